"""The tiny-shapes task: deterministic scenes, the shipped model's held-out accuracy, and `ship`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenpacker import TokenPackerForConditionalGeneration, TokenPackerProcessor, export_remote_code
from tokenpacker.shapes import (
    BACKGROUND,
    COLOURS,
    GRID,
    IMAGE_SIZE,
    POSITIONS,
    PRETRAINED,
    QUESTIONS,
    SHIPPED_FILES,
    evaluate,
    main,
    render_scene,
    ship,
    write_dataset,
)

HELD_OUT_SCENES = 60


def test_scenes_are_the_same_on_every_call_and_differ_between_splits():
    first, again, train = render_scene("test", 7), render_scene("test", 7), render_scene("train", 7)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert (first.colour, first.position, first.kind) == (again.colour, again.position, again.kind)
    assert not np.array_equal(np.asarray(first.image), np.asarray(train.image))


@pytest.mark.parametrize("index", range(12))
def test_the_shape_has_the_scenes_colour_and_lies_in_its_cell(index):
    scene = render_scene("test", index)
    pixels = np.asarray(scene.image)
    assert scene.image.size == (IMAGE_SIZE, IMAGE_SIZE)
    drawn = np.argwhere((pixels != BACKGROUND).any(axis=-1))
    assert np.all(pixels[tuple(drawn.T)] == COLOURS[scene.colour])
    (top, left), (bottom, right) = drawn.min(axis=0), drawn.max(axis=0)
    assert 20 <= max(bottom - top, right - left) + 1 <= 36  # 20 to 36 pixels across
    cell = IMAGE_SIZE // GRID
    (row, column), = [(r, c) for r in range(GRID) for c in range(GRID) if POSITIONS[r][c] == scene.position]
    assert row * cell <= top and bottom < (row + 1) * cell
    assert column * cell <= left and right < (column + 1) * cell


@pytest.fixture(scope="module")
def shipped():
    return TokenPackerForConditionalGeneration.from_pretrained(PRETRAINED), TokenPackerProcessor.from_pretrained(PRETRAINED)


def test_the_shipped_model_answers_held_out_scenes_in_batches(shipped, tmp_path):
    """Both questions on the first 60 held-out scenes, asked in left-padded batches and checked against the scenes."""
    model, processor = shipped
    scenes = [render_scene("test", index) for index in range(HELD_OUT_SCENES)]
    asked = [(scene, attribute, question) for scene in scenes for attribute, question in QUESTIONS.items()]
    right = 0
    for start in range(0, len(asked), 24):
        batch = asked[start : start + 24]
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": f"<image>\n{question}"}], add_generation_prompt=True, tokenize=False
            )
            for _, _, question in batch
        ]
        inputs = processor(images=[scene.image for scene, _, _ in batch], text=prompts)
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answers = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])
        right += sum(answer == getattr(scene, attribute) for answer, (scene, attribute, _) in zip(answers, batch))
    assert right / len(asked) >= 0.97, f"{right} of {len(asked)} held-out answers right"

    # `evaluate` (the README's accuracy) scores the test.json of `data` the same way: one question per scene.
    write_dataset(tmp_path, num_train=0, num_test=HELD_OUT_SCENES)
    records = json.loads((tmp_path / "test.json").read_text())
    assert [record["conversations"][1]["value"] for record in records] == [
        getattr(scenes[index], ("colour", "position")[index % 2]) for index in range(HELD_OUT_SCENES)
    ]
    accuracy = evaluate(model, processor, tmp_path / "test.json", batch_size=16)
    assert set(accuracy) == {*QUESTIONS.values(), "all"}
    assert accuracy["all"] >= 0.97


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
