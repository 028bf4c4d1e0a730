"""A fast tokenizer that gives exactly the ids of the original slow LLaMA (sentencepiece) tokenizer.

Used to build tokenizers (conversion, the demo, the tiny-shapes task), never by a saved model: it needs `tokenizers`
and `sentencepiece`, so the processor modules exported as remote code must not import it.
"""

import io
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import normalizers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


def fast_tokenizer_from_sentencepiece(
    model_file: str | os.PathLike,
    model_max_length: int = 2048,
    image_token: str = IMAGE_TOKEN,
    pad_token: str = PAD_TOKEN,
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """Builds a fast tokenizer from a LLaMA-style `tokenizer.model`, with `image_token` and `pad_token` appended.

    Batches are padded on `padding_side`, left by default as generation needs (the image-text-to-text pipeline pads
    its batches on the tokenizer's side).

    sentencepiece always adds its dummy prefix '▁', also to text that starts with a space; the `Metaspace`
    pre-tokenizer of transformers' Llama tokenizer does not ("▁ x" stays one '▁' short). The tokenizer built here
    normalizes like sentencepiece (prepend '▁', spaces to '▁', no pre-tokenizer), so every string, and every chunk
    the processor tokenizes between `<image>` markers, gets the original ids. It is saved as a generic
    `TokenizersBackend` so that loading keeps this normalizer instead of rebuilding the Llama default.
    """
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"No sentencepiece model at {model_file}")
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(model_file, Path(folder) / "tokenizer.model")
        llama = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False)
    backend = llama.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=llama.bos_token,
        eos_token=llama.eos_token,
        unk_token=llama.unk_token,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side=padding_side,
    )
    tokenizer.add_special_tokens({"extra_special_tokens": [image_token], "pad_token": pad_token})
    return tokenizer


def train_llama_sentencepiece(path: str | os.PathLike, sentences, vocab_size: int) -> Path:
    """Trains a LLaMA-style sentencepiece model on `sentences` and writes it to `path`.

    LLaMA's settings: BPE with byte fallback, unk 0, bos 1, eos 2, no pad, dummy prefix, no normalization, digits
    split, whitespace kept as written. Small models (a few hundred pieces) train in well under a second.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path


__all__ = ["IMAGE_TOKEN", "PAD_TOKEN", "fast_tokenizer_from_sentencepiece", "train_llama_sentencepiece"]
