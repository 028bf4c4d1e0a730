"""Reading a checkpoint folder's weights one shard at a time, safely: safetensors, or torch.load(weights_only=True).

The one reader of "which weight files does this folder declare, does the index match the shards, which tensors
(name -> shape, dtype) do they hold", for the conversion's sources and for publishing.
"""

import json
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class WeightFormat:
    """How a format stores a checkpoint: one `single` file, or shards named in `index`; `shards` matches the files
    of that format in a folder (all of them must be declared)."""

    name: str
    index: str
    single: str
    shards: str


SAFETENSORS = WeightFormat("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "*.safetensors")
TORCH = WeightFormat("torch", TORCH_INDEX, TORCH_SINGLE, "pytorch_model*.bin")


@dataclass(frozen=True)
class TensorInfo:
    shard: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_json(path: Path, what: str) -> dict:
    """The JSON object in `path` (`what` it should be, for messages: "a LLaVA config"), checked."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected {what}")
    try:
        content = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): expected {what}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(content).__name__}")
    return content


def read_index(index_file: Path, weight_format: WeightFormat = SAFETENSORS) -> dict[str, str]:
    """The index's weight map (tensor name -> shard file name in the index's folder), checked."""
    kind = f"{weight_format.name} index"
    weight_map = read_json(index_file, f"a {kind}").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file} is not a {kind}: expected a JSON object with a non-empty 'weight_map' object")
    wrong = [
        f"{name}: {file!r}"
        for name, file in weight_map.items()
        if not isinstance(file, str) or not file or Path(file).name != file or file in (".", "..")
    ]
    if wrong:
        raise ValueError(
            f"{index_file}: the 'weight_map' must map tensor names to file names (in the folder), got {few(wrong)}"
        )
    return weight_map


def few(names: list[str], limit: int = 5) -> str:
    """The first `limit` names, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


class CheckpointFiles:
    """The weight files a checkpoint folder declares, in one of `formats` (the first one present wins): the single
    file, or the shards its index names; every file of that format in the folder must be declared. `inventory()`
    reads every shard's table of contents (never its data) and checks it against the index."""

    def __init__(self, folder: str | Path, what: str, formats: tuple[WeightFormat, ...] = (SAFETENSORS, TORCH)):
        self.folder = Path(folder)
        self.what = what
        self.index, self.shards = self._find_shards(formats)

    def _find_shards(self, formats: tuple[WeightFormat, ...]) -> tuple[dict[str, str] | None, list[Path]]:
        for weight_format in formats:
            index_file = self.folder / weight_format.index
            on_disk = sorted(path.name for path in self.folder.glob(weight_format.shards) if path.is_file())
            if index_file.is_file():
                index = read_index(index_file, weight_format)
                shards = sorted(set(index.values()))
                missing = [name for name in shards if name not in on_disk]
                if missing:
                    raise FileNotFoundError(
                        f"The {self.what} index {index_file} lists shards that are missing from {self.folder}: "
                        f"{missing}"
                    )
                unlisted = sorted(set(on_disk) - set(shards))
                if unlisted:
                    raise ValueError(
                        f"{self.folder} holds {weight_format.name} files that {weight_format.index} does not list: "
                        f"{unlisted}"
                    )
                return index, [self.folder / name for name in shards]
            if on_disk == [weight_format.single]:
                return None, [self.folder / weight_format.single]
            if on_disk:
                break
        expected = ", or ".join(f"{form.single} or as shards listed in {form.index}" for form in formats)
        found = sorted(path.name for form in formats for path in self.folder.glob(form.shards))
        raise FileNotFoundError(
            f"The {self.what} folder {self.folder} must hold its weights as {expected}; found weight files {found}"
        )

    def inventory(self) -> dict[str, TensorInfo]:
        """Every tensor's shard, shape and dtype. Raises on unreadable (e.g. truncated) shards and index mismatches."""
        tensors = {}
        for shard in self.shards:
            with self.open(shard) as contents:
                for name, (shape, dtype) in contents.table_of_contents().items():
                    if name in tensors:
                        raise ValueError(
                            f"{name} is in two {self.what} shards: {tensors[name].shard.name} and {shard.name}"
                        )
                    tensors[name] = TensorInfo(shard, shape, dtype)
        if self.index is not None:
            listed = set(self.index)
            misplaced = sorted(
                name for name in listed if name not in tensors or tensors[name].shard.name != self.index[name]
            )
            unlisted = sorted(set(tensors) - listed)
            if misplaced or unlisted:
                raise ValueError(
                    f"The {self.what} index does not match its shards: tensors not in the shard the index names: "
                    f"{misplaced}; tensors the index does not list: {unlisted}"
                )
        return tensors

    @contextmanager
    def open(self, shard: Path) -> Iterator["ShardContents"]:
        """A shard's tensors, loaded one at a time on request (memory-mapped where the format allows)."""
        if shard.suffix == ".safetensors":
            try:
                with safe_open(shard, framework="pt") as handle:
                    yield SafetensorsShard(handle, shard)
            except SafetensorError as error:
                raise ValueError(f"Cannot read the {self.what} shard {shard}: {error} (is it truncated?)") from error
        else:
            contents = TorchShard(self._torch_load(shard))
            try:
                yield contents
            finally:
                contents.tensors.clear()

    def _torch_load(self, shard: Path) -> dict[str, torch.Tensor]:
        # The zip format (torch >= 1.6) is memory-mapped; the legacy format can only be read whole.
        mmap = zipfile.is_zipfile(shard)
        try:
            state = torch.load(shard, map_location="cpu", mmap=mmap, weights_only=True)
        except Exception as error:
            raise ValueError(
                f"Cannot read the {self.what} shard {shard}: {type(error).__name__}: {error} (is it truncated, or not "
                "a torch checkpoint of plain tensors?)"
            ) from error
        if not isinstance(state, dict) or not all(
            isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in state.items()
        ):
            raise ValueError(f"The {self.what} shard {shard} is not a mapping of tensor names to tensors")
        return state


class SafetensorsShard:
    def __init__(self, handle, path: Path):
        self.handle = handle
        self.path = path

    def table_of_contents(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        contents = {}
        for name in self.handle.keys():
            tensor_slice = self.handle.get_slice(name)
            dtype = tensor_slice.get_dtype()
            if dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(
                    f"{self.path}: {name} has dtype {dtype}, which the conversion does not read "
                    f"(supported: {', '.join(_SAFETENSORS_DTYPES)})"
                )
            contents[name] = (tuple(tensor_slice.get_shape()), _SAFETENSORS_DTYPES[dtype])
        return contents

    def names(self) -> list[str]:
        return list(self.handle.keys())

    def get(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)


class TorchShard:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def table_of_contents(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in self.tensors.items()}

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


ShardContents = SafetensorsShard | TorchShard

__all__ = ["SAFETENSORS", "TORCH", "CheckpointFiles", "TensorInfo", "WeightFormat", "read_index", "read_json"]
