"""Publishing a TokenPacker checkpoint folder to the Hugging Face Hub in one commit.

The folder is checked before anything is sent: it must load as a TokenPacker checkpoint (config and safetensors
weights that match the model), hold no symbolic links and no pickled data (recognised by content, whatever the
file's name), and carry a model card with Hub metadata. The upload goes through `huggingface_hub`: large files take
its LFS path, and objects the Hub already holds are not sent again, so an interrupted upload finishes by running the
same command once more. Every request to the Hub or its storage gives up after `timeout` seconds without an answer.
"""

import argparse
import bz2
import io
import lzma
import os
import pickletools
import sys
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
import numpy as np
import yaml
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, HFValidationError, filter_repo_objects, validate_repo_id

from ..configuration import TokenPackerConfig
from .checkpoint_files import SAFETENSORS, CheckpointFiles, few, read_json
from .hub_client import DEFAULT_TIMEOUT_S, HubTimeout, check_timeout, hub_requests_time_out, timed_out_server
from .sizes import check_model_sizes, model_parameters

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PIPELINE_TAG = "image-text-to-text"
DEFAULT_COMMIT_MESSAGE = "Upload TokenPacker checkpoint"
RETRY_HINT = "nothing was published; run the command again"
SNIFF_BYTES = 64
COMPRESSED_SNIFF_BYTES = 64 * 1024  # also enough for an array header
PICKLE_OPCODES = frozenset(opcode.code.encode("latin-1") for opcode in pickletools.opcodes)
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# stream magic -> a decompressor for it (the compressions joblib writes its pickles with)
COMPRESSED_STREAMS = {
    b"\x1f\x8b": lambda: zlib.decompressobj(wbits=31),
    b"\x78\x01": zlib.decompressobj,
    b"\x78\x5e": zlib.decompressobj,
    b"\x78\x9c": zlib.decompressobj,
    b"\x78\xda": zlib.decompressobj,
    b"BZh": bz2.BZ2Decompressor,
    b"\xfd7zXZ\x00": lzma.LZMADecompressor,
    b"]\x00\x00": lzma.LZMADecompressor,
}


class PublishError(RuntimeError):
    """The Hub or the connection to it refused the upload."""


@dataclass(frozen=True)
class FileToUpload:
    path_in_repo: str
    local_path: Path
    size: int


@dataclass(frozen=True)
class PublishResult:
    repo_id: str
    revision: str
    files: list[FileToUpload]
    commit: CommitInfo | None  # None for a dry run

    @property
    def total_size(self) -> int:
        return sum(file.size for file in self.files)


