"""`tokenpacker-eval generate` then `tokenpacker-eval score`, as a user runs them, on the shipped tiny-shapes model.

The question and annotation files are written in the benchmarks' own formats from held-out scenes: the open
questions (colour, position, shape) as a VQAv2 split with its annotations, the yes/no questions as POPE's question
file and per-category label files. The scores are checked against accuracies counted here from the answers file and
the scenes' true answers.
"""

import json
import subprocess
import sys

import pytest

from tokenpacker.shapes import PRETRAINED, render_scene

NUM_SCENES = 12
OPEN_KINDS = ("colour", "position", "shape")
# POPE categories: the yes/no questions of a scene come in pairs (yes, no) on the colour, the kind and the position
POPE_CATEGORIES = ("colour", "kind", "position")
TIMEOUT_S = 300


def run_eval(*arguments: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "tokenpacker.evaluation", *arguments],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def human_answers(answer: str) -> list[dict]:
    """Ten annotators who all gave `answer`, as in VQAv2's annotation files."""
    return [{"answer": answer, "answer_confidence": "yes", "answer_id": number} for number in range(1, 11)]


@pytest.fixture(scope="module")
def benchmark_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes-benchmarks")
    (folder / "images").mkdir()
    (folder / "pope").mkdir()
    vqa_questions, annotations, truths = [], [], {}
    pope_questions, pope_labels = [], {category: [] for category in POPE_CATEGORIES}
    for index in range(NUM_SCENES):
        scene = render_scene("test", index)
        image = f"test-{index}.png"
        scene.image.save(folder / "images" / image)
        for kind in OPEN_KINDS:
            ((question, answer),) = scene.questions(kind)
            question_id = len(vqa_questions)
            vqa_questions.append({"question_id": question_id, "image": image, "text": question, "category": kind})
            annotations.append({
                "question_id": question_id, "image_id": index, "question_type": kind, "answer_type": "other",
                "multiple_choice_answer": answer, "answers": human_answers(answer),
            })  # fmt: skip
            truths[question_id] = answer
        yes_no = scene.questions("yes/no")
        for category, pair in zip(POPE_CATEGORIES, (yes_no[0:2], yes_no[2:4], yes_no[4:6]), strict=True):
            for question, label in pair:
                question_id = len(pope_questions)
                pope_questions.append({"question_id": question_id, "image": image, "text": question,
                                       "category": category})  # fmt: skip
                pope_labels[category].append({"question_id": question_id, "image": image, "text": question,
                                              "label": label})  # fmt: skip
    write_jsonl(folder / "vqa_questions.jsonl", vqa_questions)
    (folder / "vqa_annotations.json").write_text(json.dumps({"annotations": annotations}))
    write_jsonl(folder / "pope" / "questions.jsonl", pope_questions)
    for category, labels in pope_labels.items():
        write_jsonl(folder / "pope" / f"coco_pope_{category}.json", labels)
    return folder, truths, pope_labels


def read_answers(path) -> dict:
    return {record["question_id"]: record["text"] for record in map(json.loads, path.read_text().splitlines())}


def test_open_questions_are_answered_and_scored_like_vqav2(benchmark_files):
    folder, truths, _ = benchmark_files
    answers_file = folder / "vqa_answers.jsonl"
    run_eval(
        "generate", "--model-path", str(PRETRAINED), "--question-file", str(folder / "vqa_questions.jsonl"),
        "--image-folder", str(folder / "images"), "--answers-file", str(answers_file), "--batch-size", "8",
        "--max-new-tokens", "8",
    )  # fmt: skip
    results = json.loads(run_eval(
        "score", "vqav2", "--answers", str(answers_file), "--questions", str(folder / "vqa_questions.jsonl"),
        "--annotations", str(folder / "vqa_annotations.json"), "--output", str(folder / "submission.json"), "--json",
    ))  # fmt: skip

    answers = read_answers(answers_file)
    assert answers.keys() == truths.keys()
    # ten annotators all gave the true answer: VQA accuracy is 1 for the true answer and 0 for anything else
    right = sum(answers[question_id].strip().lower() == truth for question_id, truth in truths.items())
    assert results["answered"] == results["questions"] == len(truths)
    assert results["accuracy"] == pytest.approx(100 * right / len(truths))
    assert results["accuracy"] >= 90
    submission = json.loads((folder / "submission.json").read_text())
    assert {entry["question_id"]: entry["answer"] for entry in submission} == {
        question_id: answer.strip().lower() for question_id, answer in answers.items()
    }


def test_yes_no_questions_are_answered_and_scored_like_pope(benchmark_files):
    folder, _, pope_labels = benchmark_files
    answers_file = folder / "pope" / "answers.jsonl"
    run_eval(
        "generate", "--model-path", str(PRETRAINED), "--question-file", str(folder / "pope" / "questions.jsonl"),
        "--image-folder", str(folder / "images"), "--answers-file", str(answers_file), "--batch-size", "16",
        "--max-new-tokens", "4",
    )  # fmt: skip
    results = json.loads(run_eval(
        "score", "pope", "--answers", str(answers_file), "--questions", str(folder / "pope" / "questions.jsonl"),
        "--annotation-dir", str(folder / "pope"), "--json",
    ))  # fmt: skip

    answers = read_answers(answers_file)
    assert set(results["categories"]) == set(POPE_CATEGORIES)
    for category, labels in pope_labels.items():
        said_yes = [answers[label["question_id"]].strip().lower().startswith("yes") for label in labels]
        truly_yes = [label["label"] == "yes" for label in labels]
        scores = results["categories"][category]
        assert scores["questions"] == len(labels) == 2 * NUM_SCENES
        assert scores["accuracy"] == pytest.approx(100 * sum(said == truth for said, truth in zip(said_yes, truly_yes)) / len(labels))
        assert scores["yes_ratio"] == pytest.approx(100 * sum(said_yes) / len(labels))
        assert scores["accuracy"] >= 90, (category, scores)
        # balanced labels: a model that says yes (or no) to everything would score 50 with a yes-ratio of 100 (or 0)
        assert 40 <= scores["yes_ratio"] <= 60
