"""Converting original-layout checkpoints: the converted model against an independent pipeline built from the original
weights (stock CLIP -> original projector formula -> plain Llama), the folder's contents, and every way it can fail."""

import json
import runpy
import shlex
import shutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from huggingface_hub import HfApi, snapshot_download
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tokenpacker.conversion import convert as convert_module
from tokenpacker.conversion import convert_checkpoint
from tokenpacker.conversion.convert import main
from tokenpacker.conversion.publish import publish_folder
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from tokenpacker import TokenPackerForConditionalGeneration

from .hub_server import HubServer, hub_environment, point_huggingface_hub_at
from .original_checkpoints import GRID, TEXT, VOCAB, clip_config, write_original_release
from tokenpacker.testing import OriginalTokenPacker
from .remote_process import run_without_tokenpacker

IMAGE = -200  # where an image goes in a prompt, like the original's IMAGE_TOKEN_INDEX
IMAGE_TOKEN_ID, PAD_TOKEN_ID = VOCAB, VOCAB + 1
HUB_TOKEN = "hf_alice_write_token"


@pytest.fixture(scope="module")
def pad_release(tmp_path_factory):
    """A 'pad' (LLaVA-1.5) checkpoint in 3 pytorch_model-*.bin shards, scale factor 2, converted once."""
    root = tmp_path_factory.mktemp("pad")
    release = write_original_release(root, image_aspect_ratio="pad", scale_factor=2, weights="bin", shards=3)
    result = convert_checkpoint(
        release.checkpoint, root / "converted", vision_tower=release.vision_tower, max_shard_size="200KB"
    )
    return release, result


@pytest.fixture(scope="module")
def slice_release(tmp_path_factory):
    """A 'slice' (TokenPacker-HD, 16 patches) checkpoint in 2 safetensors shards, scale factor 3, converted once."""
    root = tmp_path_factory.mktemp("slice")
    release = write_original_release(
        root, image_aspect_ratio="slice", scale_factor=3, patch_num=16, weights="safetensors", shards=2, seed=5
    )
    result = convert_checkpoint(release.checkpoint, root / "converted", vision_tower=release.vision_tower)
    return release, result


def separator_ids(release):
    """The original's ids for ',' and '\\n': the slow tokenizer's convert_tokens_to_ids, i.e. sentencepiece's
    piece_to_id."""
    processor = spm.SentencePieceProcessor(model_file=str(release.checkpoint / "tokenizer.model"))
    return processor.piece_to_id(","), processor.piece_to_id("\n")


def reference_logits(release, prompt, pixel_values, grids, mode, tokens_per_crop):
    """The original pipeline, rebuilt from the original weights: CLIP hidden states -> original projector formula ->
    embeddings spliced into a plain Llama, images laid out as llava_arch.py does ('slice': ',' between the blocks of a
    row, '\\n' after each row, then the thumbnail and '\\n')."""
    clip = CLIPModel(clip_config()).eval()
    clip.load_state_dict({k: v for k, v in release.clip.items() if "position_ids" not in k})
    llm = LlamaForCausalLM(LlamaConfig(**TEXT, vocab_size=VOCAB)).eval()
    llm.load_state_dict({k: v.float() for k, v in release.language_model.items()})
    comma, newline = separator_ids(release)
    with torch.no_grad():
        states = clip.vision_model(pixel_values, output_hidden_states=True).hidden_states
        assert len(states) == 25
        x = states[-2][:, 1:]
        x_multi = torch.cat([states[i] for i in (12, 16, 22, 23)], dim=-1)[:, 1:]
        features = iter(release.projector.float()(x, x_multi))
        embed = llm.model.embed_tokens
        pieces, grids = [], iter(grids)
        for token in prompt:
            if token != IMAGE:
                pieces.append(embed(torch.tensor([token])))
                continue
            if mode == "pad":
                pieces.append(next(features))
                continue
            rows, columns = next(grids)
            for _ in range(rows):
                for column in range(columns):
                    pieces.append(next(features))
                    if column < columns - 1:
                        pieces.append(embed(torch.tensor([comma])))
                pieces.append(embed(torch.tensor([newline])))
            if rows * columns > 1:
                pieces += [next(features), embed(torch.tensor([newline]))]
        assert next(features, None) is None
        return llm(inputs_embeds=torch.cat(pieces)[None]).logits


