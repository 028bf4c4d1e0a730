"""TokenPacker for transformers: the visual projector of arXiv 2407.02392 as a Hub-native model."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .building import from_vision_and_text
from .configuration import TokenPackerConfig
from .modeling import (
    TokenPackerForConditionalGeneration,
    TokenPackerModel,
    TokenPackerPreTrainedModel,
    TokenPackerProjector,
)
from .processing import TokenPackerImageProcessor, TokenPackerProcessor
from .remote_code import export_remote_code

__version__ = "0.1.0"

AutoConfig.register(TokenPackerConfig.model_type, TokenPackerConfig, exist_ok=True)
AutoModel.register(TokenPackerConfig, TokenPackerModel, exist_ok=True)
AutoModelForImageTextToText.register(TokenPackerConfig, TokenPackerForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(
    TokenPackerConfig, image_processor_classes={"pil": TokenPackerImageProcessor}, exist_ok=True
)
AutoProcessor.register(TokenPackerConfig, TokenPackerProcessor, exist_ok=True)

__all__ = [
    "TokenPackerConfig",
    "TokenPackerForConditionalGeneration",
    "TokenPackerImageProcessor",
    "TokenPackerModel",
    "TokenPackerPreTrainedModel",
    "TokenPackerProcessor",
    "TokenPackerProjector",
    "__version__",
    "export_remote_code",
    "from_vision_and_text",
]
