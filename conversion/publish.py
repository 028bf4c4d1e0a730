"""Publishing a TokenPacker checkpoint folder to the Hugging Face Hub in one commit.

The folder is checked before anything is sent: it must load as a TokenPacker checkpoint (config and safetensors
weights that match the model), hold no pickle files, and carry a model card with Hub metadata. The upload goes
through `huggingface_hub`: large files take its LFS path, and objects the Hub already holds are not sent again, so
an interrupted upload finishes by running the same command once more.
"""

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
import torch
import yaml
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, HFValidationError, filter_repo_objects, validate_repo_id
from safetensors import SafetensorError, safe_open

from ..configuration import TokenPackerConfig
from ..modeling import TokenPackerForConditionalGeneration
from .sizes import check_model_sizes

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PIPELINE_TAG = "image-text-to-text"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DEFAULT_COMMIT_MESSAGE = "Upload TokenPacker checkpoint"
RETRY_HINT = "nothing was published; run the command again (files the Hub already received are not sent again)"


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
    """Every file of the folder that an upload would send, sorted, with the Hub's default ignores applied."""
    relative_paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    kept = filter_repo_objects(relative_paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS)
    return [FileToUpload(path, folder / path, (folder / path).stat().st_size) for path in kept]


def load_checkpoint_config(folder: Path) -> TokenPackerConfig:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a TokenPacker checkpoint: config.json is missing")
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    if model_type != TokenPackerConfig.model_type:
        raise ValueError(f"{config_path} has model_type {model_type!r}, expected {TokenPackerConfig.model_type!r}")
    try:
        return TokenPackerConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{config_path} does not load as a TokenPackerConfig: {err}") from err


def weight_files(folder: Path) -> dict[str, list[str] | None]:
    """The safetensors files the checkpoint declares: shard name -> tensor names from the index (None if unsharded)."""
    on_disk = sorted(path.name for path in folder.glob("*.safetensors"))
    index_path = folder / WEIGHTS_INDEX
    if not index_path.is_file():
        if on_disk != [SINGLE_WEIGHTS]:
            raise ValueError(
                f"{folder} must hold its weights as {SINGLE_WEIGHTS} or as shards listed in {WEIGHTS_INDEX}, "
                f"found safetensors files {on_disk}"
            )
        return {SINGLE_WEIGHTS: None}
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_path} is not a safetensors index with a 'weight_map': {err}") from err
    shards: dict[str, list[str]] = defaultdict(list)
    for name, shard in weight_map.items():
        shards[shard].append(name)
    missing = sorted(set(shards) - set(on_disk))
    if missing:
        raise ValueError(f"{WEIGHTS_INDEX} lists shards that are missing from {folder}: {missing}")
    unlisted = sorted(set(on_disk) - set(shards))
    if unlisted:
        raise ValueError(f"{folder} holds safetensors files that {WEIGHTS_INDEX} does not list: {unlisted}")
    return dict(shards)


def read_weight_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape over every declared safetensors file, checked against the index when sharded."""
    shapes: dict[str, list[int]] = {}
    for shard, indexed_names in weight_files(folder).items():
        try:
            with safe_open(folder / shard, framework="pt") as weights:
                shard_shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}
        except SafetensorError as err:
            raise ValueError(f"{folder / shard} is not a readable safetensors file: {err}") from err
        if indexed_names is not None and set(indexed_names) != set(shard_shapes):
            differing = sorted(set(indexed_names) ^ set(shard_shapes))
            raise ValueError(f"{shard} does not hold the tensors {WEIGHTS_INDEX} maps to it: {_few(differing)}")
        shapes.update(shard_shapes)
    return shapes


def check_weights_match_model(folder: Path, config: TokenPackerConfig) -> None:
    """Compares the checkpoint's tensor names and shapes with the model the config builds (on the meta device)."""
    shapes = read_weight_shapes(folder)
    check_model_sizes(folder / "config.json", config, shapes)
    with torch.device("meta"):
        model = TokenPackerForConditionalGeneration(config)
    aliases: dict[int, list[str]] = defaultdict(list)  # tied parameters share one tensor under several names
    expected_shapes = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases[id(tensor)].append(name)
        expected_shapes[name] = list(tensor.shape)
    unexpected = sorted(set(shapes) - set(expected_shapes))
    missing = sorted(names[0] for names in aliases.values() if not any(name in shapes for name in names))
    wrong_shape = sorted(
        f"{name} {shapes[name]} (expected {expected_shapes[name]})"
        for name in set(shapes) & set(expected_shapes)
        if shapes[name] != expected_shapes[name]
    )
    problems = [
        f"{label}: {_few(names)}"
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
        card = ModelCard.load(card_path)
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
    pickles = [file.path_in_repo for file in files if file.path_in_repo.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"{folder} holds pickle files, which are not published (convert them to safetensors): {pickles}"
        )
    config = load_checkpoint_config(folder)
    check_weights_match_model(folder, config)
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
    if isinstance(err, httpx2.TransportError):
        cause = f"{type(err).__name__}: {err}"
        return PublishError(f"the connection to {endpoint} failed while {action} ({cause}); {RETRY_HINT}")
    status = err.response.status_code if err.response is not None else None
    detail = str(err).strip()
    if status == 401:
        return PublishError(f"the Hub rejected the token (401 Unauthorized) while {action}: {detail}")
    if status == 403:
        return PublishError(f"the token may not write there (403 Forbidden) while {action}: {detail}")
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
) -> PublishResult:
    """Uploads a TokenPacker checkpoint folder to `repo_id` in one commit, creating the repository (and the branch
    `revision`) when needed. The token defaults to HF_TOKEN or the saved login. `dry_run` checks and lists only."""
    check_repo_id(repo_id)
    files = check_checkpoint_folder(folder)
    branch = revision or "main"
    if dry_run:
        return PublishResult(repo_id, branch, files, commit=None)
    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token: pass --token, set HF_TOKEN or log in with `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token)
    with hub_step("checking the token", api.endpoint):
        user = api.whoami()["name"]
    if "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
    with hub_step(f"creating the repository {repo_id}", api.endpoint):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if branch != "main":
        with hub_step(f"creating the branch {branch!r}", api.endpoint):
            api.create_branch(repo_id, branch=branch, exist_ok=True)
    operations = [CommitOperationAdd(file.path_in_repo, file.local_path) for file in files]
    with hub_step(f"uploading {len(files)} files to {repo_id}", api.endpoint):
        commit = api.create_commit(
            repo_id, operations, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE, revision=branch
        )
    return PublishResult(repo_id, branch, files, commit)


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


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
        )
    except (ValueError, TypeError, PublishError) as err:
        print(f"tokenpacker-publish: error: {err}", file=sys.stderr)
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
