"""TokenPacker: a CLIP-like vision tower, the TokenPacker projector and a causal language model (arXiv 2407.02392)."""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from ..configuration.compat_tokenpacker import (
    CACHE_NAME,
    accepts_past_key_values,
    selected_hidden_states,
    slice_logits_to_keep,
)
from ..configuration.configuration_tokenpacker import TokenPackerConfig


@dataclass
class TokenPackerModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `image_features`: the projected crops, (num_crops, tokens per crop, hidden)."""

    image_features: torch.FloatTensor | None = None


@dataclass
class TokenPackerCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `image_features`: the projected crops, (num_crops, tokens per crop, hidden)."""

    image_features: torch.FloatTensor | None = None


class TokenPackerMLP(nn.Module):
    """Linear -> activation -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, activation: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_features)
        self.act = ACT2FN[activation]
        self.linear_2 = nn.Linear(hidden_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(hidden_states)))


class TokenPackerHeadBlockLinear(nn.Module):
    """The parameters of a square Linear whose output rows form `num_heads` blocks, one block per attention head."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size))  # (out, in), out = heads * head_dim
        self.bias = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self):
        bound = self.weight.shape[1] ** -0.5  # nn.Linear's default initialization
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"hidden_size={self.weight.shape[1]}, num_heads={self.num_heads}"


