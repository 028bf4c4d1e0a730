"""tokenpacker-publish against a Hub that stalls or refuses, and folders that must not be published as they are:
links out of the folder, pickled data under any name, text that is not UTF-8."""

import gzip
import io
import json
import pickle
import time
import zipfile

import httpx2
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, get_session

from .hub_server import SilentServer
from .test_publish import TOKEN, checkpoint, hub, run_publish, save_checkpoint, tiny_model  # noqa: F401

TIMEOUT_S = 1
SLACK_S = 8  # the folder's checks and the process's own work, well above what they take


def publish_with_timeout(capsys, folder, endpoint, *extra) -> tuple[int, str, str, float]:
    start = time.monotonic()
    code, out, err = run_publish(
        capsys, folder, "alice/tiny", "--token", TOKEN, "--endpoint", endpoint, "--timeout", TIMEOUT_S, *extra
    )
    return code, out, err, time.monotonic() - start


def assert_one_error_line(err: str, *parts: str) -> None:
    """stderr ends with one error line holding every part (upload progress bars may come before it)."""
    assert err.count("tokenpacker-publish: error: ") == 1, err
    line = err[err.index("tokenpacker-publish: error: ") :]
    assert line.endswith("\n") and line.count("\n") == 1, err
    for part in parts:
        assert part in line, err


def test_an_endpoint_that_never_answers_fails_after_the_timeout(hub, checkpoint, capsys):
    with SilentServer() as silent:
        code, out, err, seconds = publish_with_timeout(capsys, checkpoint, silent.endpoint)

    assert (code, out) == (1, "")
    assert seconds < TIMEOUT_S + SLACK_S
    assert_one_error_line(err, f"{silent.endpoint} sent no answer within 1 s while checking the token")
    assert get_session().timeout == httpx2.Timeout(None)  # huggingface_hub's own client is back after the command


def test_a_request_sent_without_a_timeout_still_times_out(hub, checkpoint, capsys):
    hub.stall("repo_info")  # huggingface_hub asks for the repository's info with timeout=None

    code, _, err, seconds = publish_with_timeout(capsys, checkpoint, hub.endpoint)

    assert code == 1 and seconds < TIMEOUT_S + SLACK_S
    assert_one_error_line(err, f"{hub.endpoint} sent no answer within 1 s while creating the repository alice/tiny")
    assert hub.repos == {}


def file_count(folder) -> int:
    return sum(1 for path in folder.rglob("*") if path.is_file())


def test_a_stalled_upload_to_storage_fails_and_removes_the_repository_it_created(hub, checkpoint, capsys):
    hub.stall("lfs_upload")

    code, out, err, seconds = publish_with_timeout(capsys, checkpoint, hub.endpoint)

    assert (code, out) == (1, "")
    assert seconds < TIMEOUT_S + SLACK_S
    assert_one_error_line(
        err,
        f"{hub.storage_endpoint} (storage of the Hub at {hub.endpoint}) sent no answer within 1 s "
        f"while uploading {file_count(checkpoint)} files to alice/tiny; nothing was published",
        "the repository alice/tiny, created by this command, was deleted again",
    )
    assert hub.bytes_received("lfs_upload") == (checkpoint / "model.safetensors").stat().st_size
    assert hub.repos == {}


def test_a_failed_upload_keeps_a_repository_that_existed_before(hub, checkpoint, capsys):
    HfApi(endpoint=hub.endpoint, token=TOKEN).create_repo("alice/tiny")
    hub.stall("lfs_upload")

    code, _, err, _ = publish_with_timeout(capsys, checkpoint, hub.endpoint)

    assert code == 1 and f"sent no answer within 1 s while uploading {file_count(checkpoint)} files to alice/tiny" in err
    assert "deleted" not in err
    assert set(hub.head("alice/tiny").files) == {".gitattributes"}


