"""`tokenpacker-eval generate` on the shipped tiny-shapes model: the original's answer format and prompts, right
answers on held-out scenes, batches equal to one question at a time, resuming after a kill, two processes, errors."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tokenpacker import TokenPackerProcessor
from tokenpacker.evaluation.cli import main
from tokenpacker.evaluation.generate import ANSWER_ID_ALPHABET, GenerationSettings, TransformersAnswerer
from tokenpacker.evaluation.questions import read_questions
from tokenpacker.shapes import PRETRAINED, render_scene
from tokenpacker.testing import write_shapes_questions

from .serving.helpers import slice_model

REPO_ROOT = Path(__file__).resolve().parents[1]
# The original's conv_vicuna_v1, "<image>\n" + question as the user turn (llava/conversation.py, model_vqa_loader.py)
ORIGINAL_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions. USER: <image>\n{question} ASSISTANT:"
)
ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
MMBENCH_ANSWER_KEYS = ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id", "model_id",
                       "metadata"]  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Every question of 10 held-out scenes as a jsonl question file, with the scenes' answers."""
    folder = tmp_path_factory.mktemp("shapes")
    truths = write_shapes_questions(folder, 10)
    return folder, truths


def generate(question_file, image_folder, answers_file, *extra, model=PRETRAINED) -> int:
    return main([
        "generate", "--model-path", str(model), "--question-file", str(question_file), "--image-folder",
        str(image_folder), "--answers-file", str(answers_file), *map(str, extra),
    ])  # fmt: skip


def read_answers(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def without_ids(answers: list[dict]) -> list[dict]:
    return [{key: value for key, value in answer.items() if key != "answer_id"} for answer in answers]


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory):
    """The answers of one uninterrupted run, one question at a time (the original's procedure)."""
    folder, _ = shapes
    answers_file = tmp_path_factory.mktemp("reference") / "answers.jsonl"
    assert generate(folder / "questions.jsonl", folder / "images", answers_file) == 0
    return answers_file


def test_answers_are_right_and_in_the_original_format(shapes, reference):
    folder, truths = shapes
    answers = read_answers(reference)
    questions = read_answers(folder / "questions.jsonl")

    assert [answer["question_id"] for answer in answers] == [question["question_id"] for question in questions]
    assert all(list(answer) == ANSWER_KEYS for answer in answers)
    assert [answer["prompt"] for answer in answers] == [question["text"] for question in questions]
    assert {answer["model_id"] for answer in answers} == {"tiny-shapes"}
    assert all(answer["metadata"] == {} for answer in answers)
    ids = [answer["answer_id"] for answer in answers]
    assert len(set(ids)) == len(ids) and all(len(i) == 22 and set(i) <= set(ANSWER_ID_ALPHABET) for i in ids)
    right = sum(answer["text"] == truths[answer["question_id"]] for answer in answers)
    assert right / len(answers) >= 0.9, [(a["prompt"], a["text"], truths[a["question_id"]]) for a in answers]


def test_prompts_are_the_original_vicuna_v1_prompts(shapes, monkeypatch):
    folder, _ = shapes
    questions = read_questions(folder / "questions.jsonl", folder / "images")[:3]
    settings = GenerationSettings(max_new_tokens=8)
    answerer = TransformersAnswerer(PRETRAINED, settings, torch.device("cpu"), torch.float32)
    seen = []
    generate_ids = answerer.model.generate
    monkeypatch.setattr(answerer.model, "generate", lambda **inputs: seen.append(inputs) or generate_ids(**inputs))
    answerer.answer(questions)

    processor = TokenPackerProcessor.from_pretrained(PRETRAINED)
    expected = processor(
        images=[question.load_image() for question in questions],
        text=[ORIGINAL_PROMPT.format(question=question.text) for question in questions],
        return_tensors="pt",
    )
    assert torch.equal(seen[0]["input_ids"], expected["input_ids"])
    assert torch.equal(seen[0]["attention_mask"], expected["attention_mask"])
    assert torch.equal(seen[0]["pixel_values"], expected["pixel_values"])
    assert seen[0]["attention_mask"][:, 0].tolist().count(0) >= 1  # prompts of two lengths: left padding in play


def test_batches_answer_like_one_question_at_a_time(shapes, reference, tmp_path):
    folder, _ = shapes
    batched = tmp_path / "batched.jsonl"
    assert generate(folder / "questions.jsonl", folder / "images", batched, "--batch-size", 5) == 0
    assert without_ids(read_answers(batched)) == without_ids(read_answers(reference))


