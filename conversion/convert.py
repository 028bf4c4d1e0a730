"""Original TokenPacker checkpoint (LLaVA folder + stock CLIP) -> verified safetensors folder for this package.

The weights stream one input shard at a time into output shards of `max_shard_size`; the folder is built beside the
target and moved into place only once complete and verified, so a failure leaves nothing behind.
"""

import argparse
import logging
import shlex
import signal
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from ..building import generation_config_for
from ..configuration import TokenPackerConfig
from ..modeling import TokenPackerForConditionalGeneration
from ..processing import TokenPackerProcessor
from ..remote_code import export_remote_code
from .checkpoint_files import CheckpointFiles, ShardContents, TensorInfo
from .hub_client import DEFAULT_TIMEOUT_S, check_timeout
from .model_card import model_card
from .original_checkpoint import (
    DEFAULT_VISION_TOWER,
    ORIGINAL_PROJECTOR,
    LlavaCheckpoint,
    SeparatorIds,
    load_sentencepiece,
    read_vision_config,
    tokenpacker_config,
    vision_tower_folder,
)
from .publish import PublishError, PublishResult, publish_folder
from .shards import ShardReader, ShardWriter, parse_size
from .sizes import ORIGINAL_TEXT, ORIGINAL_VISION, check_sizes_match_weights, model_parameters
from ..staging import OutputFolder, check_output_is_safe
from ..processing.tokenization_tokenpacker import IMAGE_TOKEN, fast_tokenizer_from_sentencepiece
from .verify import VerificationReport, compare_projector, max_abs_difference
from .weight_map import CLIP, LLAVA, Mapped, WeightMap, appended_rows

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROJECTOR_TOLERANCE = 1e-4  # relative to the largest output of the original formula, in float32
TARGET_PROJECTOR = "model.multi_modal_projector."
GROUPS = (
    ("model.language_model.", "language model"),
    ("lm_head.", "language model"),
    (TARGET_PROJECTOR, "projector"),
    ("model.vision_tower.", "vision tower"),
)


@dataclass(frozen=True)
class PlannedTensor:
    """One source tensor, where it is and where it goes."""

    files: CheckpointFiles
    info: TensorInfo
    mapped: Mapped


@dataclass(frozen=True)
class ConversionResult:
    output: Path
    config: TokenPackerConfig
    report: VerificationReport | None
    published: PublishResult | None = None


def group_of(target: str) -> str:
    return next(group for prefix, group in GROUPS if target.startswith(prefix))


