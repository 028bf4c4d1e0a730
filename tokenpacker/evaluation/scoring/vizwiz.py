"""VizWiz: the submission file of the original's convert_vizwiz_for_submission.py (one normalized answer per
question of the split file, by image; the prompt asks for "Unanswerable", which normalizes to "unanswerable") and,
given the validation annotations, the VQA accuracy."""

import os

from .answers import human_answers_by, normalize_answer, vqa_accuracy
from .files import (
    QUESTION_ID,
    add_output_arguments,
    by_question_id,
    read_answers,
    read_json,
    read_jsonl,
    refuse_unanswered,
    refuse_unknown,
    write_json,
)
from .report import percent

NAME = "vizwiz"
HELP = "VizWiz: the evaluation server's submission file, and VQA accuracy against validation annotations"
UNANSWERABLE = "unanswerable"


def read_annotations(path: str | os.PathLike) -> dict[str, list[str]]:
    """The human answers of a VizWiz annotation file (val.json: [{"image", "answers"}, ...]) by image."""
    return human_answers_by(read_json(path, "VizWiz annotation file", list), "image", f"VizWiz annotation file {path}")


def score_vizwiz(
    answers: str | os.PathLike,
    questions: str | os.PathLike,
    output: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
    force: bool = False,
) -> dict:
    """Writes the submission for the split file `questions` (llava_test.jsonl), every question answered; with
    `annotations` (the questions' images must be annotated), scores the answers."""
    split = read_jsonl(questions, "VizWiz question file", {"question_id": QUESTION_ID, "image": str})
    answered = by_question_id(read_answers(answers), answers)
    refuse_unknown(answered, (question["question_id"] for question in split), answers, questions)
    refuse_unanswered((question["question_id"] for question in split), answered, answers, questions)
    submission = [
        {"image": question["image"], "answer": normalize_answer(answered[question["question_id"]]["text"])}
        for question in split
    ]
    results = {
        "benchmark": NAME,
        "questions": len(split),
        "unanswerable": percent(sum(entry["answer"] == UNANSWERABLE for entry in submission), len(submission)),
    }
    if annotations is not None:
        human_answers = read_annotations(annotations)
        unannotated = [question["image"] for question in split if question["image"] not in human_answers]
        if unannotated:
            raise ValueError(f"VizWiz annotation file {annotations} has no answers for {len(unannotated)} image(s) of "
                             f"{questions}, e.g. {unannotated[0]}: score the split that it annotates")  # fmt: skip
        scores = [
            vqa_accuracy(answered[question["question_id"]]["text"], human_answers[question["image"]])
            for question in split
        ]
        results["accuracy"] = percent(sum(scores), len(scores))
    results["submission"] = str(write_json(output, submission, [answers, questions, annotations], force))
    return results


def add_arguments(parser):
    parser.add_argument("--questions", required=True, help="the split file (llava_test.jsonl)")
    parser.add_argument("--annotations", help="VizWiz annotations with answers (val.json) to score with")
    add_output_arguments(parser, required=True, help="the submission file to write (.json)")


def from_args(args) -> dict:
    return score_vizwiz(args.answers, args.questions, args.output, args.annotations, args.force)