def test_slice_batches_with_different_grids_answer_like_one_at_a_time(tmp_path):
    model = slice_model(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for index, size in enumerate([(336, 336), (672, 336), (336, 1008), (1008, 672)]):
        render_scene("test", index).image.resize(size).save(images / f"{index}.png")
        for question, _ in render_scene("test", index).questions():
            lines.append(json.dumps({"question_id": f"q{len(lines)}", "image": f"{index}.png", "text": question}))
    (tmp_path / "questions.jsonl").write_text("\n".join(lines) + "\n")
    image_processor = TokenPackerProcessor.from_pretrained(model).image_processor
    grids = [image_processor(images / f"{index}.png")["image_grids"][0].tolist() for index in range(4)]
    assert grids == [[1, 1], [1, 2], [3, 1], [2, 3]]  # 1, 3, 4 and 7 crops with the thumbnails

    one, batched = tmp_path / "one.jsonl", tmp_path / "batched.jsonl"
    assert generate(tmp_path / "questions.jsonl", images, one, model=model) == 0
    assert generate(tmp_path / "questions.jsonl", images, batched, "--batch-size", 4, model=model) == 0
    assert without_ids(read_answers(batched)) == without_ids(read_answers(one))
    assert len(read_answers(one)) == len(lines)


@pytest.mark.parametrize("cut", ["inside line 3", "after line 5", "inside the last line"])
def test_a_torn_last_line_is_dropped_and_the_rest_kept(shapes, reference, tmp_path, cut):
    folder, _ = shapes
    content = reference.read_bytes()
    ends = [index + 1 for index, byte in enumerate(content) if byte == ord("\n")]
    offset = {"inside line 3": ends[1] + 10, "after line 5": ends[4], "inside the last line": len(content) - 5}[cut]
    answers_file = tmp_path / "answers.jsonl"
    answers_file.write_bytes(content[:offset])
    kept = content[: max(end for end in [0, *ends] if end <= offset)]

    assert generate(folder / "questions.jsonl", folder / "images", answers_file, "--batch-size", 8) == 0
    resumed = answers_file.read_bytes()
    assert resumed.startswith(kept)  # complete lines stay as they were, answer ids included
    assert without_ids(read_answers(answers_file)) == without_ids(read_answers(reference))


def test_a_finished_file_is_left_as_it_is(shapes, reference, tmp_path, capsys):
    folder, _ = shapes
    answers_file = tmp_path / "answers.jsonl"
    answers_file.write_bytes(reference.read_bytes())
    assert generate(folder / "questions.jsonl", folder / "images", answers_file) == 0
    assert answers_file.read_bytes() == reference.read_bytes()
    assert "are answered in" in capsys.readouterr().out


def test_a_killed_run_continues_to_the_uninterrupted_answers(shapes, reference, tmp_path, capsys):
    folder, _ = shapes
    answers_file = tmp_path / "answers.jsonl"
    command = [
        sys.executable, "-m", "tokenpacker.evaluation", "generate", "--model-path", str(PRETRAINED),
        "--question-file", str(folder / "questions.jsonl"), "--image-folder", str(folder / "images"),
        "--answers-file", str(answers_file),
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if answers_file.exists() and answers_file.read_bytes().count(b"\n") >= 3:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    written = answers_file.read_bytes().count(b"\n")
    assert 3 <= written < len(read_answers(reference))

    assert generate(folder / "questions.jsonl", folder / "images", answers_file) == 0
    assert f"({written} were there already)" in capsys.readouterr().out
    assert without_ids(read_answers(answers_file)) == without_ids(read_answers(reference))


def test_two_processes_write_one_file_like_one_process(shapes, reference, tmp_path):
    folder, _ = shapes
    answers_file = tmp_path / "answers.jsonl"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
        "tokenpacker.evaluation", "generate",
        "--model-path", str(PRETRAINED), "--question-file", str(folder / "questions.jsonl"), "--image-folder",
        str(folder / "images"), "--answers-file", str(answers_file), "--batch-size", "3",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "(2 processes, batches of 3)" in completed.stderr
    assert without_ids(read_answers(answers_file)) == without_ids(read_answers(reference))


def test_mmbench_rounds_rotate_the_options_and_carry_the_original_fields(tmp_path):
    rows = []
    for index in range(2):
        scene = render_scene("test", index)
        buffer = io.BytesIO()
        scene.image.save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        hint = "A scene of one shape." if index == 0 else "nan"
        options = ["red", "green", "blue"] if index == 0 else ["top", "bottom", "", ""]
        rows.append([str(10 + index), "What colour is the shape?", hint, image, *options, *([""] * (4 - len(options)))])
    header = ["index", "question", "hint", "image", "A", "B", "C", "D"]
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text("\n".join("\t".join(row) for row in [header, *rows]) + "\n")
    answers_file = tmp_path / "answers.jsonl"

    assert generate(tsv, "", answers_file, "--all-rounds", "--single-pred-prompt", "--max-new-tokens", 4) == 0

    answers = read_answers(answers_file)
    assert all(list(answer) == MMBENCH_ANSWER_KEYS for answer in answers)
    assert [(a["question_id"], a["round_id"]) for a in answers] == [(10, 0), (10, 1), (10, 2), (11, 0), (11, 1)]
    assert answers[0]["prompt"] == "A scene of one shape.\nWhat colour is the shape?\nA. red\nB. green\nC. blue"
    assert answers[1]["prompt"] == "A scene of one shape.\nWhat colour is the shape?\nA. green\nB. blue\nC. red"
    assert answers[1]["options"] == ["green", "blue", "red"] and answers[1]["option_char"] == ["B", "C", "A"]
    assert answers[4]["prompt"] == "What colour is the shape?\nA. bottom\nB. top"
    questions = read_questions(tsv, single_pred_prompt=True, all_rounds=True, lang="cn")
    assert questions[0].text == answers[0]["prompt"] + "\n请直接回答选项字母。"


def test_scienceqa_questions_with_and_without_an_image(tmp_path):
    (tmp_path / "images").mkdir()
    render_scene("test", 0).image.save(tmp_path / "images" / "0.png")
    records = [
        {"id": "a", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Say yes.\nA. yes\nB. no"}]},
    ]
    (tmp_path / "science.json").write_text(json.dumps(records))
    answers_file = tmp_path / "answers.jsonl"

    assert generate(tmp_path / "science.json", tmp_path / "images", answers_file, "--single-pred-prompt") == 0

    answers = read_answers(answers_file)
    suffix = "\nAnswer with the option's letter from the given choices directly."
    prompts = ["<image>\nWhat colour is it?" + suffix, "Say yes.\nA. yes\nB. no" + suffix]
    assert [answer["prompt"] for answer in answers] == prompts
    assert [list(a) for a in answers] == [ANSWER_KEYS] * 2


def test_bad_inputs_are_named(shapes, tmp_path, capsys, monkeypatch):
    folder, _ = shapes
    questions, images = folder / "questions.jsonl", folder / "images"
    lines = questions.read_text().splitlines()
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(lines[0] + "\n{'question_id': 1}\n")
    missing_image = tmp_path / "missing.jsonl"
    missing_image.write_text(lines[0] + "\n" + json.dumps({"question_id": 99, "image": "gone.png", "text": "Hi?"}))
    twice = tmp_path / "twice.jsonl"
    twice.write_text(lines[0] + "\n" + lines[0] + "\n")
    no_image_column = tmp_path / "mmbench.tsv"
    no_image_column.write_text("index\tquestion\thint\tA\tB\n1\tWhy?\tnan\tyes\tno\n")
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava", "mm_projector_type": "tokenpacker"}))
    other_answers = tmp_path / "other.jsonl"
    other_answers.write_text(json.dumps({"question_id": "elsewhere", "text": "x"}) + "\n")
    answers_file = tmp_path / "answers.jsonl"

    cases = [
        ([tmp_path / "none.jsonl", images, answers_file], "question file", "does not exist"),
        ([bad_json, images, answers_file], "bad.jsonl line 2: not valid JSON", ""),
        ([missing_image, images, answers_file], "gone.png", "missing.jsonl line 2"),
        ([twice, images, answers_file], "comes twice", "line 1 and"),
        ([no_image_column, "", answers_file], "missing ['image']", "mmbench.tsv"),
        ([questions, images, other_answers], "other.jsonl line 1 answers question 'elsewhere'", "another run"),
        ([questions, images, answers_file, "--conv-mode", "llava_v1"], "'llava_v1' is not supported", "vicuna_v1"),
        ([questions, images, answers_file, "--batch-size", 0], "--batch-size must be a positive integer", ""),
        ([questions, images, answers_file, "--num-beams", 2, "--backend", "vllm"], "needs --backend transformers", ""),
        ([questions, images, answers_file, "--all-rounds"], "apply to MMBench", "questions.jsonl"),
    ]
    for arguments, *expected in cases:
        assert generate(*arguments) == 1
        error = capsys.readouterr().err
        assert all(part in error for part in expected), (arguments, error)
    assert generate(questions, images, answers_file, model=llava) == 1
    assert "original TokenPacker LLaVA checkpoint" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "vllm", None)  # as where vLLM is not installed
    assert generate(questions, images, answers_file, "--backend", "vllm") == 1
    assert "--backend vllm needs vLLM" in capsys.readouterr().err
    assert not answers_file.exists()
    assert other_answers.read_text() == json.dumps({"question_id": "elsewhere", "text": "x"}) + "\n"