def test_a_failed_commit_removes_the_repository_it_created(hub, checkpoint, capsys):
    hub.fail("commit", 500)

    code, _, err, _ = publish_with_timeout(capsys, checkpoint, hub.endpoint)

    assert code == 1
    assert_one_error_line(
        err,
        f"the Hub failed with a server error (500) while uploading {file_count(checkpoint)} files to alice/tiny",
        "the repository alice/tiny, created by this command, was deleted again",
    )
    assert hub.repos == {}


def test_a_rate_limited_commit_says_so(hub, checkpoint, capsys):
    hub.fail("commit", 429)

    code, _, err, _ = publish_with_timeout(capsys, checkpoint, hub.endpoint)

    assert code == 1
    assert_one_error_line(
        err,
        f"the Hub at {hub.endpoint} limits the request rate (429 Too Many Requests) "
        f"while uploading {file_count(checkpoint)} files to alice/tiny",
        "nothing was published; run the command again later",
    )


def test_the_timeout_must_be_positive(hub, checkpoint, capsys):
    code, _, err = run_publish(capsys, checkpoint, "alice/tiny", "--token", TOKEN, "--timeout", "0")

    assert code == 1 and hub.requests == []
    assert_one_error_line(err, "timeout must be a positive number of seconds, got 0.0")


@pytest.mark.parametrize("target", ["file", "folder", "file inside"])
def test_symbolic_links_are_refused(hub, checkpoint, capsys, tmp_path, target):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "token").write_text("hf_secret_value")
    if target == "file":
        (checkpoint / "notes.txt").symlink_to(secret / "token")
    elif target == "folder":
        (checkpoint / "notes.txt").symlink_to(secret, target_is_directory=True)
    else:
        (checkpoint / "notes.txt").symlink_to(checkpoint / "config.json")

    code, out, err = run_publish(capsys, checkpoint, "alice/tiny", "--token", TOKEN, "--endpoint", hub.endpoint)

    assert (code, out) == (1, "") and hub.requests == []
    assert_one_error_line(err, "holds symbolic links, which are not published (copy the files in): ['notes.txt']")


def torch_bytes(**save_kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buffer, **save_kwargs)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


OBJECTS = np.array([{"a": 1}, None], dtype=object)
PICKLED = {
    "protocol 2 pickle": (lambda: pickle.dumps({"w": [1, 2]}, protocol=2), "a pickle (protocol 2)"),
    "protocol 5 pickle": (lambda: pickle.dumps({"w": [1, 2]}, protocol=5), "a pickle (protocol 5)"),
    "torch zip checkpoint": (torch_bytes, "a zip archive with pickle members (archive/data.pkl)"),
    "torch legacy checkpoint": (
        lambda: torch_bytes(_use_new_zipfile_serialization=False), "a pickle (protocol 2)"
    ),
    "object npy": (lambda: npy_bytes(OBJECTS), "a numpy array of Python objects"),
    "structured npy with an object field": (
        lambda: npy_bytes(np.zeros(2, dtype=[("x", "<f4"), ("y", "O")])), "a numpy array of Python objects"
    ),
    "object npz": (
        lambda: npz_bytes(fine=np.zeros(3), bad=OBJECTS), "a zip archive whose bad.npy is a numpy array of Python"
    ),
    "gzip-compressed pickle": (lambda: gzip.compress(pickle.dumps([1, 2, 3], protocol=4)), "a compressed pickle"),
}


@pytest.mark.parametrize("kind", list(PICKLED))
def test_pickled_data_is_refused_whatever_the_file_is_called(hub, checkpoint, capsys, kind):
    make, description = PICKLED[kind]
    (checkpoint / "weights.dat").write_bytes(make())

    code, out, err = run_publish(capsys, checkpoint, "alice/tiny", "--token", TOKEN, "--endpoint", hub.endpoint)

    assert (code, out) == (1, "") and hub.requests == []
    assert_one_error_line(
        err, "holds pickle files, which are not published (convert them to safetensors): ['weights.dat']",
        f"weights.dat: {description}",
    )


