"""Tiny models, built locally, for tests."""

from tokenpacker import TokenPackerConfig
from tokenpacker.processing import train_llama_sentencepiece

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
    import random

    rng = random.Random(0)
    lines = [" ".join(rng.choice(TRAINING_WORDS) for _ in range(12)) + rng.choice(",.?") for _ in range(2000)]
    return train_llama_sentencepiece(path, lines, vocab_size)


CHAT_IMAGE_TOKEN_ID = 400  # the 400 sentencepiece pieces, then <image> (400) and <pad> (401)
CHAT_PAD_TOKEN_ID = 401


def tiny_chat_config(model_file, image_aspect_ratio="pad", **overrides):
    """`tiny_config` on the tokenizer of `train_sentencepiece`: vocab 402, HD separator ids from the model file."""
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(model_file))
    settings = dict(
        text=dict(vocab_size=pieces.get_piece_size() + 2, pad_token_id=CHAT_PAD_TOKEN_ID),
        image_token_id=CHAT_IMAGE_TOKEN_ID,
        slice_separator_token_id=pieces.piece_to_id(","),
        row_separator_token_id=pieces.piece_to_id("\n"),
        image_aspect_ratio=image_aspect_ratio,
    )
    settings.update(overrides)
    return tiny_config(**settings)


def tiny_processor(folder, image_aspect_ratio="pad"):
    """A TokenPackerProcessor (36 tokens per crop); its sentencepiece model goes to `folder / "tokenizer.model"`."""
    from tokenpacker import TokenPackerProcessor
    from tokenpacker.processing import fast_tokenizer_from_sentencepiece

    model_file = train_sentencepiece(folder / "tokenizer.model")
    config = tiny_chat_config(model_file, image_aspect_ratio)
    return TokenPackerProcessor.from_model_config(config, fast_tokenizer_from_sentencepiece(model_file))


def tiny_checkpoint_folder(folder, image_aspect_ratio="pad"):
    """Saves a tiny random TokenPackerForConditionalGeneration and its processor in `folder`, and exports the remote
    code: a Hub folder."""
    import torch

    from tokenpacker import export_remote_code
    from tokenpacker.demo import save_random_checkpoint

    torch.manual_seed(0)  # the same weights whatever ran before
    model_file = train_sentencepiece(folder / "tokenizer.model")
    save_random_checkpoint(folder, tiny_chat_config(model_file, image_aspect_ratio), model_file)
    export_remote_code(folder)
    return folder
