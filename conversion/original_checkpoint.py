"""The original TokenPacker release: a LLaVA folder (Llama config + mm_* fields, weights, sentencepiece tokenizer) and
the stock CLIP checkpoint it names as its vision tower. Reads and validates both, and derives a TokenPackerConfig."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import sentencepiece as spm
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    RemoteEntryNotFoundError,
    StrictDataclassError,
)
from huggingface_hub.utils import validate_repo_id
from transformers import CLIPVisionConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..configuration import TokenPackerConfig
from .checkpoint_files import (
    SAFETENSORS,
    TORCH,
    CheckpointFiles,
    TensorInfo,
    read_index,
    read_json,
)
from .hub_client import DEFAULT_TIMEOUT_S, HubTimeout, hub_requests_time_out, timed_out_server

DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"
# Fixed in the original code, not in its config: the levels concatenated into keys and values
# (CLIPVisionTower.feature_select), the projector's heads (nn.MultiheadAttention(1024, 1024 // 128)), and the crop
# limit its evaluation assumes when a config has no patch_num.
ORIGINAL_MULTI_LEVEL_LAYERS = (12, 16, 22, 23)
ORIGINAL_PROJECTOR_HEADS = 8
ORIGINAL_DEFAULT_PATCH_NUM = 9
# The Llama architecture fields of a LLaVA config; everything else there is LLaVA's (mm_*) or bookkeeping.
LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
)
REQUIRED_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
ORIGINAL_PROJECTOR = "model.mm_projector."


def load_sentencepiece(model_file: Path) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_file=str(model_file))
    except (RuntimeError, OSError) as error:
        raise ValueError(f"Cannot read the sentencepiece model {model_file} (empty or corrupt?): {error}") from error


@dataclass(frozen=True)
class SeparatorIds:
    """The HD layout's ids, looked up like the original: the slow tokenizer's convert_tokens_to_ids, i.e.
    sentencepiece's piece_to_id, which gives the unknown-token id for a string that is not a piece ('\\n')."""

    slice_separator: int
    row_separator: int

    @classmethod
    def from_sentencepiece(cls, model_file: Path) -> "SeparatorIds":
        processor = load_sentencepiece(model_file)
        return cls(slice_separator=processor.piece_to_id(","), row_separator=processor.piece_to_id("\n"))


