"""Training TokenPacker models with transformers' `Trainer`: `tokenpacker-train`.

Stage 1 trains the projector alone (vision tower and language model frozen); stage 2 trains the projector and the
language model, or LoRA adapters on it (`--lora-enable`). The data are LLaVA-style conversations: a JSON list of
`{"image": "path", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`;
the loss covers the assistant's answers (and their end-of-sequence token) only. On one machine it runs as it is; on
several GPUs or machines the same command runs under `accelerate launch --config_file tokenpacker/configs/fsdp.yaml`
(or `deepspeed_zero2.yaml`, `deepspeed_zero3.yaml`).

    tokenpacker-train --vision-tower openai/clip-vit-large-patch14-336 --language-model lmsys/vicuna-7b-v1.5 \\
        --stage 1 --data-path blip_laion_cc_sbu_558k.json --image-folder images --output-dir runs/stage1 --bf16
    tokenpacker-train --model-name-or-path runs/stage1 --stage 2 --data-path llava_v1_5_mix665k.json ...
"""

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from PIL import Image
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import Dataset
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config
from transformers.training_args import ParallelMode
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from .building import build_model_and_processor
from .configuration.compat_tokenpacker import training_activation_checkpointing_argument
from .distributed import end_process_group
from .modeling import TokenPackerForConditionalGeneration
from .processing import TokenPackerProcessor
from .remote_code import export_remote_code

