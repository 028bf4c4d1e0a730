"""Conversion under hostile conditions: outputs that would delete inputs, configs that disagree with their weights,
new vocabulary rows, non-finite weights, signals and stale staging folders, and inputs that must fail in one line."""

import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import _http as huggingface_hub_http
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenpacker.conversion import convert_checkpoint
from tokenpacker.conversion import convert as convert_module
from tokenpacker.conversion import original_checkpoint
from tokenpacker.conversion import shards as shards_module
from tokenpacker.conversion.convert import main
from tokenpacker.staging import remove_stale_staging

from transformers import AutoModelForImageTextToText

from .hub_server import SilentServer, point_huggingface_hub_at
from .original_checkpoints import TEXT, VOCAB, write_original_release
from .test_modeling_reliability import assert_inputs_embeds_give_the_input_ids_logits


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
        capsys, "--checkpoint", release.checkpoint, "--vision-tower", release.vision_tower, "--output", output,
        "--force",
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


# The rows appended for <image> and <pad> differ from each other and from every original row, the same on every run.


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            tensors.update((name, handle.get_tensor(name)) for name in handle.keys())
    return tensors


def test_new_vocabulary_rows_are_distinct_and_reproducible(release, converted, tmp_path):
    tensors = read_tensors(converted.output)
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        original, new = tensors[name][:VOCAB], tensors[name][VOCAB:]
        assert new.shape == (2, TEXT["hidden_size"]) and torch.isfinite(new).all()
        assert not torch.equal(new[0], new[1]), name
        assert (torch.cdist(new, original).min(dim=1).values > 0).all(), name  # no original row repeated
    again = convert_checkpoint(release.checkpoint, tmp_path / "again", vision_tower=release.vision_tower)
    files = sorted(path.name for path in converted.output.glob("*.safetensors"))
    assert files == sorted(path.name for path in again.output.glob("*.safetensors"))
    for file in files:
        assert (converted.output / file).read_bytes() == (again.output / file).read_bytes(), file


def test_a_converted_model_gives_the_same_logits_from_ids_and_from_embeddings(converted):
    model = AutoModelForImageTextToText.from_pretrained(converted.output).eval()
    config = model.config
    image, pad, tokens = config.image_token_id, config.text_config.pad_token_id, config.num_image_tokens
    assert pad != image
    input_ids = torch.tensor([[pad, pad, 1, 5] + [image] * tokens + [9, 10], [1, 5, 6, 7] + [image] * tokens + [9, 10]])
    attention_mask = (input_ids != pad).long()
    assert attention_mask[0, :2].tolist() == [0, 0] and attention_mask[1].all()  # left padding in the first row
    pixel_values = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    assert_inputs_embeds_give_the_input_ids_logits(model, input_ids, attention_mask, pixel_values)


def test_verification_checks_the_new_rows_against_their_rule(release, tmp_path, monkeypatch):
    add = convert_module.ShardWriter.add

    def zeroing_add(self, name, tensor):
        if name == "lm_head.weight":
            tensor = torch.cat([tensor[:VOCAB], torch.zeros_like(tensor[VOCAB:])])
        add(self, name, tensor)

    monkeypatch.setattr(convert_module.ShardWriter, "add", zeroing_add)
    expected = r"Verification failed: \['lm_head\.weight'\] in .* differ from lm_head\.weight"
    with pytest.raises(ValueError, match=expected):
        convert_checkpoint(release.checkpoint, tmp_path / "out", vision_tower=release.vision_tower)
    assert list(tmp_path.iterdir()) == []


# Weights that are not finite in the source, or overflow the output dtype, are named and refused unless allowed.


def set_values(checkpoint: Path, changes: dict[str, tuple[int, float]]):
    """Writes `value` at flat position `index` of each named tensor, in its safetensors shard."""
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    for name, (index, value) in changes.items():
        file = checkpoint / weight_map[name]
        tensors = load_file(file)
        tensors[name].view(-1)[index] = value
        save_file(tensors, file, metadata={"format": "pt"})


