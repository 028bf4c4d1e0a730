"""Tiny models, built locally, for tests."""

from tokenpacker import TokenPackerConfig

IMAGE_TOKEN_ID = 120


def tiny_config(**overrides):
    """A TokenPacker config small enough for CPU tests: 336-pixel crops in a 12x12 patch grid, a 2-layer Llama."""
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        image_size=336,
        patch_size=28,
    )
    text = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision.update(overrides.pop("vision", {}))
    text.update(overrides.pop("text", {}))
    settings = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        multi_level_feature_layers=[2, 3, 4, 5],
        vision_feature_layer=-2,
        projector_hidden_size=32,
        projector_num_heads=4,
        slice_separator_token_id=7,
        row_separator_token_id=0,
    )
    settings.update(overrides)
    return TokenPackerConfig(**settings)


TRAINING_WORDS = (
    "a chat between curious human and an artificial intelligence assistant the gives helpful detailed polite "
    "answers to questions USER ASSISTANT what is in this image describe colour red green blue square circle left "
    "right top bottom how many shapes are there 0 1 2 3 4 5 6 7 8 9 , . ? ! :"
).split()


def train_sentencepiece(path, vocab_size=400):
    """Trains a LLaMA-style sentencepiece model (BPE, byte fallback, unk 0, bos 1, eos 2) in well under a second."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(TRAINING_WORDS) for _ in range(12)) + rng.choice(",.?") for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
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
    path.write_bytes(model.getvalue())
    return path