IGNORE_INDEX = -100
CONVERSATION_FORMATS = ("vicuna_v1", "plain")
ROLES = {"human": "user", "gpt": "assistant"}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A TokenPacker folder to go on from (e.g. stage 1's output)."}
    )
    vision_tower: str | None = field(
        default=None, metadata={"help": "A CLIP-like vision tower to build a new model from, with --language-model."}
    )
    language_model: str | None = field(
        default=None, metadata={"help": "A causal language model (with its tokenizer) to build a new model from."}
    )
    stage: int = field(default=2, metadata={"help": "1: train the projector only; 2: the projector and the language model."})
    train_vision_tower: bool = field(default=False, metadata={"help": "Train the vision tower too."})
    scale_factor: int = field(default=2, metadata={"help": "New models: 2, 3 or 4 (144, 64 or 36 tokens at 336 px)."})
    vision_feature_layer: int = field(default=-2, metadata={"help": "New models: the coarse queries' hidden state."})
    multi_level_feature_layers: list[int] | None = field(
        default=None, metadata={"help": "New models: hidden states of the keys and values (default: 4 spread levels)."}
    )
    projector_hidden_size: int | None = field(default=None, metadata={"help": "New models: the projector's width."})
    projector_num_heads: int = field(default=8, metadata={"help": "New models: heads of the region-to-point attention."})
    initializer_range: float = field(default=0.02, metadata={"help": "New models: std of the projector's initial weights."})
    image_aspect_ratio: str = field(default="pad", metadata={"help": "New models: 'pad' (LLaVA-1.5) or 'slice' (HD)."})
    max_slices: int = field(default=9, metadata={"help": "New models in 'slice' mode: 9, 16 or 25 crops."})
    lora_enable: bool = field(default=False, metadata={"help": "Stage 2: LoRA adapters instead of the full language model."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.vision_tower is None or self.language_model is None):
            raise ValueError(
                "Give either --model-name-or-path (a TokenPacker model) or both --vision-tower and --language-model, "
                f"got model_name_or_path={self.model_name_or_path!r}, vision_tower={self.vision_tower!r}, "
                f"language_model={self.language_model!r}"
            )
        if self.model_name_or_path is not None and (self.vision_tower or self.language_model):
            raise ValueError("--vision-tower and --language-model build a new model: leave out --model-name-or-path")
        if self.stage not in (1, 2):
            raise ValueError(f"--stage must be 1 or 2, got {self.stage}")
        if self.lora_enable and self.stage != 2:
            raise ValueError("--lora-enable adapts the language model, which only stage 2 trains")

    def projector_settings(self) -> dict:
        """The settings of a new model's TokenPackerConfig."""
        settings = {
            "scale_factor": self.scale_factor,
            "vision_feature_layer": self.vision_feature_layer,
            "projector_num_heads": self.projector_num_heads,
            "initializer_range": self.initializer_range,
            "image_aspect_ratio": self.image_aspect_ratio,
            "max_slices": self.max_slices,
        }
        if self.multi_level_feature_layers is not None:
            settings["multi_level_feature_layers"] = self.multi_level_feature_layers
        if self.projector_hidden_size is not None:
            settings["projector_hidden_size"] = self.projector_hidden_size
        return settings


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "LLaVA-style JSON list of conversations."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the image paths are relative to (default: the JSON file's folder)."}
    )
    conversation_format: str = field(
        default="vicuna_v1",
        metadata={
            "help": "'vicuna_v1': the processor's chat, loss on the answers (the original's stage 2, --version v1); "
            "'plain': image, caption and newline, loss on the caption (its stage 1, --version plain)."
        },
    )


@dataclass
class TokenPackerTrainingArguments(TrainingArguments):
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep pixel_values for the model."})
    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the projector (default: --learning-rate)."}
    )
    vision_tower_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of a trained vision tower (default: --learning-rate)."}
    )
    if training_activation_checkpointing_argument() == "gradient_checkpointing":
        activation_checkpointing: bool = field(
            default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
        )

    def __post_init__(self):
        if training_activation_checkpointing_argument() == "gradient_checkpointing":
            # Where the library still calls it gradient checkpointing, --activation-checkpointing turns that on.
            self.gradient_checkpointing = self.gradient_checkpointing or self.activation_checkpointing
        # The Trainer's own rule for bfloat16: a GPU (or XLA device) that supports it, unless it runs on the CPU.
        if (self.bf16 or self.bf16_full_eval) and not self.use_cpu:
            if not is_torch_bf16_gpu_available() and not is_torch_xla_available():
                raise ValueError(
                    "--bf16 needs a GPU with bfloat16 support and this machine has none: leave out --bf16, "
                    "or add --use-cpu to train on the CPU"
                )
        if self.use_cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            # accelerate would train with plain data parallelism instead.
            raise ValueError(
                "--use-cpu turns DeepSpeed off: leave it out and add --ddp-backend gloo to run DeepSpeed on the CPU"
            )
        super().__post_init__()
        # A launcher that starts N processes sets WORLD_SIZE; where accelerate finds no device for them they would
        # each train alone and all write the same output folder.
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and (self.world_size != launched or self.parallel_mode != ParallelMode.DISTRIBUTED):
            raise ValueError(
                f"{launched} processes were launched (WORLD_SIZE={launched}) but they do not train together: no GPU "
                "was found for them. On the CPU add --use-cpu, or --ddp-backend gloo under a DeepSpeed configuration"
            )


def fsdp_requested(training_args: TrainingArguments) -> bool:
    """Whether FSDP was asked for: by `accelerate launch` with an FSDP configuration, or by `--fsdp`."""
    return bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def held_elements(parameter: torch.Tensor) -> tuple[int, int]:
    """(elements this process holds, elements of the whole parameter): an FSDP2 parameter is a DTensor whose local
    tensor is this process's shard; a DeepSpeed ZeRO-3 parameter keeps its partition in `ds_tensor`."""
    if isinstance(parameter, DTensor):
        return parameter.to_local().numel(), parameter.numel()
    if hasattr(parameter, "ds_tensor"):
        return parameter.ds_tensor.numel(), parameter.ds_numel
    return parameter.numel(), parameter.numel()