def test_non_finite_source_weights_are_named_and_refused_unless_allowed(release, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(release.checkpoint, checkpoint)
    changes = {
        "model.layers.0.mlp.up_proj.weight": (5, math.nan),
        "model.mm_projector.mlp.2.bias": (0, math.inf),
    }
    set_values(checkpoint, changes)
    arguments = ["--checkpoint", checkpoint, "--vision-tower", release.vision_tower, "--output", tmp_path / "out"]
    code, err = convert_cli(capsys, *arguments)
    assert code == 1 and "Traceback" not in err
    assert err.startswith("tokenpacker-convert: error: 2 tensor(s) would not be finite in the converted checkpoint: ")
    for name in changes:
        assert f"{name} (NaN or inf in the source)" in err
    assert "--allow-non-finite" in err and not (tmp_path / "out").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint"]

    assert main([*map(str, arguments), "--allow-non-finite"]) == 0
    report = capsys.readouterr().out
    assert "projector vs the original formula: skipped (its weights are not finite)" in report
    tensors = read_tensors(tmp_path / "out")
    up_proj = tensors["model.language_model.layers.0.mlp.up_proj.weight"].view(-1)
    assert math.isnan(up_proj[5]) and torch.isfinite(up_proj[:5]).all()
    assert tensors["model.multi_modal_projector.output_proj.linear_2.bias"][0] == math.inf


def test_values_that_overflow_the_output_dtype_are_named_and_refused_unless_allowed(release, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(release.checkpoint, checkpoint)
    set_values(checkpoint, {"model.layers.1.self_attn.o_proj.weight": (3, 1e6)})
    arguments = ["--checkpoint", checkpoint, "--vision-tower", release.vision_tower, "--output", tmp_path / "out"]
    code, err = convert_cli(capsys, *arguments, "--dtype", "float16")
    assert code == 1
    assert "model.layers.1.self_attn.o_proj.weight (values up to 1e+06 overflow float16)" in err
    assert not (tmp_path / "out").exists()
    code, _ = convert_cli(capsys, *arguments, "--dtype", "bfloat16")  # bfloat16 holds 1e6
    assert code == 0
    assert main([*map(str, arguments), "--dtype", "float16", "--allow-non-finite", "--force"]) == 0
    report = capsys.readouterr().out
    assert "not finite, converted as allowed: model.layers.1.self_attn.o_proj.weight (values up to 1e+06" in report
    assert "projector vs the original formula (nn.MultiheadAttention" in report  # still checked: it is finite
    weight = read_tensors(tmp_path / "out")["model.language_model.layers.1.self_attn.o_proj.weight"]
    assert weight.dtype == torch.float16 and weight.view(-1)[3] == math.inf
    assert torch.isfinite(weight).sum() == weight.numel() - 1


# Broken inputs and a full disk give one error line that names the file, never a traceback.


def corrupt_tokenizer(checkpoint: Path):
    (checkpoint / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model" * 10)


def retype_tensor(checkpoint: Path, dtype: str):
    """Rewrites the header of the shard holding model.norm.weight so that it claims `dtype` (same byte size)."""
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    file = checkpoint / weight_map["model.norm.weight"]
    data = file.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    entry = header["model.norm.weight"]
    entry["dtype"] = dtype
    entry["shape"] = [entry["shape"][0] * 4 // {"F8_E4M3": 1, "U16": 2}[dtype]]
    encoded = json.dumps(header).encode().ljust(size)
    file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + size :])


def edit_json(path: Path, change):
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


BROKEN_INPUTS = {
    "empty tokenizer.model": (
        lambda c: (c / "tokenizer.model").write_bytes(b""),
        "Cannot read the sentencepiece model {checkpoint}/tokenizer.model",
    ),
    "corrupt tokenizer.model": (corrupt_tokenizer, "Cannot read the sentencepiece model {checkpoint}/tokenizer.model"),
    "float8 tensors": (
        lambda c: retype_tensor(c, "F8_E4M3"),
        "{checkpoint}/model-00001-of-00002.safetensors: model.norm.weight has dtype F8_E4M3, which the conversion "
        "does not read",
    ),
    "uint16 tensors": (
        lambda c: retype_tensor(c, "U16"),
        "{checkpoint}/model-00001-of-00002.safetensors: model.norm.weight has dtype U16",
    ),
    "unknown rope scaling": (
        lambda c: edit_json(c / "config.json", lambda config: config.update(rope_scaling={"type": "wavy"})),
        "{checkpoint}/config.json: rope_scaling type 'wavy' is not one transformers knows",
    ),
    "rope scaling without its factor": (
        lambda c: edit_json(c / "config.json", lambda config: config.update(rope_scaling={"type": "linear"})),
        "{checkpoint}/config.json does not give a valid model config: KeyError",
    ),
    "a number as a shard name": (
        lambda c: edit_json(
            c / "model.safetensors.index.json", lambda index: index["weight_map"].update({"lm_head.weight": 2})
        ),
        "{checkpoint}/model.safetensors.index.json: the 'weight_map' must map tensor names to file names",
    ),
    "a shard outside the folder": (
        lambda c: edit_json(
            c / "model.safetensors.index.json",
            lambda index: index["weight_map"].update({"lm_head.weight": "../clip/model.safetensors"}),
        ),
        "{checkpoint}/model.safetensors.index.json: the 'weight_map' must map tensor names to file names",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_INPUTS))
def test_broken_inputs_fail_in_one_line_naming_the_file(case, release, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(release.checkpoint, checkpoint)
    breakage, message = BROKEN_INPUTS[case]
    breakage(checkpoint)
    before = snapshot(tmp_path)
    code, err = convert_cli(
        capsys, "--checkpoint", checkpoint, "--vision-tower", release.vision_tower, "--output", tmp_path / "out"
    )
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("tokenpacker-convert: error: ") and message.format(checkpoint=checkpoint) in err, err
    assert snapshot(tmp_path) == before


def test_a_full_disk_fails_in_one_line_and_leaves_nothing(release, tmp_path, monkeypatch, capsys):
    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards_module, "save_file", full_disk)
    code, err = convert_cli(
        capsys, "--checkpoint", release.checkpoint, "--vision-tower", release.vision_tower, "--output",
        tmp_path / "new" / "out",
    )
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("tokenpacker-convert: error: [Errno 28] Cannot write ")
    assert "model-part-00001.safetensors: No space left on device" in err
    assert list(tmp_path.iterdir()) == []


# SIGTERM cleans up like Ctrl-C; what a SIGKILL leaves is removed by the next conversion to the same folder.

STALLED_CONVERSION = """
import sys, time
from pathlib import Path
from tokenpacker.conversion import convert

write_weights = convert.write_weights


def stalled_write_weights(plan, folder, *args, **kwargs):
    ready = Path(sys.argv[1])
    ready.with_suffix(".tmp").write_text(str(folder))
    ready.with_suffix(".tmp").rename(ready)
    time.sleep(120)
    return write_weights(plan, folder, *args, **kwargs)


convert.write_weights = stalled_write_weights
sys.exit(convert.main(sys.argv[2:]))
"""


def start_stalled_conversion(release, tmp_path: Path, output: Path):
    """`python -m tokenpacker.conversion`'s main in a process that stops once its staging folder exists; returns the
    process and the staging folder."""
    ready = tmp_path / "ready"
    arguments = ["--checkpoint", release.checkpoint, "--vision-tower", release.vision_tower, "--output", output]
    process = subprocess.Popen(
        [sys.executable, "-c", STALLED_CONVERSION, ready, *map(str, arguments)], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 90
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the conversion did not start: {process.communicate(timeout=30)[1][-2000:]}")
        time.sleep(0.1)
    staging = Path(ready.read_text())
    ready.unlink()
    return process, staging


def test_sigterm_removes_the_staging_folder_and_the_parents_it_created(release, tmp_path):
    output = tmp_path / "work" / "new" / "deeper" / "out"
    (tmp_path / "work").mkdir()
    process, staging = start_stalled_conversion(release, tmp_path, output)
    assert staging.parent == output.parent and staging.name.startswith(".out.converting-")
    assert json.loads((staging / ".tokenpacker-staging").read_text())["pid"] == process.pid
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "tokenpacker-convert: error: stopped by SIGTERM; no partial output is left"
    assert "Traceback" not in err
    assert list((tmp_path / "work").iterdir()) == []


def test_a_conversion_removes_what_a_killed_one_left_and_nothing_else(release, tmp_path, capsys):
    output = tmp_path / "work" / "new" / "out"
    (tmp_path / "work").mkdir()
    process, staging = start_stalled_conversion(release, tmp_path, output)
    process.kill()
    process.communicate(timeout=60)
    assert staging.is_dir() and (staging / ".tokenpacker-staging").is_file()  # SIGKILL leaves it
    foreign = output.parent / ".out.converting-someone-else"  # no marker: not ours
    foreign.mkdir()
    running = output.parent / ".out.converting-running"  # the marker of a process that is alive
    running.mkdir()
    (running / ".tokenpacker-staging").write_text(json.dumps({"pid": os.getpid(), "created_parents": []}))
    code, err = convert_cli(
        capsys, "--checkpoint", release.checkpoint, "--vision-tower", release.vision_tower, "--output", output
    )
    assert code == 0, err
    assert sorted(path.name for path in output.parent.iterdir()) == sorted([foreign.name, running.name, "out"])
    # The parent folders a killed conversion created go too, once empty.
    shutil.rmtree(foreign), shutil.rmtree(running), shutil.rmtree(output)
    stale = output.parent / ".out.converting-stale"
    stale.mkdir()
    marker = {"pid": process.pid, "created_parents": [str(output.parent)]}  # the killed process
    (stale / ".tokenpacker-staging").write_text(json.dumps(marker))
    remove_stale_staging(output, "converting")
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize(
    "vision_tower, found",
    [
        ("clip", "and it is no Hub repo id of the form namespace/name"),
        ("models/clip", "and it is no Hub repo id of the form namespace/name"),  # models/ is a local folder
        ("../elsewhere/clip", "and it is no Hub repo id of the form namespace/name"),
        ("models/notes.txt", "it is a file"),
    ],
)
def test_a_missing_local_vision_tower_is_named_without_going_online(
    vision_tower, found, release, tmp_path, monkeypatch, capsys
):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "notes.txt").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(original_checkpoint, "hf_hub_download", None)  # any download attempt would fail loudly
    code, err = convert_cli(
        capsys, "--checkpoint", release.checkpoint, "--vision-tower", vision_tower, "--output", "out"
    )
    assert code == 1 and "Traceback" not in err
    assert err == f"tokenpacker-convert: error: The vision tower folder {vision_tower} does not exist ({found})\n"


def test_an_unreachable_hub_gives_one_line_naming_the_vision_tower(release, tmp_path, monkeypatch, capsys):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: connections are refused
    point_huggingface_hub_at(monkeypatch, endpoint, tmp_path / "hf_home")
    monkeypatch.setattr(huggingface_hub_http.time, "sleep", lambda seconds: None)  # no waits between its retries
    start = time.monotonic()
    code, err = convert_cli(
        capsys, "--checkpoint", release.checkpoint, "--vision-tower", "openai/clip-tiny", "--output", tmp_path / "out"
    )
    closed.close()
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("tokenpacker-convert: error: Cannot download the vision tower openai/clip-tiny from the Hub")
    assert "if it is meant as a local folder, openai/clip-tiny does not exist" in err
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()


def test_a_hub_that_never_answers_stops_the_download_after_the_timeout(release, tmp_path, monkeypatch, capsys):
    with SilentServer() as silent:
        point_huggingface_hub_at(monkeypatch, silent.endpoint, tmp_path / "hf_home")
        start = time.monotonic()
        code, err = convert_cli(
            capsys, "--checkpoint", release.checkpoint, "--vision-tower", "openai/clip-tiny", "--output",
            tmp_path / "out", "--timeout", "1",
        )
        seconds = time.monotonic() - start
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(
        f"tokenpacker-convert: error: Cannot download the vision tower openai/clip-tiny from the Hub at "
        f"{silent.endpoint} ({silent.endpoint} sent no answer within 1 s)"
    )
    assert seconds < 10
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("timeout", ["0", "-1", "inf", "nan"])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused(timeout, release, tmp_path, capsys):
    code, err = convert_cli(
        capsys, "--checkpoint", release.checkpoint, "--output", tmp_path / "out", "--timeout", timeout
    )
    expected = f"timeout must be a positive number of seconds, got {float(timeout)!r}"
    assert (code, err) == (1, f"tokenpacker-convert: error: {expected}\n")
    assert not (tmp_path / "out").exists()
