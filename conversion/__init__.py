"""Conversion of the original TokenPacker checkpoints into Hub folders."""

from .convert import ConversionResult, convert_checkpoint
from .verify import VerificationReport, original_projector_formula

__all__ = ["ConversionResult", "VerificationReport", "convert_checkpoint", "original_projector_formula"]