def converted_input_ids(prompt, grids, mode, tokens_per_crop, comma, newline):
    """The same layout as ids: TOKENPACKER.md sections 2 and 3."""
    ids, grids = [], iter(grids)
    for token in prompt:
        if token != IMAGE:
            ids.append(token)
        elif mode == "pad":
            ids += [IMAGE_TOKEN_ID] * tokens_per_crop
        else:
            rows, columns = next(grids)
            for _ in range(rows):
                for column in range(columns):
                    ids += [IMAGE_TOKEN_ID] * tokens_per_crop + ([comma] if column < columns - 1 else [])
                ids.append(newline)
            if rows * columns > 1:
                ids += [IMAGE_TOKEN_ID] * tokens_per_crop + [newline]
    return torch.tensor([ids])


def new_vocabulary_rows(weight):
    """The rows <image> and <pad> get: the mean of the original rows plus N(0, 1) noise (a generator seeded with 0)
    times a tenth of each dimension's standard deviation."""
    noise = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0))
    return weight.float().mean(0) + noise * weight.float().std(0) * 0.1


def compare_with_reference(release, result, prompt, grids, mode, tokens_per_crop, crops):
    model = AutoModelForImageTextToText.from_pretrained(result.output).eval()
    assert isinstance(model, TokenPackerForConditionalGeneration)
    assert model.config.num_image_tokens == tokens_per_crop
    pixel_values = torch.randn(crops, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    input_ids = converted_input_ids(prompt, grids, mode, tokens_per_crop, *separator_ids(release))
    with torch.no_grad():
        outputs = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
    logits = outputs.logits
    expected = reference_logits(release, prompt, pixel_values, grids, mode, tokens_per_crop)
    assert logits.shape == (1, input_ids.shape[1], VOCAB + 2)
    torch.testing.assert_close(logits[..., :VOCAB], expected, atol=1e-4, rtol=0)
    # The new head rows (the rule of new_vocabulary_rows) score the final hidden states like any other row.
    new_head_rows = new_vocabulary_rows(release.language_model["lm_head.weight"])
    torch.testing.assert_close(logits[..., VOCAB:], outputs.hidden_states[-1] @ new_head_rows.T, atol=1e-5, rtol=0)


def test_pad_checkpoint_gives_the_original_pipelines_logits(pad_release):
    release, result = pad_release
    prompt = [1, 5, 6, IMAGE, 9, 10, 11, IMAGE, 12]
    compare_with_reference(release, result, prompt, grids=[], mode="pad", tokens_per_crop=36, crops=2)


def test_slice_checkpoint_gives_the_original_pipelines_logits_with_separators(slice_release):
    release, result = slice_release
    comma, newline = separator_ids(release)
    assert (result.config.slice_separator_token_id, result.config.row_separator_token_id) == (comma, newline)
    assert newline == 0 and comma not in (0, IMAGE_TOKEN_ID)  # '\n' is no piece of a byte-fallback model: unk
    prompt = [1, 5, IMAGE, 7, 8, IMAGE, 9]
    # A 2x3 grid (6 blocks and a thumbnail), then a single block (no thumbnail): 8 crops of 4x4 = 16 tokens.
    compare_with_reference(release, result, prompt, grids=[(2, 3), (1, 1)], mode="slice", tokens_per_crop=16, crops=8)


def test_converted_processor_to_logits_end_to_end_for_an_hd_image(slice_release):
    release, result = slice_release
    processor = AutoProcessor.from_pretrained(result.output)
    assert (processor.image_processor.image_aspect_ratio, processor.image_processor.max_slices) == ("slice", 16)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 700, 3), dtype=np.uint8))
    chunks = ["USER: ", "\nwhat colour is the square? ASSISTANT:"]
    inputs = processor(images=image, text="<image>".join(chunks))
    grids = processor.image_processor(image)["image_grids"].tolist()
    assert grids[0][0] * grids[0][1] > 1  # a wide image: several blocks and a thumbnail
    # The original's tokenizer_image_token: every chunk tokenized on its own, only the first keeps its BOS.
    original = spm.SentencePieceProcessor(model_file=str(release.checkpoint / "tokenizer.model"))
    prompt = [1] + original.encode(chunks[0]) + [IMAGE] + original.encode(chunks[1])
    assert (
        inputs["input_ids"].tolist()
        == converted_input_ids(prompt, grids, "slice", 16, *separator_ids(release)).tolist()
    )
    model = AutoModelForImageTextToText.from_pretrained(result.output).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = reference_logits(release, prompt, inputs["pixel_values"], grids, "slice", 16)
    torch.testing.assert_close(logits[..., :VOCAB], expected, atol=1e-4, rtol=0)


