"""The generation defaults every TokenPacker folder of this package gets (converter, builder and demo alike)."""

import json

import pytest
from transformers import GenerationConfig

from tokenpacker.building import generation_config_for

from .builders import IMAGE_TOKEN_ID, tiny_checkpoint_folder, tiny_config


def test_generation_defaults_keep_the_base_and_add_pad_and_suppressed_tokens():
    config = tiny_config(text=dict(bos_token_id=1, eos_token_id=2))
    original = {"transformers_version": "4.31.0", "_from_model_config": True, "temperature": 0.9, "max_length": 4096,
                "do_sample": True, "bos_token_id": None, "eos_token_id": 5, "pad_token_id": 0}
    generation = generation_config_for(config, 127, original)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 5, 127)
    assert generation.suppress_tokens == [IMAGE_TOKEN_ID, 127]
    assert (generation.temperature, generation.max_length, generation.do_sample) == (0.9, 4096, True)
    assert generation.transformers_version != "4.31.0"

    base = GenerationConfig(**{key: value for key, value in original.items() if not key.startswith("_")})
    from_object = generation_config_for(config, 127, base)
    assert from_object.to_diff_dict() == generation.to_diff_dict()
    bare = generation_config_for(config, 0)
    assert (bare.bos_token_id, bare.eos_token_id, bare.pad_token_id) == (1, 2, 0)
    assert bare.suppress_tokens == [IMAGE_TOKEN_ID, 0]


@pytest.mark.parametrize(
    ("pad_token_id", "base", "error", "message"),
    [
        (-1, None, ValueError, "pad_token_id must be a non-negative token id, got -1"),
        (None, None, ValueError, "pad_token_id must be a non-negative token id, got None"),
        (0, "greedy", TypeError, "base must be a GenerationConfig, a dict or None, got str"),
    ],
)
def test_generation_defaults_refuse_bad_arguments(pad_token_id, base, error, message):
    with pytest.raises(error, match=message):
        generation_config_for(tiny_config(), pad_token_id, base)


def test_the_demo_folder_gets_the_same_defaults(tmp_path):
    folder = tiny_checkpoint_folder(tmp_path)
    saved = json.loads((folder / "generation_config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    pad_token_id = config["text_config"]["pad_token_id"]
    assert tokenizer["pad_token"] == "<pad>" and saved["pad_token_id"] == pad_token_id
    assert saved["suppress_tokens"] == [config["image_token_id"], pad_token_id]
    assert (saved["bos_token_id"], saved["eos_token_id"]) == (1, 2)
