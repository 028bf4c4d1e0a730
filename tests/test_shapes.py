"""The tiny-shapes task: deterministic scenes of many sizes, their questions, the shipped model's held-out accuracy
(per question kind and aspect ratio), its short answers to any question, and `ship`."""

import json
import random
import shlex
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tokenpacker import TokenPackerForConditionalGeneration, TokenPackerProcessor, export_remote_code
from tokenpacker.shapes import (
    BACKGROUND,
    COLOURS,
    OUTLINE,
    GRID,
    IMAGE_SIZE,
    KINDS,
    MAX_STEPS,
    POSITIONS,
    PRETRAINED,
    QUESTION_KINDS,
    RATIO_GROUPS,
    SHIPPED_FILES,
    YES_NO_QUESTIONS,
    YES_NO_RUNS,
    evaluate,
    main,
    ratio_group,
    render_scene,
    ship,
    training_arguments,
    training_questions,
    write_base_models,
    write_dataset,
)
import tokenpacker.shapes as shapes

HELD_OUT_SCENES = 60
OUT_OF_TASK_QUESTIONS = (  # none of them is asked in training
    "How many shapes are there?",
    "What is the capital of France?",
    "Write a long story about a dragon who lives in the mountains.",
    "hello",
    "Can you explain quantum physics to me in detail, please?",
    "Is it going to rain tomorrow?",
    "Translate 'good morning' into German.",
    "12 + 30 = ?",
)


def test_scenes_are_the_same_on_every_call_and_differ_between_splits():
    first, again, train = render_scene("test", 7), render_scene("test", 7), render_scene("train", 7)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert first.questions() == again.questions()
    assert first.image.size != train.image.size or not np.array_equal(np.asarray(first.image), np.asarray(train.image))


def test_scenes_come_in_all_sizes_and_aspect_ratios():
    sizes = [render_scene("train", index).image.size for index in range(300)]
    assert all(200 <= side <= 1000 for size in sizes for side in size)
    ratios = [width / height for width, height in sizes]
    assert 1 / 3 - 0.01 <= min(ratios) < 0.4 and 2.5 < max(ratios) <= 3 + 0.01
    groups = Counter(ratio_group(*size) for size in sizes)
    assert set(groups) == set(RATIO_GROUPS) and min(groups.values()) >= 80  # about a third each
    assert sum(width == height for width, height in sizes) >= 20  # some exactly square


