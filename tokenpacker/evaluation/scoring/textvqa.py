"""TextVQA: the VQA accuracy of the original's eval_textvqa.py (m4c's, with EvalAI's answer normalization) against
TextVQA_0.5.1_val.json. An answer is matched to its annotation by image id (the answers' `question_id`) and the
question, read back from the prompt as the original reads it."""

import os
import re

from .answers import human_answer_texts, vqa_accuracy
from .files import read_answers, read_json
from .report import percent

NAME = "textvqa"
HELP = "TextVQA: VQA accuracy against TextVQA_0.5.1_val.json"
OCR_PROMPT_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)
REFERENCE_OCR = "Reference OCR token: "


def question_of_prompt(prompt: str) -> str | None:
    """The lower-cased question of a prompt: "OCR tokens: ... Question: {q} Short answer:"; three lines with a
    "Reference OCR token: " line (the question is the other of the first two); or "{q}\\n{instruction}"."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = OCR_PROMPT_QUESTION.search(prompt)
        question = match.group(1) if match else None
    elif REFERENCE_OCR in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith(REFERENCE_OCR.rstrip()) else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    return None if question is None else question.lower()


def read_annotations(path: str | os.PathLike) -> dict[tuple, list[str]]:
    """The human answers of TextVQA_0.5.1_val.json by (image id, lower-cased question)."""
    document = read_json(path, "TextVQA annotation file", dict)
    if not isinstance(document.get("data"), list):
        raise ValueError(f"TextVQA annotation file {path} has no 'data' list")
    annotations = {}
    for number, entry in enumerate(document["data"]):
        if not (isinstance(entry, dict) and "image_id" in entry and isinstance(entry.get("question"), str)):
            raise ValueError(f"TextVQA annotation file {path} data[{number}] has no 'image_id' and 'question'")
        where = f"TextVQA annotation file {path} data[{number}] (question {entry['question']!r})"
        annotations[entry["image_id"], entry["question"].lower()] = human_answer_texts(entry.get("answers"), where)
    return annotations


def score_textvqa(answers: str | os.PathLike, annotations: str | os.PathLike) -> dict:
    """Scores a TextVQA answers file (answers hold `prompt`, as the original's answers files do)."""
    human_answers = read_annotations(annotations)
    scores = []
    for number, record in enumerate(read_answers(answers, prompt=str), start=1):
        question = question_of_prompt(record["prompt"])
        if question is None:
            raise ValueError(
                f"answers file {answers} answer {number}: its prompt {record['prompt']!r} is none of the original's "
                f"TextVQA prompts ('OCR tokens: ... Question: ... Short answer:', 3 lines with '{REFERENCE_OCR}', or "
                "2 lines)"
            )
        key = (record["question_id"], question)
        if key not in human_answers:
            raise ValueError(f"answers file {answers} answer {number}: {annotations} has no question {question!r} "
                             f"for image {record['question_id']!r}")  # fmt: skip
        scores.append(vqa_accuracy(record["text"], human_answers[key]))
    return {"benchmark": NAME, "questions": len(scores), "accuracy": percent(sum(scores), len(scores))}


def add_arguments(parser):
    parser.add_argument("--annotations", required=True, help="TextVQA_0.5.1_val.json")


def from_args(args) -> dict:
    return score_textvqa(args.answers, args.annotations)
