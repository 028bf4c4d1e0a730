"""TokenPacker as a native vLLM model: vLLM's CLIP tower and causal language model, the package's projector.

The multimodal processor gives each image the package processor's exact id layout (`image_token_layout`): crops of
`num_image_tokens` `<image>` ids, with the "slice" separators between them; only the `<image>` positions receive
the projected crops.
"""

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature, CLIPVisionConfig
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.models.clip import CLIPVisionTransformer
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.sequence import IntermediateTensors

from ..configuration import TokenPackerConfig
from ..modeling import TokenPackerProjector
from ..processing import TokenPackerProcessor


class TokenPackerProcessingInfo(BaseProcessingInfo):
    """The model's configuration and the package's processor, and how many ids an image becomes."""

    def get_hf_config(self) -> TokenPackerConfig:
        return self.ctx.get_hf_config(TokenPackerConfig)

    def get_hf_processor(self, **kwargs: object) -> TokenPackerProcessor:
        processor = self.ctx.get_hf_processor(TokenPackerProcessor, **kwargs)
        config = self.get_hf_config()
        mode = processor.image_processor.image_aspect_ratio
        if mode != config.image_aspect_ratio or processor.num_image_tokens != config.num_image_tokens:
            raise ValueError(
                f"The processor (image_aspect_ratio {mode!r}, {processor.num_image_tokens} tokens per crop) does not "
                f"match the model (image_aspect_ratio {config.image_aspect_ratio!r}, {config.num_image_tokens} tokens "
                "per crop): save the processor made for this model beside it"
            )
        return processor

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """Length of the id run one image of this size becomes, the "slice" separators included."""
        sizes = self.get_hf_processor()._get_num_multimodal_tokens(image_sizes=[(image_height, image_width)])
        return sizes.num_image_tokens[0]

    def get_image_size_with_most_features(self) -> ImageSize:
        """An image whose grid has the most blocks: 336 x 336 in "pad" mode."""
        config = self.get_hf_config()
        crop = config.vision_config.image_size
        if config.image_aspect_ratio == "pad":
            return ImageSize(width=crop, height=crop)
        blocks = range(1, config.max_slices + 1)
        sizes = [
            ImageSize(width=crop * columns, height=crop * rows)
            for rows in blocks
            for columns in blocks
            if rows * columns <= config.max_slices
        ]
        return max(sizes, key=lambda size: self.get_num_image_tokens(image_width=size.width, image_height=size.height))

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        size = self.get_image_size_with_most_features()
        return {"image": self.get_num_image_tokens(image_width=size.width, image_height=size.height)}


class TokenPackerDummyInputsBuilder(BaseDummyInputsBuilder[TokenPackerProcessingInfo]):
    """Profiling inputs: one `<image>` per image, every image of the size with the largest grid."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        size = self.info.get_image_size_with_most_features()
        images = self._get_dummy_images(
            width=size.width,
            height=size.height,
            num_images=mm_counts.get("image", 0),
            overrides=mm_options.get("image"),
        )
        return {"image": images}


class TokenPackerMultiModalProcessor(BaseMultiModalProcessor[TokenPackerProcessingInfo]):
    """Crops from the package's image processor; each `<image>` id becomes the package processor's layout."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        image_processor = self.info.get_hf_processor(**hf_kwargs).image_processor
        crops = image_processor(hf_data["images"], return_tensors="pt")
        grids = crops["image_grids"]  # (images, 2): blocks per column and per row
        num_crops = torch.tensor([image_processor.num_crops(rows, columns) for rows, columns in grids.tolist()])
        return BatchFeature({"pixel_values": crops["pixel_values"], "image_grids": grids, "num_crops": num_crops})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_crops = hf_inputs.get("num_crops", torch.empty(0, dtype=torch.long))
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", num_crops),
            "image_grids": MultiModalFieldConfig.batched("image"),
            "num_crops": MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        mode = processor.image_processor.image_aspect_ratio

        def image_ids(item_index: int) -> PromptUpdateDetails:
            rows, columns = out_mm_kwargs["image"][item_index]["image_grids"].data.tolist()
            layout = processor.image_token_layout(rows, columns, mode)
            return PromptUpdateDetails.select_token_id(layout, processor.image_token_id)

        return [PromptReplacement(modality="image", target=[processor.image_token_id], replacement=image_ids)]


@MULTIMODAL_REGISTRY.register_processor(
    TokenPackerMultiModalProcessor, info=TokenPackerProcessingInfo, dummy_inputs=TokenPackerDummyInputsBuilder
)
class TokenPackerForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    """vLLM's CLIP tower (run to the deepest layer read, no post-layernorm), the projector, vLLM's language model."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "model.language_model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError(f"TokenPacker takes images only, got modality {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: TokenPackerConfig = vllm_config.model_config.hf_config
        if not isinstance(config.vision_config, CLIPVisionConfig):
            raise ValueError(
                f"TokenPacker in vLLM runs a CLIP vision tower, got a {type(config.vision_config).__name__}"
            )
        self.config = config
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_id]
        )
        self.query_layer, self.levels = config.feature_layer_indices
        # Never generated: the image placeholder and padding (vLLM does not read generation_config's suppress_tokens).
        self.suppressed_token_ids = sorted(
            {config.image_token_id, config.text_config.pad_token_id} - {None}
        )

        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = CLIPVisionTransformer(
                config.vision_config,
                vllm_config.quant_config,
                num_hidden_layers_override=config.num_vision_layers_used,
                require_post_norm=False,
                prefix=maybe_prefix(prefix, "vision_tower"),
            )
            self.multi_modal_projector = TokenPackerProjector(config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def _packed_crops(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (crops, 3, H, W) -> (crops, tokens per crop, text hidden); hidden states: [embeddings, layer 1, ...]
        tower = self.vision_tower
        embeddings = tower.pre_layrnorm(tower.embeddings(pixel_values.to(tower.dtype)))
        hidden_states = tower.encoder(inputs_embeds=embeddings, return_all_hidden_states=True)
        patch_features = hidden_states[self.query_layer][:, 1:]  # CLS dropped
        multi_level_features = torch.cat([hidden_states[layer][:, 1:] for layer in self.levels], dim=-1)
        return self.multi_modal_projector(patch_features, multi_level_features)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        num_crops = kwargs["num_crops"]
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        num_crops = [int(count) for count in (num_crops.tolist() if torch.is_tensor(num_crops) else num_crops)]
        packed = self._packed_crops(pixel_values)
        return [image.flatten(0, 1) for image in packed.split(num_crops)]  # per image: (crops * tokens, hidden)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.language_model.compute_logits(hidden_states)
        if logits is not None:
            logits[..., self.suppressed_token_ids] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