class TokenPackerKeyProjection(TokenPackerHeadBlockLinear):
    """The keys' Linear, applied through the query: per head, q . (W k + b) = (W^T q) . k + q . b.

    One product per query instead of one per key of its region.
    """

    def forward(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # query: (heads, regions, head_dim) -> (regions, heads, hidden) and the bias term (regions, heads, 1)
        weight = self.weight.view(self.num_heads, self.head_dim, -1)
        query_in_key_space = torch.bmm(query, weight).transpose(0, 1)
        bias_term = torch.bmm(query, self.bias.view(self.num_heads, self.head_dim, 1)).transpose(0, 1)
        return query_in_key_space, bias_term


class TokenPackerValueProjection(TokenPackerHeadBlockLinear):
    """The values' Linear, applied per head after the attention weights a_j mixed the values.

    The weights of a head sum to 1, so sum_j a_j (W v_j + b) = W (sum_j a_j v_j) + b: one product per query.
    """

    def forward(self, mixed_values: torch.Tensor) -> torch.Tensor:
        # mixed_values: (regions, heads, hidden) -> (regions, heads, head_dim), head h through its own block of rows
        weight = self.weight.view(self.num_heads, self.head_dim, -1).transpose(1, 2)
        bias = self.bias.view(self.num_heads, 1, self.head_dim)
        return torch.baddbmm(bias, mixed_values.transpose(0, 1), weight).transpose(0, 1)


class TokenPackerRegionToPointAttention(nn.Module):
    """Multi-head attention in which each query sees only the keys and values of its own region.

    With one query per region, the key and value projections act through the query
    (`TokenPackerKeyProjection`, `TokenPackerValueProjection`): the same attention, without projecting the
    `region_size` keys and values of every region.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = TokenPackerKeyProjection(hidden_size, num_heads)
        self.v_proj = TokenPackerValueProjection(hidden_size, num_heads)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, queries: torch.Tensor, region_keys: torch.Tensor, region_values: torch.Tensor) -> torch.Tensor:
        # queries: (regions, hidden); region_keys, region_values: (regions, region_size, hidden)
        num_regions, _, hidden_size = region_keys.shape
        query = self.q_proj(queries).view(num_regions, self.num_heads, self.head_dim).transpose(0, 1)
        query_in_key_space, bias_term = self.k_proj(query)
        scores = torch.baddbmm(bias_term, query_in_key_space, region_keys.transpose(1, 2))  # (regions, heads, size)
        weights = (scores * self.head_dim**-0.5).softmax(dim=-1, dtype=torch.float32).to(region_values.dtype)
        attended = self.v_proj(torch.bmm(weights, region_values))  # (regions, heads, head_dim)
        return self.out_proj(attended.reshape(num_regions, hidden_size))


class TokenPackerProjector(nn.Module):
    """Packs a crop's patch features into `(grid / scale_factor) ** 2` tokens for the language model.

    1. Coarse point queries: the single-level patch features, bilinearly downsampled by `scale_factor`.
    2. Region keys and values: the multi-level patch features (several tower layers concatenated on channels).
    3. Region-to-point attention: each query attends to the `scale_factor ** 2` keys of the region it summarizes.
    4. An MLP maps the result to the language model's width.
    """

    def __init__(self, config: TokenPackerConfig):
        super().__init__()
        vision_size = config.vision_config.hidden_size
        width = config.projector_hidden_size
        multi_level_size = vision_size * len(config.multi_level_feature_layers)
        text_size = config.text_config.hidden_size
        act, eps = config.projector_hidden_act, config.projector_layer_norm_eps

        self.grid_size = config.patch_grid_size
        self.scale_factor = config.scale_factor
        self.query_proj = nn.Linear(vision_size, width, bias=False)
        self.query_norm = nn.LayerNorm(width, eps=eps)
        self.key_proj = TokenPackerMLP(multi_level_size, width, width, act)
        self.key_norm = nn.LayerNorm(width, eps=eps)
        self.value_proj = TokenPackerMLP(multi_level_size, width, width, act)
        self.value_norm = nn.LayerNorm(width, eps=eps)
        self.attention = TokenPackerRegionToPointAttention(width, config.projector_num_heads)
        self.output_proj = TokenPackerMLP(width, text_size, text_size, act)

    def coarse_queries(self, patch_features: torch.Tensor) -> torch.Tensor:
        # (crops, grid*grid, C) -> (crops, (grid/s)**2, C): bilinear in float32, like the original
        crops, _, channels = patch_features.shape
        grid, coarse = self.grid_size, self.grid_size // self.scale_factor
        patch_map = patch_features.view(crops, grid, grid, channels).permute(0, 3, 1, 2).float()
        coarse_map = F.interpolate(patch_map, size=(coarse, coarse), mode="bilinear", align_corners=False)
        return coarse_map.flatten(2).transpose(1, 2).to(patch_features.dtype)

    def regions(self, features: torch.Tensor) -> torch.Tensor:
        # (crops, grid*grid, C) -> (crops * (grid/s)**2, s*s, C): one row per region, regions in row-major order
        crops, _, channels = features.shape
        s, coarse = self.scale_factor, self.grid_size // self.scale_factor
        features = features.view(crops, coarse, s, coarse, s, channels).permute(0, 1, 3, 2, 4, 5)
        return features.reshape(crops * coarse * coarse, s * s, channels)

    def forward(self, patch_features: torch.Tensor, multi_level_features: torch.Tensor) -> torch.Tensor:
        # patch_features: (crops, grid*grid, vision); multi_level_features: (crops, grid*grid, vision * levels)
        crops = patch_features.shape[0]
        queries = self.query_norm(self.query_proj(self.coarse_queries(patch_features)))
        region_keys = self.regions(self.key_norm(self.key_proj(multi_level_features)))
        region_values = self.regions(self.value_norm(self.value_proj(multi_level_features)))
        packed = self.attention(queries.reshape(-1, queries.shape[-1]), region_keys, region_values)
        return self.output_proj(packed.view(crops, -1, packed.shape[-1]))  # (crops, (grid/s)**2, text hidden)


class TokenPackerPreTrainedModel(PreTrainedModel):
    config: TokenPackerConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["TokenPackerProjector"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def post_init(self):
        super().post_init()
        # The tower's and the language model's lists name classes of their whole family (CLIP's names its text
        # embeddings): keep the classes this model holds, which FSDP's layer-by-layer wrapping looks for.
        self._no_split_modules &= {type(module).__name__ for module in self.modules()}

    def _init_weights(self, module):
        if isinstance(module, TokenPackerProjector):
            for linear in module.modules():
                if isinstance(linear, (nn.Linear, TokenPackerHeadBlockLinear)):
                    init.trunc_normal_(linear.weight, std=self.config.initializer_range)
                    if linear.bias is not None:
                        init.zeros_(linear.bias)
                elif isinstance(linear, nn.LayerNorm):
                    init.ones_(linear.weight)
                    init.zeros_(linear.bias)
        else:
            super()._init_weights(module)


class TokenPackerModel(TokenPackerPreTrainedModel):
    """Vision tower, TokenPacker projector and language model (no head)."""

    def __init__(self, config: TokenPackerConfig):
        super().__init__(config)
        # The tower is built only up to the deepest layer the projector reads: later layers would be computed for nothing.
        vision_config = copy.deepcopy(config.vision_config)
        vision_config.num_hidden_layers = config.num_vision_layers_used
        self.vision_tower = AutoModel.from_config(vision_config)
        self.multi_modal_projector = TokenPackerProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.FloatTensor) -> BaseModelOutputWithPooling:
        """(crops, 3, H, W) pixel values -> `pooler_output`: (crops, tokens per crop, text hidden), the LLM's inputs.

        As Llava's, the output also holds the tower's hidden states (those the projector does not read are None) and,
        as `last_hidden_state`, the deepest layer run. Llava's `pooler_output` is a list with one tensor per image;
        here every crop packs into the same number of tokens, so the list is stacked: one row per crop.
        """
        self._check_pixel_values(pixel_values)
        query_layer, levels = self.config.feature_layer_indices
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        # Only the hidden states the projector reads are kept (the others come back as None) where the library can
        # select them.
        output_hidden_states = selected_hidden_states([query_layer, *levels])
        hidden_states = self.vision_tower(
            pixel_values, output_hidden_states=output_hidden_states, return_dict=True
        ).hidden_states
        patch_features = hidden_states[query_layer][:, 1:]  # CLS dropped
        multi_level_features = torch.cat([hidden_states[layer][:, 1:] for layer in levels], dim=-1)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states[-1],
            pooler_output=self.multi_modal_projector(patch_features, multi_level_features),
            hidden_states=hidden_states,
        )

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.BoolTensor:
        """(batch, seq, 1) mask of where the image features go: the `<image>` ids, or without `input_ids` the
        embeddings equal to the `<image>` embedding row. Raises when their count differs from the features'."""
        if input_ids is not None:
            image_mask = input_ids == self.config.image_token_id
        else:
            image_mask = (inputs_embeds == self._image_token_embedding(inputs_embeds.device)).all(-1)
        num_tokens, num_features = int(image_mask.sum()), image_features.shape[:-1].numel()
        if num_tokens != num_features:
            message = f"Image features and image tokens do not match: tokens: {num_tokens}, features: {num_features}"
            if image_features.ndim == 3:
                message += f" ({image_features.shape[0]} crops x {image_features.shape[1]} tokens per crop)"
            if input_ids is None:
                message += self._shared_image_row_hint()
            raise ValueError(message)
        return image_mask.unsqueeze(-1).to(inputs_embeds.device)

    def _image_token_embedding(self, device: torch.device) -> torch.Tensor:
        return self.get_input_embeddings()(torch.tensor(self.config.image_token_id, dtype=torch.long, device=device))

    def _shared_image_row_hint(self) -> str:
        """Which other tokens share the `<image>` embedding row (their positions in inputs_embeds look like images)."""
        weight = self.get_input_embeddings().weight
        twins = (weight == self._image_token_embedding(weight.device)).all(-1).nonzero().flatten().tolist()
        twins.remove(self.config.image_token_id)
        if not twins:
            return ""
        return (
            f"; the `<image>` embedding row ({self.config.image_token_id}) also equals the row of token id(s) {twins}, "
            "so their positions in inputs_embeds count as image tokens: pass input_ids instead of inputs_embeds, or "
            "give `<image>` an embedding row of its own"
        )

    def _check_pixel_values(self, pixel_values: torch.Tensor):
        _check_is_tensor("pixel_values", pixel_values)
        vision = self.config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be floating point (normalized crops from the processor), got {pixel_values.dtype}"
            )
        if pixel_values.ndim != 4 or pixel_values.shape[0] == 0 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (crops, {', '.join(map(str, expected))}) with at least one crop, "
                f"got {tuple(pixel_values.shape)}"
            )
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values must be finite, got NaN or infinite values")

    def _check_text_inputs(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | dict | BlockMask | None,
        past_length: int,
    ):
        """Shapes, dtypes and id range of the text inputs. A prepared mask (4-D, a dict, a BlockMask) is trusted."""
        _check_is_tensor("input_ids", input_ids)
        _check_is_tensor("inputs_embeds", inputs_embeds)
        if not isinstance(attention_mask, (dict, BlockMask)):
            _check_is_tensor("attention_mask", attention_mask)
        if input_ids is not None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must have shape (batch, sequence), got {tuple(input_ids.shape)}")
            if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
                raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
            vocab_size = self.get_input_embeddings().num_embeddings
            out_of_vocabulary = (input_ids < 0) | (input_ids >= vocab_size)
            if out_of_vocabulary.any():
                bad_ids = input_ids[out_of_vocabulary]
                largest, smallest = int(bad_ids.max()), int(bad_ids.min())
                worst = f"the largest {largest}" if largest >= vocab_size else f"the smallest {smallest}"
                raise ValueError(
                    f"input_ids must be in [0, {vocab_size}) (the vocab size is {vocab_size}), got {bad_ids.numel()} "
                    f"id(s) outside it, {worst}"
                )
            batch_size, length = input_ids.shape
        else:
            hidden_size = self.config.text_config.hidden_size
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != hidden_size:
                raise ValueError(
                    f"inputs_embeds must have shape (batch, sequence, {hidden_size}), got {tuple(inputs_embeds.shape)}"
                )
            batch_size, length = inputs_embeds.shape[:2]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim != 4:
            allowed = [(batch_size, length)] + ([(batch_size, past_length + length)] if past_length else [])
            if tuple(attention_mask.shape) not in allowed:
                expected = " or ".join(f"({batch}, {size})" for batch, size in allowed)
                raise ValueError(
                    f"attention_mask must have shape {expected} (batch, past + new tokens) to match the "
                    f"{'input_ids' if input_ids is not None else 'inputs_embeds'}, got {tuple(attention_mask.shape)}"
                )

    @can_return_tuple
    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> TokenPackerModelOutputWithPast:
        r"""
        Image tokens in `input_ids` need `pixel_values` while the cache is empty (a prompt). Once the prompt is
        cached, `generate` drops `pixel_values` and feeds back the generated ids: an `<image>` id the model generated
        itself (when it is not suppressed) is embedded as it is.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_text_inputs(input_ids, inputs_embeds, attention_mask, past_length)
        if pixel_values is None and input_ids is not None and past_length == 0:
            num_image_tokens = int((input_ids == self.config.image_token_id).sum())
            if num_image_tokens:
                raise ValueError(
                    f"input_ids hold {num_image_tokens} image tokens (id {self.config.image_token_id}) but "
                    "pixel_values is None: pass the processor's pixel_values with them"
                )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, return_dict=True).pooler_output
            image_mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            features = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        return TokenPackerModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=image_features,
        )


class TokenPackerForConditionalGeneration(TokenPackerPreTrainedModel, GenerationMixin):
    """TokenPacker with a language-modelling head: answers questions about images with `generate`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: TokenPackerConfig):
        super().__init__(config)
        self.model = TokenPackerModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module):
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        """(crops, 3, H, W) pixel values -> `pooler_output`: (crops, tokens per crop, text hidden), see the base."""
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> TokenPackerCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets aligned with `input_ids`; -100 is ignored, and so are the image positions.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = None
        if labels is not None:
            if input_ids is not None:
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return TokenPackerCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=outputs.image_features,
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # pixel_values holds crops, not samples: repeat each sample's group of crops, not each crop. (The library
        # expands per-sample visual inputs only as precomputed `mm_encoder_outputs`, and not in every supported release.)
        pixel_values = model_kwargs.pop("pixel_values", None)
        if expand_size > 1 and pixel_values is not None:
            image_tokens = (input_ids == self.config.image_token_id).sum(-1)
            crops_per_sample = (image_tokens // self.config.num_image_tokens).tolist()
            if sum(crops_per_sample) != pixel_values.shape[0]:
                raise ValueError(
                    f"Cannot expand {pixel_values.shape[0]} crops for generation: input_ids hold image tokens for "
                    f"{sum(crops_per_sample)} crops"
                )
            groups = pixel_values.split(crops_per_sample)
            pixel_values = torch.cat([group for group in groups for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs


def _check_is_tensor(name: str, value):
    if value is not None and not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


__all__ = ["TokenPackerForConditionalGeneration", "TokenPackerModel", "TokenPackerPreTrainedModel", "TokenPackerProjector"]
