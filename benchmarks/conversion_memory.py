"""Peak memory of `tokenpacker-convert` on a multi-shard checkpoint of a few GB.

Writes a random original-layout TokenPacker checkpoint to a temporary folder: a LLaVA folder with 7B-wide Llama layers
(hidden 4096, MLP 11008, vocabulary 32000) in pytorch_model-0000k-of-0000n.bin shards of at most --shard-gb, and a
full-size CLIP ViT-L/14-336 vision tower in float32 (pytorch_model.bin, as the stock checkpoint ships). Then runs the
converter (with verification) in a child process and reports that process's peak resident memory next to the shard
sizes, and the peak of a child that only imports the package. Everything is deleted afterwards.

    python benchmarks/conversion_memory.py --size-gb 3 --shard-gb 1
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from sentencepiece import sentencepiece_model_pb2
from tokenpacker.processing import train_llama_sentencepiece
from tokenpacker.testing import original_llava_config

GB = 10**9
TEXT = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000)
VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
)


def llama_layer(index: int, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    prefix = f"model.layers.{index}."
    shapes = {prefix + f"self_attn.{name}_proj.weight": (hidden, hidden) for name in ("q", "k", "v", "o")}
    shapes.update({prefix + f"mlp.{name}_proj.weight": (intermediate, hidden) for name in ("gate", "up")})
    shapes[prefix + "mlp.down_proj.weight"] = (hidden, intermediate)
    shapes.update({prefix + f"{name}.weight": (hidden,) for name in ("input_layernorm", "post_attention_layernorm")})
    return shapes


def projector(vision: int, text: int, width: int = 1024, levels: int = 4) -> dict[str, tuple[int, ...]]:
    """The original projector's tensors (model.mm_projector.*)."""
    shapes = {"q_proj_1.weight": (width, vision), "clip_attn.in_proj_weight": (3 * width, width)}
    shapes.update({"clip_attn.in_proj_bias": (3 * width,), "clip_attn.out_proj.weight": (width, width)})
    shapes["clip_attn.out_proj.bias"] = (width,)
    for kind in ("k", "v"):
        shapes.update({f"{kind}_proj_1.0.weight": (width, vision * levels), f"{kind}_proj_1.0.bias": (width,)})
        shapes.update({f"{kind}_proj_1.2.weight": (width, width), f"{kind}_proj_1.2.bias": (width,)})
    for kind in ("q", "k", "v"):
        shapes.update({f"ln_{kind}_1.weight": (width,), f"ln_{kind}_1.bias": (width,)})
    shapes.update(
        {"mlp.0.weight": (text, width), "mlp.0.bias": (text,), "mlp.2.weight": (text, text), "mlp.2.bias": (text,)}
    )
    return {f"model.mm_projector.{name}": shape for name, shape in shapes.items()}


def clip_vision(config: dict) -> dict[str, tuple[int, ...]]:
    """CLIPVisionModel's tensors under the vision_model.* names of the stock checkpoint."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    positions = (config["image_size"] // config["patch_size"]) ** 2 + 1
    shapes = {
        "embeddings.class_embedding": (hidden,),
        "embeddings.patch_embedding.weight": (hidden, 3, config["patch_size"], config["patch_size"]),
        "embeddings.position_embedding.weight": (positions, hidden),
    }
    for norm in ("pre_layrnorm", "post_layernorm"):
        shapes.update({f"{norm}.weight": (hidden,), f"{norm}.bias": (hidden,)})
    for layer in range(config["num_hidden_layers"]):
        prefix = f"encoder.layers.{layer}."
        for name in ("q", "k", "v", "out"):
            shapes.update(
                {
                    prefix + f"self_attn.{name}_proj.weight": (hidden, hidden),
                    prefix + f"self_attn.{name}_proj.bias": (hidden,),
                }
            )
        shapes.update({prefix + "mlp.fc1.weight": (inner, hidden), prefix + "mlp.fc1.bias": (inner,)})
        shapes.update({prefix + "mlp.fc2.weight": (hidden, inner), prefix + "mlp.fc2.bias": (hidden,)})
        for norm in ("layer_norm1", "layer_norm2"):
            shapes.update({prefix + f"{norm}.weight": (hidden,), prefix + f"{norm}.bias": (hidden,)})
    return {f"vision_model.{name}": shape for name, shape in shapes.items()}


def nbytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    return sum(torch.Size(shape).numel() for shape in shapes.values()) * dtype.itemsize


def random_tensors(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, generator) -> dict[str, torch.Tensor]:
    return {name: (torch.randn(shape, generator=generator) * 0.02).to(dtype) for name, shape in shapes.items()}


def write_llava_checkpoint(folder: Path, size: int, shard_size: int, dtype: torch.dtype) -> list[int]:
    """Sharded like the original's trainer: tensors in model order, a new shard when the next would overflow."""
    text = dict(TEXT)
    fixed = {
        "model.embed_tokens.weight": (text["vocab_size"], text["hidden_size"]),
        "model.norm.weight": (text["hidden_size"],),
    }
    head = {"lm_head.weight": (text["vocab_size"], text["hidden_size"])}
    mm = projector(VISION["hidden_size"], text["hidden_size"])
    per_layer = nbytes(llama_layer(0, text["hidden_size"], text["intermediate_size"]), dtype)
    layers = max(1, round((size - nbytes({**fixed, **head, **mm}, dtype)) / per_layer))
    shapes = {"model.embed_tokens.weight": fixed["model.embed_tokens.weight"]}
    for index in range(layers):
        shapes.update(llama_layer(index, text["hidden_size"], text["intermediate_size"]))
    shapes.update({"model.norm.weight": fixed["model.norm.weight"], **mm, **head})

    groups, current, current_size = [], {}, 0
    for name, shape in shapes.items():
        tensor_size = nbytes({name: shape}, dtype)
        if current and current_size + tensor_size > shard_size:
            groups.append(current)
            current, current_size = {}, 0
        current[name], current_size = shape, current_size + tensor_size
    groups.append(current)

    generator = torch.Generator().manual_seed(0)
    weight_map, sizes = {}, []
    for number, group in enumerate(groups, start=1):
        file = folder / f"pytorch_model-{number:05d}-of-{len(groups):05d}.bin"
        torch.save(random_tensors(group, dtype, generator), file)
        weight_map.update((name, file.name) for name in group)
        sizes.append(file.stat().st_size)
    index = {"metadata": {"total_size": nbytes(shapes, dtype)}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))

    text.update(
        num_hidden_layers=layers,
        num_key_value_heads=text["num_attention_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = original_llava_config(text, VISION["hidden_size"], dtype=dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"})
    )
    write_tokenizer(folder / "tokenizer.model", text["vocab_size"])
    return sizes