class ParameterShardsReport(TrainerCallback):
    """Prints, when training on several processes starts, how many parameter elements each process holds, in all and
    of the largest parameter: all of them under data parallelism, about 1/N each where FSDP or ZeRO-3 shards them."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.world_size == 1:
            return
        sizes = {name: held_elements(parameter) for name, parameter in model.named_parameters()}
        largest = max(sizes, key=lambda name: sizes[name][1])
        held = [sum(local for local, _ in sizes.values()), sizes[largest][0]]
        every = [None] * args.world_size
        torch.distributed.all_gather_object(every, held)
        if state.is_world_process_zero:
            total = sum(whole for _, whole in sizes.values())
            print(
                f"Parameter elements held by each of the {args.world_size} processes: "
                f"{', '.join(f'{counts[0]:,}' for counts in every)} of {total:,}; of the largest parameter, "
                f"{largest}: {', '.join(f'{counts[1]:,}' for counts in every)} of {sizes[largest][1]:,}"
            )


class TokenPackerTrainer(Trainer):
    """A Trainer whose optimizer can give the projector and the vision tower learning rates of their own, and which
    shards the model with FSDP on the CPU too (accelerate applies an FSDP launch configuration on GPUs only)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU and fsdp_requested(self.args):
            plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))
            if state.mixed_precision != "no":
                plugin.set_mixed_precision(state.mixed_precision)
            state.fsdp_plugin = plugin
            state.distributed_type = DistributedType.FSDP
            PartialState().distributed_type = DistributedType.FSDP  # as accelerate keeps them for FSDP on GPUs
            self.is_fsdp_enabled = True

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        rates = {"multi_modal_projector": self.args.projector_lr, "vision_tower": self.args.vision_tower_lr}
        rate_of = {
            id(parameter): rate
            for name, parameter in (self.model if model is None else model).named_parameters()
            for module, rate in rates.items()
            if rate is not None and f"{module}." in name
        }
        if rate_of:
            groups = []
            for group in optimizer.param_groups:
                own_rates = {rate_of.get(id(p), group["lr"]) for p in group["params"]}
                for rate in sorted(own_rates, key=lambda rate: rate != group["lr"]):  # the base rate first, as logged
                    params = [p for p in group["params"] if rate_of.get(id(p), group["lr"]) == rate]
                    groups.append({**group, "params": params, "lr": rate})
            optimizer.param_groups = []
            for group in groups:
                optimizer.add_param_group(group)
        return optimizer


def chat_messages(turns: list[dict], num_images: int, image_token: str) -> list[dict]:
    """LLaVA turns -> chat messages; like the original, each image marker moves to the start of its message."""
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise ValueError(f"conversations must be a non-empty list of human/gpt pairs, got {turns!r}")
    messages = []
    for number, turn in enumerate(turns):
        expected = "human" if number % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise ValueError(f"Turn {number} must be {{'from': {expected!r}, 'value': str}}, got {turn!r}")
        text = turn["value"]
        markers = text.count(image_token)
        if markers:
            if number != 0:
                raise ValueError(f"Images must come with the first question; turn {number} holds {image_token}")
            text = image_token * markers + "\n" + text.replace(image_token, "").strip()
        messages.append({"role": ROLES[turn["from"]], "content": text})
    found = messages[0]["content"].count(image_token)
    if found != num_images:
        raise ValueError(f"The first question holds {found} {image_token} markers for {num_images} images")
    return messages


def text_after_last_image(processor, text: str) -> list[int]:
    """The ids of the text after the prompt's last image: the processor tokenizes that chunk on its own."""
    return processor.tokenizer(text.rpartition(processor.image_token)[2], add_special_tokens=False)["input_ids"]


def encode_with_tail(processor, text: str, images: list[Image.Image]) -> tuple[dict, list[int], int]:
    """The processor's inputs for `text`, the ids of its text after the last image, and where those ids start."""
    encoded = processor(images=images or None, text=text, padding=False, return_tensors="pt")
    input_ids = encoded["input_ids"][0]
    tail = text_after_last_image(processor, text)
    start = len(input_ids) - len(tail)
    if input_ids[start:].tolist() != tail:
        raise ValueError("The processor's ids do not end with the tokenized text after the last image")
    return encoded, tail, start


def as_sample(encoded, labels: torch.Tensor) -> dict:
    sample = {"input_ids": encoded["input_ids"][0], "labels": labels}
    if "pixel_values" in encoded:
        sample["pixel_values"] = encoded["pixel_values"]
    return sample


