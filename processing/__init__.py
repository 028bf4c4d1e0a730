from .processing_tokenpacker import TokenPackerProcessor

__all__ = ["TokenPackerProcessor"]