@pytest.mark.parametrize("index", range(16))
def test_the_shape_has_the_scenes_colour_lies_in_its_cell_and_spans_one_to_two_patches(index):
    scene = render_scene("test", index)
    width, height = scene.image.size
    pixels = np.asarray(scene.image)
    drawn = np.argwhere((pixels != BACKGROUND).any(axis=-1))
    (top, left), (bottom, right) = drawn.min(axis=0), drawn.max(axis=0)
    across = max(bottom - top, right - left) + 1
    # the fill has the scene's colour, the outline (a tenth of the size wide) the outline colour, and nothing else
    filled, outlined = [(pixels[tuple(drawn.T)] == colour).all(axis=-1) for colour in (COLOURS[scene.colour], OUTLINE)]
    assert np.all(filled | outlined) and filled.sum() > outlined.sum() / 2
    outline_width = round(0.1 * across)
    assert np.all(pixels[top : top + outline_width, (left + right) // 2] == OUTLINE)  # the outline at the top
    assert np.all(pixels[(top + bottom) // 2 + outline_width, (left + right) // 2] == COLOURS[scene.colour])
    # the 3x3 grid is over the image itself, not over the padded square; the shape is at most 80% of a cell's side
    (row, column), = [(r, c) for r in range(GRID) for c in range(GRID) if POSITIONS[r][c] == scene.position]
    assert row * height / GRID <= top and bottom < (row + 1) * height / GRID
    assert column * width / GRID <= left and right < (column + 1) * width / GRID
    assert across <= 0.8 * min(width, height) / GRID
    # in pixels of the 336-pixel square that the processor pads and resizes the image to: 42 to 52 (1.5 to 1.9 patches
    # of the tower), or 80% of a cell's shorter side where that is smaller
    in_square = IMAGE_SIZE / max(width, height)
    assert min(42, 0.8 * min(width, height) / GRID * in_square) - 1 <= across * in_square <= 52 + 1


def test_questions_hold_every_kind_with_true_and_balanced_answers():
    scene = render_scene("test", 4)
    described = f"{'an' if scene.colour[0] in 'aeiou' else 'a'} {scene.colour} {scene.kind}, {scene.position}"
    assert scene.questions("colour") == [("What colour is the shape?", scene.colour)]
    assert scene.questions("position") == [("Where is the shape?", scene.position)]
    assert scene.questions("shape") == [("What shape is it?", scene.kind)]
    assert scene.questions("description") == [("What is in this image?", described)]
    yes_no = dict(scene.questions("yes/no"))
    assert [yes_no[f"Is the shape {scene.colour}?"], yes_no[f"Is there a {scene.kind}?"]] == ["yes", "yes"]
    assert [yes_no[f"Is the shape {scene.absent_colour}?"], yes_no[f"Is there a {scene.absent_kind}?"]] == ["no", "no"]
    assert scene.absent_colour != scene.colour and scene.absent_kind != scene.kind and len(yes_no) == 4
    assert len(scene.questions()) == sum(len(scene.questions(kind)) for kind in QUESTION_KINDS)
    with pytest.raises(ValueError, match="kind must be one of"):
        scene.questions("size")


def yes_no_asked(question: str) -> tuple[str, str] | None:
    """(attribute, value) that a yes/no question of the task asks about, read off the wordings of
    `YES_NO_QUESTIONS`; None for the others."""
    for topic, template in YES_NO_QUESTIONS.items():
        prefix, suffix = template.split("{}")
        if question.startswith(prefix) and question.endswith(suffix):
            return topic, question[len(prefix) : len(question) - len(suffix)]
    return None


def test_training_asks_yes_no_runs_whose_first_question_is_yes_at_even_odds():
    """The first yes/no question of a run on an attribute is "yes" at even odds; every answer is true, the values
    asked in a run are distinct, and after a "yes" the rest of the run is "no"."""
    first, lengths = Counter(), Counter()
    for index in range(900):
        scene = render_scene("train", index)
        truth = {"colour": scene.colour, "shape": scene.kind}
        runs = {}
        for question, answer in training_questions(scene, random.Random(index)):
            asked = yes_no_asked(question)
            if asked is not None:
                topic, value = asked
                assert answer == ("yes" if value == truth[topic] else "no"), (question, answer, scene)
                runs.setdefault(topic, []).append((value, answer))
        for topic, run in runs.items():
            first[topic, run[0][1]] += 1
            lengths[topic, len(run)] += 1
            assert len({value for value, _ in run}) == len(run), run
            answers = [answer for _, answer in run]
            assert "yes" not in answers or set(answers[answers.index("yes") + 1 :]) <= {"no"}, run
    for topic in ("colour", "shape"):
        yes, no = first[topic, "yes"], first[topic, "no"]
        assert yes + no > 300 and 0.43 < yes / (yes + no) < 0.57, (topic, yes, no)
        low, high = YES_NO_RUNS[topic]
        assert {length for (name, length) in lengths if name == topic} == set(range(low, high + 1)), lengths


def test_training_conversations_ask_on_every_attribute_then_for_the_description():
    """A fifth of the conversations are one description (or other) question; the others ask on the colour, kind and
    position (on the colour and kind a run of yes/no questions two times in three, else the open question), each
    attribute's questions together, then for the description."""
    lengths, asked = Counter(), Counter()
    for index in range(600):
        scene = render_scene("train", index)
        pairs = training_questions(scene, random.Random(index))
        lengths[len(pairs) == 1] += 1
        assert pairs[-1][1] == scene.description and all(answer != scene.description for _, answer in pairs[:-1])
        topics = []
        for question, answer in pairs[:-1]:
            yes_no = yes_no_asked(question)
            if yes_no is not None:
                topic = yes_no[0]
            else:
                topics_asked = ("colour", "shape", "position")
                topic = next(kind for kind in topics_asked if scene.questions(kind) == [(question, answer)])
                asked["open", topic] += 1
            if not topics or topics[-1] != topic:
                topics.append(topic)
                asked["yes/no"] += question != scene.questions(topic)[0][0]
        assert sorted(topics) in ([], ["colour", "position", "shape"]), pairs
    assert 0.15 < lengths[True] / 600 < 0.25, lengths
    on_colour_and_kind = asked["yes/no"] + asked["open", "colour"] + asked["open", "shape"]
    assert 0.6 < asked["yes/no"] / on_colour_and_kind < 0.73, asked


def test_base_pretrains_the_tower_reproducibly(tmp_path, monkeypatch, capsys):
    """`base` trains the random tower on the scenes' attributes: the same bytes on every run, and not the random
    tower's. (A short run on 64 scenes here; the shipped model's pretraining is in docs/training.md.)"""
    monkeypatch.setattr(shapes, "PRETRAINING_SCENES", 64)
    folders = {name: tmp_path / name for name in ("random", "first", "second")}
    write_base_models(folders["random"], pretraining_steps=0)
    for name in ("first", "second"):
        main(["base", "--output-dir", str(folders[name]), "--pretraining-steps", "20"])
    out = capsys.readouterr().out
    assert "tower pretraining: step 20/20, loss " in out and "tower pretraining, held-out scenes 0-299: colour" in out
    weights = {name: (folder / "vision" / "model.safetensors").read_bytes() for name, folder in folders.items()}
    assert weights["first"] == weights["second"] != weights["random"]
    for name in ("model.safetensors", "tokenizer.json"):
        assert (folders["first"] / "text" / name).read_bytes() == (folders["random"] / "text" / name).read_bytes()
    with pytest.raises(SystemExit):
        main(["base", "--output-dir", str(tmp_path / "bad"), "--pretraining-steps", "-1"])
    assert "--pretraining-steps must be a non-negative integer, got -1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shipped():
    return TokenPackerForConditionalGeneration.from_pretrained(PRETRAINED), TokenPackerProcessor.from_pretrained(PRETRAINED)


def greedy(shipped, images: list[Image.Image], questions: list[str], max_new_tokens: int = 8, batch_size: int = 24):
    """(answer, ids generated up to and with the end of sequence, or all when it never came) per question, asked in
    left-padded batches through the chat template."""
    model, processor = shipped
    results = []
    for start in range(0, len(questions), batch_size):
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": f"<image>\n{question}"}], add_generation_prompt=True, tokenize=False
            )
            for question in questions[start : start + batch_size]
        ]
        inputs = processor(images=images[start : start + batch_size], text=prompts)
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_ids = generated[:, inputs["input_ids"].shape[1] :].tolist()
        for ids, answer in zip(new_ids, processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])):
            eos = processor.tokenizer.eos_token_id
            results.append((answer, ids[: ids.index(eos) + 1] if eos in ids else ids))
    return results