def encode_conversation(processor, messages: list[dict], images: list[Image.Image]) -> dict:
    """input_ids, labels (the answers and their end tokens; -100 elsewhere) and pixel_values of one conversation.

    The processor tokenizes the text after the last image on its own, so the answers' bounds come from tokenizing
    the prefixes of that text: the prompt up to "ASSISTANT:" and the conversation up to the end of each answer.
    """
    full_text = processor.apply_chat_template(messages, tokenize=False)
    encoded, tail, start = encode_with_tail(processor, full_text, images)
    input_ids = encoded["input_ids"][0]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for number, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:number], tokenize=False, add_generation_prompt=True)
        answered = processor.apply_chat_template(messages[: number + 1], tokenize=False)
        prompt, answered = text_after_last_image(processor, prompt), text_after_last_image(processor, answered)
        if tail[: len(prompt)] != prompt or tail[: len(answered)] != answered:
            raise ValueError(
                f"Answer {number // 2} does not start or end on a token boundary of the conversation; "
                f"conversation: {full_text!r}"
            )
        labels[start + len(prompt) : start + len(answered)] = input_ids[start + len(prompt) : start + len(answered)]
    return as_sample(encoded, labels)


def encode_caption(processor, caption: str, images: list[Image.Image]) -> dict:
    """The original's stage-1 "plain" format: the image, the caption and "\\n", with the loss on the caption and "\\n"."""
    encoded, _, start = encode_with_tail(processor, processor.image_token * len(images) + caption + "\n", images)
    labels = torch.full_like(encoded["input_ids"][0], IGNORE_INDEX)
    labels[start:] = encoded["input_ids"][0][start:]
    return as_sample(encoded, labels)


class ConversationDataset(Dataset):
    """LLaVA-style conversations, each encoded by the processor when it is read."""

    def __init__(
        self, data_path: str | Path, processor, image_folder: str | Path | None = None, conversation_format: str = "vicuna_v1"
    ):
        if conversation_format not in CONVERSATION_FORMATS:
            raise ValueError(f"conversation_format must be one of {CONVERSATION_FORMATS}, got {conversation_format!r}")
        data_path = Path(data_path)
        records = json.loads(data_path.read_text())
        if not isinstance(records, list) or not records:
            raise ValueError(f"{data_path} must hold a non-empty JSON list of conversations")
        for index, record in enumerate(records):
            if not isinstance(record, dict) or "conversations" not in record:
                raise ValueError(f"Record {index} of {data_path} has no 'conversations': {record!r}")
            if not isinstance(record.get("image", ""), str):
                raise ValueError(f"Record {index} of {data_path}: 'image' must be a path, got {record['image']!r}")
        self.records = records
        self.processor = processor
        self.conversation_format = conversation_format
        self.image_folder = Path(image_folder) if image_folder is not None else data_path.parent

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        images = [Image.open(self.image_folder / record["image"]).convert("RGB")] if "image" in record else []
        messages = chat_messages(record["conversations"], len(images), self.processor.image_token)
        if self.conversation_format == "vicuna_v1":
            return encode_conversation(self.processor, messages, images)
        if len(messages) != 2 or not images:
            raise ValueError(f"The plain format takes an image and one question/caption pair; record {index} has not")
        return encode_caption(self.processor, messages[1]["content"], images)


@dataclass
class ConversationCollator:
    """Pads a batch on the right (labels with -100) and stacks the crops of every sample in order."""

    pad_token_id: int

    def __call__(self, samples: list[dict]) -> dict:
        input_ids = nn.utils.rnn.pad_sequence([s["input_ids"] for s in samples], batch_first=True, padding_value=self.pad_token_id)
        labels = nn.utils.rnn.pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX)
        lengths = torch.tensor([len(s["input_ids"]) for s in samples])
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": (torch.arange(input_ids.shape[1]) < lengths[:, None]).long(),
        }
        crops = [s["pixel_values"] for s in samples if "pixel_values" in s]
        if crops:
            batch["pixel_values"] = torch.cat(crops)
        return batch


def set_trainable(model, stage: int, train_vision_tower: bool = False):
    """Stage 1: the projector only; stage 2: the projector and the language model (and its head)."""
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if stage == 2:
        model.model.language_model.requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    if train_vision_tower:
        model.model.vision_tower.requires_grad_(True)


