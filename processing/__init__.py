from .image_processing_tokenpacker import TokenPackerImageProcessor
from .processing_tokenpacker import TokenPackerProcessor
from .tokenization_tokenpacker import fast_tokenizer_from_sentencepiece, train_llama_sentencepiece

__all__ = [
    "TokenPackerImageProcessor",
    "TokenPackerProcessor",
    "fast_tokenizer_from_sentencepiece",
    "train_llama_sentencepiece",
]