def padded_safetensors(path, header_size: int) -> None:
    """Rewrites a safetensors file with its JSON header padded by spaces to `header_size` bytes."""
    content = path.read_bytes()
    size = int.from_bytes(content[:8], "little")
    header = content[8 : 8 + size].rstrip(b" ")
    path.write_bytes(header_size.to_bytes(8, "little") + header.ljust(header_size, b" ") + content[8 + size :])


def test_a_folder_with_plain_data_files_still_publishes(hub, checkpoint, capsys):
    # a header length whose first bytes read like a pickle's opening: 0x80, protocol 2, then the opcode '}'
    padded_safetensors(checkpoint / "model.safetensors", header_size=0x7D0280)
    assert (checkpoint / "model.safetensors").read_bytes()[:3] == b"\x80\x02}"
    (checkpoint / "examples").mkdir()
    (checkpoint / "examples" / "features.npy").write_bytes(npy_bytes(np.arange(6.0).reshape(2, 3)))
    (checkpoint / "examples" / "features.npz").write_bytes(npz_bytes(a=np.ones(2), b=np.arange(3)))
    with zipfile.ZipFile(checkpoint / "examples" / "images.zip", "w") as archive:
        archive.writestr("one.txt", "USER: <image>\nWhat is in this image? ASSISTANT:")
    (checkpoint / "examples" / "prompt.txt.gz").write_bytes(gzip.compress(b"What colour is the square?"))

    code, out, err = run_publish(capsys, checkpoint, "alice/tiny", "--token", TOKEN, "--endpoint", hub.endpoint)

    assert code == 0 and "error" not in err and out.startswith("Published alice/tiny")
    for path in ("model.safetensors", "examples/features.npy", "examples/features.npz", "examples/images.zip"):
        assert hub.file_bytes("alice/tiny", path) == (checkpoint / path).read_bytes()


def write_index(folder, change) -> None:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    change(index)
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("config not UTF-8", "config.json is not UTF-8 text (invalid start byte at byte 1): expected a JSON model"),
        ("config not an object", "config.json must hold a JSON object, got list"),
        ("card not UTF-8", "README.md is not UTF-8 text (invalid continuation byte at byte"),
        ("index not UTF-8", "model.safetensors.index.json is not UTF-8 text (invalid start byte at byte 0)"),
        ("index map of lists", "model.safetensors.index.json: the 'weight_map' must map tensor names to file names "
                               "(in the folder), got lm_head.weight: ['model-00001-of-00004.safetensors']"),
        ("index map not an object", "model.safetensors.index.json is not a safetensors index: expected a JSON object"),
    ],
)
def test_unreadable_text_files_are_named(hub, tiny_model, tmp_path, capsys, problem, message):
    folder = save_checkpoint(tiny_model, tmp_path / "sharded", max_shard_size="300KB")
    if problem == "config not UTF-8":
        (folder / "config.json").write_bytes(b"{\xff}")
    elif problem == "config not an object":
        (folder / "config.json").write_text("[]")
    elif problem == "card not UTF-8":
        (folder / "README.md").write_bytes((folder / "README.md").read_bytes() + b"\nCaf\xe9\n")
    elif problem == "index not UTF-8":
        (folder / "model.safetensors.index.json").write_bytes(b"\xfe\xff")
    elif problem == "index map of lists":
        write_index(folder, lambda index: index["weight_map"].update({"lm_head.weight": [
            "model-00001-of-00004.safetensors"]}))
    else:
        write_index(folder, lambda index: index.update(weight_map=["model-00001-of-00004.safetensors"]))

    code, out, err = run_publish(capsys, folder, "alice/tiny", "--token", TOKEN, "--endpoint", hub.endpoint)

    assert (code, out) == (1, "") and hub.requests == []
    assert_one_error_line(err, str(folder), message)
