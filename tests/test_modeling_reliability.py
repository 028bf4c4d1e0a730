"""Bad inputs to the model get errors that name the argument, and `inputs_embeds` find the image positions only where
the `<image>` embedding row is the image's own."""

import re

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import CLIPConfig, CLIPModel, DynamicCache, PreTrainedTokenizerFast

from tokenpacker import TokenPackerForConditionalGeneration, from_vision_and_text
from tokenpacker.configuration.compat_tokenpacker import CACHE_NAME

from .builders import IMAGE_TOKEN_ID, tiny_config
from .test_training import VISION, tiny_llama

TOKENS = 36  # 12x12 patch grid packed with scale factor 2
PAD_TOKEN_ID = 0


def build():
    torch.manual_seed(0)
    return TokenPackerForConditionalGeneration(tiny_config()).eval()


def prompt(before, after):
    return [1, *before, *[IMAGE_TOKEN_ID] * TOKENS, *after]


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.fixture
def input_ids():
    return torch.tensor([prompt([5, 6], [9, 10])])


@pytest.fixture
def pixel_values():
    return torch.randn(1, 3, 336, 336)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_pixel_values_are_refused(model, input_ids, dtype):
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (1, 3, 336, 336)).to(dtype)
    expected = f"pixel_values must be floating point (normalized crops from the processor), got {dtype}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        model(input_ids=input_ids, pixel_values=raw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixel_values_are_refused(model, input_ids, pixel_values, bad):
    pixel_values[0, 1, 100, 200] = bad
    with pytest.raises(ValueError, match="pixel_values must be finite, got NaN or infinite values"):
        model(input_ids=input_ids, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="pixel_values must be finite"):
        model.get_image_features(pixel_values)


@pytest.mark.parametrize(
    "shape", [(3, 336, 336), (1, 1, 3, 336, 336), (0, 3, 336, 336), (1, 3, 224, 224), (1, 1, 336, 336)]
)
def test_pixel_values_of_the_wrong_shape_are_refused(model, input_ids, shape):
    message = f"pixel_values must have shape (crops, 3, 336, 336) with at least one crop, got {tuple(shape)}"
    with pytest.raises(ValueError, match=re.escape(message)):
        model(input_ids=input_ids, pixel_values=torch.randn(shape))


def test_image_tokens_without_pixel_values_are_refused(model, input_ids):
    message = f"input_ids hold {TOKENS} image tokens (id {IMAGE_TOKEN_ID}) but pixel_values is None"
    with pytest.raises(ValueError, match=re.escape(message)):
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match="pixel_values is None"):
        model.generate(input_ids=input_ids, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="pixel_values is None"):
        model(input_ids=input_ids, cache=DynamicCache(config=model.config.text_config))  # an empty cache: a prompt


def test_an_image_token_fed_back_after_the_cached_prompt_is_embedded_as_it_is(model, input_ids, pixel_values):
    # Without suppressing `<image>`, a model may generate it; the next step feeds it back without pixel_values.
    with torch.no_grad():
        prefill = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
        past = input_ids.shape[1]
        step = model(
            input_ids=torch.tensor([[IMAGE_TOKEN_ID]]),
            attention_mask=torch.ones(1, past + 1, dtype=torch.long),
            **{CACHE_NAME: getattr(prefill, CACHE_NAME)},
            use_cache=True,
        )
    assert step.logits.shape == (1, 1, 128) and torch.isfinite(step.logits).all()


def test_generation_with_a_cache_still_works_without_suppressing_the_image_token(input_ids, pixel_values):
    model = build()
    with torch.no_grad():  # make `<image>` the most likely next token at every step
        model.lm_head.weight[IMAGE_TOKEN_ID] = 10 * model.lm_head.weight.abs().max() * torch.sign(
            model.model.language_model.norm.weight
        )
    sequences = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=3, do_sample=False)
    assert sequences.shape == (1, input_ids.shape[1] + 3)


def test_an_attention_mask_of_another_shape_is_refused(model, input_ids, pixel_values):
    length = input_ids.shape[1]
    for mask in (torch.ones(1, length + 1), torch.ones(2, length), torch.ones(length), torch.ones(1, length, 1)):
        expected = f"attention_mask must have shape (1, {length}) (batch, past + new tokens) to match the input_ids"
        expected += f", got {tuple(mask.shape)}"
        with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
            model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask)


def test_during_decoding_the_mask_covers_the_past_and_the_new_tokens(model, input_ids, pixel_values):
    with torch.no_grad():
        cache = getattr(model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True), CACHE_NAME)
        past = input_ids.shape[1]
        expected = rf"attention_mask must have shape \(1, 1\) or \(1, {past + 1}\) .*got \(1, 5\)"
        with pytest.raises(ValueError, match=expected):
            model(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, 5), **{CACHE_NAME: cache})
        model(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, past + 1), **{CACHE_NAME: cache})


def test_one_dimensional_input_ids_are_refused(model):
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, sequence\), got \(5,\)"):
        model(input_ids=torch.tensor([1, 5, 6, 7, 8]))
    with pytest.raises(ValueError, match="input_ids must hold integer token ids, got torch.float32"):
        model(input_ids=torch.tensor([[1.0, 5.0]]))


