"""Tiny checkpoints in the layout of the original TokenPacker release, for conversion tests.

A LLaVA folder (LlavaLlamaForCausalLM's config.json with mm_* fields, original tensor names in sharded
pytorch_model-0000k-of-0000n.bin or safetensors files with their index, a sentencepiece tokenizer.model) and a
stock-layout CLIP folder (CLIPModel: vision and text towers, projections, logit scale). The widths are tiny, the
structure is the release's: a 24-layer CLIP tower read at hidden states 12, 16, 22, 23 and -2, a projector whose
keys and values take the 4 levels concatenated, 8 attention heads.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from .builders import train_sentencepiece
from tokenpacker.testing import OriginalTokenPacker, original_llava_config

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=24,
    num_attention_heads=4,
    image_size=336,
    patch_size=28,  # 12x12 patch grid
    hidden_act="quick_gelu",
)
CLIP_TEXT = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    vocab_size=64,
    bos_token_id=0,
    eos_token_id=1,
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
VOCAB = 400  # the sentencepiece model of tests/builders.py
GRID = 12
PROJECTOR_WIDTH = 48  # the original's 1024, shrunk
PROJECTOR_HEADS = 8  # as in the original
LEVELS = 4  # hidden states 12, 16, 22, 23


@dataclass
class OriginalRelease:
    """What was written, in the original's own terms, for tests to build their reference from."""

    checkpoint: Path
    vision_tower: Path
    llava_config: dict
    language_model: dict[
        str, torch.Tensor
    ]  # model.embed_tokens.weight, model.layers.*, model.norm.weight, lm_head.weight
    projector: OriginalTokenPacker
    clip: dict[str, torch.Tensor] = field(default_factory=dict)  # the CLIP folder's tensors


def _randomize(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * scale
            parameter.copy_(1 + noise if name.endswith("norm.weight") else noise)
    return module


def clip_config() -> CLIPConfig:
    return CLIPConfig(vision_config=VISION, text_config=CLIP_TEXT, projection_dim=16)


def write_clip_checkpoint(folder: Path, layout: str = "clip_model", weights: str = "bin", seed: int = 0) -> dict:
    """A stock-layout CLIP checkpoint. layout "clip_model": a CLIPModel as the Hub's openai checkpoints (vision_model.*,
    text_model.*, projections, logit_scale and the position_ids buffers of older transformers); "vision_model": a
    CLIPVisionModel saved by transformers 5 (bare names). weights: "bin" (pytorch_model.bin) or "safetensors"."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = clip_config()
    model = CLIPModel(config).eval()
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(GRID * GRID + 1)[None]
    state["text_model.embeddings.position_ids"] = torch.arange(config.text_config.max_position_embeddings)[None]
    if layout == "vision_model":
        vision = CLIPVisionModel(config.vision_config)
        vision.load_state_dict(
            {
                k.removeprefix("vision_model."): v
                for k, v in state.items()
                if k.startswith("vision_model.") and "position_ids" not in k
            }
        )
        state = {name: tensor.contiguous() for name, tensor in vision.state_dict().items()}
        config = config.vision_config
    config.save_pretrained(folder)
    if weights == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return state


def _write_shards(folder: Path, state: dict[str, torch.Tensor], weights: str, shards: int):
    names = list(state)
    per_shard = math.ceil(len(names) / shards)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    prefix, extension, index_name = (
        ("pytorch_model", "bin", "pytorch_model.bin.index.json")
        if weights == "bin"
        else ("model", "safetensors", "model.safetensors.index.json")
    )
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file = f"{prefix}-{number:05d}-of-{len(groups):05d}.{extension}"
        part = {name: state[name] for name in group}
        if weights == "bin":
            torch.save(part, folder / file)
        else:
            save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update((name, file) for name in group)
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / index_name).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def write_original_release(
    root: Path,
    image_aspect_ratio: str = "pad",
    scale_factor: int = 2,
    patch_num: int | None = None,
    weights: str = "bin",
    shards: int = 3,
    dtype: torch.dtype = torch.float32,
    clip_layout: str = "clip_model",
    clip_weights: str = "bin",
    legacy_buffers: bool = True,
    seed: int = 0,
    text_sizes: dict | None = None,
) -> OriginalRelease:
    """Writes root/checkpoint (the LLaVA folder) and root/clip (the vision tower). `legacy_buffers` adds what older
    LLaVA checkpoints also hold: per-layer rotary inv_freq buffers and a frozen copy of the vision tower.
    `text_sizes` overrides entries of TEXT (e.g. fewer, wider attention heads)."""
    text = dict(TEXT, **(text_sizes or {}))
    checkpoint, vision_tower = root / "checkpoint", root / "clip"
    checkpoint.mkdir(parents=True)
    clip_state = write_clip_checkpoint(vision_tower, clip_layout, clip_weights, seed)

    text_config = LlamaConfig(**text, vocab_size=VOCAB)
    language_model = {
        name: tensor.to(dtype).contiguous()
        for name, tensor in _randomize(LlamaForCausalLM(text_config), seed + 1, 0.1).state_dict().items()
    }
    projector = OriginalTokenPacker(
        VISION["hidden_size"], LEVELS, PROJECTOR_WIDTH, PROJECTOR_HEADS, text["hidden_size"], scale_factor, GRID
    ).randomize(seed + 2)
    projector = projector.to(dtype)

    # LlavaLlamaForCausalLM's state dict order:
    # model.embed_tokens, model.layers.*, model.norm, model.mm_projector.*, lm_head
    state = {name: tensor for name, tensor in language_model.items() if name != "lm_head.weight"}
    if legacy_buffers:
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        for layer in range(text["num_hidden_layers"]):
            state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
        vision_copy = {k: v for k, v in clip_state.items() if k.startswith("vision_model.") and "position_ids" not in k}
        state.update((f"model.vision_tower.vision_tower.{k}", v.to(dtype).clone()) for k, v in vision_copy.items())
    state.update((f"model.mm_projector.{name}", tensor.contiguous()) for name, tensor in projector.state_dict().items())
    state["lm_head.weight"] = language_model["lm_head.weight"]
    _write_shards(checkpoint, state, weights, shards)

    config = original_llava_config(
        dict(text, vocab_size=VOCAB), VISION["hidden_size"], image_aspect_ratio, scale_factor, patch_num, dtype
    )
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2))
    (checkpoint / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.31.0"})
    )
    train_sentencepiece(checkpoint / "tokenizer.model")
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 2048,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return OriginalRelease(checkpoint, vision_tower, config, language_model, projector.eval(), clip_state)
