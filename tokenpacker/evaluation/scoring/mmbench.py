"""MMBench: the submission table of the original's convert_mmbench_for_submission.py and, where the TSV holds the
answers (the dev split), the accuracy with MMBench's circular evaluation: a question counts only when every answer
to it is right, over its rounds of rotated options (answers with round_id 1, 2, ...) and over the TSV's rotated copies
(index + k * 1,000,000). A prediction's letter is read by MMBench's matching rules (before its ChatGPT step)."""

import csv
import importlib.util
import os
import string
from collections import defaultdict
from pathlib import Path

from .files import (
    add_output_arguments,
    by_question_id,
    read_answers,
    read_tsv,
    refuse_unanswered,
    refuse_unknown,
    write_output,
)
from .report import percent

NAME = "mmbench"
HELP = "MMBench: the submission table (.xlsx or .tsv), and circular accuracy on the dev split"
DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
PREDICTION_COLUMN_POSITION = 6
COPY_STRIDE = 1_000_000  # the TSV's rotated copies of question i have the indices i + k * COPY_STRIDE
MATCH_SEPARATORS = ".()[],:;!*#{}"


def infer_letter(prediction: str, options: list[str]) -> str | None:
    """The letter of the option a prediction names: the one option letter among its words (unless it is "A" in a
    sentence of more than three words, likely the article), else the one option whose text it contains."""
    letters = string.ascii_uppercase[: len(options)]
    words = prediction
    for separator in MATCH_SEPARATORS:
        words = words.replace(separator, " ")
    words = words.split()
    named = [letter for letter in letters if letter in words]
    if len(named) == 1 and not ("A" in words and len(words) > 3):
        return named[0]
    containing = [letter for letter, option in zip(letters, options) if str(option).lower() in prediction.lower()]
    return containing[0] if len(containing) == 1 else None


def answer_is_right(record: dict, truth: str) -> bool:
    """`options` are the options as the round showed them (lettered A, B, ...), `option_char` their letters in the
    TSV: a prediction is right when the option it names is the TSV's answer."""
    letter = infer_letter(record["text"], record["options"])
    return letter is not None and record["option_char"][string.ascii_uppercase.index(letter)] == truth


def question_results(rows: list[dict], rounds: dict[int, list[dict]]) -> dict[int, tuple[bool, dict]]:
    """Per question (TSV index modulo COPY_STRIDE): whether every answer to every copy is right, and its first row."""
    questions = {}
    for row in rows:
        right = all(answer_is_right(record, row["answer"]) for record in rounds[row["index"]])
        all_right, first_row = questions.get(row["index"] % COPY_STRIDE, (True, row))
        questions[row["index"] % COPY_STRIDE] = (all_right and right, first_row)
    return questions


def accuracy_by(questions: dict[int, tuple[bool, dict]], column: str) -> dict:
    groups = defaultdict(list)
    for right, row in questions.values():
        groups[row[column]].append(right)
    return {name: {"questions": len(rights), "accuracy": percent(sum(rights), len(rights))}
            for name, rights in sorted(groups.items())}  # fmt: skip


def read_rows(path: str | os.PathLike) -> tuple[list[str], list[dict]]:
    header, rows = read_tsv(path, "MMBench TSV", ["index", "question", "A", "B"])
    for number, row in enumerate(rows, start=2):
        try:
            row["index"] = int(row["index"])
        except ValueError:
            raise ValueError(f"MMBench TSV {path} line {number}: index {row['index']!r} is not a number") from None
    return header, rows


def submission_table(header: list[str], rows: list[dict], predictions: dict[int, str]) -> list[list]:
    columns = [column for column in header if column not in DROPPED_COLUMNS]
    columns.insert(min(PREDICTION_COLUMN_POSITION, len(columns)), "prediction")
    rows = [{**row, "prediction": predictions[row["index"]]} for row in rows]
    return [columns] + [[row[column] for column in columns] for row in rows]


def write_table(table: list[list], path: Path):
    """.xlsx (openpyxl, the `eval` extra) or .tsv, as `path` is named."""
    if path.suffix == ".xlsx":
        from openpyxl import Workbook

        workbook = Workbook()
        for line in table:
            workbook.active.append([None if cell in ("", None) else cell for cell in line])
        workbook.save(path)
    else:
        with open(path, "w", newline="", encoding="utf-8") as file:
            csv.writer(file, delimiter="\t", lineterminator="\n").writerows(table)


def check_output_name(output: Path):
    if output.suffix not in (".xlsx", ".tsv"):
        raise ValueError(f"the output {output} must be named .xlsx (MMBench's upload format) or .tsv")
    if output.suffix == ".xlsx" and importlib.util.find_spec("openpyxl") is None:
        raise ValueError(f"writing {output} needs openpyxl (pip install 'tokenpacker[eval]'); a .tsv output does not")


def score_mmbench(
    answers: str | os.PathLike,
    annotations: str | os.PathLike,
    output: str | os.PathLike | None = None,
    force: bool = False,
) -> dict:
    """Scores an MMBench answers file (`question_id`: the TSV's index, `round_id`, `options`, `option_char`,
    `text`) against the TSV; with `output` (.xlsx or .tsv), writes the submission of the round-0 answers."""
    if output is not None:
        check_output_name(Path(output))
    header, rows = read_rows(annotations)
    records = read_answers(answers, question_id=int, round_id=int, options=list, option_char=list)
    by_round = by_question_id(records, answers, key=lambda record: (record["question_id"], record["round_id"]))
    indices = [row["index"] for row in rows]
    refuse_unknown({record["question_id"] for record in records}, indices, answers, annotations)
    first_answered = {index for index, round_id in by_round if round_id == 0}
    refuse_unanswered(indices, first_answered, answers, f"{annotations} (round 0)")
    rounds = defaultdict(list)
    for record in records:
        if len(record["options"]) != len(record["option_char"]):
            raise ValueError(f"answers file {answers} question {record['question_id']}: 'options' and 'option_char' "
                             "differ in length")  # fmt: skip
        rounds[record["question_id"]].append(record)
    results = {"benchmark": NAME, "rows": len(rows)}
    with_answers = [row for row in rows if row.get("answer")]
    if with_answers and len(with_answers) != len(rows):
        raise ValueError(f"MMBench TSV {annotations} has answers for {len(with_answers)} of its {len(rows)} rows")
    if with_answers:
        questions = question_results(rows, rounds)
        first_rounds = [answer_is_right(by_round[row["index"], 0], row["answer"]) for row in rows]
        results["questions"] = len(questions)
        results["accuracy"] = percent(sum(right for right, _ in questions.values()), len(questions))
        results["single_answer_accuracy"] = percent(sum(first_rounds), len(rows))
        for column, name in (("category", "categories"), ("l2-category", "l2_categories")):
            if column in header:
                results[name] = accuracy_by(questions, column)
    elif output is None:
        raise ValueError(f"MMBench TSV {annotations} holds no answers (a test split): give an output to write the "
                         "submission")  # fmt: skip
    if output is not None:
        table = submission_table(header, rows, {row["index"]: by_round[row["index"], 0]["text"] for row in rows})
        written = write_output(output, lambda path: write_table(table, path), [answers, annotations], force)
        results["submission"] = str(written)
    return results


def add_arguments(parser):
    parser.add_argument("--annotations", required=True, help="the MMBench TSV (mmbench_dev_20230712.tsv)")
    add_output_arguments(
        parser, required=False, help="write the submission here (.xlsx needs openpyxl; .tsv works always)"
    )


def from_args(args) -> dict:
    return score_mmbench(args.answers, args.annotations, args.output, args.force)
