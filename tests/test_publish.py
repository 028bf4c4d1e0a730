"""Publishing checkpoints to a Hub-compatible server on 127.0.0.1 (tests/hub_server.py) and reading them back."""

import hashlib
import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from PIL import Image
from transformers import AutoProcessor

from tokenpacker import TokenPackerForConditionalGeneration, TokenPackerProcessor, export_remote_code
from tokenpacker.conversion.publish import main, publish_folder

from .builders import IMAGE_TOKEN_ID, tiny_config, tiny_processor
from .hub_server import HubServer, hub_environment, point_huggingface_hub_at

TOKEN = "hf_alice_write_token"
CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- tokenpacker
---
# Tiny TokenPacker

A randomly initialised TokenPacker for tests.
"""
GENERATE_IN_FRESH_PROCESS = """
import json, sys
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText
import tokenpacker

model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
ids = model.generate(**load_file(sys.argv[2]), max_new_tokens=8, do_sample=False)
print(json.dumps({"class": type(model).__name__, "ids": ids.tolist()}))
"""


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubServer(tokens={TOKEN: "alice"}, organizations={"tokenpacker-org": {"alice"}}) as server:
        point_huggingface_hub_at(monkeypatch, server.endpoint, tmp_path / "hf_home")
        yield server


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = TokenPackerForConditionalGeneration(tiny_config()).eval()
    model.generation_config.suppress_tokens = [IMAGE_TOKEN_ID]  # a random model could otherwise emit `<image>`
    return model


def save_checkpoint(model, folder: Path, **save_kwargs) -> Path:
    model.save_pretrained(folder, **save_kwargs)
    export_remote_code(folder)
    (folder / "README.md").write_text(CARD, encoding="utf-8")
    return folder


@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    return save_checkpoint(tiny_model, tmp_path / "checkpoint")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def run_publish(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_round_trip_publish_download_and_generate_in_a_fresh_process(hub, tiny_model, checkpoint, tmp_path):
    result = publish_folder(
        checkpoint, "alice/tiny-tokenpacker", token=TOKEN, endpoint=hub.endpoint, commit_message="Add tiny checkpoint"
    )

    repo = hub.repos["alice/tiny-tokenpacker"]
    head = hub.head("alice/tiny-tokenpacker")
    assert result.commit.oid == head.oid and head.message == "Add tiny checkpoint"
    assert len(repo.commits) == 2  # the repository's initial commit, then the whole folder in one commit
    assert sorted(head.operations) == [
        ("file", "README.md"), ("file", "compat_tokenpacker.py"), ("file", "config.json"),
        ("file", "configuration_tokenpacker.py"), ("file", "generation_config.json"),
        ("file", "image_processing_tokenpacker.py"), ("file", "modeling_tokenpacker.py"),
        ("file", "processing_tokenpacker.py"), ("lfsFile", "model.safetensors"),
    ]
    weights = (checkpoint / "model.safetensors").read_bytes()
    assert hub.lfs_objects == {hashlib.sha256(weights).hexdigest(): weights}
    routes = [path for _, path, _ in hub.requests]
    lfs_steps = ["/preupload/main", "lfs/objects/batch", "/upload/", "lfs/objects/verify", "/commit/main"]
    positions = [next(i for i, path in enumerate(routes) if step in path) for step in lfs_steps]
    assert positions == sorted(positions)

    snapshot = Path(snapshot_download("alice/tiny-tokenpacker", cache_dir=tmp_path / "download"))
    expected = folder_bytes(checkpoint)
    downloaded = folder_bytes(snapshot)
    assert set(downloaded) == set(expected) | {".gitattributes"}
    assert all(downloaded[name] == content for name, content in expected.items())

    input_ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN_ID] * 36 + [9, 10, 11]])
    inputs = {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 336, 336)}
    save_file(inputs, tmp_path / "inputs.safetensors")
    requests_before = len(hub.requests)
    script = [sys.executable, "-c", GENERATE_IN_FRESH_PROCESS]
    fresh = subprocess.run(
        [*script, "alice/tiny-tokenpacker", str(tmp_path / "inputs.safetensors")],
        env=hub_environment(hub.endpoint, tmp_path / "fresh_home", TOKEN),
        capture_output=True, text=True, timeout=120, check=True,
    )
    answer = json.loads(fresh.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        local_ids = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert answer["class"] == "TokenPackerForConditionalGeneration"
    assert answer["ids"] == local_ids.tolist()
    fresh_downloads = [path for method, path, _ in hub.requests[requests_before:] if method == "GET"]
    assert any(path.startswith("/objects/") for path in fresh_downloads)  # the weights came from this server


def test_an_interrupted_upload_finishes_without_sending_objects_again(hub, tiny_model, tmp_path):
    folder = save_checkpoint(tiny_model, tmp_path / "sharded", max_shard_size="300KB")
    shards = {hashlib.sha256(shard.read_bytes()).hexdigest(): shard.stat().st_size for shard in folder.glob("model-*")}
    assert len(shards) == 4

    hub.hold_lfs_uploads(admitted=1)
    command = [sys.executable, "-m", "tokenpacker.conversion.publish", str(folder), "alice/sharded"]
    process = subprocess.Popen(
        command, env=hub_environment(hub.endpoint, tmp_path / "home", TOKEN),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert hub.wait_until(lambda: len(hub.lfs_objects) == 1 and hub.held_uploads >= 1, timeout=90)
    finally:
        process.kill()
        process.wait(timeout=30)
        hub.release_held_uploads()
    assert set(hub.head("alice/sharded").files) == {".gitattributes"}  # nothing committed
    (arrived,) = hub.lfs_objects
    sent_before = hub.bytes_received("lfs_upload")
    assert sent_before >= shards[arrived]

    publish_folder(folder, "alice/sharded", token=TOKEN, endpoint=hub.endpoint)
    assert hub.bytes_received("lfs_upload") - sent_before == sum(shards.values()) - shards[arrived]
    assert hub.lfs_uploads == dict.fromkeys(shards, 1)
    assert {path: hub.file_bytes("alice/sharded", path) for path in folder_bytes(folder)} == folder_bytes(folder)

    commits = len(hub.repos["alice/sharded"].commits)
    sent_before = hub.bytes_received("lfs_upload")
    publish_folder(folder, "alice/sharded", token=TOKEN, endpoint=hub.endpoint)
    assert hub.bytes_received("lfs_upload") == sent_before
    assert len(hub.repos["alice/sharded"].commits) == commits  # unchanged files make no empty commit


def assert_repository_holds_saved_folder(hub, repo_id: str, saved: Path, download: Path) -> None:
    """The repository holds every saved file byte for byte, plus the generated model card, in one commit."""
    expected = folder_bytes(saved)
    downloaded = folder_bytes(Path(snapshot_download(repo_id, cache_dir=download)))
    assert set(downloaded) == set(expected) | {"README.md", ".gitattributes"}
    assert all(downloaded[name] == content for name, content in expected.items())
    assert len(hub.repos[repo_id].commits) == 2


def test_model_push_to_hub_gives_the_save_pretrained_folder(hub, tiny_model, tmp_path):
    tiny_model.push_to_hub("alice/pushed-model", token=TOKEN)
    tiny_model.save_pretrained(tmp_path / "saved")

    assert_repository_holds_saved_folder(hub, "alice/pushed-model", tmp_path / "saved", tmp_path / "download")


def test_processor_push_to_hub_gives_the_save_pretrained_folder(hub, tmp_path):
    (tmp_path / "sentencepiece").mkdir()
    processor = tiny_processor(tmp_path / "sentencepiece", "slice")
    processor.push_to_hub("alice/pushed-processor", token=TOKEN)
    processor.save_pretrained(tmp_path / "saved")

    assert_repository_holds_saved_folder(hub, "alice/pushed-processor", tmp_path / "saved", tmp_path / "download")
    loaded = AutoProcessor.from_pretrained("alice/pushed-processor", token=TOKEN)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 700, 3), dtype=np.uint8))
    prompt = "USER: <image>\nWhat colour is the square? ASSISTANT:"
    expected, got = processor(images=image, text=prompt), loaded(images=image, text=prompt)
    assert type(loaded) is TokenPackerProcessor and got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_dry_run_lists_files_and_sizes_and_sends_nothing(hub, checkpoint, capsys):
    code, out, err = run_publish(capsys, checkpoint, "alice/tiny", "--dry-run")

    assert (code, err, hub.requests) == (0, "", [])
    sizes = {path.name: path.stat().st_size for path in checkpoint.iterdir()}
    assert out.startswith("Dry run: would upload to alice/tiny (branch main):\n")
    for name, size in sizes.items():
        assert any(line.split() == [name, f"{size:,}", "bytes"] for line in out.splitlines()), name
    assert f"  {len(sizes)} files, {sum(sizes.values()):,} bytes in total" in out


def test_private_organization_repository_on_a_new_branch(hub, checkpoint, capsys, tmp_path):
    (checkpoint / "examples").mkdir()
    (checkpoint / "examples" / "prompt.txt").write_text("USER: <image>\nWhat is in this image? ASSISTANT:")
    repo_id = "tokenpacker-org/private-tiny"
    code, out, err = run_publish(
        capsys, checkpoint, repo_id, "--private", "--branch", "converted", "--commit-message", "Convert",
        "--token", TOKEN, "--endpoint", hub.endpoint,
    )

    assert code == 0 and "error" not in err
    repo = hub.repos[repo_id]
    assert repo.private and set(repo.branches) == {"main", "converted"}
    assert set(hub.head(repo_id).files) == {".gitattributes"}
    assert hub.head(repo_id, "converted").message == "Convert"
    assert f"Published {repo_id} (branch converted, commit {repo.branches['converted']})" in out
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(repo_id, revision="converted", cache_dir=tmp_path / "anonymous", token=False)
    snapshot = Path(snapshot_download(repo_id, revision="converted", cache_dir=tmp_path / "dl", token=TOKEN))
    attributes = hub.file_bytes(repo_id, ".gitattributes")
    assert folder_bytes(snapshot) == {**folder_bytes(checkpoint), ".gitattributes": attributes}

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    assert sorted(api.list_repo_files(repo_id, revision="converted")) == sorted(folder_bytes(snapshot))
    infos = api.get_paths_info(repo_id, ["examples", "model.safetensors", "absent.txt"], revision="converted")
    assert [(type(info).__name__, info.path) for info in infos] == [
        ("RepoFile", "model.safetensors"), ("RepoFolder", "examples")
    ]
    weights = (checkpoint / "model.safetensors").read_bytes()
    assert (infos[0].size, infos[0].lfs.sha256) == (len(weights), hashlib.sha256(weights).hexdigest())


@pytest.mark.parametrize("source", ["environment", "login file"])
def test_token_comes_from_the_environment_or_the_login_file(hub, checkpoint, capsys, monkeypatch, source):
    if source == "environment":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:
        Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
        Path(constants.HF_TOKEN_PATH).write_text(TOKEN)

    code, out, err = run_publish(capsys, checkpoint, "tiny")  # no namespace: the token's user

    assert code == 0 and "error" not in err
    assert "Published alice/tiny (branch main" in out
    assert hub.file_bytes("alice/tiny", "model.safetensors") == (checkpoint / "model.safetensors").read_bytes()


def corrupt(folder: Path, problem: str) -> None:
    """Breaks a saved checkpoint folder in one way."""
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if problem == "no config":
        config_path.unlink()
    elif problem == "config not JSON":
        config_path.write_text("{")
    elif problem == "config not loadable":
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "projector_num_heads": 3}))
    elif problem == "other model type":
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": "llava"}))
    elif problem == "pickle":
        torch.save({"weight": torch.zeros(1)}, folder / "pytorch_model.bin")
    elif problem == "no weights":
        weights_path.unlink()
    elif problem == "missing tensor":
        weights = load_file(weights_path)
        del weights["lm_head.weight"]
        save_file(weights, weights_path, metadata={"format": "pt"})
    elif problem == "wrong shape":
        weights = load_file(weights_path)
        weights["lm_head.weight"] = torch.zeros(3, 64)
        save_file(weights, weights_path, metadata={"format": "pt"})
    elif problem == "no card":
        (folder / "README.md").unlink()
    elif problem == "card without license":
        (folder / "README.md").write_text(CARD.replace("license: apache-2.0\n", ""))
    elif problem == "card with broken metadata":
        (folder / "README.md").write_text(CARD.replace("- tokenpacker", "- [tokenpacker"))
    elif problem == "card with another pipeline":
        (folder / "README.md").write_text(CARD.replace("image-text-to-text", "text-generation"))


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("no config", "is not a TokenPacker checkpoint: config.json is missing"),
        ("config not JSON", "config.json is not valid JSON: Expecting property name enclosed in double quotes"),
        ("config not loadable", "config.json does not load as a TokenPackerConfig: projector_num_heads must divide"),
        ("other model type", "config.json has model_type 'llava', expected 'tokenpacker'"),
        ("pickle", "holds pickle files, which are not published (convert them to safetensors): ['pytorch_model.bin']"),
        ("no weights",
         "must hold its weights as model.safetensors or as shards listed in model.safetensors.index.json"),
        ("missing tensor", "do not match a TokenPacker model: missing: lm_head.weight"),
        ("wrong shape", "do not match a TokenPacker model: wrong shape: lm_head.weight [3, 64] (expected [128, 64])"),
        ("no card", "has no model card: write a README.md with Hub metadata before publishing"),
        ("card without license", "README.md is incomplete: license is missing"),
        ("card with broken metadata", "README.md is not a valid YAML mapping: while parsing a flow sequence"),
        ("card with another pipeline", "pipeline_tag must be 'image-text-to-text', got 'text-generation'"),
    ],
)
def test_folders_that_are_not_publishable_checkpoints_are_refused(hub, checkpoint, capsys, problem, message):
    corrupt(checkpoint, problem)

    code, out, err = run_publish(capsys, checkpoint, "alice/tiny", "--token", TOKEN)

    assert code == 1 and out == "" and hub.requests == []
    assert err.startswith("tokenpacker-publish: error: ") and message in err


def test_sharded_weights_must_match_their_index(hub, tiny_model, tmp_path, capsys):
    folder = save_checkpoint(tiny_model, tmp_path / "sharded", max_shard_size="300KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved, weight_map = "lm_head.weight", index["weight_map"]
    weight_map[moved] = next(shard for shard in weight_map.values() if shard != weight_map[moved])
    index_path.write_text(json.dumps(index))
    code, _, err = run_publish(capsys, folder, "alice/tiny", "--dry-run")
    assert code == 1 and "index does not match its shards: tensors not in the shard the index names: ['lm_head.weight']" in err

    (folder / "model-00002-of-00004.safetensors").unlink()
    code, _, err = run_publish(capsys, folder, "alice/tiny", "--dry-run")
    assert code == 1 and "lists shards that are missing from" in err and "['model-00002-of-00004.safetensors']" in err
    assert hub.requests == []


def test_no_token_and_an_invalid_repository_name_fail_before_sending_anything(hub, checkpoint, capsys):
    code, out, err = run_publish(capsys, checkpoint, "alice/tiny")
    assert (code, out) == (1, "")
    assert "no Hugging Face token: pass --token, set HF_TOKEN or log in with `hf auth login`" in err

    code, out, err = run_publish(capsys, checkpoint, "alice/bad name!", "--token", TOKEN)
    assert (code, out) == (1, "")
    assert "invalid repository name 'alice/bad name!'" in err

    code, out, err = run_publish(capsys, checkpoint / "absent", "alice/tiny", "--token", TOKEN)
    assert (code, out) == (1, "")
    assert f"expected a checkpoint folder, got '{checkpoint / 'absent'}', which is not a directory" in err
    assert hub.requests == []


def test_a_wrong_token_is_rejected(hub, checkpoint, capsys):
    code, out, err = run_publish(capsys, checkpoint, "alice/tiny", "--token", "hf_wrong", "--endpoint", hub.endpoint)

    assert (code, out) == (1, "")
    assert "the Hub rejected the token (401 Unauthorized) while checking the token: Invalid user token." in err
    assert hub.repos == {}


def test_writing_without_a_token_is_unauthorized(hub):
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(endpoint=hub.endpoint).create_repo("alice/anonymous", token=False)
    assert error.value.response.status_code == 401 and hub.repos == {}


def test_a_forbidden_repository_is_refused(hub, checkpoint, capsys):
    code, out, err = run_publish(capsys, checkpoint, "bob/tiny", "--token", TOKEN, "--endpoint", hub.endpoint)

    assert (code, out) == (1, "")
    assert "the token may not write there (403 Forbidden) while creating the repository bob/tiny" in err
    assert 'rights to create a model under the namespace "bob"' in err
    assert hub.repos == {}


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ({"status": 500}, "the Hub failed with a server error (500) while uploading 9 files to alice/tiny"),
        ({"drop": True}, "the connection to {endpoint} failed while uploading 9 files to alice/tiny (RemoteProtocol"),
    ],
)
def test_a_failed_commit_publishes_nothing_and_a_rerun_completes_it(hub, checkpoint, capsys, failure, message):
    HfApi(endpoint=hub.endpoint, token=TOKEN).create_repo("alice/tiny")  # kept: it existed before the command
    hub.fail("commit", **failure)
    code, out, err = run_publish(capsys, checkpoint, "alice/tiny", "--token", TOKEN, "--endpoint", hub.endpoint)

    assert (code, out) == (1, "")
    assert message.format(endpoint=hub.endpoint) in err
    assert "nothing was published; run the command again" in err
    assert set(hub.head("alice/tiny").files) == {".gitattributes"}

    hub.clear_failures()
    sent_before = hub.bytes_received("lfs_upload")
    code, out, err = run_publish(capsys, checkpoint, "alice/tiny", "--token", TOKEN, "--endpoint", hub.endpoint)
    assert code == 0 and "error" not in err and out.startswith("Published alice/tiny")
    assert hub.bytes_received("lfs_upload") == sent_before  # the weights had arrived before the commit failed
    assert hub.file_bytes("alice/tiny", "model.safetensors") == (checkpoint / "model.safetensors").read_bytes()


def test_the_command_is_installed_as_a_console_script():
    (script,) = entry_points(group="console_scripts", name="tokenpacker-publish")
    assert script.load() is main
