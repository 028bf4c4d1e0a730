"""Conversion under hostile conditions: outputs that would delete inputs, configs that disagree with their weights,
new vocabulary rows, non-finite weights, signals and stale staging folders, and inputs that must fail in one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenpacker.conversion import convert_checkpoint
from tokenpacker.conversion.convert import main

from .original_checkpoints import write_original_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A 'pad' checkpoint in 2 safetensors shards and its CLIP folder, never modified by the tests."""
    return write_original_release(tmp_path_factory.mktemp("release"), weights="safetensors", shards=2)


def snapshot(folder: Path):
    return sorted(
        (str(path.relative_to(folder)), path.stat().st_size if path.is_file() else -1) for path in folder.rglob("*")
    )


def convert_cli(capsys, *arguments):
    """Runs tokenpacker-convert in this process; returns its exit code and standard error."""
    code = main([str(argument) for argument in arguments])
    return code, capsys.readouterr().err


# An output folder that is, holds or lies inside an input, the current directory or the home folder is refused
# before anything is read, with or without --force, and the inputs stay as they were.

UNSAFE_OUTPUTS = {
    "the checkpoint itself": ("inputs/checkpoint", r"is the checkpoint folder"),
    "the vision tower itself": ("inputs/clip", r"is the vision tower folder"),
    "the folder holding both inputs": ("inputs", r"contains the checkpoint folder"),
    "the same folder through '..'": ("inputs/clip/..", r"contains the checkpoint folder"),
    "a folder inside the checkpoint": ("inputs/checkpoint/converted", r"lies inside the checkpoint folder"),
    "a folder inside the vision tower": ("inputs/clip/sub/converted", r"lies inside the vision tower folder"),
    "a link to the checkpoint": ("link", r"is the checkpoint folder"),
}


@pytest.mark.parametrize("case", list(UNSAFE_OUTPUTS))
def test_force_never_replaces_an_input_or_the_current_directory(case, release, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    (work / "inputs").mkdir(parents=True)
    shutil.copytree(release.checkpoint, work / "inputs" / "checkpoint")
    shutil.copytree(release.vision_tower, work / "inputs" / "clip")
    (work / "link").symlink_to(work / "inputs" / "checkpoint")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    output, message = UNSAFE_OUTPUTS[case]
    code, err = convert_cli(
        capsys, "--checkpoint", "inputs/checkpoint", "--vision-tower", "inputs/clip", "--output", output, "--force"
    )
    assert code == 1
    assert err.startswith(f"tokenpacker-convert: error: The output folder {output} ") and message in err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "output, message", [(".", "is the current directory"), ("..", "contains the current directory")]
)
def test_force_never_replaces_the_current_directory(output, message, release, tmp_path, monkeypatch, capsys):
    (tmp_path / "work" / "deeper").mkdir(parents=True)
    (tmp_path / "work" / "deeper" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "work" / "deeper")
    code, err = convert_cli(
        capsys, "--checkpoint", release.checkpoint, "--vision-tower", release.vision_tower, "--output", output, "--force"
    )
    assert code == 1 and f"The output folder {output} {message}" in err
    assert snapshot(tmp_path) == [("work", -1), ("work/deeper", -1), ("work/deeper/notes.txt", 4)]


