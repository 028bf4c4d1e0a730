"""POPE: yes/no object hallucination, scored per category (adversarial, popular, random) like the original's
eval_pope.py: accuracy, precision, recall, F1 (of "yes") and the share of "yes" answers."""

import os
from pathlib import Path

from .files import (
    QUESTION_ID,
    by_question_id,
    existing_folder,
    read_answers,
    read_jsonl,
    refuse_unanswered,
    refuse_unknown,
)
from .report import percent

NAME = "pope"
HELP = "POPE: accuracy, precision, recall, F1 and yes-ratio per category"
LABEL_FILE_PREFIX, LABEL_FILE_SUFFIX = "coco_pope_", ".json"


def says_no(text: str) -> bool:
    """The original's reading: only the first sentence counts; it is "no" when one of its words (split at spaces,
    commas dropped) is exactly "No", "no" or "not", and "yes" otherwise ("Not sure" reads as yes)."""
    first_sentence = text.split(".")[0]
    return any(word in ("No", "no", "not") for word in first_sentence.replace(",", "").split(" "))


def confusion_metrics(predictions: list[bool], labels: list[bool]) -> dict:
    """Counts and percentages of yes (True) predictions against yes labels. Precision, recall and F1 are 0 when
    their denominator is (the original divides by zero there)."""
    pairs = list(zip(predictions, labels))
    tp, fp = pairs.count((True, True)), pairs.count((True, False))
    tn, fn = pairs.count((False, False)), pairs.count((False, True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "questions": len(pairs), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": percent(tp + tn, len(pairs)), "precision": 100 * precision, "recall": 100 * recall,
        "f1": 100 * f1, "yes_ratio": percent(predictions.count(True), len(predictions)),
    }  # fmt: skip


def label_files(annotation_dir: Path) -> dict[str, Path]:
    """coco_pope_{category}.json of the annotation folder, by category."""
    files = {
        path.name[len(LABEL_FILE_PREFIX) : -len(LABEL_FILE_SUFFIX)]: path
        for path in sorted(annotation_dir.iterdir())
        if path.name.startswith(LABEL_FILE_PREFIX) and path.name.endswith(LABEL_FILE_SUFFIX)
    }
    if not files:
        raise ValueError(f"annotation folder {annotation_dir} holds no {LABEL_FILE_PREFIX}<category>.json file")
    return files


def read_labels(path: Path) -> list[bool]:
    labels = []
    for number, record in enumerate(read_jsonl(path, "POPE annotation file", {"label": str}), start=1):
        if record["label"] not in ("yes", "no"):
            raise ValueError(f"POPE annotation file {path} record {number}: label {record['label']!r}, expected yes/no")
        labels.append(record["label"] == "yes")
    return labels


def score_pope(answers: str | os.PathLike, questions: str | os.PathLike, annotation_dir: str | os.PathLike) -> dict:
    """Scores a POPE answers file against the question file (its `category` fields) and the annotation folder
    (coco_pope_{category}.json, one label a line). The answers of a category are paired with its labels in the
    question file's order, as the original pairs them."""
    annotation_dir = existing_folder(annotation_dir, "POPE annotation folder")
    question_records = read_jsonl(questions, "POPE question file", {"question_id": QUESTION_ID, "category": str})
    answer_texts = {key: record["text"] for key, record in by_question_id(read_answers(answers), answers).items()}
    refuse_unknown(answer_texts, (record["question_id"] for record in question_records), answers, questions)
    files = label_files(annotation_dir)
    answered_categories = {record["category"] for record in question_records if record["question_id"] in answer_texts}
    unlabelled = sorted(answered_categories - set(files))
    if unlabelled:
        raise ValueError(f"answers file {answers} answers category {unlabelled[0]!r}, which has no "
                         f"{LABEL_FILE_PREFIX}{unlabelled[0]}{LABEL_FILE_SUFFIX} in {annotation_dir}")  # fmt: skip
    categories = {}
    for category, path in files.items():
        ids = [record["question_id"] for record in question_records if record["category"] == category]
        refuse_unanswered(ids, answer_texts, answers, f"{questions} (category {category})")
        labels = read_labels(path)
        if len(labels) != len(ids):
            raise ValueError(f"{path} holds {len(labels)} labels but {questions} has {len(ids)} questions of category "
                             f"{category!r}: the two files must list the same questions in the same order")  # fmt: skip
        categories[category] = confusion_metrics([not says_no(answer_texts[i]) for i in ids], labels)
    averaged = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    average = {name: sum(row[name] for row in categories.values()) / len(categories) for name in averaged}
    return {"benchmark": NAME, "categories": categories, "average": average}


def add_arguments(parser):
    parser.add_argument("--questions", required=True, help="the question file (llava_pope_test.jsonl)")
    parser.add_argument("--annotation-dir", required=True, help="the folder of coco_pope_{category}.json files")


def from_args(args) -> dict:
    return score_pope(args.answers, args.questions, args.annotation_dir)
