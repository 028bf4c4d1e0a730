"""New TokenPacker models from a CLIP-like vision tower and a causal language model, and the generation defaults
every TokenPacker folder of this package gets.

The model's own module (modeling/) holds the model only: it is exported as remote code, and building needs the Hub,
tokenizers and this package, which remote code must not import.
"""

import copy
import json
import os
import re
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import IMAGE_PROCESSOR_NAME, cached_file

from .configuration import TokenPackerConfig
from .modeling import TokenPackerForConditionalGeneration
from .processing import TokenPackerProcessor

# Settings of a saved generation config that describe the file, not the generation.
_FILE_SETTINGS = ("transformers_version", "_from_model_config")


def generation_config_for(
    config: TokenPackerConfig, pad_token_id: int, base: GenerationConfig | dict | None = None
) -> GenerationConfig:
    """The generation settings of a TokenPacker model: `base`'s (the language model's or the original checkpoint's),
    its bos and eos ids filled in from the text config where it has none, `pad_token_id`, and the `<image>` and pad
    tokens suppressed (a model must never generate them)."""
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a non-negative token id, got {pad_token_id!r}")
    if isinstance(base, GenerationConfig):
        base = base.to_dict()
    if base is not None and not isinstance(base, dict):
        raise TypeError(f"base must be a GenerationConfig, a dict or None, got {type(base).__name__}")
    settings = {key: value for key, value in (base or {}).items() if key not in _FILE_SETTINGS}
    for name in ("bos_token_id", "eos_token_id"):
        if settings.get(name) is None:
            settings[name] = getattr(config.text_config, name, None)
    settings["pad_token_id"] = pad_token_id
    settings["suppress_tokens"] = [config.image_token_id, pad_token_id]
    return GenerationConfig(**settings)


