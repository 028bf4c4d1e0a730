from .modeling_tokenpacker import (
    TokenPackerForConditionalGeneration,
    TokenPackerModel,
    TokenPackerPreTrainedModel,
    TokenPackerProjector,
)

__all__ = ["TokenPackerForConditionalGeneration", "TokenPackerModel", "TokenPackerPreTrainedModel", "TokenPackerProjector"]