def add_lora(model, model_args: ModelArguments):
    """LoRA on every linear layer of the language model; the projector (and a trained tower) train in full."""
    from peft import LoraConfig, get_peft_model

    targets = [
        f"model.language_model.{name}"
        for name, module in model.model.language_model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    modules_to_save = ["multi_modal_projector"] + (["vision_tower"] if model_args.train_vision_tower else [])
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_model_and_processor(model_args: ModelArguments) -> tuple[TokenPackerForConditionalGeneration, TokenPackerProcessor]:
    """A TokenPacker folder with its processor, or a new model built from a vision tower and a language model."""
    if model_args.model_name_or_path is not None:
        model = TokenPackerForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
        return model, TokenPackerProcessor.from_pretrained(model_args.model_name_or_path)
    return build_model_and_processor(
        model_args.vision_tower, model_args.language_model, **model_args.projector_settings()
    )


def save_trained(trainer: Trainer, processor: TokenPackerProcessor, output_dir: str):
    """Saves the trained model as a Hub folder (weights, processor and the exported remote code); LoRA adapters are
    merged into the language model."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(model, "merge_and_unload"):
        trainer.save_model(output_dir)
    elif trainer.is_world_process_zero():
        model.merge_and_unload().save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    if trainer.is_world_process_zero():
        export_remote_code(output_dir)


def make_trainer(
    model: TokenPackerForConditionalGeneration,
    processor: TokenPackerProcessor,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TokenPackerTrainingArguments,
) -> Trainer:
    """Freezes what the stage keeps fixed, adds LoRA if asked, and wires the data into a Trainer."""
    if model_args.lora_enable and (fsdp_requested(training_args) or is_deepspeed_zero3_enabled()):
        raise ValueError("--lora-enable merges the adapters into full weights at the end: use DDP or DeepSpeed ZeRO-2")
    set_trainable(model, model_args.stage, model_args.train_vision_tower)
    if model_args.lora_enable:
        model = add_lora(model, model_args)
    return TokenPackerTrainer(
        model=model,
        args=training_args,
        train_dataset=ConversationDataset(
            data_args.data_path, processor, data_args.image_folder, data_args.conversation_format
        ),
        data_collator=ConversationCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        callbacks=[ParameterShardsReport()],
    )


@contextmanager
def whole_weights_in_every_process(training_args: TrainingArguments):
    """Lets `from_pretrained` load whole weights under a ZeRO-3 launch whose configuration leaves out ZeRO-3's
    partitioned initialization (`zero3_init_flag: false`): transformers partitions every model built while ZeRO-3 is
    on, and a new model copies weights between whole models. DeepSpeed partitions the model when training starts."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is None or plugin.zero3_init_flag or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TokenPackerTrainingArguments) -> Trainer:
    """Builds or loads the model, trains it and saves it in `output_dir`; returns the Trainer."""
    set_seed(training_args.seed)  # a new model's projector and new embeddings start from --seed too
    with whole_weights_in_every_process(training_args):
        model, processor = load_model_and_processor(model_args)
    trainer = make_trainer(model, processor, model_args, data_args, training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_trained(trainer, processor, training_args.output_dir)
    return trainer


def argument_parser(*dataclass_types, prog: str = "tokenpacker-train") -> HfArgumentParser:
    """An HfArgumentParser over `dataclass_types` (default: the model, data and training arguments) whose options
    read with dashes, like every tokenpacker command (`--max-steps`); HfArgumentParser accepts the underscore
    spelling of transformers' examples (`--max_steps`) too, shown second."""
    parser = HfArgumentParser(dataclass_types or (ModelArguments, DataArguments, TokenPackerTrainingArguments), prog=prog)
    for action in parser._actions:
        action.option_strings.sort(key=lambda option: "_" in option)
    return parser


def main(argv: list[str] | None = None):
    parser = argument_parser()
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:
        sys.exit(f"tokenpacker-train: error: {error}")
    train(model_args, data_args, training_args)
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
