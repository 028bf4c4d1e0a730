"""The compatibility module's detections hold for the installed transformers."""

import warnings

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaModel, modeling_utils

from tokenpacker.configuration import compat_tokenpacker as compat


def tiny_llama():
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaModel(config).eval()


def test_the_cache_name_is_the_language_models_argument_and_output():
    model = tiny_llama()
    with torch.no_grad():
        outputs = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert getattr(outputs, compat.CACHE_NAME) is not None
    with torch.no_grad():
        cached = model(input_ids=torch.tensor([[4]]), use_cache=True, **{compat.CACHE_NAME: getattr(outputs, compat.CACHE_NAME)})
    assert getattr(cached, compat.CACHE_NAME).get_seq_length() == 4


def test_accepts_past_key_values_hands_either_name_to_cache():
    @compat.accepts_past_key_values
    def forward(input_ids=None, cache=None, **kwargs):
        return cache, kwargs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert forward(input_ids=1, past_key_values="kv") == ("kv", {})
    assert forward(input_ids=1, cache="kv") == ("kv", {})


def test_hidden_state_selection_is_detected_as_the_tower_behaves():
    config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=28, patch_size=14
    )
    tower = CLIPVisionModel(config).eval()
    pixel_values = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        selected = tower(pixel_values, output_hidden_states=compat.selected_hidden_states([1, 3])).hidden_states
        every = tower(pixel_values, output_hidden_states=True).hidden_states
    kept = [index for index, state in enumerate(selected) if state is not None]
    assert kept == ([1, 3] if compat.HIDDEN_STATES_SELECTABLE else [0, 1, 2, 3, 4])
    for index in (1, 3):
        torch.testing.assert_close(selected[index], every[index])


def test_activation_checkpointing_is_turned_on_under_the_installed_name():
    model = tiny_llama()
    assert not compat.is_activation_checkpointing(model)
    compat.enable_activation_checkpointing(model)
    assert compat.is_activation_checkpointing(model) and model.gradient_checkpointing
    assert compat.ACTIVATION_CHECKPOINTING_NAMES == hasattr(model, "is_activation_checkpointing")


def test_slice_logits_to_keep_keeps_the_last_positions_or_the_given_ones():
    hidden_states = torch.arange(2 * 5 * 3).view(2, 5, 3)
    implementations = {compat.slice_logits_to_keep, compat._slice_logits_to_keep}
    library_function = getattr(modeling_utils, "slice_logits_to_keep", None)
    assert compat.slice_logits_to_keep is (library_function or compat._slice_logits_to_keep)
    for keep in implementations:
        assert torch.equal(keep(hidden_states, 0), hidden_states)
        assert torch.equal(keep(hidden_states, 2), hidden_states[:, 3:])
        assert torch.equal(keep(hidden_states, torch.tensor([0, 4])), hidden_states[:, [0, 4]])