class LlavaCheckpoint:
    """An original TokenPacker LLaVA folder: config.json with mm_projector_type 'tokenpacker', weight shards,
    tokenizer.model (+ tokenizer_config.json, generation_config.json)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"The checkpoint folder {self.folder} does not exist")
        self.config = read_json(self.folder / "config.json", "a LLaVA config")
        self._validate_config()
        self.tokenizer_model = self.folder / "tokenizer.model"
        if not self.tokenizer_model.is_file():
            raise FileNotFoundError(
                f"No tokenizer.model in {self.folder}: the original's sentencepiece tokenizer is needed for the token "
                "ids and the ',' and '\\n' separator ids"
            )
        tokenizer_config = self.folder / "tokenizer_config.json"
        self.tokenizer_config = read_json(tokenizer_config, "a tokenizer config") if tokenizer_config.exists() else {}
        generation_config = self.folder / "generation_config.json"
        self.generation_config = (
            read_json(generation_config, "a generation config") if generation_config.exists() else {}
        )
        self.files = CheckpointFiles(self.folder, "checkpoint")

    def _validate_config(self):
        config, where = self.config, self.folder / "config.json"
        if isinstance(config.get("patch_num"), str) and config["patch_num"].isdigit():
            config["patch_num"] = int(config["patch_num"])  # the original reads it with int()
        projector_type = config.get("mm_projector_type")
        if projector_type != "tokenpacker":
            found = (
                "has no mm_projector_type" if projector_type is None else f"has mm_projector_type {projector_type!r}"
            )
            raise ValueError(f"{where} is not a TokenPacker LLaVA checkpoint: it {found}, expected 'tokenpacker'")
        missing = [field for field in REQUIRED_LLAMA_FIELDS + ("mm_vision_select_layer",) if field not in config]
        if missing:
            raise ValueError(f"{where} lacks the fields {missing} of a LLaVA (Llama) config")
        checks = (
            ("mm_vision_select_feature", config.get("mm_vision_select_feature", "patch"), ("patch",)),
            ("mm_use_im_start_end", config.get("mm_use_im_start_end", False), (False,)),
            # The original adds an <im_patch> token when this is true, or absent.
            ("mm_use_im_patch_token", config.get("mm_use_im_patch_token", True), (False,)),
            ("image_aspect_ratio", config.get("image_aspect_ratio"), ("pad", "slice")),
            ("patch_num", config.get("patch_num", ORIGINAL_DEFAULT_PATCH_NUM), (9, 16, 25)),
        )
        for field, value, allowed in checks:
            if isinstance(value, bool) != isinstance(allowed[0], bool) or value not in allowed:
                expected = " or ".join(repr(option) for option in allowed)
                raise ValueError(f"{where}: {field} must be {expected}, got {value!r}")
        scale_factor = config.get("scale_factor")
        if isinstance(scale_factor, bool) or not isinstance(scale_factor, int) or scale_factor < 1:
            raise ValueError(
                f"{where}: scale_factor must be a positive integer (2, 3 or 4 in the release), got {scale_factor!r}"
            )

    @property
    def llama_config(self) -> dict:
        return {field: self.config[field] for field in LLAMA_FIELDS if field in self.config}


def is_hub_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id `namespace/name` rather than a local path: a valid id whose namespace
    is not an existing local folder."""
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or Path(parts[0]).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def vision_tower_folder(vision_tower: str | Path, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """A local CLIP folder as is; otherwise a Hub repo id `namespace/name`, downloaded (config and one weight format
    only; every request gives up after `timeout` seconds without an answer)."""
    path = Path(vision_tower)
    if path.is_dir():
        return path
    if path.exists() or not is_hub_repo_id(str(vision_tower)):
        found = "it is a file" if path.exists() else "and it is no Hub repo id of the form namespace/name"
        raise FileNotFoundError(f"The vision tower folder {vision_tower} does not exist ({found})")
    try:
        with hub_requests_time_out(timeout):
            return download_vision_tower(str(vision_tower))
    except (HfHubHTTPError, OSError, httpx2.HTTPError) as error:  # the offline fallback's errors are OSErrors too
        timed_out = next((cause for cause in causes(error) if isinstance(cause, HubTimeout)), None)
        if timed_out is not None:
            detail = f"{timed_out_server(timed_out, constants.ENDPOINT)} sent {timed_out}"
        else:
            detail = f"{type(error).__name__}: {error}"
        raise ValueError(
            f"Cannot download the vision tower {vision_tower} from the Hub at {constants.ENDPOINT} ({detail}); if it "
            f"is meant as a local folder, {vision_tower} does not exist"
        ) from error


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and the errors it was raised from or while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def download_vision_tower(repo_id: str) -> Path:
    """config.json and one weight format (safetensors first), file by file: each file's metadata request has the
    explicit `HF_HUB_ETAG_TIMEOUT` and its data request `HF_HUB_DOWNLOAD_TIMEOUT`; a listing of the repo has none."""

    def download(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, etag_timeout=constants.HF_HUB_ETAG_TIMEOUT))

    folder = download("config.json").parent
    for weight_format in (SAFETENSORS, TORCH):
        for name in (weight_format.index, weight_format.single):
            try:
                file = download(name)
            except RemoteEntryNotFoundError:
                continue
            if name == weight_format.index:
                for shard in sorted(set(read_index(file, weight_format).values())):
                    download(shard)
            return folder
    raise FileNotFoundError(
        f"The Hub repo {repo_id} holds no {SAFETENSORS.single} or {TORCH.single} (or their index)"
    )


def read_vision_config(folder: Path) -> CLIPVisionConfig:
    """The vision part of a CLIPModel or CLIPVisionModel config.json."""
    model_type = read_json(folder / "config.json", "a vision tower config").get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise ValueError(
            f"The vision tower at {folder} must be a CLIP checkpoint (model_type 'clip' or 'clip_vision_model'), "
            f"got model_type {model_type!r}"
        )
    return CLIPVisionConfig.from_pretrained(folder)


