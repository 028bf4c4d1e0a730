"""ScienceQA: the accuracy of the original's eval_science_qa.py on a split of problems.json (pid_splits.json), and
its accuracy on the questions with an image ("<image>" in the answer's prompt). A question without an answer counts
as wrong, as the original counts it."""

import os
import re

from .files import by_question_id, read_answers, read_json, refuse_unknown
from .report import percent

NAME = "scienceqa"
HELP = "ScienceQA: accuracy on a split of problems.json, and on its questions with an image"
LETTERS = ("A", "B", "C", "D", "E")
THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # "." matches any character, as in the original
IMAGE_MARK = "<image>"


def parse_letter(text: str) -> str | None:
    """"A"; "A. ..." (a letter, a period and a space); or the one letter of a single "The answer is X?"."""
    if text in LETTERS:
        return text
    if len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        return text[0]
    found = THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def read_split(problems: str | os.PathLike, pid_splits: str | os.PathLike, split: str) -> dict[str, dict]:
    """The problems of one split, by problem id, each with its `choices` and the index of its `answer`."""
    splits = read_json(pid_splits, "ScienceQA split file", dict)
    if not isinstance(splits.get(split), list):
        raise ValueError(f"ScienceQA split file {pid_splits} has no split {split!r} (it has {sorted(splits)})")
    all_problems = read_json(problems, "ScienceQA problems file", dict)
    refuse_unknown(splits[split], all_problems, pid_splits, problems)
    chosen = {}
    for problem_id in splits[split]:
        problem = all_problems[problem_id]
        if not (isinstance(problem, dict) and isinstance(problem.get("choices"), list)
                and isinstance(problem.get("answer"), int)):  # fmt: skip
            raise ValueError(f"ScienceQA problems file {problems} problem {problem_id!r} has no 'choices' list and "
                             "'answer' index")  # fmt: skip
        chosen[problem_id] = problem
    return chosen


def score_scienceqa(
    answers: str | os.PathLike, problems: str | os.PathLike, pid_splits: str | os.PathLike, split: str = "test"
) -> dict:
    """Scores a ScienceQA answers file (`question_id`: the problem id, `prompt`, `text`) on `split`."""
    split_problems = read_split(problems, pid_splits, split)
    records = read_answers(answers, prompt=str)
    answered = by_question_id(records, answers, key=lambda record: str(record["question_id"]))
    refuse_unknown(answered, split_problems, answers, f"{pid_splits} (split {split!r})")
    correct = image_questions = image_correct = 0
    for problem_id, problem in split_problems.items():
        record = answered.get(problem_id, {"text": "FAILED", "prompt": ""})
        letter = parse_letter(record["text"])
        right = letter in LETTERS[: len(problem["choices"])] and LETTERS.index(letter) == problem["answer"]
        has_image = IMAGE_MARK in record["prompt"]
        correct += right
        image_questions += has_image
        image_correct += right and has_image
    return {
        "benchmark": NAME,
        "split": split,
        "questions": len(split_problems),
        "unanswered": len(split_problems) - len(answered),
        "correct": correct,
        "accuracy": percent(correct, len(split_problems)),
        "image_questions": image_questions,
        "image_accuracy": percent(image_correct, image_questions),
    }


def add_arguments(parser):
    parser.add_argument("--annotations", required=True, help="ScienceQA's problems.json")
    parser.add_argument("--pid-splits", required=True, help="ScienceQA's pid_splits.json")
    parser.add_argument("--split", default="test", help="the split to score (default: test)")


def from_args(args) -> dict:
    return score_scienceqa(args.answers, args.annotations, args.pid_splits, args.split)
