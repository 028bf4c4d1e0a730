from .configuration_tokenpacker import TokenPackerConfig

__all__ = ["TokenPackerConfig"]
