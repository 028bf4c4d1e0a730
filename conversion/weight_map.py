"""The one table from the original checkpoints' tensor names to this package's names.

Two sources feed a converted model: the original LLaVA folder (language model and `model.mm_projector`) and the stock
CLIP checkpoint (the vision tower, which the original loads on its own and never saves). Every source tensor must
match exactly one rule: a rename, a split into equal parts along the first dimension, or a named drop.
"""

import re
from dataclasses import dataclass

import torch

LLAVA = "checkpoint"
CLIP = "vision tower"

_PROJECTOR = "model.multi_modal_projector."
NEW_ROW_SEED = 0
NEW_ROW_NOISE = 0.1  # noise scale, relative to each dimension's standard deviation over the original rows


@dataclass(frozen=True)
class Rule:
    """Original names matching `pattern` become `targets` (regex replacement templates).

    One target: a rename. Several: the tensor is split into that many equal parts along dim 0, in order. None: the
    tensor is dropped, for the reason given in `note`. `grows_with_vocabulary`: rows are appended for new tokens
    (`appended_rows`).
    """

    pattern: str
    targets: tuple[str, ...]
    note: str
    grows_with_vocabulary: bool = False

    @property
    def dropped(self) -> bool:
        return not self.targets


def llava_rules() -> tuple[Rule, ...]:
    """Rules for the original LLaVA folder (LlavaLlamaForCausalLM's state dict)."""
    return (
        Rule(r"^model\.embed_tokens\.(weight)$", ("model.language_model.embed_tokens.\\1",), "token embeddings", True),
        Rule(r"^lm_head\.(weight)$", ("lm_head.\\1",), "language-model head", True),
        Rule(
            r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",
            (),
            "rotary frequencies: a buffer that transformers recomputes from the config",
        ),
        Rule(r"^model\.layers\.(.+)$", ("model.language_model.layers.\\1",), "decoder layers"),
        Rule(r"^model\.norm\.(.+)$", ("model.language_model.norm.\\1",), "final norm"),
        Rule(r"^model\.mm_projector\.q_proj_1\.(weight)$", (_PROJECTOR + "query_proj.\\1",), "query projection"),
        Rule(r"^model\.mm_projector\.ln_q_1\.(weight|bias)$", (_PROJECTOR + "query_norm.\\1",), "query norm"),
        Rule(r"^model\.mm_projector\.k_proj_1\.0\.(weight|bias)$", (_PROJECTOR + "key_proj.linear_1.\\1",), "key MLP"),
        Rule(r"^model\.mm_projector\.k_proj_1\.2\.(weight|bias)$", (_PROJECTOR + "key_proj.linear_2.\\1",), "key MLP"),
        Rule(r"^model\.mm_projector\.ln_k_1\.(weight|bias)$", (_PROJECTOR + "key_norm.\\1",), "key norm"),
        Rule(
            r"^model\.mm_projector\.v_proj_1\.0\.(weight|bias)$", (_PROJECTOR + "value_proj.linear_1.\\1",), "value MLP"
        ),
        Rule(
            r"^model\.mm_projector\.v_proj_1\.2\.(weight|bias)$", (_PROJECTOR + "value_proj.linear_2.\\1",), "value MLP"
        ),
        Rule(r"^model\.mm_projector\.ln_v_1\.(weight|bias)$", (_PROJECTOR + "value_norm.\\1",), "value norm"),
        Rule(
            r"^model\.mm_projector\.clip_attn\.in_proj_(weight|bias)$",
            tuple(_PROJECTOR + f"attention.{part}_proj.\\1" for part in ("q", "k", "v")),
            "nn.MultiheadAttention's packed input projection: query, key and value parts",
        ),
        Rule(
            r"^model\.mm_projector\.clip_attn\.out_proj\.(weight|bias)$",
            (_PROJECTOR + "attention.out_proj.\\1",),
            "attention output projection",
        ),
        Rule(r"^model\.mm_projector\.mlp\.0\.(weight|bias)$", (_PROJECTOR + "output_proj.linear_1.\\1",), "output MLP"),
        Rule(r"^model\.mm_projector\.mlp\.2\.(weight|bias)$", (_PROJECTOR + "output_proj.linear_2.\\1",), "output MLP"),
        Rule(
            r"^model\.vision_tower\.",
            (),
            "a frozen copy of the stock CLIP tower that the original ignores when loading: the tower comes from the "
            "CLIP checkpoint",
        ),
    )


def clip_rules(num_layers_used: int) -> tuple[Rule, ...]:
    """Rules for the stock CLIP checkpoint: a CLIPModel (`vision_model.*`, text tower, projections) or a
    CLIPVisionModel (`vision_model.*` before transformers 5, bare names since). Only the first `num_layers_used`
    encoder layers are kept: the projector reads no deeper hidden state."""
    vision = r"^(?:vision_model\.)?"
    kept_layers = "|".join(str(layer) for layer in range(num_layers_used))
    return (
        Rule(vision + r"embeddings\.position_ids$", (), "position ids: a buffer that transformers rebuilds"),
        Rule(vision + r"(embeddings\..+)$", ("model.vision_tower.\\1",), "patch and position embeddings"),
        Rule(vision + r"(pre_layrnorm\..+)$", ("model.vision_tower.\\1",), "pre-encoder norm"),
        Rule(vision + rf"(encoder\.layers\.(?:{kept_layers})\..+)$", ("model.vision_tower.\\1",), "encoder layers"),
        Rule(
            vision + r"encoder\.layers\.\d+\.",
            (),
            f"encoder layers {num_layers_used} and later (from 0), whose outputs the projector never reads",
        ),
        Rule(vision + r"(post_layernorm\..+)$", ("model.vision_tower.\\1",), "post-encoder norm"),
        Rule(r"^text_model\.", (), "CLIP text tower"),
        Rule(r"^(?:visual_projection|text_projection)\.", (), "CLIP contrastive projections"),
        Rule(r"^logit_scale$", (), "CLIP contrastive temperature"),
    )


def appended_rows(weight: torch.Tensor, count: int) -> torch.Tensor:
    """The rows appended to an embedding matrix or a head for `count` new tokens, in float32: the mean of the
    original rows plus Gaussian noise of NEW_ROW_NOISE times each dimension's standard deviation, drawn from a
    generator seeded with NEW_ROW_SEED. Near an average token, distinct from each other (so `<image>` and `<pad>`
    embeddings tell image positions from padding) and from every original row, and the same on every run."""
    std, mean = torch.std_mean(weight.float(), dim=0)
    noise = torch.randn(count, *weight.shape[1:], generator=torch.Generator().manual_seed(NEW_ROW_SEED))
    return mean + noise * std * NEW_ROW_NOISE


@dataclass(frozen=True)
class Mapped:
    """Where one source tensor goes: `targets` (several when split), or nowhere when `rule.dropped`."""

    source: str
    name: str
    rule: Rule
    targets: tuple[str, ...]


class WeightMap:
    """Resolves original tensor names of each source with the first rule that matches."""

    def __init__(self, num_vision_layers_used: int):
        self.rules = {LLAVA: llava_rules(), CLIP: clip_rules(num_vision_layers_used)}

    def resolve(self, source: str, name: str) -> Mapped | None:
        for rule in self.rules[source]:
            match = re.match(rule.pattern, name)
            if match:
                return Mapped(source, name, rule, tuple(match.expand(target) for target in rule.targets))
        return None


__all__ = ["CLIP", "LLAVA", "Mapped", "Rule", "WeightMap", "appended_rows", "clip_rules", "llava_rules"]
