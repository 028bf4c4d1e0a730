"""What differs across the supported transformers releases (5.18 to the latest), detected from the installed library.

Every difference the package depends on is tested here, by the feature itself and never by the version number; the
other modules use these names only.
"""

import functools
import importlib

from transformers import PreTrainedConfig, PreTrainedModel, modeling_utils
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

# The key/value cache is `cache` in forward arguments and outputs; earlier releases call it `past_key_values`.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# `output_hidden_states` may select hidden states by index (a list): the others come back as None and are not kept.
HIDDEN_STATES_SELECTABLE = hasattr(
    importlib.import_module("transformers.utils.output_capturing"), "selected_hidden_states"
)

# Configs are huggingface_hub strict dataclasses with a `validate()` (the `validate_*` checks) that `save_pretrained`
# runs; TokenPacker's config chains its own checks to it where the library has one.
LIBRARY_VALIDATES_CONFIGS = callable(getattr(PreTrainedConfig, "validate", None))

# `activation_checkpointing_enable` / `is_activation_checkpointing`; earlier releases say "gradient checkpointing".
ACTIVATION_CHECKPOINTING_NAMES = hasattr(PreTrainedModel, "activation_checkpointing_enable")


def _slice_logits_to_keep(hidden_states, logits_to_keep):
    """The positions `logits_to_keep` selects: the last `logits_to_keep` ones for an int (all for 0), else those
    indices (what the library's `slice_logits_to_keep` does, where it has one)."""
    positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, positions, :]


slice_logits_to_keep = getattr(modeling_utils, "slice_logits_to_keep", _slice_logits_to_keep)


def accepts_past_key_values(forward):
    """Lets a `forward` whose cache argument is `cache` also take it as `past_key_values`.

    Where the library has renamed it, the old name gets the library's own deprecation warning; where
    `past_key_values` is still the library's name (and what `generate` passes), it is taken silently.
    """
    if CACHE_NAME == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def forward_with_past_key_values(*args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    return forward_with_past_key_values


def selected_hidden_states(layers: list[int]) -> list[int] | bool:
    """The `output_hidden_states` value that keeps `layers`: those indices where selection is supported, else all."""
    return list(layers) if HIDDEN_STATES_SELECTABLE else True


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Turns on activation (gradient) checkpointing under the installed library's name."""
    if ACTIVATION_CHECKPOINTING_NAMES:
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable()


def is_activation_checkpointing(model: PreTrainedModel) -> bool:
    """Whether activation (gradient) checkpointing is on, under the installed library's name."""
    if ACTIVATION_CHECKPOINTING_NAMES:
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def training_activation_checkpointing_argument() -> str:
    """The `TrainingArguments` field that turns activation checkpointing on: `activation_checkpointing` or, in
    earlier releases, `gradient_checkpointing`."""
    from transformers import TrainingArguments  # the training stack is only needed by training

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


__all__ = [
    "ACTIVATION_CHECKPOINTING_NAMES",
    "CACHE_NAME",
    "HIDDEN_STATES_SELECTABLE",
    "LIBRARY_VALIDATES_CONFIGS",
    "accepts_past_key_values",
    "enable_activation_checkpointing",
    "is_activation_checkpointing",
    "selected_hidden_states",
    "slice_logits_to_keep",
    "training_activation_checkpointing_argument",
]