def test_the_shipped_model_answers_held_out_scenes_of_every_kind_and_aspect_ratio(shipped):
    """Three questions on each of the first 60 held-out scenes, the kinds in turn, checked against the scenes."""
    scenes = [render_scene("test", index) for index in range(HELD_OUT_SCENES)]
    asked = []
    for index, scene in enumerate(scenes):
        for turn in range(3):
            pairs = scene.questions(QUESTION_KINDS[(3 * index + turn) % len(QUESTION_KINDS)])
            asked.append((scene, *pairs[index % len(pairs)]))
    answers = greedy(shipped, [scene.image for scene, _, _ in asked], [question for _, question, _ in asked])
    right = Counter()
    for (scene, question, truth), (answer, _) in zip(asked, answers):
        kind = next(kind for kind in QUESTION_KINDS if (question, truth) in scene.questions(kind))
        for name in (kind, ratio_group(*scene.image.size)):
            right[name, answer == truth] += 1
    # docs/training.md: on all 1,200 held-out scenes 99.6-100 % per question kind, 99.7-100 % per aspect ratio
    for name in (*QUESTION_KINDS, *RATIO_GROUPS):
        hits, total = right[name, True], right[name, True] + right[name, False]
        assert total >= 20 and hits / total >= 0.95, f"{name}: {hits} of {total} held-out answers right"


