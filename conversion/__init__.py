"""Conversion of the original TokenPacker checkpoints into Hub folders."""

from .tokenizer import fast_tokenizer_from_sentencepiece, train_llama_sentencepiece

__all__ = ["fast_tokenizer_from_sentencepiece", "train_llama_sentencepiece"]
