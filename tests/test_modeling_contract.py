"""The multimodal contract of transformers' Llava family: tuple outputs with `return_dict=False`, `get_image_features`
returning a `BaseModelOutputWithPooling`, and `get_placeholder_mask`."""

import pytest
import torch
from transformers import CLIPVisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenpacker.configuration.compat_tokenpacker import HIDDEN_STATES_SELECTABLE

from .builders import IMAGE_TOKEN_ID
from .test_modeling import TOKENS, build, prompt


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return build()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.tensor([prompt([1, 5, 6], "<image>", [9, 10, 11]), prompt([1, 8], "<image>", [12, 13, 14, 15])])
    return input_ids, torch.randn(2, 3, 336, 336, generator=generator)


def reference_features(model, original, pixel_values):
    """The original projector on the full CLIP tower's hidden states (TOKENPACKER.md section 1)."""
    tower = CLIPVisionModel(model.config.vision_config).eval()
    tower.load_state_dict(model.model.vision_tower.state_dict(), strict=False)
    with torch.no_grad():
        states = tower(pixel_values, output_hidden_states=True).hidden_states
        return original(states[-2][:, 1:], torch.cat([states[i] for i in (2, 3, 4, 5)], dim=-1)[:, 1:])


def test_return_dict_false_gives_tuples_equal_to_the_outputs(built, inputs):
    model, _ = built
    input_ids, pixel_values = inputs
    with torch.no_grad():
        outputs = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids)
        as_tuple = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids, return_dict=False)
        loss, logits, *_ = as_tuple
        (logits_only, *_) = model(input_ids=input_ids, pixel_values=pixel_values, return_dict=False)
        base = model.model(input_ids=input_ids, pixel_values=pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(loss, outputs.loss, atol=0, rtol=0)
    torch.testing.assert_close(logits, outputs.logits, atol=0, rtol=0)
    torch.testing.assert_close(logits_only, outputs.logits, atol=0, rtol=0)
    assert isinstance(base, tuple) and base[0].shape == (2, input_ids.shape[1], 64)
    torch.testing.assert_close(model.lm_head(base[0]), outputs.logits, atol=0, rtol=0)
    torch.testing.assert_close(as_tuple[-1], outputs.image_features, atol=0, rtol=0)


def test_config_return_dict_false_gives_tuples_and_generation_still_works(inputs):
    model, _ = build()
    input_ids, pixel_values = inputs
    with torch.no_grad():
        expected = model(input_ids=input_ids, pixel_values=pixel_values).logits
        greedy = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=3, do_sample=False)
        model.config.return_dict = False
        outputs = model(input_ids=input_ids, pixel_values=pixel_values)
        base = model.model(input_ids=input_ids, pixel_values=pixel_values)
        features = model.get_image_features(pixel_values)
        assert isinstance(outputs, tuple) and isinstance(base, tuple) and isinstance(features, tuple)
        torch.testing.assert_close(outputs[0], expected, atol=0, rtol=0)
        assert model(input_ids=input_ids, pixel_values=pixel_values, return_dict=True).logits.shape == expected.shape
        again = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=3, do_sample=False)
    assert torch.equal(again, greedy)


def test_get_image_features_returns_the_projected_crops_as_pooler_output(built, inputs):
    model, original = built
    _, pixel_values = inputs
    with torch.no_grad():
        default = model.get_image_features(pixel_values)
        explicit = model.model.get_image_features(pixel_values, return_dict=True)
        last_hidden_state, pooled, hidden_states = model.get_image_features(pixel_values, return_dict=False)
    assert isinstance(default, BaseModelOutputWithPooling)
    assert default.pooler_output.shape == (2, TOKENS, 64)  # (crops, tokens per crop, text hidden)
    expected = reference_features(model, original, pixel_values)
    torch.testing.assert_close(default.pooler_output, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(explicit.pooler_output, default.pooler_output, atol=0, rtol=0)
    torch.testing.assert_close(pooled, default.pooler_output, atol=0, rtol=0)
    kept = [index for index, state in enumerate(hidden_states) if state is not None]
    assert kept == ([2, 3, 4, 5] if HIDDEN_STATES_SELECTABLE else [0, 1, 2, 3, 4, 5])  # see test_modeling
    torch.testing.assert_close(last_hidden_state, hidden_states[5], atol=0, rtol=0)


def test_forward_writes_the_pooler_output_at_the_image_tokens(built, inputs):
    model, _ = built
    input_ids, pixel_values = inputs
    with torch.no_grad():
        pooled = model.get_image_features(pixel_values).pooler_output
        outputs = model(input_ids=input_ids, pixel_values=pixel_values)
    torch.testing.assert_close(outputs.image_features, pooled, atol=0, rtol=0)


def test_get_placeholder_mask_marks_the_image_tokens_and_checks_the_counts(built, inputs):
    model, _ = built
    input_ids, pixel_values = inputs
    base = model.model
    with torch.no_grad():
        features = base.get_image_features(pixel_values).pooler_output
        inputs_embeds = base.get_input_embeddings()(input_ids)
        from_ids = base.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
        from_embeds = base.get_placeholder_mask(None, inputs_embeds=inputs_embeds, image_features=features)
    assert from_ids.shape == (2, input_ids.shape[1], 1) and from_ids.dtype == torch.bool
    assert torch.equal(from_ids[..., 0], input_ids == IMAGE_TOKEN_ID) and from_ids.sum() == 2 * TOKENS
    assert torch.equal(from_embeds, from_ids)
    message = f"Image features and image tokens do not match: tokens: {2 * TOKENS}, features: {TOKENS}"
    with pytest.raises(ValueError, match=message):
        base.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features[:1])