def test_the_shipped_model_compares_the_colour_and_kind_asked_with_the_image(shipped):
    """Every colour and every kind asked yes/no on held-out scenes 0-19: "yes" for the scene's own, "no" for each
    other (a model trained with one yes/no question per attribute said "yes" to 28 % of the other colours)."""
    scenes = [render_scene("test", index) for index in range(20)]
    asked = [(scene, f"Is the shape {colour}?", colour == scene.colour) for scene in scenes for colour in sorted(COLOURS)]
    asked += [(scene, f"Is there a {kind}?", kind == scene.kind) for scene in scenes for kind in KINDS]
    answers = greedy(shipped, [scene.image for scene, _, _ in asked], [question for _, question, _ in asked])
    right = Counter()
    for (_, question, true), (answer, _) in zip(asked, answers):
        right[yes_no_asked(question)[0], true, answer == ("yes" if true else "no")] += 1
    for attribute in ("colour", "shape"):
        for true in (True, False):
            hits, total = right[attribute, true, True], right[attribute, true, True] + right[attribute, true, False]
            assert total >= 20 and hits / total >= 0.95, (attribute, "own" if true else "other", hits, total)


def draw_scene(size: tuple[int, int], colour: str, kind: str, row: int, column: int) -> Image.Image:
    """A scene drawn here, as a user would: one shape an eighth of the longer side across with a black outline a tenth
    of that wide, centred in its cell of a 3x3 grid over the image, on the task's mid grey."""
    width, height = size
    across = max(size) // 8
    centre_x, centre_y = (column + 0.5) * width / 3, (row + 0.5) * height / 3
    box = (centre_x - across / 2, centre_y - across / 2, centre_x + across / 2, centre_y + across / 2)
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    style = {"fill": {"red": (220, 50, 47), "green": (50, 160, 60), "blue": (40, 90, 220)}[colour], "outline": (0, 0, 0)}
    style["width"] = round(across / 10)
    if kind == "circle":
        draw.ellipse(box, **style)
    elif kind == "square":
        draw.rectangle(box, **style)
    else:
        draw.polygon([(centre_x, box[1]), (box[0], box[3]), (box[2], box[3])], **style)
    return image


