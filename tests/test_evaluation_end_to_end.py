"""`tokenpacker-eval generate` then `tokenpacker-eval score`, as a user runs them, on the shipped tiny-shapes model.

The question and annotation files are written in VQAv2's own formats from held-out scenes: the free-form questions
on the shape's colour and position as a split file, and annotations in which ten annotators all gave the scene's
true answer. The scores are checked against accuracies counted here from the answers file and the scenes' answers.
"""

import json
import subprocess
import sys

import pytest

from tokenpacker.shapes import PRETRAINED, render_scene

NUM_SCENES = 20
QUESTIONS = {"colour": "What colour is the shape?", "position": "Where is the shape?"}  # the scene's attributes
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
    questions, annotations, truths = [], [], {}
    for index in range(NUM_SCENES):
        scene = render_scene("test", index)
        image = f"test-{index}.png"
        scene.image.save(folder / "images" / image)
        for attribute, question in QUESTIONS.items():
            question_id, answer = len(questions), getattr(scene, attribute)
            questions.append({"question_id": question_id, "image": image, "text": question, "category": attribute})
            annotations.append({
                "question_id": question_id, "image_id": index, "question_type": attribute, "answer_type": "other",
                "multiple_choice_answer": answer, "answers": human_answers(answer),
            })  # fmt: skip
            truths[question_id] = answer
    write_jsonl(folder / "vqa_questions.jsonl", questions)
    (folder / "vqa_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return folder, truths


def read_answers(path) -> dict:
    return {record["question_id"]: record["text"] for record in map(json.loads, path.read_text().splitlines())}


def test_open_questions_are_answered_and_scored_like_vqav2(benchmark_files):
    folder, truths = benchmark_files
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