def from_vision_and_text(
    vision_model_or_path: str | os.PathLike | PreTrainedModel,
    text_model_or_path: str | os.PathLike | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    image_token: str = "<image>",
    pad_token: str = "<pad>",
    **config_settings,
) -> TokenPackerForConditionalGeneration:
    """A new TokenPacker from a CLIP-like vision tower and a causal language model, with a fresh projector.

    Either model is a folder (or Hub id) or a loaded model; a CLIP-like tower may come as a whole CLIP model (its
    vision half is used). `tokenizer` is the language model's, loaded from `text_model_or_path` when that is a
    folder; `image_token` (and `pad_token` if it has no pad token) are added to it in place and the embeddings
    are resized to match. `config_settings` go to `TokenPackerConfig` (`scale_factor`, `image_aspect_ratio`...);
    by default the keys and values read 4 levels spread like CLIP ViT-L's (12, 16, 22, 23 of 24 layers), the
    projector is as wide as the tower, and the "slice" separators are the tokenizer's ',' and '\\n' ids.
    """
    vision_config, vision_weights = _vision_tower(
        _load_pretrained(vision_model_or_path, "vision_model_or_path", _load_vision_model)
    )
    text_model = _load_pretrained(text_model_or_path, "text_model_or_path", AutoModelForCausalLM.from_pretrained)
    tokenizer = language_model_tokenizer(text_model_or_path, tokenizer)
    new_tokens = {} if image_token in tokenizer.get_vocab() else {"extra_special_tokens": [image_token]}
    if tokenizer.pad_token is None:
        new_tokens["pad_token"] = pad_token
    tokenizer.add_special_tokens(new_tokens)

    num_layers = vision_config.num_hidden_layers
    settings = {
        "multi_level_feature_layers": [num_layers // 2, 2 * num_layers // 3, num_layers - 2, num_layers - 1],
        "projector_hidden_size": vision_config.hidden_size,
        "slice_separator_token_id": _token_id(tokenizer, ","),
        "row_separator_token_id": _token_id(tokenizer, "\n"),
        **config_settings,
    }
    config = TokenPackerConfig(
        vision_config=vision_config,
        text_config=copy.deepcopy(text_model.config),
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        **settings,
    )

    model = TokenPackerForConditionalGeneration(config)
    missing, unexpected = model.model.vision_tower.load_state_dict(vision_weights, strict=False)
    unexpected = [key for key in unexpected if not _is_unused_layer(key, config.num_vision_layers_used)]
    if missing or unexpected:
        raise ValueError(
            f"The vision tower's weights do not fit a {type(model.model.vision_tower).__name__}: "
            f"missing {missing}, unexpected {unexpected}"
        )
    model.model.language_model.load_state_dict(text_model.get_decoder().state_dict())
    model.lm_head.load_state_dict(text_model.get_output_embeddings().state_dict())
    num_text_tokens = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(len(tokenizer))
    _spread_added_rows(model.get_input_embeddings().weight, num_text_tokens)
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation_config_for(config, tokenizer.pad_token_id, text_model.generation_config)
    return model


def build_model_and_processor(
    vision_model_or_path, text_model_or_path, tokenizer=None, **config_settings
) -> tuple[TokenPackerForConditionalGeneration, TokenPackerProcessor]:
    """A new model (see `from_vision_and_text`) and its processor.

    The image processor normalizes with the vision tower's own mean and standard deviation when its folder has an
    image processor configuration, and with CLIP's otherwise.
    """
    tokenizer = language_model_tokenizer(text_model_or_path, tokenizer)
    model = from_vision_and_text(vision_model_or_path, text_model_or_path, tokenizer=tokenizer, **config_settings)
    normalization = {}
    if not isinstance(vision_model_or_path, PreTrainedModel):
        settings_file = cached_file(
            vision_model_or_path, IMAGE_PROCESSOR_NAME, _raise_exceptions_for_missing_entries=False
        )
        if settings_file is not None:
            tower_settings = json.loads(Path(settings_file).read_text())
            normalization = {key: tower_settings[key] for key in ("image_mean", "image_std") if key in tower_settings}
    processor = TokenPackerProcessor.from_model_config(model.config, tokenizer, **normalization)
    return model, processor


def language_model_tokenizer(
    text_model_or_path: str | os.PathLike | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedTokenizerBase:
    """`tokenizer` when given, else the tokenizer saved with the language model (a folder or Hub id)."""
    if tokenizer is None:
        if isinstance(text_model_or_path, PreTrainedModel):
            raise ValueError("Pass the language model's tokenizer: text_model_or_path is a model object, not a folder")
        tokenizer = AutoTokenizer.from_pretrained(text_model_or_path)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    return tokenizer


@torch.no_grad()
def _spread_added_rows(embedding_weight: torch.Tensor, num_old_rows: int):
    """Moves the rows added past `num_old_rows` a tenth of the old rows' spread apart (normal noise per dimension).

    transformers' mean resizing puts new rows at the old rows' mean, with a noise of 3e-5 of their spread that rounding
    to half precision mostly erases, or none at all when the old rows' covariance is singular: `<image>` and `<pad>`
    would share one row, and `inputs_embeds` could not tell image positions from padding.
    """
    num_added = embedding_weight.shape[0] - num_old_rows
    if num_added > 0:
        spread = embedding_weight[:num_old_rows].float().std(dim=0)
        noise = torch.randn(num_added, embedding_weight.shape[1], device=embedding_weight.device) * spread / 10
        embedding_weight[num_old_rows:] += noise.to(embedding_weight.dtype)


def _load_pretrained(model_or_path, name: str, load):
    """A model object as it is, or `load(path)` for a folder or Hub id."""
    if isinstance(model_or_path, PreTrainedModel):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return load(model_or_path)
    raise TypeError(f"{name} must be a folder, a Hub id or a PreTrainedModel, got {type(model_or_path).__name__}")


def _load_vision_model(path: str | os.PathLike) -> PreTrainedModel:
    """The model of a vision folder as it was saved: a vision model, or a CLIP-like dual encoder whose vision half
    `_vision_tower` takes (loading the vision half alone would report the other half's weights as unexpected).
    Weights the checkpoint lacks or holds in other shapes are refused."""
    model, loading_info = AutoModel.from_pretrained(path, output_loading_info=True)
    problems = {kind: loading_info.get(kind) for kind in ("missing_keys", "mismatched_keys")}
    problems = {kind: sorted(map(str, keys)) for kind, keys in problems.items() if keys}
    if problems:
        found = "; ".join(f"{kind.replace('_', ' ')}: {keys}" for kind, keys in problems.items())
        raise ValueError(f"The vision checkpoint {path} does not fit its {type(model).__name__}: {found}")
    return model


def _vision_tower(model: PreTrainedModel) -> tuple:
    """(config, weights) of a vision model, or of the vision half of a CLIP-like dual encoder."""
    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is not None and hasattr(model, "vision_model"):
        return copy.deepcopy(vision_config), model.vision_model.state_dict()
    return copy.deepcopy(model.config), model.state_dict()


def _is_unused_layer(key: str, num_layers_used: int) -> bool:
    """Whether a vision weight belongs to an encoder layer past the deepest one the projector reads."""
    match = re.match(r"encoder\.layers\.(\d+)\.", key)
    return match is not None and int(match.group(1)) >= num_layers_used


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """What the original's `convert_tokens_to_ids` gives: the token's id, or the unknown-token id."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None:
        raise ValueError(
            f"The tokenizer has neither {token!r} nor an unknown token; pass slice_separator_token_id and "
            "row_separator_token_id explicitly"
        )
    return token_id


__all__ = ["build_model_and_processor", "from_vision_and_text", "generation_config_for", "language_model_tokenizer"]