@pytest.mark.parametrize("size", [(400, 300), (300, 400)])
def test_the_shipped_model_answers_non_square_scenes_drawn_elsewhere(shipped, size):
    """Before the model trained on scenes of every aspect ratio, 400x300 scenes (padded with the CLIP mean colour by
    the processor) got 17% of their colours and 13% of their positions right. The shipped model gets every colour,
    position and kind right at both sizes (the 9-token model before it missed one kind at 400x300)."""
    names = [name for row in POSITIONS for name in row]
    images, questions, truths = [], [], []
    for cell, position in enumerate(names):
        colour, kind = ("red", "green", "blue")[cell % 3], ("circle", "square", "triangle")[cell // 3]
        image = draw_scene(size, colour, kind, cell // GRID, cell % GRID)
        for question, truth in (
            ("What colour is the shape?", colour), ("Where is the shape?", position), ("What shape is it?", kind)
        ):
            images.append(image), questions.append(question), truths.append(truth)
    answers = [answer for answer, _ in greedy(shipped, images, questions)]
    wrong = [(question, truth, answer) for question, truth, answer in zip(questions, truths, answers) if answer != truth]
    assert len(wrong) <= 2 and all(question == "What shape is it?" for question, _, _ in wrong), wrong


def test_every_answer_ends_within_eight_tokens_even_out_of_the_task(shipped):
    scenes = [render_scene("test", index) for index in range(3)]
    asked = [(scene, question) for scene in scenes for question in OUT_OF_TASK_QUESTIONS]
    results = greedy(shipped, [scene.image for scene, _ in asked], [question for _, question in asked], max_new_tokens=12)
    eos = shipped[1].tokenizer.eos_token_id
    for (scene, question), (answer, ids) in zip(asked, results):
        assert ids[-1] == eos and len(ids) <= 8, (question, answer, ids)
    # "What is in this image?" and its kind get the scene's short description
    descriptions = greedy(shipped, [scene.image for scene in scenes], ["Describe the image."] * 3)
    assert [answer for answer, _ in descriptions] == [scene.questions("description")[0][1] for scene in scenes]


def test_evaluate_scores_each_question_kind_and_aspect_ratio(shipped, tmp_path):
    model, processor = shipped
    write_dataset(tmp_path, num_train=0, num_test=30)
    records = json.loads((tmp_path / "test.json").read_text())
    assert [record["question_kind"] for record in records[:5]] == list(QUESTION_KINDS)
    for index, record in enumerate(records):
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        assert (question, record["conversations"][1]["value"]) in render_scene("test", index).questions(record["question_kind"])
    accuracy = evaluate(model, processor, tmp_path / "test.json", batch_size=16)
    assert list(accuracy["question kind"]) == list(QUESTION_KINDS)
    assert set(accuracy["aspect ratio"]) == set(RATIO_GROUPS)
    assert accuracy["all"] >= 0.9


def test_the_shipped_folder_holds_weights_and_settings_only():
    assert sorted(path.name for path in PRETRAINED.iterdir()) == sorted(SHIPPED_FILES)
    for name in SHIPPED_FILES:
        if name.endswith(".json"):
            assert "auto_map" not in (PRETRAINED / name).read_text(), name
    assert (PRETRAINED / "model.safetensors").stat().st_size < 8 * 2**20
@pytest.fixture
def trained_folder(tmp_path, shipped):
    """A folder as tokenpacker-train leaves it: weights, processor, the exported remote code and a pickle."""
    model, processor = shipped
    folder = tmp_path / "trained"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    export_remote_code(folder)
    (folder / "training_args.bin").write_bytes(b"pickled arguments")
    assert (folder / "modeling_tokenpacker.py").is_file() and "auto_map" in (folder / "config.json").read_text()
    return folder


def test_ship_keeps_the_model_and_drops_code_pickles_and_auto_map(trained_folder, tmp_path):
    output = ship(trained_folder, tmp_path / "shipped")
    assert sorted(path.name for path in output.iterdir()) == sorted(SHIPPED_FILES)
    assert (output / "model.safetensors").read_bytes() == (trained_folder / "model.safetensors").read_bytes()
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        source, copy = json.loads((trained_folder / name).read_text()), json.loads((output / name).read_text())
        assert "auto_map" not in json.dumps(copy)
        source.pop("auto_map", None)
        source.get("image_processor", {}).pop("auto_map", None)
        assert copy == source, name

    model, processor = TokenPackerForConditionalGeneration.from_pretrained(output), TokenPackerProcessor.from_pretrained(output)
    original = TokenPackerForConditionalGeneration.from_pretrained(trained_folder)
    scene = render_scene("test", 3)
    inputs = processor(images=scene.image, text="<image>\nWhere is the shape?")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, original(**inputs).logits)


def test_ship_refuses_to_replace_a_folder_unless_forced(trained_folder, tmp_path, capsys):
    output = tmp_path / "shipped"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["ship", "--model", str(trained_folder), "--output_dir", str(output)])
    assert f"{output} exists and is not empty: pass force=True (--force) to replace it" in capsys.readouterr().err
    assert [path.name for path in output.iterdir()] == ["notes.txt"]

    main(["ship", "--model", str(trained_folder), "--output_dir", str(output), "--force"])
    assert f"Copied 7 files of {trained_folder} to {output}: config.json, " in capsys.readouterr().out
    assert sorted(path.name for path in output.iterdir()) == sorted(SHIPPED_FILES)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shipped", "trained"]  # no staging folder left


def test_ship_never_replaces_the_trained_folder_it_reads(trained_folder, capsys):
    before = {path.name: path.read_bytes() for path in trained_folder.iterdir()}
    for output in (trained_folder, trained_folder.parent):
        with pytest.raises(SystemExit):
            main(["ship", "--model", str(trained_folder), "--output-dir", str(output), "--force"])
        assert "writing there could delete it; choose a new folder for the shipped model" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in trained_folder.iterdir()} == before


def test_ship_stages_beside_the_target_and_removes_what_a_killed_ship_left(trained_folder, tmp_path, monkeypatch):
    output = tmp_path / "shipped"
    stale = tmp_path / ".shipped.shipping-stale"  # left by a killed process: its marker names a process that is gone
    stale.mkdir()
    (stale / ".tokenpacker-staging").write_text(json.dumps({"pid": 2**22 + 1, "created_parents": []}))
    staged = []

    def failing_copy(source, target):
        staged.append(Path(target).parent)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="No space left on device"):
        ship(trained_folder, output)
    assert staged[0].parent == tmp_path and staged[0].name.startswith(".shipped.shipping-")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["trained"]  # neither the stale nor the failed copy


