"""MME: the original's convert_answer_to_mme.py and MME's eval_tool/calculation.py in one step. Per category,
accuracy over the questions and accuracy+ over the images (both of an image's two questions right); a category's
score is accuracy + accuracy+ (in percent, up to 200), perception sums its 10 categories and cognition its 4."""

import os
from collections import defaultdict
from pathlib import Path

from .files import existing_folder, read_answers, read_text
from .report import percent

NAME = "mme"
HELP = "MME: perception and cognition scores (accuracy + accuracy+ per category, summed)"
GROUPS = {
    "perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"],
    "cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}  # fmt: skip
SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_OR_NO = "Please answer yes or no."
QUESTIONS_PER_IMAGE = 2


def read_ground_truth(folder: Path) -> dict[tuple[str, str, str], str]:
    """MME_Benchmark_release_version: {category}/[questions_answers_YN/]{image}.txt, "question<TAB>answer" lines,
    by (category, file name, question)."""
    ground_truth = {}
    for category_folder in sorted(path for path in folder.iterdir() if path.is_dir()):
        answers_folder = category_folder / "questions_answers_YN"
        for path in sorted((answers_folder if answers_folder.is_dir() else category_folder).glob("*.txt")):
            for number, line in enumerate(read_text(path, "MME answer file").splitlines(), start=1):
                fields = line.strip().split("\t")
                if len(fields) != 2 or fields[1].lower() not in ("yes", "no"):
                    raise ValueError(f"MME answer file {path} line {number} is not 'question<TAB>yes|no': {line!r}")
                ground_truth[category_folder.name, path.name, fields[0]] = fields[1].lower()
    if not ground_truth:
        raise ValueError(f"MME folder {folder} holds no {{category}}/questions_answers_YN/*.txt answer files")
    return ground_truth


def question_of_prompt(prompt: str, ground_truth: dict, category: str, file_name: str) -> str:
    """The prompt as MME's files write the question: without the short-answer instruction, with " Please answer
    yes or no." (two spaces before it where MME's file has two)."""
    question = prompt.replace(SHORT_ANSWER, "").strip() if SHORT_ANSWER in prompt else prompt
    if YES_OR_NO not in question:
        question = f"{question} {YES_OR_NO}"
        if (category, file_name, question) not in ground_truth:
            question = question.replace(f" {YES_OR_NO}", f"  {YES_OR_NO}")
    return question


def read_yes_no(text: str) -> str:
    """MME's reading: "yes"/"no" as they are, else "yes" or "no" within the first 4 characters, else "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def category_scores(images: dict[str, list[tuple[str, str]]]) -> dict:
    pairs = [pair for image_pairs in images.values() for pair in image_pairs]
    accuracy = sum(truth == read_yes_no(text) for truth, text in pairs) / len(pairs)
    accuracy_plus = sum(all(truth == read_yes_no(text) for truth, text in image_pairs)
                        for image_pairs in images.values()) / len(images)  # fmt: skip
    return {
        "images": len(images), "questions": len(pairs),
        "unparsed": sum(read_yes_no(text) == "other" for _, text in pairs),
        "accuracy": 100 * accuracy, "accuracy_plus": 100 * accuracy_plus, "score": accuracy * 100 + accuracy_plus * 100,
    }  # fmt: skip


def score_mme(answers: str | os.PathLike, annotations: str | os.PathLike) -> dict:
    """Scores an MME answers file (`question_id`: "{category}/{image file}", `prompt`, `text`) against the MME
    benchmark folder. Categories without answers are listed as missing and left out of the sums."""
    ground_truth = read_ground_truth(existing_folder(annotations, "MME folder"))
    known = {category for group in GROUPS.values() for category in group}
    by_image = defaultdict(lambda: defaultdict(list))  # category -> image -> [(truth, answer)]
    for number, record in enumerate(read_answers(answers, question_id=str, prompt=str), start=1):
        category, image = record["question_id"].split("/")[0], record["question_id"].split("/")[-1]
        if category not in known:
            raise ValueError(f"answers file {answers} answer {number}: {record['question_id']!r} is of no MME "
                             f"category (expected '<category>/<image>', category one of {sorted(known)})")  # fmt: skip
        file_name = image.split(".")[0] + ".txt"
        question = question_of_prompt(record["prompt"], ground_truth, category, file_name)
        if (category, file_name, question) not in ground_truth:
            raise ValueError(f"answers file {answers} answer {number}: {annotations}/{category} has no question "
                             f"{question!r} for {file_name}")  # fmt: skip
        by_image[category][record["question_id"]].append((ground_truth[category, file_name, question], record["text"]))
    for category, images in by_image.items():
        for image, image_pairs in images.items():
            if len(image_pairs) != QUESTIONS_PER_IMAGE:
                raise ValueError(f"answers file {answers} answers {len(image_pairs)} question(s) of {image}: MME "
                                 f"asks {QUESTIONS_PER_IMAGE} per image and accuracy+ needs both")  # fmt: skip
    results = {"benchmark": NAME}
    for group, categories in GROUPS.items():
        scored = {category: category_scores(by_image[category]) for category in categories if category in by_image}
        total = 0
        for row in scored.values():
            total += row["score"]
        results[group] = {"score": total, "categories": scored,
                          "missing": [category for category in categories if category not in scored]}  # fmt: skip
    return results


def add_arguments(parser):
    parser.add_argument("--annotations", required=True, help="the MME benchmark folder (MME_Benchmark_release_version)")


def from_args(args) -> dict:
    return score_mme(args.answers, args.annotations)
