"""TokenPackerForConditionalGeneration against an independent pipeline: full CLIP tower -> original projector
formula -> features spliced into a plain Llama."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, CLIPVisionModel, LlamaForCausalLM

from tokenpacker import TokenPackerForConditionalGeneration, TokenPackerModel
from tokenpacker.configuration.compat_tokenpacker import (
    HIDDEN_STATES_SELECTABLE,
    enable_activation_checkpointing,
    is_activation_checkpointing,
)

from .builders import IMAGE_TOKEN_ID, tiny_config
from tokenpacker.testing import OriginalTokenPacker, load_original_projector

TOKENS = 36  # 12x12 patch grid packed with scale factor 2


def build(**overrides):
    config = tiny_config(**overrides)
    model = TokenPackerForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [IMAGE_TOKEN_ID]  # a random model could otherwise emit `<image>`
    vision = config.vision_config
    original = OriginalTokenPacker(
        vision.hidden_size, 4, 32, 4, config.text_config.hidden_size, config.scale_factor, 12
    ).randomize()
    load_original_projector(model.model.multi_modal_projector, original)
    return model, original


def reference_logits(model, original, input_ids, pixel_values, attention_mask=None):
    config = model.config
    tower = CLIPVisionModel(config.vision_config).eval()  # all 6 layers, like the original
    missing = tower.load_state_dict(model.model.vision_tower.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("encoder.layers.5.") for key in missing)
    llm = LlamaForCausalLM(config.text_config).eval()
    llm.model.load_state_dict(model.model.language_model.state_dict())
    llm.lm_head.load_state_dict(model.lm_head.state_dict())
    with torch.no_grad():
        states = tower(pixel_values, output_hidden_states=True).hidden_states
        assert len(states) == 7
        x = states[-2][:, 1:]
        x_multi = torch.cat([states[i] for i in (2, 3, 4, 5)], dim=-1)[:, 1:]
        features = iter(original(x, x_multi))
        embeds = llm.model.embed_tokens(input_ids).clone()
        for row, ids in enumerate(input_ids):
            positions = (ids == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
            for start in positions[::TOKENS]:
                embeds[row, start : start + TOKENS] = next(features)
        assert next(features, None) is None
        return llm(inputs_embeds=embeds, attention_mask=attention_mask).logits


def prompt(*parts):
    ids = []
    for part in parts:
        ids += [IMAGE_TOKEN_ID] * TOKENS if part == "<image>" else list(part)
    return ids


def test_logits_equal_the_reference_pipeline():
    model, original = build()
    input_ids = torch.tensor([prompt([1, 5, 6], "<image>", [9, 10, 11]), prompt([1, 8], "<image>", [12, 13, 14, 15])])
    pixel_values = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values)
    assert out.image_features.shape == (2, TOKENS, 64)
    torch.testing.assert_close(out.logits, reference_logits(model, original, input_ids, pixel_values), atol=1e-4, rtol=0)


def test_the_tower_runs_only_the_layers_the_projector_reads():
    model, _ = build()
    assert model.config.vision_config.num_hidden_layers == 6
    assert len(model.model.vision_tower.encoder.layers) == 5


def test_the_tower_keeps_only_the_hidden_states_the_projector_reads():
    model, _ = build()
    outputs = []
    model.model.vision_tower.register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        model.model.get_image_features(torch.randn(2, 3, 336, 336))
    kept = [index for index, state in enumerate(outputs[0].hidden_states) if state is not None]
    if HIDDEN_STATES_SELECTABLE:
        assert kept == [2, 3, 4, 5]  # the multi-level layers; the query layer (-2 of 7 states) is 5
    else:  # the library keeps every state of the truncated tower (5 of 6 layers run)
        assert kept == [0, 1, 2, 3, 4, 5]


def test_several_crops_and_images_per_sample_and_samples_without_image():
    model, original = build()
    rows = [
        prompt([1, 5], "<image>", [6], "<image>", "<image>", [7, 8]),  # several crops (HD blocks) or images
        prompt([1, 9, 10, 11, 12, 13]),  # text only
        prompt([1, 3], "<image>", [4, 5]),
    ]
    length = max(len(r) for r in rows)
    rows = [r + [4] * (length - len(r)) for r in rows]
    input_ids = torch.tensor(rows)
    pixel_values = torch.randn(4, 3, 336, 336)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(logits, reference_logits(model, original, input_ids, pixel_values), atol=1e-4, rtol=0)


def test_inputs_embeds_give_the_same_logits_as_input_ids():
    model, _ = build()
    input_ids = torch.tensor([prompt([1, 5], "<image>", [6, 7])])
    pixel_values = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        from_ids = model(input_ids=input_ids, pixel_values=pixel_values).logits
        embeds = model.get_input_embeddings()(input_ids)
        from_embeds = model(inputs_embeds=embeds, pixel_values=pixel_values).logits
    torch.testing.assert_close(from_embeds, from_ids, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("crops", "tokens"), [(2, TOKENS), (1, TOKENS + 1), (1, TOKENS - 1)])
def test_mismatched_image_tokens_and_features_name_both_counts(crops, tokens):
    model, _ = build()
    input_ids = torch.tensor([[1, 5] + [IMAGE_TOKEN_ID] * tokens + [6]])
    with pytest.raises(ValueError, match=f"tokens: {tokens}, features: {crops * TOKENS}"):
        model(input_ids=input_ids, pixel_values=torch.randn(crops, 3, 336, 336))


def test_loss_ignores_image_positions_and_matches_cross_entropy():
    model, original = build()
    input_ids = torch.tensor([prompt([1, 5, 6], "<image>", [9, 10, 11, 12])])
    pixel_values = torch.randn(1, 3, 336, 336)
    labels = input_ids.clone()  # image positions are masked by the model itself
    with torch.no_grad():
        loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
    logits = reference_logits(model, original, input_ids, pixel_values)
    targets = input_ids[0, 1:].masked_fill(input_ids[0, 1:] == IMAGE_TOKEN_ID, -100)
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], targets, ignore_index=-100)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)


def test_greedy_generation_is_identical_with_and_without_cache():
    model, _ = build()
    input_ids = torch.tensor([prompt([1, 5, 6], "<image>", [9, 10])])
    pixel_values = torch.randn(1, 3, 336, 336)
    kwargs = dict(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False, eos_token_id=None)
    cached = model.generate(**kwargs, use_cache=True)
    uncached = model.generate(**kwargs, use_cache=False)
    assert cached.shape == (1, input_ids.shape[1] + 8)
    assert torch.equal(cached, uncached)


def test_batched_left_padded_generation_equals_one_by_one():
    model, _ = build()
    samples = [
        (prompt([1, 5, 6], "<image>", [9, 10]), 1),
        (prompt([1, 5], "<image>", [6], "<image>", [7, 8, 9]), 2),
        (prompt([1, 11, 12, 13]), 0),
    ]
    pixel_values = torch.randn(3, 3, 336, 336)
    length = max(len(ids) for ids, _ in samples)
    input_ids = torch.tensor([[0] * (length - len(ids)) + ids for ids, _ in samples])
    attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids, _ in samples])
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **kwargs)
    crops = pixel_values.split([n for _, n in samples])
    for row, ((ids, n), sample_crops) in enumerate(zip(samples, crops)):
        single = model.generate(
            input_ids=torch.tensor([ids]), pixel_values=sample_crops if n else None, **kwargs
        )
        assert batched[row, -6:].tolist() == single[0, -6:].tolist()


def test_sampling_several_sequences_repeats_each_samples_own_crops():
    model, _ = build()
    samples = [prompt([1, 5], "<image>", "<image>", [6]), prompt([1, 7], [8] * TOKENS, "<image>", [6])]
    pixel_values = torch.randn(3, 3, 336, 336)
    kwargs = dict(max_new_tokens=5, eos_token_id=None, pad_token_id=0)
    greedy = model.generate(input_ids=torch.tensor(samples), pixel_values=pixel_values, do_sample=False, **kwargs)
    sampled = model.generate(
        input_ids=torch.tensor(samples), pixel_values=pixel_values, do_sample=True, top_k=1, num_return_sequences=2, **kwargs
    )
    assert torch.equal(sampled, greedy.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(tmp_path, dtype):
    model, _ = build()
    model.save_pretrained(tmp_path)
    half = TokenPackerForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).eval()
    assert half.model.vision_tower.dtype == dtype and half.model.multi_modal_projector.output_proj.linear_2.weight.dtype == dtype
    input_ids = torch.tensor([prompt([1, 5, 6], "<image>", [9, 10])])
    pixel_values = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        full = model(input_ids=input_ids, pixel_values=pixel_values).logits
        low = half(input_ids=input_ids, pixel_values=pixel_values).logits
    assert low.dtype == dtype
    assert (low.float() - full).abs().max() < 0.05 * full.abs().max()


def test_device_map_auto_offloads_without_splitting_blocks_and_keeps_outputs(tmp_path):
    model, _ = build()
    model.save_pretrained(tmp_path)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded = AutoModelForImageTextToText.from_pretrained(
        tmp_path, device_map="auto", max_memory={"cpu": size // 2}, offload_folder=tmp_path / "offload"
    )
    assert isinstance(loaded, TokenPackerForConditionalGeneration)
    assert set(loaded.hf_device_map.values()) == {"cpu", "disk"}
    assert not any(name.startswith("model.multi_modal_projector.") for name in loaded.hf_device_map)
    input_ids = torch.tensor([prompt([1, 5], "<image>", [9])])
    pixel_values = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=input_ids, pixel_values=pixel_values).logits,
            model(input_ids=input_ids, pixel_values=pixel_values).logits,
        )
    kwargs = dict(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=4, do_sample=False)
    assert torch.equal(loaded.generate(**kwargs), model.generate(**kwargs))


def test_base_model_returns_hidden_states_and_image_features():
    model, _ = build()
    base = model.model
    assert isinstance(base, TokenPackerModel)
    input_ids = torch.tensor([prompt([1], "<image>", [9])])
    with torch.no_grad():
        out = base(input_ids=input_ids, pixel_values=torch.randn(1, 3, 336, 336))
    assert out.last_hidden_state.shape == (1, TOKENS + 2, 64)
    assert out.image_features.shape == (1, TOKENS, 64)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, _ = build()
    input_ids = torch.tensor([prompt([1, 5], "<image>", [9, 10, 11])])
    pixel_values = torch.randn(1, 3, 336, 336)

    def gradients():
        model.zero_grad()
        model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = gradients()
    enable_activation_checkpointing(model)
    assert model.model.language_model.gradient_checkpointing and is_activation_checkpointing(model.model.vision_tower)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    assert any(name.startswith("model.multi_modal_projector.") for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_resize_token_embeddings_keeps_existing_logits():
    model, _ = build()
    input_ids = torch.tensor([prompt([1, 5], "<image>", [9, 10])])
    pixel_values = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        before = model(input_ids=input_ids, pixel_values=pixel_values).logits
    model.resize_token_embeddings(136)
    assert model.config.text_config.vocab_size == 136
    assert model.get_input_embeddings().weight.shape[0] == 136 and model.lm_head.weight.shape[0] == 136
    with torch.no_grad():
        after = model(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(after[..., :128], before)


def test_tied_embeddings_share_one_tensor_and_survive_saving(tmp_path):
    model, _ = build(text=dict(tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = TokenPackerForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_untied_embeddings_are_separate():
    model, _ = build()
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_sdpa_and_eager_attention_agree(tmp_path):
    model, _ = build()
    model.save_pretrained(tmp_path)
    sdpa = TokenPackerForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    eager = TokenPackerForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert sdpa.model.language_model.config._attn_implementation == "sdpa"
    assert eager.model.language_model.config._attn_implementation == "eager"
    input_ids = torch.tensor([prompt([1, 5], "<image>", [9, 10])])
    pixel_values = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        torch.testing.assert_close(
            sdpa(input_ids=input_ids, pixel_values=pixel_values).logits,
            eager(input_ids=input_ids, pixel_values=pixel_values).logits,
            atol=1e-5,
            rtol=0,
        )


def test_beam_search_with_several_sequences_gives_each_sample_its_own_crops():
    model, _ = build()
    samples = [prompt([1, 5], "<image>", "<image>", [6]), prompt([1, 7], [8] * TOKENS, "<image>", [6])]
    pixel_values = torch.randn(3, 3, 336, 336)
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2, eos_token_id=None, pad_token_id=0)
    batched = model.generate(input_ids=torch.tensor(samples), pixel_values=pixel_values, **kwargs)
    for index, crops in enumerate(pixel_values.split([2, 1])):
        alone = model.generate(input_ids=torch.tensor([samples[index]]), pixel_values=crops, **kwargs)
        assert torch.equal(batched[2 * index : 2 * index + 2], alone)
