from .image_processing_tokenpacker import TokenPackerImageProcessor

__all__ = ["TokenPackerImageProcessor"]
