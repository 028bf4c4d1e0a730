"""Writing a state dict as safetensors shards one tensor at a time, and reading it back one shard at a time."""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint_files import SAFETENSORS_INDEX

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB"."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if isinstance(size, bool) or not match or float(match.group(1)) <= 0:
        raise ValueError(
            f"max_shard_size must be a positive number of bytes or a size like '5GB' or '500MB', got {size!r}"
        )
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


class ShardWriter:
    """Collects tensors into shards of at most `max_shard_size` bytes (a larger tensor gets a shard of its own) and
    writes each shard as soon as it is full, so that at most one shard is held in memory."""

    def __init__(self, folder: Path, max_shard_size: int):
        self.folder = folder
        self.max_shard_size = max_shard_size
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_size = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_size + size > self.max_shard_size:
            self.flush()
        self.pending[name] = tensor
        self.pending_size += size
        self.total_size += size

    def flush(self):
        path = self.folder / f"model-part-{len(self.shards) + 1:05d}.safetensors"
        try:
            save_file(self.pending, path, metadata={"format": "pt"})
        except (OSError, SafetensorError) as error:  # e.g. a full disk
            detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise OSError(getattr(error, "errno", None), f"Cannot write {path}: {detail}") from error
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_size = {}, 0

    def finish(self) -> dict[str, str]:
        """Names the shards like transformers (model.safetensors, or model-0000k-of-0000n.safetensors with an index);
        returns the weight map: tensor name -> file name."""
        if self.pending:
            self.flush()
        count = len(self.shards)
        weight_map = {}
        for number, (path, names) in enumerate(self.shards, start=1):
            final = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update((name, final) for name in names)
        if count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


class ShardReader:
    """Reads tensors of a written folder, keeping one shard open at a time (reads in writing order open each once)."""

    def __init__(self, folder: Path, weight_map: dict[str, str]):
        self.folder = folder
        self.weight_map = weight_map
        self.current_file = None
        self.handle = None

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        if file != self.current_file:
            self.close()  # drops the previous shard's memory map
            self.handle = safe_open(self.folder / file, framework="pt")
            self.current_file = file
        return self.handle.get_tensor(name)

    def close(self):
        self.handle, self.current_file = None, None


__all__ = ["ShardReader", "ShardWriter", "parse_size"]
