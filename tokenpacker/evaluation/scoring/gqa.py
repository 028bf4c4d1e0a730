"""GQA: the predictions file of the original's convert_gqa_for_eval.py (testdev_balanced_predictions.json: the
answer lower-cased, trailing periods removed) and the exact-match accuracy of GQA's eval.py over the balanced
questions, with its binary/open split and its accuracy per structural and semantic type."""

import os
from collections import defaultdict

from .files import (
    add_output_arguments,
    by_question_id,
    read_answers,
    read_json,
    refuse_unanswered,
    refuse_unknown,
    write_json,
)
from .report import percent

NAME = "gqa"
HELP = "GQA: exact-match accuracy against testdev_balanced_questions.json, and the predictions file"


def prediction_of(text: str) -> str:
    return text.rstrip(".").lower()


def read_questions(path: str | os.PathLike) -> dict[str, dict]:
    """GQA's questions file ({question id: {"answer", "isBalanced", "types": {"structural", "semantic"}}})."""
    questions = read_json(path, "GQA questions file", dict)
    for question_id, question in questions.items():
        if not isinstance(question, dict) or not isinstance(question.get("answer"), str):
            raise ValueError(f"GQA questions file {path} question {question_id!r} has no answer: the test split "
                             "has none; score testdev_balanced_questions.json")  # fmt: skip
        types = question.get("types")
        if not (isinstance(types, dict) and {"structural", "semantic"} <= types.keys() and "isBalanced" in question):
            raise ValueError(f"GQA questions file {path} question {question_id!r} has no 'isBalanced' or no "
                             "structural and semantic 'types'")  # fmt: skip
    return questions


def score_gqa(
    answers: str | os.PathLike,
    annotations: str | os.PathLike,
    output: str | os.PathLike | None = None,
    force: bool = False,
) -> dict:
    """Scores a GQA answers file against GQA's questions file (every balanced question answered); with `output`,
    also writes the predictions file GQA's eval.py reads."""
    records = read_answers(answers)
    predictions = {key: prediction_of(record["text"]) for key, record in by_question_id(
        records, answers, key=lambda record: str(record["question_id"])).items()}  # fmt: skip
    gqa_questions = read_questions(annotations)
    refuse_unknown(predictions, gqa_questions, answers, annotations)
    balanced = {key: question for key, question in gqa_questions.items() if question["isBalanced"]}
    refuse_unanswered(balanced, predictions, answers, annotations)
    scores = defaultdict(list)
    structural, semantic = defaultdict(list), defaultdict(list)
    for key, question in balanced.items():
        correct = predictions[key] == question["answer"]
        scores["accuracy"].append(correct)
        scores["open" if question["types"]["structural"] == "query" else "binary"].append(correct)
        structural[question["types"]["structural"]].append(correct)
        semantic[question["types"]["semantic"]].append(correct)
    results = {"benchmark": NAME, "questions": len(balanced)}
    results |= {name: percent(sum(scores[name]), len(scores[name])) for name in ("accuracy", "binary", "open")}
    for name, groups in (("structural_types", structural), ("semantic_types", semantic)):
        results[name] = {
            kind: {"questions": len(group), "accuracy": percent(sum(group), len(group))}
            for kind, group in sorted(groups.items())
        }
    if output is not None:
        written = [{"questionId": record["question_id"], "prediction": prediction_of(record["text"])}
                   for record in records]  # fmt: skip
        results["predictions"] = str(write_json(output, written, [answers, annotations], force))
    return results


def add_arguments(parser):
    parser.add_argument("--annotations", required=True, help="GQA's questions file (testdev_balanced_questions.json)")
    add_output_arguments(parser, required=False, help="write the predictions file for GQA's eval.py here (.json)")


def from_args(args) -> dict:
    return score_gqa(args.answers, args.annotations, args.output, args.force)