def list_folder_files(folder: Path) -> list[FileToUpload]:
    """Every file of the folder that an upload would send, sorted, with the Hub's default ignores applied.

    Symbolic links (to files or folders) are refused, and so is any file whose real path is outside the folder."""
    entries = []  # every path below the folder, links included and not followed
    for directory, folders, names in os.walk(folder):
        entries += [Path(directory, name) for name in folders + names]
    relative = {path.relative_to(folder).as_posix(): path for path in entries}
    kept = sorted(filter_repo_objects(list(relative), ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    links = [path for path in kept if relative[path].is_symlink()]
    if links:
        raise ValueError(f"{folder} holds symbolic links, which are not published (copy the files in): {links}")
    root = folder.resolve()
    outside = [path for path in kept if not relative[path].resolve().is_relative_to(root)]
    if outside:
        raise ValueError(f"{folder} holds paths that resolve outside it, which are not published: {outside}")
    files = [path for path in kept if relative[path].is_file()]
    return [FileToUpload(path, relative[path], relative[path].stat().st_size) for path in files]


def pickled_content(path: Path) -> str | None:
    """What pickled data the file holds, judged by its first bytes (and a zip's directory), or None. Loads nothing."""
    with path.open("rb") as stream:
        head = stream.read(SNIFF_BYTES)
        if head.startswith(NPY_MAGIC):
            stream.seek(0)
            return "a numpy array of Python objects" if _npy_holds_objects(stream) else None
        if head.startswith(ZIP_MAGICS):
            return _zip_pickles(path)
        if _is_pickle_stream(head) and not _is_safetensors_header(head, path.stat().st_size):
            return f"a pickle (protocol {head[1]})"
        for magic, decompressor in COMPRESSED_STREAMS.items():
            if head.startswith(magic):
                stream.seek(0)
                try:
                    start = decompressor().decompress(stream.read(COMPRESSED_SNIFF_BYTES), SNIFF_BYTES)
                except (OSError, ValueError, EOFError, zlib.error, lzma.LZMAError):  # not that compression after all
                    return None
                return "a compressed pickle" if _is_pickle_stream(start) else None
    return None


def _is_pickle_stream(head: bytes) -> bool:
    """Pickle protocols 2 to 5 (torch's legacy format included) open with PROTO, its number, then an opcode."""
    return len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2:3] in PICKLE_OPCODES


def _is_safetensors_header(head: bytes, size: int) -> bool:
    """A safetensors file opens with its header's length (8 bytes, little-endian) and then the header's '{'."""
    return len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= size


def _npy_holds_objects(stream) -> bool:
    """Whether a .npy header declares a dtype with Python objects (which numpy stores pickled)."""
    try:
        version = np.lib.format.read_magic(stream)  # versions 2 and 3 differ only in the header's text encoding
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(stream, max_header_size=1 << 20)
    except ValueError:  # an unreadable header is treated like one that declares objects
        return True
    return dtype.hasobject


def _zip_pickles(path: Path) -> str | None:
    """Torch's zip checkpoints keep their pickle in `*.pkl` members; .npz archives keep arrays in `*.npy` members."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [name for name in names if name.lower().endswith((".pkl", ".pickle"))]
            if pickles:
                return f"a zip archive with pickle members ({few(pickles)})"
            for name in names:  # numpy reads every member that opens like an array as one, whatever its name
                with archive.open(name) as member:
                    head = member.read(COMPRESSED_SNIFF_BYTES)
                if head.startswith(NPY_MAGIC) and _npy_holds_objects(io.BytesIO(head)):
                    return f"a zip archive whose {name} is a numpy array of Python objects"
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError):
        # Corrupt, encrypted or compressed in a way zipfile cannot read: then numpy and torch cannot open it either, so
        # nothing in it would ever be unpickled. That is the answer "no pickled content", not an error to hide.
        return None
    return None


def check_no_pickles(folder: Path, files: list[FileToUpload]) -> None:
    """Refuses pickle files: named like one, or holding pickled data whatever their name."""
    found = {}
    for file in files:
        if file.path_in_repo.lower().endswith(PICKLE_SUFFIXES):
            found[file.path_in_repo] = "named like a pickle file"
        elif (content := pickled_content(file.local_path)) is not None:
            found[file.path_in_repo] = content
    if found:
        details = "; ".join(f"{path}: {content}" for path, content in found.items())
        raise ValueError(
            f"{folder} holds pickle files, which are not published (convert them to safetensors): {list(found)} "
            f"({details})"
        )


def load_checkpoint_config(folder: Path) -> TokenPackerConfig:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a TokenPacker checkpoint: config.json is missing")
    config = read_json(config_path, "a JSON model configuration")
    model_type = config.get("model_type")
    if model_type != TokenPackerConfig.model_type:
        raise ValueError(f"{config_path} has model_type {model_type!r}, expected {TokenPackerConfig.model_type!r}")
    try:
        return TokenPackerConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{config_path} does not load as a TokenPackerConfig: {err}") from err


def read_weight_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape over the safetensors files the folder declares, checked against the index when sharded."""
    tensors = CheckpointFiles(folder, "checkpoint", formats=(SAFETENSORS,)).inventory()
    return {name: list(info.shape) for name, info in tensors.items()}


def check_weights_match_model(folder: Path, config: TokenPackerConfig, shapes: dict[str, list[int]]) -> None:
    """Compares the checkpoint's tensor names and shapes with the model the config builds (on the meta device)."""
    check_model_sizes(folder / "config.json", config, shapes)
    expected = model_parameters(config)
    expected_shapes = {name: list(shape) for name, shape in expected.shapes.items()}
    unexpected = sorted(set(shapes) - set(expected_shapes))
    missing = sorted(names[0] for names in expected.tied_groups if not any(name in shapes for name in names))
    wrong_shape = sorted(
        f"{name} {shapes[name]} (expected {expected_shapes[name]})"
        for name in set(shapes) & set(expected_shapes)
        if shapes[name] != expected_shapes[name]
    )
    problems = [
        f"{label}: {few(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if names
    ]
    if problems:
        raise ValueError(f"the weights in {folder} do not match a TokenPacker model: " + "; ".join(problems))


def check_model_card(folder: Path) -> ModelCard:
    card_path = folder / "README.md"
    if not card_path.is_file():
        raise ValueError(f"{folder} has no model card: write a README.md with Hub metadata before publishing")
    try:
        text = card_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{card_path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    try:
        card = ModelCard(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"the metadata block of {card_path} is not a valid YAML mapping: {err}") from err
    metadata = card.data
    problems = [f"{field} is missing" for field in ("license", "library_name") if not getattr(metadata, field)]
    if metadata.pipeline_tag != PIPELINE_TAG:
        problems.append(f"pipeline_tag must be {PIPELINE_TAG!r}, got {metadata.pipeline_tag!r}")
    if problems:
        raise ValueError(f"the model card metadata in {card_path} is incomplete: " + "; ".join(problems))
    return card


def check_checkpoint_folder(folder: str | Path) -> list[FileToUpload]:
    """Refuses a folder that is not a publishable TokenPacker checkpoint; returns the files to upload."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"expected a checkpoint folder, got {str(folder)!r}, which is not a directory")
    files = list_folder_files(folder)
    check_no_pickles(folder, files)
    shapes = read_weight_shapes(folder)  # the weights' table of contents is checked before the config builds anything
    config = load_checkpoint_config(folder)
    check_weights_match_model(folder, config, shapes)
    check_model_card(folder)
    return files


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"invalid repository name {repo_id!r}: {err}") from err


@contextmanager
def hub_step(action: str, endpoint: str) -> Iterator[None]:
    """Turns the Hub's and the network's failures during `action` into a PublishError that names the cause."""
    try:
        yield
    except RuntimeError as err:
        if isinstance(err.__cause__, (HfHubHTTPError, httpx2.TransportError)):  # raised from an upload thread
            raise _publish_error(err.__cause__, action, endpoint) from err
        raise
    except (HfHubHTTPError, httpx2.TransportError) as err:
        raise _publish_error(err, action, endpoint) from err


def _publish_error(err: Exception, action: str, endpoint: str) -> PublishError:
    if isinstance(err, HubTimeout):
        return PublishError(f"{timed_out_server(err, endpoint)} sent {err} while {action}; {RETRY_HINT}")
    if isinstance(err, httpx2.TransportError):
        cause = f"{type(err).__name__}: {err}"
        return PublishError(f"the connection to {endpoint} failed while {action} ({cause}); {RETRY_HINT}")
    status = err.response.status_code if err.response is not None else None
    detail = str(err).strip()
    if status == 401:
        return PublishError(f"the Hub rejected the token (401 Unauthorized) while {action}: {detail}")
    if status == 403:
        return PublishError(f"the token may not write there (403 Forbidden) while {action}: {detail}")
    if status == 429:
        wait = err.response.headers.get("Retry-After")
        when = f"in {wait} s" if wait else "later"
        return PublishError(
            f"the Hub at {endpoint} limits the request rate (429 Too Many Requests) while {action}: {detail}; "
            f"{RETRY_HINT} {when}"
        )
    if status is not None and status >= 500:
        return PublishError(f"the Hub failed with a server error ({status}) while {action}: {detail}; {RETRY_HINT}")
    return PublishError(f"the Hub answered {status} while {action}: {detail}")


def publish_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> PublishResult:
    """Uploads a TokenPacker checkpoint folder to `repo_id` in one commit, creating the repository (and the branch
    `revision`) when needed. The token defaults to HF_TOKEN or the saved login. `dry_run` checks and lists only.
    Each request gives up after `timeout` seconds without an answer; a repository this call created is deleted
    again if the upload fails."""
    check_repo_id(repo_id)
    check_timeout(timeout)
    files = check_checkpoint_folder(folder)
    branch = revision or "main"
    if dry_run:
        return PublishResult(repo_id, branch, files, commit=None)
    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token: pass --token, set HF_TOKEN or log in with `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token)
    with hub_requests_time_out(timeout):
        with hub_step("checking the token", api.endpoint):
            user = api.whoami()["name"]
        if "/" not in repo_id:
            repo_id = f"{user}/{repo_id}"
        with hub_step(f"creating the repository {repo_id}", api.endpoint):
            existed = api.repo_exists(repo_id)
            repo_id = api.create_repo(repo_id, private=private, exist_ok=existed).repo_id
        try:
            commit = _commit_folder(api, repo_id, branch, files, commit_message or DEFAULT_COMMIT_MESSAGE)
        except PublishError as err:
            if existed:
                raise
            raise PublishError(f"{err}; {_delete_new_repository(api, repo_id)}") from err
    return PublishResult(repo_id, branch, files, commit)


def _commit_folder(api: HfApi, repo_id: str, branch: str, files: list[FileToUpload], message: str) -> CommitInfo:
    if branch != "main":
        with hub_step(f"creating the branch {branch!r}", api.endpoint):
            api.create_branch(repo_id, branch=branch, exist_ok=True)
    operations = [CommitOperationAdd(file.path_in_repo, file.local_path) for file in files]
    with hub_step(f"uploading {len(files)} files to {repo_id}", api.endpoint):
        return api.create_commit(repo_id, operations, commit_message=message, revision=branch)


def _delete_new_repository(api: HfApi, repo_id: str) -> str:
    """Deletes the repository this command created for an upload that failed; says how that went."""
    try:
        with hub_step(f"deleting the new repository {repo_id}", api.endpoint):
            api.delete_repo(repo_id)
    except PublishError as err:
        return f"the repository {repo_id}, created by this command, is left empty: {err}"
    return f"the repository {repo_id}, created by this command, was deleted again"


def _describe_files(result: PublishResult) -> str:
    width = max(len(file.path_in_repo) for file in result.files)
    lines = [f"  {file.path_in_repo:<{width}}  {file.size:>15,} bytes" for file in result.files]
    lines.append(f"  {len(result.files)} files, {result.total_size:,} bytes in total")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenpacker-publish",
        description="Upload a TokenPacker checkpoint folder to the Hugging Face Hub in one commit.",
    )
    parser.add_argument("folder", help="checkpoint folder: config.json, safetensors weights, README.md model card")
    parser.add_argument("repo_id", help="target repository, 'namespace/name' (or 'name' under the token's user)")
    parser.add_argument("--private", action="store_true", help="create the repository private (new repositories)")
    parser.add_argument("--revision", "--branch", dest="revision", help="branch to commit to, created if missing")
    parser.add_argument("--commit-message", help=f"commit message (default: {DEFAULT_COMMIT_MESSAGE!r})")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN, then the saved login)")
    parser.add_argument("--dry-run", action="store_true", help="check the folder and list the files; send nothing")
    parser.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT, then the public Hub)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help=f"give up when the Hub or its storage sends no answer for this long (default: {DEFAULT_TIMEOUT_S:g})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = publish_folder(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            dry_run=args.dry_run,
            endpoint=args.endpoint,
            timeout=args.timeout,
        )
    except (ValueError, TypeError, OSError, PublishError) as err:
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"tokenpacker-publish: error: {message}", file=sys.stderr)
        return 1
    if result.commit is None:
        print(f"Dry run: would upload to {result.repo_id} (branch {result.revision}):\n{_describe_files(result)}")
    else:
        print(
            f"Published {result.repo_id} (branch {result.revision}, commit {result.commit.oid}):\n"
            f"{_describe_files(result)}\n{result.commit.commit_url}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
