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