def projector_widths(tensors: dict[str, TensorInfo], vision_size: int, text_size: int, where: Path) -> int:
    """The projector's width, read from its weights; checks the widths it must share with the towers."""
    needed = ("q_proj_1.weight", "k_proj_1.0.weight", "v_proj_1.0.weight", "mlp.0.weight", "mlp.2.weight")
    absent = [ORIGINAL_PROJECTOR + name for name in needed if ORIGINAL_PROJECTOR + name not in tensors]
    if absent:
        raise ValueError(f"The checkpoint in {where} lacks the TokenPacker projector tensors {absent}")
    width, query_in = tensors[ORIGINAL_PROJECTOR + "q_proj_1.weight"].shape
    levels = len(ORIGINAL_MULTI_LEVEL_LAYERS)
    expectations = (
        ("q_proj_1.weight", (width, vision_size), "(projector width, vision hidden size)"),
        (
            "k_proj_1.0.weight",
            (width, vision_size * levels),
            f"(projector width, vision hidden size x {levels} levels)",
        ),
        (
            "v_proj_1.0.weight",
            (width, vision_size * levels),
            f"(projector width, vision hidden size x {levels} levels)",
        ),
        ("mlp.0.weight", (text_size, width), "(text hidden size, projector width)"),
        ("mlp.2.weight", (text_size, text_size), "(text hidden size, text hidden size)"),
    )
    for name, expected, meaning in expectations:
        shape = tensors[ORIGINAL_PROJECTOR + name].shape
        if shape != expected:
            raise ValueError(
                f"{ORIGINAL_PROJECTOR + name} has shape {tuple(shape)}, expected {expected} {meaning} for a vision "
                "tower of "
                f"width {vision_size} and a language model of width {text_size}"
            )
    if width % ORIGINAL_PROJECTOR_HEADS != 0:
        raise ValueError(
            f"The projector width {width} must be a multiple of the original's {ORIGINAL_PROJECTOR_HEADS} attention "
            "heads"
        )
    return width


def tokenpacker_config(
    checkpoint: LlavaCheckpoint,
    tensors: dict[str, TensorInfo],
    vision_config: CLIPVisionConfig,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    separators: SeparatorIds,
) -> TokenPackerConfig:
    """The TokenPackerConfig equivalent to the original checkpoint and its vision tower, for the vocabulary grown by
    `<image>` and `<pad>` (the pad id replaces the original's reuse of the unknown token)."""
    llava, where = checkpoint.config, checkpoint.folder / "config.json"
    mm_hidden_size = llava.get("mm_hidden_size", vision_config.hidden_size)
    if mm_hidden_size != vision_config.hidden_size:
        raise ValueError(
            f"{where} has mm_hidden_size {mm_hidden_size} but the vision tower's hidden size is "
            f"{vision_config.hidden_size}: wrong vision tower?"
        )
    grid = vision_config.image_size // vision_config.patch_size
    if grid % llava["scale_factor"] != 0:
        raise ValueError(
            f"{where}: scale_factor {llava['scale_factor']} does not divide the vision tower's {grid}x{grid} patch grid"
        )
    width = projector_widths(tensors, vision_config.hidden_size, llava["hidden_size"], checkpoint.folder)
    text_config = dict(checkpoint.llama_config, model_type="llama", vocab_size=vocab_size, pad_token_id=pad_token_id)
    rope = llava.get("rope_scaling") or llava.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"{where}: rope_scaling type {rope_type!r} is not one transformers knows ({sorted(ROPE_INIT_FUNCTIONS)})"
        )
    try:
        return TokenPackerConfig(
            vision_config=vision_config.to_dict(),
            text_config=text_config,
            image_token_id=image_token_id,
            scale_factor=llava["scale_factor"],
            vision_feature_layer=llava["mm_vision_select_layer"],
            multi_level_feature_layers=list(ORIGINAL_MULTI_LEVEL_LAYERS),
            projector_hidden_size=width,
            projector_num_heads=ORIGINAL_PROJECTOR_HEADS,
            image_aspect_ratio=llava["image_aspect_ratio"],
            max_slices=llava.get("patch_num", ORIGINAL_DEFAULT_PATCH_NUM),
            slice_separator_token_id=separators.slice_separator,
            row_separator_token_id=separators.row_separator,
            tie_word_embeddings=bool(llava.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, StrictDataclassError) as error:
        raise ValueError(f"{where} does not give a valid model config: {type(error).__name__}: {error}") from error


__all__ = [
    "DEFAULT_VISION_TOWER",
    "LlavaCheckpoint",
    "SeparatorIds",
    "read_vision_config",
    "vision_tower_folder",
    "tokenpacker_config",
]
