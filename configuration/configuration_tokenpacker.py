"""TokenPacker model configuration: typed fields, checked when the config is built and whenever one is assigned."""

import math
from typing import Literal, get_args

from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN

from .compat_tokenpacker import LIBRARY_VALIDATES_CONFIGS


def _sub_config(name: str, value, model_type: str, settings: dict) -> PreTrainedConfig:
    """A sub-config as given, from its dict (of `model_type` unless it names one), or of `model_type` with `settings`."""
    if isinstance(value, PreTrainedConfig):
        return value
    if value is None:
        return AutoConfig.for_model(model_type, **settings)
    if isinstance(value, dict):
        value = dict(value)
        return AutoConfig.for_model(value.pop("model_type", model_type), **value)
    raise TypeError(f"{name} must be a dict, a PreTrainedConfig or None, got {type(value).__name__}")


def _positive_integer(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _token_id(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a token id (int), got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative token id, got {value!r}")


def _positive_float(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive float, got {value!r}")


def _layer_index(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a hidden-state index (int), got {type(value).__name__} {value!r}")


def _layer_indices(name: str, value):
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of hidden-state indices, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{name} must name at least one hidden-state index, got []")
    for layer in value:
        _layer_index(name, layer)


def _one_of(name: str, value, allowed: tuple):
    if isinstance(value, bool) or value not in allowed:
        choices = [repr(choice) for choice in allowed]
        raise ValueError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")


def _activation(name: str, value):
    if not isinstance(value, str) or value not in ACT2FN:
        raise ValueError(f"{name} must name an activation of transformers' ACT2FN (e.g. 'gelu'), got {value!r}")


def _strategy(name: str, value):
    if value != "default":
        raise ValueError(
            f"{name} must be 'default' (the CLS token is dropped so that the patches form a square grid), "
            f"got {value!r}"
        )


# Marks a config whose construction is complete: from then on every assignment is checked against the whole config.
_CHECKS_ASSIGNMENTS = "_checks_assignments"


class TokenPackerConfig(PreTrainedConfig):
    r"""
    Configuration of a TokenPacker multimodal model: a CLIP-like vision tower, the TokenPacker projector and a causal
    language model, as in "TokenPacker: Efficient Visual Projector for Multimodal LLM" (arXiv 2407.02392).

    The defaults give the released LLaVA-1.5-7B TokenPacker: CLIP ViT-L/14-336, Vicuna-7B v1.5, 144 tokens per image.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision tower's configuration (default: CLIP ViT-L/14-336).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The language model's configuration (default: Vicuna-7B v1.5, a Llama model). Any `AutoConfig` text model.
        image_token_id (`int`, *optional*, defaults to 32000):
            The id of the `<image>` placeholder; every image token is replaced by one projected feature.
        scale_factor (`int`, *optional*, defaults to 2):
            Downsampling of the patch grid: 2, 3 and 4 pack 24x24 patches into 144, 64 and 36 tokens. Must divide the
            patch grid.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Index into the tower's hidden states (embeddings included) of the features the coarse queries come from.
        multi_level_feature_layers (`list[int]`, *optional*, defaults to `[12, 16, 22, 23]`):
            Indices into the tower's hidden states of the levels concatenated into the keys and values.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the CLS token, which is the only strategy compatible with a square patch grid.
        projector_hidden_size (`int`, *optional*, defaults to 1024):
            Width of the projector's queries, keys and values.
        projector_num_heads (`int`, *optional*, defaults to 8):
            Heads of the region-to-point attention; must divide `projector_hidden_size`.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the key/value projections and of the output MLP.
        projector_layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the query, key and value layer norms.
        image_aspect_ratio (`str`, *optional*, defaults to `"pad"`):
            `"pad"` (LLaVA-1.5: one square crop per image) or `"slice"` (TokenPacker-HD: a grid of crops plus a
            thumbnail).
        max_slices (`int`, *optional*, defaults to 9):
            TokenPacker-HD's largest number of crops per image: 9, 16 or 25.
        slice_separator_token_id (`int`, *optional*, defaults to 29892):
            Id written between two crops of a row in `"slice"` mode (`','` in the LLaMA vocabulary).
        row_separator_token_id (`int`, *optional*, defaults to 0):
            Id written at the end of each row of crops and after the thumbnail in `"slice"` mode (the original looks up
            `'\n'`, which LLaMA's vocabulary lacks, so it gets the unknown-token id 0).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the projector's truncated-normal weight initialization.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the language model head shares the input embeddings.
    """

    model_type = "tokenpacker"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}
    # Each sub-config's model type when a dict names none, and its settings when it is not given.
    default_sub_configs = {
        "vision_config": (
            "clip_vision_model",
            {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
            },
        ),
        "text_config": ("llama", {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "pad_token_id": 0}),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    scale_factor: int = 2
    vision_feature_layer: int = -2
    multi_level_feature_layers: list[int] | tuple[int, ...] = (12, 16, 22, 23)
    vision_feature_select_strategy: str = "default"
    projector_hidden_size: int = 1024
    projector_num_heads: int = 8
    projector_hidden_act: str = "gelu"
    projector_layer_norm_eps: float = 1e-6
    image_aspect_ratio: Literal["pad", "slice"] = "pad"
    max_slices: Literal[9, 16, 25] = 9
    slice_separator_token_id: int = 29892
    row_separator_token_id: int = 0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if "mm_projector_type" in kwargs or "mm_vision_tower" in kwargs:
            raise ValueError(
                "This is an original TokenPacker checkpoint in the LLaVA folder layout (config.json with mm_* fields), "
                "which this package does not load directly: convert it first with "
                "`tokenpacker-convert --checkpoint <folder> --output <new folder>`"
            )
        for name, (model_type, settings) in self.default_sub_configs.items():
            setattr(self, name, _sub_config(name, getattr(self, name), model_type, settings))
        super().__post_init__(**kwargs)
        self.multi_level_feature_layers = list(self.multi_level_feature_layers)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self.validate_projector()
        self.validate_inputs()
        self.__dict__[_CHECKS_ASSIGNMENTS] = True

    def __setattr__(self, name, value):
        """Assigning a TokenPacker field checks the value, and then the whole config with it (the old value stays
        when that fails). Edits inside `vision_config` or `text_config` are checked by `validate()`."""
        check = _FIELD_CHECKS.get(name)
        if check is None:
            super().__setattr__(name, value)
            return
        check(name, value)
        if not self.__dict__.get(_CHECKS_ASSIGNMENTS):
            super().__setattr__(name, value)
            return
        previous = self.__dict__[name]
        super().__setattr__(name, list(value) if name == "multi_level_feature_layers" else value)
        try:
            self.validate_projector()
            self.validate_inputs()
        except (TypeError, ValueError):
            super().__setattr__(name, previous)
            raise

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.pop(_CHECKS_ASSIGNMENTS, None)
        return output

    def validate(self):
        """Checks the whole config, sub-configs included: the library's checks where it has them, then TokenPacker's
        (the library runs this when saving)."""
        if LIBRARY_VALIDATES_CONFIGS:
            super().validate()
        self.validate_projector()
        self.validate_inputs()

    def validate_projector(self):
        """The projector's settings against each other and against the vision tower."""
        grid = self.patch_grid_size
        if grid % self.scale_factor != 0:
            divisors = [d for d in range(1, grid + 1) if grid % d == 0]
            raise ValueError(
                f"scale_factor must divide the {grid}x{grid} patch grid of the vision tower, got {self.scale_factor}; "
                f"allowed: {divisors}"
            )
        if self.projector_hidden_size % self.projector_num_heads != 0:
            raise ValueError(
                f"projector_num_heads must divide projector_hidden_size ({self.projector_hidden_size}), "
                f"got {self.projector_num_heads}"
            )
        num_states = self.vision_config.num_hidden_layers + 1
        for name, layers in (
            ("vision_feature_layer", [self.vision_feature_layer]),
            ("multi_level_feature_layers", self.multi_level_feature_layers),
        ):
            for layer in layers:
                if not -num_states <= layer < num_states:
                    raise ValueError(
                        f"{name} must index the vision tower's {num_states} hidden states "
                        f"(from {-num_states} to {num_states - 1}), got {layer!r}"
                    )

    def validate_inputs(self):
        """The separator ids against the text vocabulary, in "slice" mode (the only mode that writes them)."""
        if self.image_aspect_ratio != "slice":
            return
        vocab_size = self.text_config.vocab_size
        for name in ("slice_separator_token_id", "row_separator_token_id"):
            if getattr(self, name) >= vocab_size:
                raise ValueError(
                    f"{name} must be below the text model's vocab_size ({vocab_size}), got {getattr(self, name)} "
                    "('slice' mode writes it into the input ids)"
                )

    @property
    def patch_grid_size(self) -> int:
        """Patches per side of the vision tower's grid (24 for CLIP ViT-L/14 at 336 pixels)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def query_grid_size(self) -> int:
        """Packed tokens per side of one crop (12, 8, 6 for scale factors 2, 3, 4 on a 24x24 grid)."""
        return self.patch_grid_size // self.scale_factor

    @property
    def num_image_tokens(self) -> int:
        """Tokens one crop becomes in the language model (144, 64, 36 for scale factors 2, 3, 4)."""
        return self.query_grid_size**2

    @property
    def feature_layer_indices(self) -> tuple[int, list[int]]:
        """The query layer and the key/value levels as non-negative indices into the tower's hidden states."""
        num_states = self.vision_config.num_hidden_layers + 1
        query_layer = self.vision_feature_layer % num_states
        return query_layer, [layer % num_states for layer in self.multi_level_feature_layers]

    @property
    def num_vision_layers_used(self) -> int:
        """Encoder layers the tower must run: up to the deepest hidden state the projector reads."""
        query_layer, levels = self.feature_layer_indices
        return max(query_layer, *levels)


# TokenPacker's own fields -> the check of a value on its own (`TokenPackerConfig.validate_*` check them together).
_FIELD_CHECKS = {
    "image_token_id": _token_id,
    "scale_factor": _positive_integer,
    "vision_feature_layer": _layer_index,
    "multi_level_feature_layers": _layer_indices,
    "vision_feature_select_strategy": _strategy,
    "projector_hidden_size": _positive_integer,
    "projector_num_heads": _positive_integer,
    "projector_hidden_act": _activation,
    "projector_layer_norm_eps": _positive_float,
    "image_aspect_ratio": lambda name, value: _one_of(name, value, get_args(TokenPackerConfig.__annotations__[name])),
    "max_slices": lambda name, value: _one_of(name, value, get_args(TokenPackerConfig.__annotations__[name])),
    "slice_separator_token_id": _token_id,
    "row_separator_token_id": _token_id,
    "initializer_range": _positive_float,
}


__all__ = ["TokenPackerConfig"]