def write_tokenizer(path: Path, vocab_size: int):
    """A LLaMA-style sentencepiece model, padded with filler pieces to `vocab_size`."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [letters[i % 26] + letters[(i * 7) % 26] + letters[(i * 11) % 26] for i in range(400)]
    sentences = [" ".join(words[(j * 13 + i) % 400] for i in range(12)) + "," for j in range(2000)]
    train_llama_sentencepiece(path, sentences, vocab_size=400)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    for index in range(vocab_size - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"▁filler{index}", -1e4 - index
    path.write_bytes(proto.SerializeToString())


def write_clip(folder: Path) -> int:
    config = {
        "model_type": "clip_vision_model",
        "architectures": ["CLIPVisionModel"],
        "hidden_act": "quick_gelu",
        **VISION,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(1)
    torch.save(random_tensors(clip_vision(VISION), torch.float32, generator), folder / "pytorch_model.bin")
    return (folder / "pytorch_model.bin").stat().st_size


# Runs a module's main() with the given arguments, then records the process's own high-water mark (VmHWM belongs to the
# process's memory map: unlike ru_maxrss it does not include the parent's memory at fork/exec).
MEASURED_RUN = """
import importlib, sys
report, module, arguments = sys.argv[1], sys.argv[2], sys.argv[3:]
code = importlib.import_module(module).main(arguments) if module else 0
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
open(report, "w").write(peak.split()[1])
sys.exit(code)
"""


def peak_rss_of(module: str, arguments: list[str], report: Path) -> tuple[int, float]:
    """Runs `module.main(arguments)` in a fresh Python process (module "" just starts the interpreter and imports
    tokenpacker.conversion); returns its peak resident set size in bytes and its wall time."""
    start = time.perf_counter()
    command = [sys.executable, "-c", "import tokenpacker.conversion\n" + MEASURED_RUN, str(report), module, *arguments]
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"{module or 'import'} {' '.join(arguments)} failed")
    return int(report.read_text()) * 1024, time.perf_counter() - start


def gb(size: int) -> str:
    return f"{size / GB:.2f} GB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=3.0, help="size of the LLaVA checkpoint's weights")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="largest input and output shard")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--workdir", help="where to create the temporary folder (default: the system's)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    root = Path(tempfile.mkdtemp(prefix="tokenpacker-conversion-memory-", dir=args.workdir))
    try:
        checkpoint, clip, output = root / "checkpoint", root / "clip", root / "converted"
        checkpoint.mkdir()
        clip.mkdir()
        start = time.perf_counter()
        shard_sizes = write_llava_checkpoint(checkpoint, int(args.size_gb * GB), int(args.shard_gb * GB), dtype)
        clip_size = write_clip(clip)
        print(f"Generated the checkpoint in {time.perf_counter() - start:.0f} s")

        baseline, _ = peak_rss_of("", [], root / "peak")
        convert = ["--checkpoint", str(checkpoint), "--vision-tower", str(clip), "--output", str(output)]
        peak, seconds = peak_rss_of(
            "tokenpacker.conversion.convert", convert + ["--max-shard-size", f"{args.shard_gb}GB"], root / "peak"
        )
        output_sizes = [file.stat().st_size for file in sorted(output.glob("*.safetensors"))]

        print()
        print(
            f"input:  LLaVA checkpoint {gb(sum(shard_sizes))} in {len(shard_sizes)} shards: "
            f"{', '.join(map(gb, shard_sizes))}"
        )
        print(f"        CLIP vision tower {gb(clip_size)} (float32, one file)")
        print(f"output: {gb(sum(output_sizes))} in {len(output_sizes)} shards: {', '.join(map(gb, output_sizes))}")
        print(f"largest input shard + largest output shard: {gb(max(shard_sizes + [clip_size]) + max(output_sizes))}")
        print(f"peak RSS of tokenpacker-convert (with verification): {gb(peak)} in {seconds:.0f} s")
        print(f"peak RSS of importing the package alone: {gb(baseline)}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