def test_ship_names_the_files_a_folder_lacks(trained_folder, tmp_path):
    (trained_folder / "model.safetensors").unlink()
    (trained_folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="is not a trained TokenPacker folder: it lacks model.safetensors, tokenizer.json"):
        ship(trained_folder, tmp_path / "shipped")
    assert not (tmp_path / "shipped").exists()


def test_data_writes_both_splits_and_says_what_it_wrote(tmp_path, capsys):
    main(["data", "--output_dir", str(tmp_path), "--num_train", "3", "--num_test", "2"])
    out = capsys.readouterr().out
    assert f"Wrote 3 training and 2 test scenes to {tmp_path}: 5 images in {tmp_path / 'images'}" in out
    assert f"{tmp_path / 'train.json'} (3 conversations), {tmp_path / 'test.json'} (2 questions)" in out
    assert len(list((tmp_path / "images").glob("*.png"))) == 5
    records = {split: json.loads((tmp_path / f"{split}.json").read_text()) for split in ("train", "test")}
    assert [len(records["train"]), len(records["test"])] == [3, 2]
    assert [len(record["conversations"]) for record in records["test"]] == [2, 2]  # one question per held-out scene


def test_the_documented_baseline_trains_with_the_arguments_of_train():
    """docs/training.md's baseline command repeats what `python -m tokenpacker.shapes train` passes to
    tokenpacker-train, so that both projectors are trained alike."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    command = page.split("python benchmarks/avg_pool_baseline.py ", 1)[1].split("\n```", 1)[0].split("\npython", 1)[0]
    arguments = shlex.split(command.replace("\\\n", " "))
    assert arguments[-4:] == ["--test-path", "runs/shapes/test.json", "--tokenpacker-model", "runs/tiny-shapes"]
    assert arguments[:-4] == training_arguments("runs/shapes", "runs/base", "runs/avg-pool", MAX_STEPS)


def test_train_refuses_a_step_count_below_one(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data-dir", "runs/shapes", "--base-dir", "runs/base", "--output-dir", "out", "--max-steps", "0"])
    assert "--max-steps must be a positive integer, got 0" in capsys.readouterr().err


def test_reproduce_runs_every_step_and_compares_the_weights_with_the_shipped_ones(tmp_path, monkeypatch, capsys):
    """`reproduce` on a few scenes and steps: run twice with the same settings, the second run's weights are byte for
    byte the first's (here standing in for the shipped model); a different file is reported and exits 1."""
    monkeypatch.setattr(shapes, "PRETRAINING_SCENES", 32)
    arguments = ["--num-train", "16", "--num-test", "5", "--pretraining-steps", "2", "--max-steps", "2"]
    main(["reproduce", "--output-dir", str(tmp_path / "first"), *arguments])
    out = capsys.readouterr().out
    assert "Not the shipped model's settings: the weights are not compared with the shipped ones." in out
    assert json.loads(out[out.index("{\n") : out.rindex("}") + 1])["question kind"].keys() <= set(QUESTION_KINDS)
    assert "tokenpacker-train --vision-tower " in out and "data, base and train took " in out
    first = tmp_path / "first" / "tiny-shapes"
    assert (tmp_path / "first" / "shapes" / "test.json").is_file() and (tmp_path / "first" / "base" / "vision").is_dir()

    # these settings as the shipped model's, and the first run's weights as the shipped ones
    for name, value in {"NUM_TRAIN": 16, "PRETRAINING_STEPS": 2, "MAX_STEPS": 2, "PRETRAINED": first}.items():
        monkeypatch.setattr(shapes, name, value)
    main(["reproduce", "--output-dir", str(tmp_path / "second"), *arguments])
    out = capsys.readouterr().out
    assert f"{tmp_path / 'second' / 'tiny-shapes' / 'model.safetensors'} is byte for byte the same as " in out

    shipped_copy = tmp_path / "shipped"
    shutil.copytree(first, shipped_copy)
    weights = bytearray((shipped_copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (shipped_copy / "model.safetensors").write_bytes(bytes(weights))
    monkeypatch.setattr(shapes, "PRETRAINED", shipped_copy)
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--output-dir", str(tmp_path / "third"), *arguments])
    assert exit_info.value.code == 1
    assert f"is different from {shipped_copy / 'model.safetensors'}" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        main(["reproduce", "--output-dir", str(tmp_path / "first"), *arguments])
    assert "exists and is not an empty folder: reproduce writes a new one" in capsys.readouterr().err
