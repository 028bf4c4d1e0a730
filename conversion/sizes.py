"""A config's sizes (layer counts, widths, vocabulary) against the tensor names and shapes of its weights, and the
tensors the model a config builds holds.

The size checks run before any model is built from a config, even on the meta device: a config that says a million
layers must be refused in milliseconds, not allocate the module tree it describes.
"""

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..modeling import TokenPackerForConditionalGeneration

MAX_SIZE = 2**24  # above every layer count, width and vocabulary of a real checkpoint


@dataclass(frozen=True)
class TowerLayout:
    """Where one tower's sizes show in a state dict: the layer numbers after `layers` (a regex; `shown` in
    messages), and for each width field the tensor (first of the candidate names present) and the dimension."""

    layers: str
    shown: str
    widths: tuple[tuple[str, tuple[str, ...], int], ...]


def _vision_names(*names: str) -> tuple[str, ...]:
    return tuple(prefix + name for name in names for prefix in ("vision_model.", ""))


ORIGINAL_TEXT = TowerLayout(
    layers=r"model\.layers\.",
    shown="model.layers.N",
    widths=(
        ("hidden_size", ("model.embed_tokens.weight",), 1),
        ("intermediate_size", ("model.layers.0.mlp.up_proj.weight",), 0),
    ),
)
ORIGINAL_VISION = TowerLayout(
    layers=r"(?:vision_model\.)?encoder\.layers\.",
    shown="vision_model.encoder.layers.N",
    widths=(
        ("hidden_size", _vision_names("embeddings.patch_embedding.weight"), 0),
        ("intermediate_size", _vision_names("encoder.layers.0.mlp.fc1.weight"), 0),
    ),
)
CONVERTED_TEXT = TowerLayout(
    layers=r"model\.language_model\.layers\.",
    shown="model.language_model.layers.N",
    widths=(
        ("vocab_size", ("model.language_model.embed_tokens.weight",), 0),
        ("hidden_size", ("model.language_model.embed_tokens.weight",), 1),
        ("intermediate_size", ("model.language_model.layers.0.mlp.up_proj.weight",), 0),
    ),
)
CONVERTED_VISION = TowerLayout(
    layers=r"model\.vision_tower\.encoder\.layers\.",
    shown="model.vision_tower.encoder.layers.N",
    widths=(
        ("hidden_size", ("model.vision_tower.embeddings.patch_embedding.weight",), 0),
        ("intermediate_size", ("model.vision_tower.encoder.layers.0.mlp.fc1.weight",), 0),
    ),
)


def _field(sizes, name: str):
    return sizes.get(name) if isinstance(sizes, Mapping) else getattr(sizes, name, None)


def check_sizes_match_weights(
    where: str | Path,
    label: str,
    sizes,
    shapes: Mapping[str, Sequence[int]],
    layout: TowerLayout,
    layers_in_weights: Callable[[], int] | None = None,
) -> None:
    """Refuses sizes that are not positive integers below MAX_SIZE, or that disagree with the weights.

    where: the config file, for messages; label: the fields' prefix there ("" or "text_config."); sizes: a config
    or its dict; shapes: tensor name -> shape; layers_in_weights: how many layers the weights must hold once the
    sizes are sane (default: num_hidden_layers; a converted vision tower keeps only the layers it uses).
    """
    pattern = re.compile(rf"^{layout.layers}(\d+)\.")
    numbers = {int(match.group(1)) for name in shapes if (match := pattern.match(name))}
    held = f"{len(numbers)} layers ({layout.shown})" + (f", numbered up to {max(numbers)}" if numbers else "")
    found = {"num_hidden_layers": (len(numbers), f"the weights hold {held}")}
    for field, names, dim in layout.widths:
        name = next((name for name in names if name in shapes), None)
        if name is None or len(shapes[name]) <= dim:
            found[field] = (None, f"the weights have no {names[0]} to tell")
        else:
            found[field] = (shapes[name][dim], f"{name} has shape {tuple(shapes[name])}")
    for field, (count, evidence) in found.items():
        value = _field(sizes, field)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
            raise ValueError(
                f"{where}: {label}{field} must be a positive integer up to {MAX_SIZE}, got {value!r} ({evidence})"
            )
    for field, (count, evidence) in found.items():
        value = expected = _field(sizes, field)
        if field == "num_hidden_layers" and layers_in_weights is not None:
            expected = layers_in_weights()
        if count is not None and count != expected:
            needs = f", which needs {expected} layers in the weights," if expected != value else ""
            raise ValueError(f"{where}: {label}{field} is {value!r}{needs} but {evidence}")


def check_model_sizes(where: str | Path, config, shapes: Mapping[str, Sequence[int]]) -> None:
    """A converted folder's TokenPackerConfig (text and vision towers) against its weights' names and shapes."""
    check_sizes_match_weights(where, "text_config.", config.text_config, shapes, CONVERTED_TEXT)
    check_sizes_match_weights(
        where,
        "vision_config.",
        config.vision_config,
        shapes,
        CONVERTED_VISION,
        layers_in_weights=lambda: config.num_vision_layers_used,
    )


@dataclass(frozen=True)
class ModelParameters:
    """The state dict of TokenPackerForConditionalGeneration for a config: every name with its shape, and the groups
    of names that share one tensor (tied weights; a group of one for the others)."""

    shapes: dict[str, torch.Size]
    tied_groups: list[list[str]]


def model_parameters(config) -> ModelParameters:
    """The tensors the model `config` builds holds, from a model on the meta device (no memory, no initialisation).
    Check the config's sizes first (`check_model_sizes`)."""
    with torch.device("meta"):
        model = TokenPackerForConditionalGeneration(config)
    groups: dict[int, list[str]] = defaultdict(list)
    shapes = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups[id(tensor)].append(name)
        shapes[name] = tensor.shape
    return ModelParameters(shapes, list(groups.values()))


__all__ = [
    "CONVERTED_TEXT",
    "CONVERTED_VISION",
    "ORIGINAL_TEXT",
    "ORIGINAL_VISION",
    "ModelParameters",
    "TowerLayout",
    "check_model_sizes",
    "check_sizes_match_weights",
    "model_parameters",
]
