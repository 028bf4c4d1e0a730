"""TokenPacker model configuration, and the code export that makes saved folders load with trust_remote_code."""

import importlib
import json
import re
import sys
from pathlib import Path
from typing import ClassVar

from transformers import AutoConfig, PreTrainedConfig

# `from ..package.module import` or `from .module import` at the start of a line
_RELATIVE_IMPORT = re.compile(r"^from (\.+)([\w.]*) import ", re.MULTILINE)


def remote_code_sources(module_name: str) -> dict[str, str]:
    """The source of `module_name` and of every module it imports relatively, as flat files importing each other.

    In this package the modules live in sibling subpackages (`from ..configuration.configuration_tokenpacker import`);
    in a Hub folder they sit side by side (`from .configuration_tokenpacker import`). Loaded from a Hub folder, the
    modules are flat already and come out unchanged.
    """
    sources, pending = {}, [module_name]
    while pending:
        module = importlib.import_module(pending.pop())
        path = Path(module.__file__)
        if path.name in sources:
            continue

        def flatten(match, package=module.__package__):
            target = importlib.util.resolve_name(match.group(1) + match.group(2), package)
            pending.append(target)
            return f"from .{target.rsplit('.', 1)[-1]} import "

        sources[path.name] = _RELATIVE_IMPORT.sub(flatten, path.read_text(encoding="utf-8"))
    return sources


def write_remote_code(save_directory, module_name: str, auto_map: dict[str, dict[str, str]]) -> None:
    """Writes the flat code of `module_name` into `save_directory` and adds `auto_map` entries to its JSON files.

    `auto_map` maps a JSON file name (config.json, processor_config.json...), or a file name and one of its sections
    ("processor_config.json/image_processor"), to the Auto classes it should name; what the save did not write is
    left alone.
    """
    save_directory = Path(save_directory)
    for file_name, source in remote_code_sources(module_name).items():
        (save_directory / file_name).write_text(source, encoding="utf-8")
    for location, entries in auto_map.items():
        file_name, _, section = location.partition("/")
        path = save_directory / file_name
        if not path.is_file():
            continue
        content = json.loads(path.read_text(encoding="utf-8"))
        target = content.get(section) if section else content
        if isinstance(target, dict):
            target["auto_map"] = {**target.get("auto_map", {}), **entries}
            path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class RemoteCodeMixin:
    """`save_pretrained` also writes the code defining the saved classes, so that the folder loads with
    `trust_remote_code=True` where this package is not installed. Subclasses list the Auto classes to name."""

    remote_code_auto_map: ClassVar[dict[str, dict[str, str]]] = {}

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        hub_kwargs = {
            key: kwargs.pop(key)
            for key in ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision")
            if key in kwargs
        }
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory, type(self).__module__, self.remote_code_auto_map)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", Path(save_directory).name)
            self.push_to_hub(repo_id, token=kwargs.get("token"), **hub_kwargs)
        return saved


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


class TokenPackerConfig(RemoteCodeMixin, PreTrainedConfig):
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
    remote_code_auto_map = {"config.json": {"AutoConfig": "configuration_tokenpacker.TokenPackerConfig"}}
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
    image_aspect_ratio: str = "pad"
    max_slices: int = 9
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
        self._validate_projector()
        self._validate_inputs()

    def _validate_projector(self):
        if self.vision_feature_select_strategy != "default":
            raise ValueError(
                "vision_feature_select_strategy must be 'default' (the CLS token is dropped so that the patches form a "
                f"square grid), got {self.vision_feature_select_strategy!r}"
            )
        for name in ("scale_factor", "projector_hidden_size", "projector_num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
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
        if not self.multi_level_feature_layers:
            raise ValueError("multi_level_feature_layers must name at least one hidden-state index, got []")
        num_states = self.vision_config.num_hidden_layers + 1
        for name, layers in (
            ("vision_feature_layer", [self.vision_feature_layer]),
            ("multi_level_feature_layers", self.multi_level_feature_layers),
        ):
            for layer in layers:
                if isinstance(layer, bool) or not isinstance(layer, int) or not -num_states <= layer < num_states:
                    raise ValueError(
                        f"{name} must index the vision tower's {num_states} hidden states "
                        f"(from {-num_states} to {num_states - 1}), got {layer!r}"
                    )

    def _validate_inputs(self):
        if self.image_aspect_ratio not in ("pad", "slice"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'slice', got {self.image_aspect_ratio!r}")
        if self.max_slices not in (9, 16, 25):
            raise ValueError(f"max_slices must be 9, 16 or 25, got {self.max_slices!r}")
        vocab_size = self.text_config.vocab_size
        for name in ("image_token_id", "slice_separator_token_id", "row_separator_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative token id, got {value!r}")
        for name in ("slice_separator_token_id", "row_separator_token_id"):
            if getattr(self, name) >= vocab_size:
                raise ValueError(
                    f"{name} must be below the text model's vocab_size ({vocab_size}), got {getattr(self, name)}"
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


__all__ = ["RemoteCodeMixin", "TokenPackerConfig", "remote_code_sources", "write_remote_code"]
