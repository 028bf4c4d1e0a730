"""Conversion of the original TokenPacker checkpoints into Hub folders."""

from .convert import ConversionResult, convert_checkpoint
from .tokenizer import fast_tokenizer_from_sentencepiece, train_llama_sentencepiece
from .verify import VerificationReport, original_projector_formula

__all__ = [
    "ConversionResult",
    "VerificationReport",
    "convert_checkpoint",
    "fast_tokenizer_from_sentencepiece",
    "original_projector_formula",
    "train_llama_sentencepiece",
]
