"""VQAv2: the submission file of the original's convert_vqav2_for_submission.py (every question of the split file,
answers normalized like EvalAI, "" for the questions not answered) and, given annotations, the VQA accuracy."""

import os

from .answers import human_answers_by, normalize_answer, vqa_accuracy
from .files import (
    QUESTION_ID,
    add_output_arguments,
    by_question_id,
    read_answers,
    read_json,
    read_jsonl,
    refuse_unknown,
    write_json,
)
from .report import percent

NAME = "vqav2"
HELP = "VQAv2: the evaluation server's submission file, and VQA accuracy on annotated questions"


def read_annotations(path: str | os.PathLike) -> dict:
    """The human answers of a VQAv2 annotation file ({"annotations": [{"question_id", "answers"}, ...]})."""
    document = read_json(path, "VQAv2 annotation file", dict)
    if not isinstance(document.get("annotations"), list):
        raise ValueError(f"VQAv2 annotation file {path} has no 'annotations' list")
    return human_answers_by(document["annotations"], "question_id", f"VQAv2 annotation file {path} annotations")


def score_vqav2(
    answers: str | os.PathLike,
    questions: str | os.PathLike,
    output: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
    force: bool = False,
) -> dict:
    """Writes the submission for the split file `questions` (llava_vqav2_mscoco_test2015.jsonl: the test-dev answers
    fill their questions, the others get ""); with `annotations`, scores the answered questions."""
    split = read_jsonl(questions, "VQAv2 question file", {"question_id": QUESTION_ID})
    answered = by_question_id(read_answers(answers), answers)
    refuse_unknown(answered, (question["question_id"] for question in split), answers, questions)
    results = {"benchmark": NAME, "questions": len(split), "answered": len(answered)}
    if annotations is not None:
        human_answers = read_annotations(annotations)
        refuse_unknown(answered, human_answers, answers, annotations)
        scores = [vqa_accuracy(record["text"], human_answers[key]) for key, record in answered.items()]
        results["accuracy"] = percent(sum(scores), len(scores))
    submission = [
        {"question_id": question["question_id"],
         "answer": normalize_answer(answered[question["question_id"]]["text"]) if question["question_id"] in answered
         else ""}
        for question in split
    ]  # fmt: skip
    results["submission"] = str(write_json(output, submission, [answers, questions, annotations], force))
    return results


def add_arguments(parser):
    parser.add_argument("--questions", required=True, help="the split file (llava_vqav2_mscoco_test2015.jsonl)")
    parser.add_argument("--annotations", help="VQAv2 annotations (v2_mscoco_val2014_annotations.json) to score with")
    add_output_arguments(parser, required=True, help="the submission file to write (.json)")


def from_args(args) -> dict:
    return score_vqav2(args.answers, args.questions, args.output, args.annotations, args.force)