def test_force_never_replaces_the_home_folder(release, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    code, err = convert_cli(
        capsys, "--checkpoint", release.checkpoint, "--vision-tower", release.vision_tower, "--output", home, "--force"
    )
    assert code == 1 and f"The output folder {home} is the home folder" in err
    assert [path.name for path in home.iterdir()] == ["notes.txt"]


# Config sizes are checked against the weights' names and shapes before any model is built from the config.


def edited_copy(folder: Path, destination: Path, section: str | None = None, **changes) -> Path:
    """A copy of `folder` whose config.json (or its `section`) has `changes`."""
    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    (config[section] if section else config).update(changes)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


WRONG_SIZES = {
    "one layer too many": (
        "checkpoint",
        dict(num_hidden_layers=3),
        "num_hidden_layers is 3 but the weights hold 2 layers (model.layers.N), numbered up to 1",
    ),
    "a text width": (
        "checkpoint",
        dict(hidden_size=128),
        "hidden_size is 128 but model.embed_tokens.weight has shape (400, 64)",
    ),
    "an mlp width": (
        "checkpoint",
        dict(intermediate_size=11008),
        "intermediate_size is 11008 but model.layers.0.mlp.up_proj.weight has shape (128, 64)",
    ),
    "a negative layer count": (
        "checkpoint",
        dict(num_hidden_layers=-2),
        "num_hidden_layers must be a positive integer up to 16777216, got -2 (the weights hold 2 layers",
    ),
    "a layer count as text": (
        "checkpoint",
        dict(num_hidden_layers="2"),
        "num_hidden_layers must be a positive integer up to 16777216, got '2' (the weights hold 2 layers",
    ),
    "an absurd width": (
        "checkpoint",
        dict(hidden_size=10**12),
        "hidden_size must be a positive integer up to 16777216, got 1000000000000 (model.embed_tokens.weight has",
    ),
    "vision tower layers": (
        "clip",
        dict(num_hidden_layers=12),
        "num_hidden_layers is 12 but the weights hold 24 layers (vision_model.encoder.layers.N), numbered up to 23",
    ),
    "vision tower width": (
        "clip",
        dict(hidden_size=1024),
        "hidden_size is 1024 but vision_model.embeddings.patch_embedding.weight has shape (32, 3, 28, 28)",
    ),
}


@pytest.mark.parametrize("case", list(WRONG_SIZES))
def test_config_sizes_that_disagree_with_the_weights_are_refused(case, release, tmp_path, capsys):
    which, changes, message = WRONG_SIZES[case]
    checkpoint, clip = release.checkpoint, release.vision_tower
    if which == "checkpoint":
        checkpoint = edited_copy(checkpoint, tmp_path / "checkpoint", **changes)
    else:
        clip = edited_copy(clip, tmp_path / "clip", "vision_config", **changes)
    before = snapshot(tmp_path)
    code, err = convert_cli(capsys, "--checkpoint", checkpoint, "--vision-tower", clip, "--output", tmp_path / "out")
    where = (checkpoint if which == "checkpoint" else clip) / "config.json"
    assert code == 1 and err.startswith(f"tokenpacker-convert: error: {where}: ") and message in err
    assert err.count("\n") == 1
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    return convert_checkpoint(
        release.checkpoint, tmp_path_factory.mktemp("converted") / "out", vision_tower=release.vision_tower
    )


MILLION_LAYERS = """
import json, sys, time
from tokenpacker.conversion import convert_checkpoint
from tokenpacker.conversion.publish import check_checkpoint_folder

checkpoint, clip, published_text, published_vision, output = sys.argv[1:]
calls = {
    "convert, LLaVA config": lambda: convert_checkpoint(checkpoint, output, vision_tower=clip),
    "publish, text_config": lambda: check_checkpoint_folder(published_text),
    "publish, vision_config": lambda: check_checkpoint_folder(published_vision),
}
results = {}
for name, call in calls.items():
    start = time.monotonic()
    try:
        call()
        error = None
    except ValueError as caught:
        error = str(caught)
    results[name] = [time.monotonic() - start, error]
print(json.dumps(results))
"""


def test_a_million_layers_in_a_config_is_refused_at_once_by_conversion_and_publishing(
    release, converted, tmp_path
):
    checkpoint = edited_copy(release.checkpoint, tmp_path / "checkpoint", num_hidden_layers=1_000_000)
    text = edited_copy(converted.output, tmp_path / "text", "text_config", num_hidden_layers=1_000_000)
    vision = edited_copy(converted.output, tmp_path / "vision", "vision_config", num_hidden_layers=1_000_000)
    arguments = [checkpoint, release.vision_tower, text, vision, tmp_path / "out"]
    process = subprocess.run(
        [sys.executable, "-c", MILLION_LAYERS, *map(str, arguments)], capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 0, process.stderr[-2000:]
    results = json.loads(process.stdout.splitlines()[-1])
    expected = {
        "convert, LLaVA config": (
            f"{checkpoint / 'config.json'}: num_hidden_layers is 1000000 but the weights hold 2 layers"
        ),
        "publish, text_config": (
            f"{text / 'config.json'}: text_config.num_hidden_layers is 1000000 but the weights hold 2 layers "
            "(model.language_model.layers.N)"
        ),
        "publish, vision_config": (
            f"{vision / 'config.json'}: vision_config.num_hidden_layers is 1000000, which needs 999999 layers in the "
            "weights, but the weights hold 23 layers (model.vision_tower.encoder.layers.N)"
        ),
    }
    for name, message in expected.items():
        seconds, error = results[name]
        assert error is not None and error.startswith(message), (name, error)
        assert seconds < 5, (name, seconds)
    assert not (tmp_path / "out").exists()
