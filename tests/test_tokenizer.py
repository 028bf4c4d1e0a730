"""The fast tokenizer against sentencepiece itself, the original's tokenizer."""

import random

import sentencepiece as spm
from transformers import AutoTokenizer

from tokenpacker.processing import fast_tokenizer_from_sentencepiece

from .builders import train_sentencepiece


def test_ids_equal_sentencepiece_for_random_text_and_survive_saving(tmp_path):
    model_file = train_sentencepiece(tmp_path / "tokenizer.model")
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    fast_tokenizer_from_sentencepiece(model_file).save_pretrained(tmp_path / "saved")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "saved")
    rng = random.Random(0)
    alphabet = list("ab ,.\n?é中 XY09\t") + ["USER", " ASSISTANT:", "  ", "what colour"]
    texts = ["", " ", "\n", " ASSISTANT:", "\nWhat is this?", "USER: "]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(1000)]
    for text in texts:
        assert tokenizer(text).input_ids == [processor.bos_id()] + processor.encode(text), repr(text)


def test_image_and_pad_tokens_are_appended_special_tokens(tmp_path):
    model_file = train_sentencepiece(tmp_path / "tokenizer.model")
    tokenizer = fast_tokenizer_from_sentencepiece(model_file)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [400, 401]
    assert tokenizer.pad_token_id == 401 and len(tokenizer) == 402
    assert tokenizer("<image>", add_special_tokens=False).input_ids == [400]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_decoding_drops_the_dummy_prefix(tmp_path):
    tokenizer = fast_tokenizer_from_sentencepiece(train_sentencepiece(tmp_path / "tokenizer.model"))
    text = "what colour, red?\nthe square  is left"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
