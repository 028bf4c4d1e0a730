import pytest

from tokenpacker import TokenPackerConfig

from .builders import tiny_config


def test_defaults_are_the_released_7b_model():
    config = TokenPackerConfig()
    assert config.vision_config.model_type == "clip_vision_model"
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (1024, 24)
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert config.text_config.model_type == "llama"
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (4096, 32)
    assert config.text_config.max_position_embeddings == 4096
    assert config.multi_level_feature_layers == [12, 16, 22, 23]
    assert config.vision_feature_layer == -2
    assert (config.projector_hidden_size, config.projector_num_heads) == (1024, 8)
    assert config.patch_grid_size == 24
    assert config.num_image_tokens == 144
    assert config.feature_layer_indices == (23, [12, 16, 22, 23])
    assert config.num_vision_layers_used == 23  # the original computes all 24


@pytest.mark.parametrize(("scale_factor", "tokens"), [(2, 144), (3, 64), (4, 36)])
def test_tokens_per_crop_follow_the_scale_factor(scale_factor, tokens):
    assert TokenPackerConfig(scale_factor=scale_factor).num_image_tokens == tokens


def test_round_trip_through_save_pretrained(tmp_path):
    config = tiny_config(scale_factor=3, image_aspect_ratio="slice", max_slices=16)
    config.save_pretrained(tmp_path)
    loaded = TokenPackerConfig.from_pretrained(tmp_path)
    saved = loaded.to_dict()
    assert saved.pop("auto_map") == {"AutoConfig": "configuration_tokenpacker.TokenPackerConfig"}
    assert saved == config.to_dict()
    assert loaded.num_image_tokens == 16
    assert loaded.text_config.hidden_size == 64


def test_any_text_model_type_is_accepted():
    config = tiny_config(text=dict(model_type="qwen2", num_key_value_heads=2))
    assert config.text_config.model_type == "qwen2"


def test_tied_embeddings_follow_the_text_config():
    assert tiny_config(text=dict(tie_word_embeddings=True)).tie_word_embeddings is True
    assert tiny_config().tie_word_embeddings is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(scale_factor=5), "scale_factor must divide the 12x12 patch grid of the vision tower, got 5; allowed: [1, 2, 3, 4, 6, 12]"),
        (dict(scale_factor=0), "scale_factor must be a positive integer, got 0"),
        (dict(projector_num_heads=3), "projector_num_heads must divide projector_hidden_size (32), got 3"),
        (dict(vision_feature_layer=7), "vision_feature_layer must index the vision tower's 7 hidden states (from -7 to 6), got 7"),
        (dict(multi_level_feature_layers=[2, -9]), "multi_level_feature_layers must index the vision tower's 7 hidden states (from -7 to 6), got -9"),
        (dict(multi_level_feature_layers=[]), "multi_level_feature_layers must name at least one hidden-state index, got []"),
        (dict(vision_feature_select_strategy="full"), "vision_feature_select_strategy must be 'default'"),
        (dict(image_aspect_ratio="anyres"), "image_aspect_ratio must be 'pad' or 'slice', got 'anyres'"),
        (dict(max_slices=12), "max_slices must be 9, 16 or 25, got 12"),
        (dict(slice_separator_token_id=500), "slice_separator_token_id must be below the text model's vocab_size (128), got 500"),
        (dict(image_token_id=-1), "image_token_id must be a non-negative token id, got -1"),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(overrides, message):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert message in str(error.value)
