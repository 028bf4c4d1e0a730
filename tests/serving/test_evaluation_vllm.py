"""`tokenpacker-eval generate --backend vllm`: the answers file of the transformers backend, through vLLM's engine."""

import json
import subprocess
import sys

from tokenpacker.evaluation.cli import main
from tokenpacker.shapes import PRETRAINED
from tokenpacker.testing import write_shapes_questions

from .helpers import REPO_ROOT, vllm_environment


def without_ids(path) -> list[dict]:
    answers = [json.loads(line) for line in path.read_text().splitlines()]
    return [{key: value for key, value in answer.items() if key != "answer_id"} for answer in answers]


def test_vllm_answers_equal_the_transformers_backend_and_resume(tmp_path):
    truths = write_shapes_questions(tmp_path, 8)
    arguments = [
        "generate", "--model-path", str(PRETRAINED), "--question-file", str(tmp_path / "questions.jsonl"),
        "--image-folder", str(tmp_path / "images"), "--dtype", "float32",
    ]  # fmt: skip
    reference = tmp_path / "transformers.jsonl"
    assert main([*arguments, "--answers-file", str(reference), "--batch-size", "4"]) == 0
    # vLLM continues a file that the transformers backend started: 3 answers are there, the rest to go, in batches of 5.
    served = tmp_path / "vllm.jsonl"
    served.write_text("".join(reference.read_text().splitlines(keepends=True)[:3]))
    command = [
        sys.executable, "-m", "tokenpacker.evaluation", *arguments, "--answers-file", str(served), "--backend", "vllm",
        "--batch-size", "5", "--enforce-eager",
    ]  # fmt: skip
    completed = subprocess.run(
        command, cwd=REPO_ROOT, env=vllm_environment(tmp_path), capture_output=True, text=True, timeout=420
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert f"Wrote {len(truths) - 3} answers" in completed.stdout

    assert without_ids(served) == without_ids(reference)
    right = sum(answer["text"] == truths[answer["question_id"]] for answer in without_ids(served))
    assert right / len(truths) >= 0.9