def test_the_converted_model_loads_with_remote_code_where_tokenpacker_is_absent(pad_release, tmp_path):
    _, result = pad_release
    input_ids = [[1, 5, 6] + [IMAGE_TOKEN_ID] * 36 + [9]]
    pixel_values = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    save_file({"pixel_values": pixel_values}, tmp_path / "pixels.safetensors")
    remote = run_without_tokenpacker(
        f"""
        import json, torch
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained({str(result.output)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({input_ids}), **load_file("pixels.safetensors")).logits
        print(json.dumps({{"module": type(model).__module__, "last": logits[0, -1].tolist()}}))
        """,
        tmp_path,
    )
    assert remote["module"].startswith("transformers_modules.")
    model = AutoModelForImageTextToText.from_pretrained(result.output).eval()
    with torch.no_grad():
        local = model(input_ids=torch.tensor(input_ids), pixel_values=pixel_values).logits[0, -1]
    torch.testing.assert_close(torch.tensor(remote["last"]), local, atol=1e-5, rtol=0)


def test_config_records_the_original_settings(pad_release, slice_release):
    for (release, result), (mode, scale, slices) in zip(
        (pad_release, slice_release), (("pad", 2, 9), ("slice", 3, 16))
    ):
        config = json.loads((result.output / "config.json").read_text())
        assert config["model_type"] == "tokenpacker"
        assert config["architectures"] == ["TokenPackerForConditionalGeneration"]  # vLLM picks its model by it
        assert (config["image_aspect_ratio"], config["scale_factor"], config["max_slices"]) == (mode, scale, slices)
        assert config["vision_feature_layer"] == -2 and config["multi_level_feature_layers"] == [12, 16, 22, 23]
        assert (config["projector_hidden_size"], config["projector_num_heads"]) == (48, 8)
        assert config["image_token_id"] == IMAGE_TOKEN_ID
        assert [config["slice_separator_token_id"], config["row_separator_token_id"]] == list(separator_ids(release))
        assert config["text_config"]["vocab_size"] == VOCAB + 2
        assert config["text_config"]["hidden_size"] == TEXT["hidden_size"]
        assert config["vision_config"]["num_hidden_layers"] == 24 and config["vision_config"]["patch_size"] == 28
        assert config["dtype"] == "float32"


def test_tokenizer_chat_template_and_generation_config(pad_release):
    release, result = pad_release
    tokenizer = AutoTokenizer.from_pretrained(result.output)
    original = spm.SentencePieceProcessor(model_file=str(release.checkpoint / "tokenizer.model"))
    for text in ("what colour is the square?", "\nUSER: how many shapes, left or right"):
        assert tokenizer(text).input_ids == [1] + original.encode(text)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [IMAGE_TOKEN_ID, PAD_TOKEN_ID]
    # The original's conv_vicuna_v1 (llava/conversation.py), with the image first in the user's turn.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert AutoProcessor.from_pretrained(result.output).apply_chat_template(messages, add_generation_prompt=True) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is this? ASSISTANT:"
    )
    generation = GenerationConfig.from_pretrained(result.output)
    assert generation.suppress_tokens == [IMAGE_TOKEN_ID, PAD_TOKEN_ID]
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, PAD_TOKEN_ID)


