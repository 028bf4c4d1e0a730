import typing

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
    assert "auto_map" not in saved  # the code and its auto_map come with `export_remote_code` only
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
        (
            dict(image_aspect_ratio="slice", slice_separator_token_id=500),
            "slice_separator_token_id must be below the text model's vocab_size (128), got 500",
        ),
        (dict(projector_hidden_act="swish_ish"), "projector_hidden_act must name an activation of transformers'"),
        (dict(initializer_range=0.0), "initializer_range must be a positive float, got 0.0"),
        (dict(projector_layer_norm_eps=-1e-6), "projector_layer_norm_eps must be a positive float, got -1e-06"),
        (dict(image_token_id=-1), "image_token_id must be a non-negative token id, got -1"),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(overrides, message):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    [
        ("projector_hidden_act", 3, ValueError, "projector_hidden_act must name an activation of transformers' ACT2FN"),
        ("initializer_range", "x", TypeError, "initializer_range must be a positive float, got str 'x'"),
        ("projector_layer_norm_eps", float("nan"), ValueError, "projector_layer_norm_eps must be a positive float"),
        ("scale_factor", "2", TypeError, "scale_factor must be a positive integer, got str '2'"),
        ("image_token_id", True, TypeError, "image_token_id must be a token id (int), got bool True"),
        ("multi_level_feature_layers", 3, TypeError, "multi_level_feature_layers must be a list of hidden-state"),
    ],
)
def test_wrong_types_are_refused_at_construction(name, value, error, message):
    with pytest.raises(error) as raised:
        tiny_config(**{name: value})
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    [
        ("scale_factor", 5, ValueError, "scale_factor must divide the 12x12 patch grid of the vision tower, got 5"),
        ("scale_factor", 0, ValueError, "scale_factor must be a positive integer, got 0"),
        ("projector_num_heads", 5, ValueError, "projector_num_heads must divide projector_hidden_size (32), got 5"),
        ("projector_hidden_act", 3, ValueError, "projector_hidden_act must name an activation of transformers' ACT2FN"),
        ("initializer_range", "x", TypeError, "initializer_range must be a positive float, got str 'x'"),
        ("initializer_range", -0.02, ValueError, "initializer_range must be a positive float, got -0.02"),
        ("projector_layer_norm_eps", 0, ValueError, "projector_layer_norm_eps must be a positive float, got 0"),
        ("image_aspect_ratio", "anyres", ValueError, "image_aspect_ratio must be 'pad' or 'slice', got 'anyres'"),
        ("max_slices", 12, ValueError, "max_slices must be 9, 16 or 25, got 12"),
        ("vision_feature_layer", 7, ValueError, "vision_feature_layer must index the vision tower's 7 hidden states"),
        ("multi_level_feature_layers", [1, 9], ValueError, "multi_level_feature_layers must index the vision tower's"),
        ("vision_feature_select_strategy", "full", ValueError, "vision_feature_select_strategy must be 'default'"),
        ("row_separator_token_id", -1, ValueError, "row_separator_token_id must be a non-negative token id, got -1"),
    ],
)
def test_assigning_a_bad_value_is_refused_and_keeps_the_old_one(name, value, error, message):
    config = tiny_config()
    before = config.to_dict()
    with pytest.raises(error) as raised:
        setattr(config, name, value)
    assert message in str(raised.value)
    assert config.to_dict() == before


def test_assigning_a_good_value_changes_what_follows_from_it():
    config = tiny_config()
    config.scale_factor = 3
    assert config.num_image_tokens == 16
    config.multi_level_feature_layers = (1, 2)
    assert config.multi_level_feature_layers == [1, 2]
    config.projector_hidden_act = "silu"
    config.initializer_range = 1  # an int is a float here
    assert TokenPackerConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_separators_are_checked_against_the_vocabulary_in_slice_mode_only():
    """A "pad" model with a small vocabulary keeps the default separators it never writes."""
    config = tiny_config(slice_separator_token_id=29892)
    assert config.image_aspect_ratio == "pad"
    config.row_separator_token_id = 5000
    with pytest.raises(ValueError, match=r"slice_separator_token_id must be below the text model's vocab_size \(128\), got 29892"):
        config.image_aspect_ratio = "slice"
    assert config.image_aspect_ratio == "pad"
    config.slice_separator_token_id, config.row_separator_token_id = 7, 0
    config.image_aspect_ratio = "slice"
    with pytest.raises(ValueError, match="row_separator_token_id must be below the text model's vocab_size"):
        config.row_separator_token_id = 128
    with pytest.raises(ValueError, match="slice_separator_token_id must be below"):
        tiny_config(image_aspect_ratio="slice", slice_separator_token_id=29892)


def test_saved_configs_and_from_pretrained_settings_load_through_the_checks(tmp_path):
    tiny_config(image_aspect_ratio="slice", max_slices=25).save_pretrained(tmp_path)
    loaded = TokenPackerConfig.from_pretrained(tmp_path, scale_factor=3, projector_hidden_act="relu")
    assert (loaded.scale_factor, loaded.num_image_tokens, loaded.max_slices) == (3, 16, 25)
    assert loaded.projector_hidden_act == "relu"
    with pytest.raises(ValueError, match="scale_factor must divide the 12x12 patch grid"):
        TokenPackerConfig.from_pretrained(tmp_path, scale_factor=5)


def test_saving_checks_edits_inside_the_sub_configs(tmp_path):
    config = tiny_config(scale_factor=4)
    config.vision_config.image_size = 280  # a 10x10 grid, which 4 does not divide
    with pytest.raises(ValueError, match="scale_factor must divide the 10x10 patch grid"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_the_typed_fields_list_their_choices():
    annotations = TokenPackerConfig.__annotations__
    assert typing.get_args(annotations["image_aspect_ratio"]) == ("pad", "slice")
    assert typing.get_args(annotations["max_slices"]) == (9, 16, 25)