def plan_conversion(
    sources: list[tuple[str, CheckpointFiles, dict[str, TensorInfo]]],
    weight_map: WeightMap,
    expected: dict[str, torch.Size],
    added_rows: int,
) -> list[PlannedTensor]:
    """Maps every source tensor; raises with the missing, unexpected, doubly filled and misshapen names."""
    plan, produced, unexpected, misshapen = [], {}, [], []
    for source, files, tensors in sources:
        for name, info in tensors.items():
            mapped = weight_map.resolve(source, name)
            if mapped is None:
                unexpected.append(f"{name} ({source}: no rule)")
                continue
            plan.append(PlannedTensor(files, info, mapped))
            rows = info.shape[0] if info.shape else 0
            for target in mapped.targets:
                if target not in expected:
                    unexpected.append(f"{name} ({source}: {target} is not a parameter of the model)")
                    continue
                produced.setdefault(target, []).append(name)
                shape = (rows // len(mapped.targets) + (added_rows if mapped.rule.grows_with_vocabulary else 0),)
                shape += tuple(info.shape[1:])
                if rows % len(mapped.targets) or shape != tuple(expected[target]):
                    misshapen.append(f"{target}: {tuple(expected[target])} expected, {name} gives {shape}")
    missing = sorted(set(expected) - set(produced))
    doubled = sorted(f"{target} <- {names}" for target, names in produced.items() if len(names) > 1)
    if missing or unexpected or doubled or misshapen:
        raise ValueError(
            "The checkpoint and vision tower do not map onto TokenPackerForConditionalGeneration.\n"
            f"Missing (no source tensor): {missing}\nUnexpected: {sorted(unexpected)}\n"
            f"Filled twice: {doubled}\nWrong shape: {misshapen}"
        )
    return plan


def dropped_counts(plan: list[PlannedTensor]) -> dict[str, int]:
    """How many source tensors each drop rule removed, by its reason."""
    return dict(Counter(step.mapped.rule.note for step in plan if step.mapped.rule.dropped))


def by_shard(plan: list[PlannedTensor]) -> list[tuple[CheckpointFiles, Path, list[PlannedTensor]]]:
    """The plan cut into runs of tensors from the same shard, in reading order."""
    runs = []
    for step in plan:
        if runs and runs[-1][1] == step.info.shard:
            runs[-1][2].append(step)
        else:
            runs.append((step.files, step.info.shard, [step]))
    return runs


def converted_tensors(step: PlannedTensor, tensor: torch.Tensor, dtype: torch.dtype, added_rows: int):
    """The target tensors of one source tensor, each an owned contiguous copy (the source may be memory-mapped)."""
    targets = step.mapped.targets
    if step.mapped.rule.grows_with_vocabulary:
        return [(targets[0], torch.cat([tensor.to(dtype), appended_rows(tensor, added_rows).to(dtype)]))]
    tensor = tensor.to(dtype=dtype, copy=True)
    if len(targets) > 1:
        return [(target, part.clone()) for target, part in zip(targets, tensor.chunk(len(targets)))]
    return [(targets[0], tensor)]


def non_finite_problem(name: str, source: torch.Tensor, converted: list[torch.Tensor], dtype: torch.dtype) -> str:
    """Why a tensor is not finite after conversion ("" when it is): NaN/inf in the source, or values too large for
    `dtype`."""
    if not source.is_floating_point() or all(torch.isfinite(tensor).all() for tensor in converted):
        return ""
    if not torch.isfinite(source).all():
        return f"{name} (NaN or inf in the source)"
    largest = source.abs().max().item()
    return f"{name} (values up to {largest:.3g} overflow {str(dtype).removeprefix('torch.')})"


def write_weights(
    plan: list[PlannedTensor],
    folder: Path,
    dtype: torch.dtype,
    added_rows: int,
    max_shard_size: int,
    allow_non_finite: bool = False,
) -> tuple[dict[str, str], list[str]]:
    """Converts the planned tensors shard by shard; returns the weight map (tensor name -> file name) and the source
    tensors that are not finite after conversion, which are refused unless `allow_non_finite`."""
    writer = ShardWriter(folder, max_shard_size)
    non_finite = []
    for files, shard, steps in by_shard(plan):
        logger.info("Converting %s", shard)
        with files.open(shard) as contents:
            for step in steps:
                if step.mapped.rule.dropped:
                    continue
                source = contents.get(step.mapped.name)
                converted = converted_tensors(step, source, dtype, added_rows)
                problem = non_finite_problem(step.mapped.name, source, [tensor for _, tensor in converted], dtype)
                if problem:
                    non_finite.append(problem)
                for target, tensor in converted:
                    writer.add(target, tensor)
    if non_finite and not allow_non_finite:
        raise ValueError(
            f"{len(non_finite)} tensor(s) would not be finite in the converted checkpoint: {non_finite}; pass "
            "--allow-non-finite (allow_non_finite=True) to convert them as they are"
        )
    return writer.finish(), non_finite


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality, NaN equal to NaN (`torch.equal` says NaN != NaN)."""
    if torch.equal(a, b):
        return True
    return a.shape == b.shape and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


def verify_tensor(
    step: PlannedTensor, contents: ShardContents, reader: ShardReader, dtype: torch.dtype, report: VerificationReport
):
    """Checks the targets of one source tensor (exact equality with the source cast to `dtype`, new rows exactly
    `appended_rows`) and records the difference to the uncast source. Holds no tensor after returning: they map whole
    files."""
    source, targets = contents.get(step.mapped.name), step.mapped.targets
    written = [reader.get(target) for target in targets]
    whole = torch.cat(written) if len(written) > 1 else written[0]
    grows = step.mapped.rule.grows_with_vocabulary
    kept = whole[: source.shape[0]] if grows else whole
    added = whole[source.shape[0] :] if grows else whole[:0]
    expected_added = appended_rows(source, added.shape[0]).to(dtype) if grows else added
    if not (same_values(kept, source.to(dtype)) and same_values(added, expected_added)):
        raise ValueError(
            f"Verification failed: {list(targets)} in {reader.folder} differ from {step.mapped.name} cast to {dtype}"
        )
    report.record(group_of(targets[0]), source.dtype, max_abs_difference(kept, source))


def verify_weights(
    plan: list[PlannedTensor],
    folder: Path,
    weight_map: dict[str, str],
    config: TokenPackerConfig,
    dtype: torch.dtype,
    new_tokens: tuple[str, ...],
    non_finite: Sequence[str] = (),
) -> VerificationReport:
    """Reads the written folder back against the sources, then compares its projector with the original formula
    (skipped when the projector holds allowed non-finite weights, which make any output NaN)."""
    report = VerificationReport(
        dtype=dtype, new_rows=new_tokens, dropped=dropped_counts(plan), non_finite=tuple(non_finite)
    )
    reader = ShardReader(folder, weight_map)
    original_projector, converted_projector = {}, {}
    for files, shard, steps in by_shard(plan):
        logger.info("Verifying %s", shard)
        with files.open(shard) as contents:
            for step in steps:
                if not step.mapped.targets:
                    continue
                verify_tensor(step, contents, reader, dtype, report)
                if step.mapped.name.startswith(ORIGINAL_PROJECTOR):
                    source = contents.get(step.mapped.name).to(dtype=dtype, copy=True)
                    original_projector[step.mapped.name.removeprefix(ORIGINAL_PROJECTOR)] = source
                    converted_projector.update(
                        (target.removeprefix(TARGET_PROJECTOR), reader.get(target).clone())
                        for target in step.mapped.targets
                    )
    reader.close()
    if any(problem.startswith(ORIGINAL_PROJECTOR) for problem in non_finite):
        return report
    difference, scale = compare_projector(config, converted_projector, original_projector)
    report.projector_difference, report.projector_scale = difference, scale
    if not difference <= PROJECTOR_TOLERANCE * max(scale, 1.0):
        raise ValueError(
            f"Verification failed: the converted projector differs from the original formula by {difference:.3g} "
            f"(outputs up to {scale:.3g}; tolerance {PROJECTOR_TOLERANCE:g} relative)"
        )
    return report




def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)} (or None for the checkpoint's own), got {dtype!r}")
    return DTYPES[dtype]


def default_command(
    checkpoint, output, vision_tower, dtype, max_shard_size, force, verify, push_to_hub, allow_non_finite
) -> str:
    arguments = ["tokenpacker-convert", "--checkpoint", str(checkpoint), "--vision-tower", str(vision_tower)]
    arguments += ["--output", str(output)]
    if dtype is not None:
        arguments += ["--dtype", str(dtype).removeprefix("torch.")]
    arguments += ["--max-shard-size", str(max_shard_size)] + ["--force"] * force + ["--no-verify"] * (not verify)
    arguments += ["--push-to-hub", push_to_hub] if push_to_hub else []
    arguments += ["--allow-non-finite"] * allow_non_finite
    return shlex.join(arguments)


def vision_model_id(vision_tower: str | Path, checkpoint: LlavaCheckpoint) -> str | None:
    """The vision tower's Hub id, for the model card: the argument, or the checkpoint's mm_vision_tower."""
    for candidate in (str(vision_tower), str(checkpoint.config.get("mm_vision_tower", ""))):
        parts = candidate.split("/")
        if len(parts) == 2 and all(parts) and not candidate.startswith(".") and not Path(candidate).exists():
            return candidate
    return None


@dataclass(frozen=True)
class PreparedConversion:
    """Everything read, checked and planned before anything is written."""

    original: LlavaCheckpoint
    config: TokenPackerConfig
    tokenizer: PreTrainedTokenizerFast
    plan: list[PlannedTensor]
    dtype: torch.dtype
    new_tokens: tuple[str, ...]  # appended to the original vocabulary: <image>, <pad>


def original_tokenizer(original: LlavaCheckpoint, embedding_rows: int | None) -> PreTrainedTokenizerFast:
    """The fast tokenizer of the checkpoint's tokenizer.model, which must hold one piece per embedding row."""
    pieces = load_sentencepiece(original.tokenizer_model).get_piece_size()
    if not pieces == original.config["vocab_size"] == embedding_rows:
        raise ValueError(
            f"tokenizer.model has {pieces} pieces, config.json a vocab_size of {original.config['vocab_size']} and "
            f"model.embed_tokens.weight {embedding_rows} rows: they must be equal"
        )
    max_length = original.tokenizer_config.get("model_max_length", 2048)
    return fast_tokenizer_from_sentencepiece(
        original.tokenizer_model, model_max_length=max_length if isinstance(max_length, int) else 2048
    )


def shapes_of(tensors: dict[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    return {name: info.shape for name, info in tensors.items()}


def prepare_conversion(
    checkpoint: str | Path, vision_tower: str | Path, dtype: torch.dtype | None, output: Path, timeout: float
) -> PreparedConversion:
    """Reads both sources' configs and tables of contents, builds the config and the tokenizer, maps every tensor."""
    original = LlavaCheckpoint(checkpoint)
    vision_folder = vision_tower_folder(vision_tower, timeout)
    check_output_is_safe(output, {"the checkpoint folder": original.folder, "the vision tower folder": vision_folder})
    vision_config = read_vision_config(vision_folder)
    vision_files = CheckpointFiles(vision_folder, "vision tower")
    llava_tensors, vision_tensors = original.files.inventory(), vision_files.inventory()
    check_sizes_match_weights(
        original.folder / "config.json", "", original.config, shapes_of(llava_tensors), ORIGINAL_TEXT
    )
    check_sizes_match_weights(
        vision_folder / "config.json", "", vision_config, shapes_of(vision_tensors), ORIGINAL_VISION
    )
    embeddings = llava_tensors.get("model.embed_tokens.weight")
    tokenizer = original_tokenizer(original, embeddings.shape[0] if embeddings else None)
    config = tokenpacker_config(
        original,
        llava_tensors,
        vision_config,
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        separators=SeparatorIds.from_sentencepiece(original.tokenizer_model),
    )
    config.dtype = dtype or embeddings.dtype  # by default the checkpoint's own precision
    new_tokens = tuple(tokenizer.convert_ids_to_tokens(list(range(embeddings.shape[0], len(tokenizer)))))
    plan = plan_conversion(
        [(LLAVA, original.files, llava_tensors), (CLIP, vision_files, vision_tensors)],
        WeightMap(config.num_vision_layers_used),
        model_parameters(config).shapes,
        len(new_tokens),
    )
    for reason, count in dropped_counts(plan).items():
        logger.info("Dropping %d tensor(s): %s", count, reason)
    return PreparedConversion(original, config, tokenizer, plan, config.dtype, new_tokens)


def convert_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    vision_tower: str | Path = DEFAULT_VISION_TOWER,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    verify: bool = True,
    license: str = "llama2",
    command: str | None = None,
    push_to_hub: str | None = None,
    allow_non_finite: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> ConversionResult:
    """Converts an original TokenPacker checkpoint into a safetensors folder that `from_pretrained` loads.

    Args:
        checkpoint: the original LLaVA folder (config.json, weight shards, tokenizer.model).
        output: the folder to create; an existing one is replaced only with `force`.
        vision_tower: the stock CLIP checkpoint: a local folder or a Hub repo id.
        dtype: "float32", "float16" or "bfloat16"; default: the checkpoint's own.
        max_shard_size: the largest output shard, e.g. "5GB".
        verify: read everything back against the sources and check the projector against the original formula.
        license: the model card's license (the released weights derive from Vicuna v1.5, i.e. Llama 2).
        command: the command line to show in the model card (default: the equivalent `tokenpacker-convert` call).
        push_to_hub: a Hub repo id to publish the finished folder to (`tokenpacker.conversion.publish.publish_folder`,
            token from HF_TOKEN or the saved login).
        allow_non_finite: convert tensors that hold NaN or inf, or overflow `dtype`, instead of refusing them.
        timeout: seconds without an answer after which a request to the Hub (downloading the vision tower,
            publishing) gives up.
    """
    output = Path(output)
    local_sources = {"the checkpoint folder": Path(checkpoint)}
    if Path(vision_tower).exists():
        local_sources["the vision tower folder"] = Path(vision_tower)
    check_output_is_safe(output, local_sources)
    if (output.exists() or output.is_symlink()) and not force:
        raise FileExistsError(f"{output} already exists; pass --force (force=True) to replace it")
    shard_bytes = parse_size(max_shard_size)
    check_timeout(timeout)
    prepared = prepare_conversion(checkpoint, vision_tower, resolve_dtype(dtype), output, timeout)
    config, plan = prepared.config, prepared.plan
    command = command or default_command(
        checkpoint, output, vision_tower, dtype, max_shard_size, force, verify, push_to_hub, allow_non_finite
    )

    folder = OutputFolder(output, activity="converting")
    try:
        weight_map, non_finite = write_weights(
            plan, folder.path, prepared.dtype, len(prepared.new_tokens), shard_bytes, allow_non_finite
        )
        config.architectures = [TokenPackerForConditionalGeneration.__name__]  # what vLLM and the Hub read
        config.save_pretrained(folder.path)
        pad_token_id = prepared.tokenizer.pad_token_id
        generation_config_for(config, pad_token_id, prepared.original.generation_config).save_pretrained(folder.path)
        TokenPackerProcessor.from_model_config(config, prepared.tokenizer).save_pretrained(folder.path)
        export_remote_code(folder.path)
        report = None
        if verify:
            report = verify_weights(
                plan, folder.path, weight_map, config, prepared.dtype, prepared.new_tokens, non_finite
            )
        card = model_card(
            config,
            model_id=push_to_hub or output.name,
            source_name=prepared.original.folder.name,
            vision_model_id=vision_model_id(vision_tower, prepared.original),
            command=command,
            license=license,
            verification=str(report) if report else None,
        )
        (folder.path / "README.md").write_text(card)
        folder.commit()
    except BaseException:
        folder.discard()
        raise
    logger.info("Wrote %s", output)
    published = None
    if push_to_hub:
        try:
            published = publish_folder(output, push_to_hub, timeout=timeout)
        except PublishError as error:
            raise PublishError(
                f"{error} (the converted folder {output} is complete: publish it with tokenpacker-publish)"
            ) from error
        logger.info("Published %s to %s", output, published.repo_id)
    return ConversionResult(output=output, config=config, report=report, published=published)


def interrupt_on_signal(signum, frame):
    """SIGTERM handled like Ctrl-C: the conversion stops and removes what it wrote. A second signal is ignored while
    it cleans up."""
    signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tokenpacker-convert",
        description="Convert an original TokenPacker checkpoint (LLaVA folder) into a verified safetensors folder.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="the original LLaVA folder (config.json, weights, tokenizer.model)"
    )
    parser.add_argument(
        "--vision-tower",
        default=DEFAULT_VISION_TOWER,
        help=f"stock CLIP folder or Hub repo id (default: {DEFAULT_VISION_TOWER})",
    )
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument("--dtype", choices=list(DTYPES), help="output precision (default: the checkpoint's own)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip reading everything back")
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="convert weights that hold NaN or inf, or overflow --dtype (by default they are listed and refused)",
    )
    parser.add_argument("--license", default="llama2", help="license in the model card (default: llama2)")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="publish the finished folder to this Hub repo (token: HF_TOKEN or login)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help=f"give up when the Hub sends no answer for this long (default: {DEFAULT_TIMEOUT_S:g})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = shlex.join(["tokenpacker-convert", *(sys.argv[1:] if argv is None else argv)])
    handles_signals = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, interrupt_on_signal) if handles_signals else None
    try:
        result = convert_checkpoint(
            args.checkpoint,
            args.output,
            vision_tower=args.vision_tower,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            force=args.force,
            verify=args.verify,
            license=args.license,
            command=command,
            push_to_hub=args.push_to_hub,
            allow_non_finite=args.allow_non_finite,
            timeout=args.timeout,
        )
    except (ValueError, TypeError, OSError, PublishError) as error:
        print(f"tokenpacker-convert: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        signum = interrupt.args[0] if interrupt.args else signal.SIGINT
        print(f"tokenpacker-convert: error: stopped by {signum.name}; no partial output is left", file=sys.stderr)
        return 128 + signum
    finally:
        if handles_signals:
            signal.signal(signal.SIGTERM, previous_handler)
    if result.report is not None:
        print(result.report)
    print(f"Converted {args.checkpoint} -> {result.output}")
    if result.published is not None:
        print(f"Published to {result.published.repo_id} ({result.published.commit.commit_url})")
    return 0


__all__ = ["ConversionResult", "convert_checkpoint", "main"]
