from .image_processing_tokenpacker import TokenPackerImageProcessor
from .processing_tokenpacker import TokenPackerProcessor

__all__ = ["TokenPackerImageProcessor", "TokenPackerProcessor"]