@pytest.mark.parametrize(
    ("ids", "count", "worst"),
    [
        ([1, 500, 130, 6], 2, "the largest 500"),
        ([1, -1, 6], 1, "the smallest -1"),
        ([1, -3, 128, 6], 2, "the largest 128"),
    ],
)
def test_out_of_vocabulary_ids_name_the_worst_id_and_the_vocab_size(model, ids, count, worst):
    message = f"input_ids must be in [0, 128) (the vocab size is 128), got {count} id(s) outside it, {worst}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model(input_ids=torch.tensor([ids]))


def test_lists_instead_of_tensors_are_refused(model, input_ids, pixel_values):
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor, got list"):
        model(input_ids=input_ids.tolist(), pixel_values=pixel_values)
    with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor, got list"):
        model(input_ids=input_ids, pixel_values=pixel_values.tolist())
    with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor, got ndarray"):
        model.get_image_features(pixel_values.numpy())
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor, got list"):
        model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=[[1] * input_ids.shape[1]])
    with pytest.raises(TypeError, match="inputs_embeds must be a torch.Tensor, got list"):
        model(inputs_embeds=[[0.0] * 64], pixel_values=pixel_values)


def left_padded_batch():
    rows = [prompt([5, 6, 7, 8, 9], [9, 10, 11]), prompt([5], [12])]
    length = max(map(len, rows))
    input_ids = torch.tensor([[PAD_TOKEN_ID] * (length - len(r)) + r for r in rows])
    attention_mask = (input_ids != PAD_TOKEN_ID).long()
    return input_ids, attention_mask


def test_inputs_embeds_give_the_input_ids_logits_on_a_left_padded_batch():
    model = build()
    embeddings = model.get_input_embeddings().weight
    assert not torch.equal(embeddings[IMAGE_TOKEN_ID], embeddings[PAD_TOKEN_ID])
    input_ids, attention_mask = left_padded_batch()
    assert (attention_mask == 0).sum() == 6
    assert_inputs_embeds_give_the_input_ids_logits(model, input_ids, attention_mask, torch.randn(2, 3, 336, 336))


def assert_inputs_embeds_give_the_input_ids_logits(model, input_ids, attention_mask, pixel_values):
    """The logits from `inputs_embeds` (the ids' embeddings) equal those from `input_ids` at attended positions."""
    with torch.no_grad():
        from_ids = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits
        inputs_embeds = model.get_input_embeddings()(input_ids)
        from_embeds = model(
            inputs_embeds=inputs_embeds, pixel_values=pixel_values, attention_mask=attention_mask
        ).logits
    attended = attention_mask.bool()
    torch.testing.assert_close(from_embeds[attended], from_ids[attended], atol=1e-5, rtol=0)


def test_an_image_row_shared_with_the_pad_row_is_reported_with_inputs_embeds():
    model = build()
    with torch.no_grad():  # converted checkpoints used to have zero `<image>` and `<pad>` rows
        model.get_input_embeddings().weight[[IMAGE_TOKEN_ID, PAD_TOKEN_ID]] = 0
    input_ids, attention_mask = left_padded_batch()
    pixel_values = torch.randn(2, 3, 336, 336)
    inputs_embeds = model.get_input_embeddings()(input_ids)
    message = (
        rf"tokens: {2 * TOKENS + 6}, features: {2 * TOKENS} .*the `<image>` embedding row \({IMAGE_TOKEN_ID}\) also "
        rf"equals the row of token id\(s\) \[{PAD_TOKEN_ID}\].*pass input_ids instead of inputs_embeds"
    )
    with pytest.raises(ValueError, match=message):
        model(inputs_embeds=inputs_embeds, pixel_values=pixel_values, attention_mask=attention_mask)
    with torch.no_grad():  # input_ids are unambiguous
        outputs = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    assert torch.isfinite(outputs.logits).all()


def tokenizer_without_image_and_pad(pieces):
    vocab = {piece: index for index, piece in enumerate(pieces)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


@pytest.mark.parametrize("num_pieces", [6, 300])  # 6 rows of width 64: a singular covariance, no noise from resizing
def test_from_vision_and_text_gives_image_and_pad_rows_of_their_own(num_pieces):
    pieces = ["<unk>", "<s>", "</s>", ","] + [f"w{index}" for index in range(num_pieces - 4)]
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    clip = CLIPModel(CLIPConfig(vision_config=VISION, text_config=text))
    llm = tiny_llama(num_pieces)
    tokenizer = tokenizer_without_image_and_pad(pieces)
    model = from_vision_and_text(clip, llm, tokenizer=tokenizer, scale_factor=3)
    image_id, pad_id = tokenizer.convert_tokens_to_ids(["<image>", "<pad>"])
    assert (image_id, pad_id) == (num_pieces, num_pieces + 1)
    weight = model.get_input_embeddings().weight.detach()
    assert torch.equal(weight[:num_pieces], llm.model.embed_tokens.weight)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rows = weight.to(dtype)
        for token_id in (image_id, pad_id):
            assert (rows == rows[token_id]).all(-1).sum() == 1, (dtype, token_id)
    old = llm.model.embed_tokens.weight.detach()
    mean = old.mean(0)
    assert ((weight[num_pieces:] - mean).norm(dim=-1) < 0.5 * (old - mean).norm(dim=-1).mean()).all()