def test_generation_suppresses_the_new_tokens(pad_release):
    _, result = pad_release
    model = AutoModelForImageTextToText.from_pretrained(result.output).eval()
    input_ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN_ID] * 36 + [9]])
    output = model.generate(
        input_ids=input_ids,
        pixel_values=torch.randn(1, 3, 336, 336),
        max_new_tokens=3,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    for scores in output.scores:  # their raw logits are those of an average token, which could win
        assert torch.isneginf(scores[:, VOCAB:]).all() and torch.isfinite(scores[:, :VOCAB]).all()
    assert (output.sequences[0, input_ids.shape[1] :] < VOCAB).all()


def read_folder(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            tensors.update((name, handle.get_tensor(name)) for name in handle.keys())
    return tensors


def test_weights_are_the_sources_renamed_split_and_grown(pad_release):
    release, result = pad_release
    index = json.loads((result.output / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded at 200KB
    tensors = read_folder(result.output)
    assert set(index["weight_map"]) == set(tensors)
    projector = release.projector.state_dict()
    q, k, v = projector["clip_attn.in_proj_weight"].chunk(3)
    prefix = "model.multi_modal_projector."
    assert torch.equal(tensors[prefix + "attention.q_proj.weight"], q)
    assert torch.equal(tensors[prefix + "attention.k_proj.weight"], k)
    assert torch.equal(tensors[prefix + "attention.v_proj.weight"], v)
    assert torch.equal(tensors[prefix + "attention.v_proj.bias"], projector["clip_attn.in_proj_bias"].chunk(3)[2])
    assert torch.equal(tensors[prefix + "key_proj.linear_2.weight"], projector["k_proj_1.2.weight"])
    assert torch.equal(tensors[prefix + "output_proj.linear_1.bias"], projector["mlp.0.bias"])
    embeddings = tensors["model.language_model.embed_tokens.weight"]
    assert torch.equal(embeddings[:VOCAB], release.language_model["model.embed_tokens.weight"])
    expected_rows = new_vocabulary_rows(release.language_model["model.embed_tokens.weight"])
    torch.testing.assert_close(embeddings[VOCAB:], expected_rows, atol=1e-6, rtol=0)
    expected_rows = new_vocabulary_rows(release.language_model["lm_head.weight"])
    torch.testing.assert_close(tensors["lm_head.weight"][VOCAB:], expected_rows, atol=1e-6, rtol=0)
    layers = {name.split(".")[4] for name in tensors if name.startswith("model.vision_tower.encoder.layers.")}
    assert layers == {str(i) for i in range(23)}  # the 24th layer feeds no hidden state the projector reads
    assert torch.equal(
        tensors["model.vision_tower.encoder.layers.22.mlp.fc1.weight"],
        release.clip["vision_model.encoder.layers.22.mlp.fc1.weight"],
    )
    assert not any("text_model" in name or "projection" in name or "logit_scale" in name for name in tensors)


def test_half_precision_checkpoint_stays_half_and_the_tower_is_cast(tmp_path):
    release = write_original_release(
        tmp_path, dtype=torch.float16, weights="safetensors", shards=1, legacy_buffers=False
    )
    result = convert_checkpoint(release.checkpoint, tmp_path / "out", vision_tower=release.vision_tower)
    tensors = read_folder(result.output)
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float16}
    name = "model.vision_tower.encoder.layers.3.self_attn.k_proj.weight"
    assert torch.equal(tensors[name], release.clip["vision_model.encoder.layers.3.self_attn.k_proj.weight"].half())
    assert result.report.groups["vision tower"].source_dtypes == {torch.float32}
    assert 0 < result.report.groups["vision tower"].max_abs_difference < 1e-3  # rounding to float16
    assert result.report.groups["language model"].max_abs_difference == 0
    assert json.loads((result.output / "config.json").read_text())["dtype"] == "float16"
    bf16 = convert_checkpoint(
        release.checkpoint, tmp_path / "bf16", vision_tower=release.vision_tower, dtype="bfloat16"
    )
    assert {tensor.dtype for tensor in read_folder(bf16.output).values()} == {torch.bfloat16}


def test_clip_vision_model_checkpoints_of_either_naming_give_the_same_tower(tmp_path, pad_release):
    _, converted = pad_release
    release = write_original_release(tmp_path, clip_layout="vision_model", clip_weights="safetensors")
    assert not any(name.startswith("vision_model.") for name in release.clip)  # transformers 5 names
    result = convert_checkpoint(release.checkpoint, tmp_path / "out", vision_tower=release.vision_tower)
    ours, reference = read_folder(result.output), read_folder(converted.output)
    assert ours.keys() == reference.keys()
    for name in ours:
        if name.startswith("model.vision_tower."):
            assert torch.equal(ours[name], reference[name]), name


def test_model_card_metadata_and_command(pad_release):
    release, result = pad_release
    card = (result.output / "README.md").read_text()
    metadata = card.split("---\n")[1]
    for line in (
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "license: llama2",
        "- openai/clip-vit-large-patch14-336",
        "- arxiv:2407.02392",
    ):
        assert line in metadata.splitlines()
    assert "trust_remote_code=True" in card
    command = (
        f"tokenpacker-convert --checkpoint {release.checkpoint} --vision-tower {release.vision_tower} "
        f"--output {result.output} --max-shard-size 200KB"
    )
    assert command in card
    assert str(result.report) in card


def test_cli_prints_the_verification_report(tmp_path, pad_release, capsys):
    release, _ = pad_release
    output = tmp_path / "out"
    argv = [
        "--checkpoint",
        str(release.checkpoint),
        "--vision-tower",
        str(release.vision_tower),
        "--output",
        str(output),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "language model     21 tensors from float32  max |converted - source| = 0" in printed
    assert "vision tower      375 tensors from float32" in printed
    assert "dropped    16 source tensors: encoder layers 23 and later (from 0), whose outputs the projector" in printed
    assert "projector vs the original formula" in printed
    assert f"tokenpacker-convert {' '.join(argv)}" in (output / "README.md").read_text()
    assert main(argv) == 1
    assert "tokenpacker-convert: error: " in capsys.readouterr().err


def test_command_line_entry_points(monkeypatch, capsys):
    (script,) = entry_points(group="console_scripts", name="tokenpacker-convert")
    assert script.value == "tokenpacker.conversion.convert:main"
    monkeypatch.setattr(sys, "argv", ["python -m tokenpacker.conversion", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("tokenpacker.conversion", run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "--vision-tower" in printed and "--max-shard-size" in printed and "--no-verify" in printed


@pytest.mark.parametrize("scale_factor", [2, 3, 4])
def test_the_original_formula_packs_each_region_into_its_own_token(scale_factor):
    """Region-to-point attention (TOKENPACKER.md section 1, step 3): a key/value patch of image n at (row, column)
    reaches only token (row // s, column // s) of image n, for every patch."""
    original = OriginalTokenPacker(32, 4, 48, 8, 64, scale_factor, GRID).randomize(3).eval()
    x, x_multi = torch.randn(2, GRID * GRID, 32), torch.randn(2, GRID * GRID, 128)
    coarse = GRID // scale_factor
    with torch.no_grad():
        before = original(x, x_multi)
        for patch in range(GRID * GRID):
            changed = x_multi.clone()
            changed[1, patch] += 1.0
            moved = (original(x, changed) - before).abs().amax(dim=-1) > 1e-6  # (images, coarse*coarse)
            row, column = divmod(patch, GRID)
            expected = torch.zeros(2, coarse * coarse, dtype=torch.bool)
            expected[1, (row // scale_factor) * coarse + column // scale_factor] = True
            assert torch.equal(moved, expected), patch


def test_hub_vision_tower_and_push_to_hub(pad_release, tmp_path, monkeypatch, capsys):
    release, local = pad_release
    with HubServer(tokens={HUB_TOKEN: "alice"}, organizations={"openai": {"alice"}}) as hub:
        point_huggingface_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf_home")
        monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
        api = HfApi(endpoint=hub.endpoint, token=HUB_TOKEN)
        api.create_repo("openai/clip-tiny")
        api.upload_folder(folder_path=release.vision_tower, repo_id="openai/clip-tiny")  # pytorch_model.bin only
        output = tmp_path / "out"
        argv = ["--checkpoint", str(release.checkpoint), "--vision-tower", "openai/clip-tiny", "--output", str(output)]
        assert main([*argv, "--push-to-hub", "alice/TokenPacker-tiny"]) == 0
        assert "Published to alice/TokenPacker-tiny" in capsys.readouterr().out
        published = Path(snapshot_download("alice/TokenPacker-tiny", cache_dir=tmp_path / "download"))
    ours, reference = read_folder(output), read_folder(local.output)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[name], reference[name]) for name in ours)
    files = {path.name: path.read_bytes() for path in output.iterdir()}
    assert {path.name: path.read_bytes() for path in published.iterdir() if path.name != ".gitattributes"} == files
    card = files["README.md"].decode()
    assert '"alice/TokenPacker-tiny", trust_remote_code=True' in card
    assert f"tokenpacker-convert {shlex.join(argv)} --push-to-hub alice/TokenPacker-tiny" in card


# Failures: each gives a clear error and leaves the output's parent folder exactly as it was.


def snapshot(folder: Path):
    return sorted(
        (str(path.relative_to(folder)), path.stat().st_size if path.is_file() else -1) for path in folder.rglob("*")
    )


def copy_release(release, tmp_path):
    shutil.copytree(release.checkpoint, tmp_path / "checkpoint")
    return tmp_path / "checkpoint"


def edit_config(checkpoint, **changes):
    config = json.loads((checkpoint / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (checkpoint / "config.json").write_text(json.dumps(config))


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BROKEN = {
    "truncated bin shard": (
        lambda c: truncate(c / "pytorch_model-00002-of-00003.bin"),
        ValueError,
        r"(?s)Cannot read the checkpoint shard .*pytorch_model-00002-of-00003\.bin.*truncated",
    ),
    "missing shard": (
        lambda c: (c / "pytorch_model-00003-of-00003.bin").unlink(),
        FileNotFoundError,
        r"index .*pytorch_model\.bin\.index\.json lists shards that are missing from .*: "
        r"\['pytorch_model-00003-of-00003\.bin'\]",
    ),
    "undeclared shard": (
        lambda c: (c / "pytorch_model-00004-of-00004.bin").write_bytes((c / "pytorch_model.bin.index.json").read_bytes()),
        ValueError,
        r"holds torch files that pytorch_model\.bin\.index\.json does not list: \['pytorch_model-00004-of-00004\.bin'\]",
    ),
    "mlp projector": (
        lambda c: edit_config(c, mm_projector_type="mlp2x_gelu"),
        ValueError,
        r"is not a TokenPacker LLaVA checkpoint: it has mm_projector_type 'mlp2x_gelu', expected 'tokenpacker'",
    ),
    "no projector type": (
        lambda c: edit_config(c, mm_projector_type=None),
        ValueError,
        r"is not a TokenPacker LLaVA checkpoint: it has no mm_projector_type, expected 'tokenpacker'",
    ),
    "no tokenizer.model": (lambda c: (c / "tokenizer.model").unlink(), FileNotFoundError, r"No tokenizer\.model in "),
    "scale factor not dividing the grid": (
        lambda c: edit_config(c, scale_factor=5),
        ValueError,
        r"scale_factor 5 does not divide the vision tower's 12x12 patch grid",
    ),
    "scale factor not an integer": (
        lambda c: edit_config(c, scale_factor="2"),
        ValueError,
        r"scale_factor must be a positive integer \(2, 3 or 4 in the release\), got '2'",
    ),
    "wrong vision tower width": (
        lambda c: edit_config(c, mm_hidden_size=1024),
        ValueError,
        r"has mm_hidden_size 1024 but the vision tower's hidden size is 32: wrong vision tower\?",
    ),
    "anyres layout": (
        lambda c: edit_config(c, image_aspect_ratio="anyres"),
        ValueError,
        r"image_aspect_ratio must be 'pad' or 'slice', got 'anyres'",
    ),
    "vocabulary of another tokenizer": (
        lambda c: edit_config(c, vocab_size=32000),
        ValueError,
        r"tokenizer\.model has 400 pieces, config\.json a vocab_size of 32000 and model\.embed_tokens\.weight 400 rows",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoints_fail_clearly_and_leave_nothing(case, tmp_path, pad_release):
    release, _ = pad_release
    checkpoint = copy_release(release, tmp_path / "source")
    breakage, error, message = BROKEN[case]
    breakage(checkpoint)
    before = snapshot(tmp_path)
    with pytest.raises(error, match=message):
        convert_checkpoint(checkpoint, tmp_path / "new" / "out", vision_tower=release.vision_tower)
    assert snapshot(tmp_path) == before


def rewrite_shard(checkpoint, shard, change):
    state = torch.load(checkpoint / shard, weights_only=True)
    change(state)
    torch.save(state, checkpoint / shard)
    index = json.loads((checkpoint / "pytorch_model.bin.index.json").read_text())
    index["weight_map"] = {name: file for name, file in index["weight_map"].items() if file != shard}
    index["weight_map"].update((name, shard) for name in state)
    (checkpoint / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def shard_of(checkpoint, name):
    return json.loads((checkpoint / "pytorch_model.bin.index.json").read_text())["weight_map"][name]


def test_missing_and_unexpected_tensors_are_listed(tmp_path, pad_release):
    release, _ = pad_release
    checkpoint = copy_release(release, tmp_path)
    removed = "model.layers.1.mlp.up_proj.weight"
    rewrite_shard(checkpoint, shard_of(checkpoint, removed), lambda state: state.pop(removed))
    extra = "model.mm_projector.extra_query"
    rewrite_shard(
        checkpoint, shard_of(checkpoint, "lm_head.weight"), lambda state: state.update({extra: torch.zeros(3)})
    )
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as caught:
        convert_checkpoint(checkpoint, tmp_path / "out", vision_tower=release.vision_tower)
    message = str(caught.value)
    assert "Missing (no source tensor): ['model.language_model.layers.1.mlp.up_proj.weight']" in message
    assert "Unexpected: ['model.mm_projector.extra_query (checkpoint: no rule)']" in message
    assert snapshot(tmp_path) == before


def test_an_index_that_disagrees_with_its_shards_is_refused(tmp_path, pad_release):
    release, _ = pad_release
    checkpoint = copy_release(release, tmp_path)
    index = json.loads((checkpoint / "pytorch_model.bin.index.json").read_text())
    assert index["weight_map"]["lm_head.weight"] == "pytorch_model-00003-of-00003.bin"
    index["weight_map"]["lm_head.weight"] = "pytorch_model-00001-of-00003.bin"
    (checkpoint / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    expected = r"index does not match its shards: tensors not in the shard the index names: \['lm_head\.weight'\]"
    with pytest.raises(ValueError, match=expected):
        convert_checkpoint(checkpoint, tmp_path / "out", vision_tower=release.vision_tower)


def test_an_existing_output_is_kept_without_force_and_replaced_with_it(tmp_path, pad_release):
    release, _ = pad_release
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"out already exists; pass --force \(force=True\) to replace it"):
        convert_checkpoint(release.checkpoint, output, vision_tower=release.vision_tower)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    convert_checkpoint(release.checkpoint, output, vision_tower=release.vision_tower, force=True)
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_verification_failure_leaves_the_existing_output_and_nothing_else(tmp_path, pad_release, monkeypatch):
    release, _ = pad_release
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    add = convert_module.ShardWriter.add

    def corrupting_add(self, name, tensor):
        if name == "model.multi_modal_projector.attention.k_proj.bias":
            tensor = tensor + 1e-3
        add(self, name, tensor)

    monkeypatch.setattr(convert_module.ShardWriter, "add", corrupting_add)
    with pytest.raises(
        ValueError, match=r"Verification failed: \['model\.multi_modal_projector\.attention\.q_proj\.bias', "
    ):
        convert_checkpoint(release.checkpoint, output, vision_tower=release.vision_tower, force=True)
    assert snapshot(tmp_path) == before


def test_a_converted_fixture_published_to_the_hub_answers_the_same_without_tokenpacker(pad_release, tmp_path, monkeypatch):
    release, local = pad_release
    image = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
    image.save(tmp_path / "image.png")
    prompt = "USER: <image>\nWhat is in the image? ASSISTANT:"
    processor = AutoProcessor.from_pretrained(local.output)
    model = AutoModelForImageTextToText.from_pretrained(local.output).eval()
    expected = model.generate(**processor(images=[image], text=prompt), max_new_tokens=6, do_sample=False)
    with HubServer(tokens={HUB_TOKEN: "alice"}) as hub:
        point_huggingface_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf_home")
        publish_folder(local.output, "alice/TokenPacker-tiny", token=HUB_TOKEN, endpoint=hub.endpoint)
        published = Path(snapshot_download("alice/TokenPacker-tiny", cache_dir=tmp_path / "download"))
        remote = run_without_tokenpacker(
            f"""
            import json
            from PIL import Image
            from transformers import AutoModelForImageTextToText, AutoProcessor
            processor = AutoProcessor.from_pretrained("alice/TokenPacker-tiny", trust_remote_code=True)
            model = AutoModelForImageTextToText.from_pretrained("alice/TokenPacker-tiny", trust_remote_code=True)
            inputs = processor(images=[Image.open("image.png").convert("RGB")], text={prompt!r})
            ids = model.eval().generate(**inputs, max_new_tokens=6, do_sample=False)
            print(json.dumps({{"model": type(model).__module__, "ids": ids.tolist()}}))
            """,
            tmp_path,
            **hub_environment(hub.endpoint, tmp_path / "fresh_home", HUB_TOKEN),
        )
    files = {path.name: path.read_bytes() for path in local.output.iterdir()}
    assert {path.name: path.read_bytes() for path in published.iterdir() if path.name != ".gitattributes"} == files
    assert remote["model"].startswith("transformers_modules.")
    assert remote["ids"] == expected.tolist()
