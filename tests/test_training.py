"""Training with transformers' Trainer: new models from a tower and a language model, answer-only labels, the stages'
frozen parameters, Trainer checkpoints and LoRA."""

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
)

import tokenpacker
from tokenpacker import TokenPackerForConditionalGeneration, TokenPackerProcessor, from_vision_and_text
from tokenpacker.building import build_model_and_processor
from tokenpacker.configuration.compat_tokenpacker import training_activation_checkpointing_argument
from tokenpacker.shapes import render_scene, train_tokenizer, write_dataset
from tokenpacker.training import (
    ConversationCollator,
    ConversationDataset,
    DataArguments,
    ModelArguments,
    TokenPackerTrainingArguments,
    argument_parser,
    chat_messages,
    encode_conversation,
    main,
    make_trainer,
    set_trainable,
    train,
)

from .server_process import free_port

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=336, patch_size=56)
SETTINGS = dict(vision_feature_layer=-1, multi_level_feature_layers=[1, 2, 3, 4], projector_num_heads=4)
TOKENS = 9  # 6x6 patch grid packed with scale factor 2
PIECES = 512  # the task tokenizer's sentencepiece pieces, then <image> and <pad>
IMAGE_TOKEN_ID, PAD_TOKEN_ID = 512, 513


def tiny_llama(vocab_size):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny shapes data, the task's tokenizer, and a random tower and language model saved as folders."""
    folder = tmp_path_factory.mktemp("training")
    write_dataset(folder / "data", num_train=8, num_test=2)
    tokenizer = train_tokenizer(folder / "text")
    tokenizer.save_pretrained(folder / "text")
    tiny_llama(tokenizer.vocab_size).save_pretrained(folder / "text")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(folder / "vision")
    return folder


def new_model(workspace, **settings):
    return build_model_and_processor(workspace / "vision", workspace / "text", **{**SETTINGS, **settings})


def training_args(workspace, name, **overrides):
    settings = dict(
        output_dir=str(workspace / name),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        max_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return TokenPackerTrainingArguments(**settings)


def test_from_vision_and_text_keeps_both_models_weights_and_adds_the_tokens():
    sp_tokens = ["<unk>", "<s>", "</s>", ",", "a", "b"]
    llm = tiny_llama(len(sp_tokens))
    clip = CLIPModel(CLIPConfig(vision_config=VISION, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)))
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({t: i for i, t in enumerate(sp_tokens)}, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    model = from_vision_and_text(clip, llm, tokenizer=tokenizer, scale_factor=3)

    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [6, 7]
    config = model.config
    assert (config.image_token_id, config.text_config.pad_token_id, config.text_config.vocab_size) == (6, 7, 8)
    assert (config.slice_separator_token_id, config.row_separator_token_id) == (3, 0)  # ',' and the unknown id for '\n'
    assert config.multi_level_feature_layers == [2, 2, 2, 3]  # 4 layers: levels at 1/2, 2/3, L-2 and L-1
    assert config.projector_hidden_size == 32 and config.num_image_tokens == 4
    assert len(model.model.vision_tower.encoder.layers) == 3  # the tower runs up to layer 3 (vision_feature_layer -2)
    assert torch.equal(model.model.vision_tower.encoder.layers[2].mlp.fc1.weight, clip.vision_model.encoder.layers[2].mlp.fc1.weight)
    assert torch.equal(model.model.vision_tower.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight)
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(model.get_input_embeddings().weight[:6], llm.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight[:6], llm.lm_head.weight)
    assert model.lm_head.weight.shape == (8, 64)
    assert (model.generation_config.pad_token_id, model.generation_config.suppress_tokens) == (7, [6, 7])


def test_a_whole_clip_folder_gives_its_vision_half_without_a_load_report(workspace, tmp_path, caplog):
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    clip = CLIPModel(CLIPConfig(vision_config=VISION, text_config=text))
    clip.save_pretrained(tmp_path / "clip")
    with caplog.at_level(logging.INFO):
        model = from_vision_and_text(tmp_path / "clip", workspace / "text", **SETTINGS)
    messages = [record.getMessage() for record in caplog.records]
    assert not [message for message in messages if "UNEXPECTED" in message or "LOAD REPORT" in message]
    tower = model.model.vision_tower
    assert torch.equal(tower.encoder.layers[3].mlp.fc1.weight, clip.vision_model.encoder.layers[3].mlp.fc1.weight)
    assert torch.equal(tower.post_layernorm.weight, clip.vision_model.post_layernorm.weight)


def test_a_clip_folder_that_lacks_vision_weights_is_refused(workspace, tmp_path):
    from safetensors.torch import load_file, save_file

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    CLIPModel(CLIPConfig(vision_config=VISION, text_config=text)).save_pretrained(tmp_path / "clip")
    weights = load_file(tmp_path / "clip" / "model.safetensors")
    del weights["vision_model.encoder.layers.1.mlp.fc2.weight"]
    save_file(weights, tmp_path / "clip" / "model.safetensors", metadata={"format": "pt"})
    missing = r"does not fit its CLIPModel: missing keys: \[.*encoder\.layers\.1\.mlp\.fc2\.weight"
    with pytest.raises(ValueError, match=missing):
        from_vision_and_text(tmp_path / "clip", workspace / "text", **SETTINGS)


def test_from_vision_and_text_rejects_what_it_cannot_use(workspace):
    with pytest.raises(ValueError, match="Pass the language model's tokenizer: text_model_or_path is a model object"):
        from_vision_and_text(workspace / "vision", tiny_llama(PIECES))
    with pytest.raises(TypeError, match="vision_model_or_path must be a folder, a Hub id or a PreTrainedModel, got int"):
        from_vision_and_text(3, workspace / "text")
    shallow = CLIPVisionModel(CLIPVisionConfig(**{**VISION, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="multi_level_feature_layers must index the vision tower's 3 hidden states"):
        from_vision_and_text(shallow, workspace / "text", **SETTINGS)


def test_the_processor_matches_the_model_and_the_tower_normalization(workspace):
    model, processor = new_model(workspace)
    assert processor.image_token_id == model.config.image_token_id == IMAGE_TOKEN_ID
    assert processor.tokenizer.pad_token_id == model.config.text_config.pad_token_id == PAD_TOKEN_ID
    assert processor.num_image_tokens == TOKENS
    assert list(processor.image_processor.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    (workspace / "vision_norm").mkdir(exist_ok=True)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(workspace / "vision_norm")
    (workspace / "vision_norm" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]})
    )
    _, processor = build_model_and_processor(workspace / "vision_norm", workspace / "text", **SETTINGS)
    assert list(processor.image_processor.image_std) == [0.25, 0.25, 0.25]


def answer_ids(workspace, answer):
    """What the original's sentencepiece tokenizer gives for an answer after "ASSISTANT: ", then </s>."""
    pieces = spm.SentencePieceProcessor(model_file=str(workspace / "text" / "tokenizer.model"))
    return pieces.encode(answer) + [pieces.eos_id()]


@pytest.mark.parametrize("mode", ["pad", "slice"])
def test_labels_keep_only_the_answers_and_their_end_tokens(workspace, mode):
    model, processor = new_model(workspace, image_aspect_ratio=mode)
    turns = [
        {"from": "human", "value": "What colour is the circle?\n<image>"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Where is the circle?"},
        {"from": "gpt", "value": "top left"},
    ]
    image = Image.new("RGB", (672, 336), (200, 200, 200))
    messages = chat_messages(turns, 1, processor.image_token)
    assert messages[0] == {"role": "user", "content": "<image>\nWhat colour is the circle?"}  # marker moved first
    sample = encode_conversation(processor, messages, [image])

    prompt = processor.apply_chat_template(messages, tokenize=False)
    expected = processor(images=[image], text=prompt, return_tensors="pt")
    assert torch.equal(sample["input_ids"], expected["input_ids"][0])
    assert torch.equal(sample["pixel_values"], expected["pixel_values"])
    input_ids, labels = sample["input_ids"], sample["labels"]
    kept = labels != -100
    assert labels[kept].tolist() == answer_ids(workspace, "red") + answer_ids(workspace, "top left")
    assert torch.equal(labels[kept], input_ids[kept])
    assert (labels[input_ids == processor.image_token_id] == -100).all()
    if mode == "slice":  # a 672x336 image: a 1x2 grid and the thumbnail: "block , block \n thumbnail \n"
        crops = sample["pixel_values"].shape[0]
        image_positions = (input_ids == processor.image_token_id).nonzero().flatten()
        assert crops == 3 and len(image_positions) == crops * TOKENS
        layout = input_ids[image_positions[0] : image_positions[-1] + 2]
        separators = layout[layout != processor.image_token_id].tolist()
        assert separators == [processor.slice_separator_token_id] + [processor.row_separator_token_id] * 2
        assert (labels[image_positions[0] : image_positions[-1] + 2] == -100).all()
    # the answers are the last tokens of their turns: "...ASSISTANT: red</s>USER: ..."
    positions = kept.nonzero().flatten().tolist()
    assert positions[-1] == len(input_ids) - 1


def test_the_plain_format_trains_the_caption_and_its_newline(workspace):
    _, processor = new_model(workspace)
    caption = "a small red circle at the top left"
    question = {"from": "human", "value": "Describe the image.\n<image>"}
    two_turns = [question, {"from": "gpt", "value": caption}, {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "yes"}]
    records = [{"image": "images/train-000000.png", "conversations": turns} for turns in (two_turns[:2], two_turns)]
    (workspace / "data" / "captions.json").write_text(json.dumps(records))
    dataset = ConversationDataset(workspace / "data" / "captions.json", processor, conversation_format="plain")
    sample = dataset[0]
    pieces = spm.SentencePieceProcessor(model_file=str(workspace / "text" / "tokenizer.model"))
    expected_ids = [pieces.bos_id()] + [IMAGE_TOKEN_ID] * TOKENS + pieces.encode(caption + "\n")
    assert sample["input_ids"].tolist() == expected_ids  # the question is dropped, like the original's stage 1
    assert sample["labels"].tolist() == [-100] * (1 + TOKENS) + pieces.encode(caption + "\n")
    with pytest.raises(ValueError, match="The plain format takes an image and one question/caption pair; record 1 has not"):
        dataset[1]
    with pytest.raises(ValueError, match="conversation_format must be one of \\('vicuna_v1', 'plain'\\), got 'v1'"):
        ConversationDataset(workspace / "data" / "train.json", processor, conversation_format="v1")


def test_conversations_must_be_well_formed(workspace):
    with pytest.raises(ValueError, match="Turn 1 must be {'from': 'gpt', 'value': str}"):
        chat_messages([{"from": "human", "value": "<image>\nhi"}, {"from": "human", "value": "again"}], 1, "<image>")
    with pytest.raises(ValueError, match="Images must come with the first question; turn 2 holds <image>"):
        turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "1"}]
        chat_messages(turns + [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "2"}], 0, "<image>")
    with pytest.raises(ValueError, match="The first question holds 0 <image> markers for 1 images"):
        chat_messages([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "1"}], 1, "<image>")
    with pytest.raises(ValueError, match="Give either --model-name-or-path"):
        ModelArguments(vision_tower="v")
    with pytest.raises(ValueError, match="--lora-enable adapts the language model, which only stage 2 trains"):
        ModelArguments(model_name_or_path="m", stage=1, lora_enable=True)


def test_the_collator_pads_on_the_right_and_keeps_every_crop(workspace):
    _, processor = new_model(workspace)
    dataset = ConversationDataset(workspace / "data" / "train.json", processor)
    samples = [dataset[0], dataset[1]]
    batch = ConversationCollator(processor.tokenizer.pad_token_id)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (2, max(lengths))
    for row, sample in enumerate(samples):
        length = lengths[row]
        assert torch.equal(batch["input_ids"][row, :length], sample["input_ids"])
        assert (batch["input_ids"][row, length:] == PAD_TOKEN_ID).all() and (batch["labels"][row, length:] == -100).all()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
    assert torch.equal(batch["pixel_values"], torch.cat([samples[0]["pixel_values"], samples[1]["pixel_values"]]))


def batch_loss(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def test_a_few_trainer_steps_lower_the_loss(workspace):
    model, processor = new_model(workspace)
    set_trainable(model, stage=2, train_vision_tower=True)
    dataset = ConversationDataset(workspace / "data" / "train.json", processor)
    batch = ConversationCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(8)])
    before = batch_loss(model, batch)
    from transformers import Trainer

    args = training_args(workspace, "steps", max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=ConversationCollator(PAD_TOKEN_ID)).train()
    after = batch_loss(model, batch)
    assert after < 0.6 * before


def test_stage_1_trains_the_projector_only(workspace):
    model_args = ModelArguments(
        vision_tower=str(workspace / "vision"), language_model=str(workspace / "text"), stage=1, **SETTINGS
    )
    data_args = DataArguments(data_path=str(workspace / "data" / "train.json"))
    torch.manual_seed(0)
    trainer = train(model_args, data_args, training_args(workspace, "stage1"))
    # the output is a Hub folder: the remote code is exported beside the weights and the processor
    output = workspace / "stage1"
    assert {"modeling_tokenpacker.py", "processing_tokenpacker.py", "compat_tokenpacker.py"} <= set(os.listdir(output))
    assert json.loads((output / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"] == (
        "modeling_tokenpacker.TokenPackerForConditionalGeneration"
    )
    assert "AutoProcessor" in json.loads((output / "processor_config.json").read_text())["auto_map"]
    trained = trainer.model.state_dict()
    torch.manual_seed(0)
    initial, _ = new_model(workspace)  # the same new model: same folders, same random projector and new embeddings
    changed = {name for name, weight in initial.state_dict().items() if not torch.equal(weight, trained[name])}
    projector = {name for name in trained if name.startswith("model.multi_modal_projector.")}
    assert changed and changed <= projector
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == projector


def test_stage_2_leaves_the_vision_tower_frozen_unless_asked():
    from .builders import tiny_config

    model = TokenPackerForConditionalGeneration(tiny_config())
    set_trainable(model, stage=2)
    frozen = {n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] if n.startswith("lm_head") else n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert frozen == {"vision_tower"} and trainable == {"multi_modal_projector", "language_model", "lm_head"}
    set_trainable(model, stage=2, train_vision_tower=True)
    assert all(p.requires_grad for p in model.parameters())


def test_the_projector_and_the_tower_can_have_learning_rates_of_their_own(workspace):
    model, processor = new_model(workspace)
    model_args = ModelArguments(
        vision_tower=str(workspace / "vision"), language_model=str(workspace / "text"), train_vision_tower=True, **SETTINGS
    )
    args = training_args(workspace, "rates", learning_rate=1e-3, projector_lr=5e-3, vision_tower_lr=1e-4, weight_decay=0.1)
    trainer = make_trainer(model, processor, model_args, DataArguments(str(workspace / "data" / "train.json")), args)
    optimizer = trainer.create_optimizer()
    rates = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    assert len(rates) == sum(1 for _ in model.parameters())
    for name, parameter in model.named_parameters():
        rate = 5e-3 if "multi_modal_projector." in name else 1e-4 if "vision_tower." in name else 1e-3
        decay = 0.0 if "bias" in name or "norm" in name or "layernorm" in name else 0.1
        assert rates[id(parameter)] == (rate, decay), name
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the one the Trainer logs


def command_arguments(workspace, output, steps=2) -> list[str]:
    """`tokenpacker-train` arguments: a new model from the workspace's tower and language model, `steps` steps of 2
    scenes per process, a checkpoint at the last step."""
    return [
        "--vision-tower", str(workspace / "vision"),
        "--language-model", str(workspace / "text"),
        "--vision-feature-layer", "-1",
        "--multi-level-feature-layers", "1", "2", "3", "4",
        "--projector-num-heads", "4",
        "--data-path", str(workspace / "data" / "train.json"),
        "--output-dir", str(output),
        "--per-device-train-batch-size", "2",
        "--max-steps", str(steps),
        "--save-steps", str(steps),
        "--use-cpu",
        "--report-to", "none",
        "--disable-tqdm", "true",
    ]  # fmt: skip

def test_options_read_with_dashes_and_with_underscores_alike(workspace, capsys):
    dashes = command_arguments(workspace, workspace / "out") + ["--lora-enable", "--learning-rate", "0.5"]
    underscores = [
        "--" + argument[2:].replace("-", "_") if argument.startswith("--") else argument for argument in dashes
    ]
    assert "--max_steps" in underscores and "--per_device_train_batch_size" in underscores
    parsed = [argument_parser().parse_args_into_dataclasses(args=arguments) for arguments in (dashes, underscores)]
    assert parsed[0][:2] == parsed[1][:2]  # model and data arguments
    assert parsed[0][2].to_dict() == parsed[1][2].to_dict() and parsed[0][2].max_steps == 2
    assert parsed[0][0].lora_enable and parsed[0][2].learning_rate == 0.5

    with pytest.raises(SystemExit):
        argument_parser().parse_args(["--help"])
    usage = capsys.readouterr().out
    assert "--max-steps MAX_STEPS, --max_steps MAX_STEPS" in usage  # dashes first, underscores as the alias
    assert "--model-name-or-path MODEL_NAME_OR_PATH, --model_name_or_path" in usage


def test_activation_checkpointing_argument_turns_on_the_installed_librarys_checkpointing():
    parser = HfArgumentParser(TokenPackerTrainingArguments)
    (on,) = parser.parse_args_into_dataclasses(["--output-dir", "out", "--use-cpu", "--activation-checkpointing"])
    (off,) = parser.parse_args_into_dataclasses(["--output-dir", "out", "--use-cpu"])
    name = training_activation_checkpointing_argument()
    assert getattr(on, name) is True and not getattr(off, name)


def test_the_command_saves_checkpoints_that_reload(workspace):
    output = workspace / "cli"
    main([*command_arguments(workspace, output), "--activation-checkpointing", "--bf16"])
    checkpoint = TokenPackerForConditionalGeneration.from_pretrained(output / "checkpoint-2")
    final = TokenPackerForConditionalGeneration.from_pretrained(output)
    for name, weight in final.state_dict().items():
        assert torch.equal(weight, checkpoint.state_dict()[name]), name
    initial, processor = new_model(workspace)
    assert not torch.equal(final.lm_head.weight, initial.lm_head.weight)  # stage 2 trained the language model
    reloaded = TokenPackerProcessor.from_pretrained(output / "checkpoint-2")
    scene = render_scene("test", 0)
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nHow many shapes are there?"}], add_generation_prompt=True, tokenize=False)
    assert torch.equal(reloaded(images=scene.image, text=prompt)["input_ids"], processor(images=scene.image, text=prompt)["input_ids"])


STEPS = 4  # the two-process runs: 4 steps of 2 scenes per process are 2 epochs of the 8 training scenes
CONFIGS = Path(tokenpacker.__file__).parent / "configs"
REPORT = re.compile(
    r"Parameter elements held by each of the 2 processes: ([\d,]+), ([\d,]+) of ([\d,]+); "
    r"of the largest parameter, (\S+): ([\d,]+), ([\d,]+) of ([\d,]+)"
)


def launch(launcher: list[str], arguments: list[str], **env) -> subprocess.CompletedProcess:
    """Runs `tokenpacker.training` with `arguments` under a launcher of 2 processes, one thread each."""
    command = [*launcher, "-m", "tokenpacker.training", *arguments]
    return subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=600
    )


def accelerate_launch(config: str, *options: str) -> list[str]:
    """`accelerate launch` with a shipped configuration on 2 processes, meeting on a free port (not the default
    29500, which another run on the machine may hold)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    return [
        str(accelerate), "launch", "--config_file", str(CONFIGS / config), "--num_processes", "2",
        "--main_process_port", str(free_port()), *options,
    ]  # fmt: skip


def distributed_arguments(workspace, output) -> list[str]:
    """The runs compared with each other: STEPS steps at a learning rate that moves the loss, each step logged."""
    return [*command_arguments(workspace, output, STEPS), "--learning-rate", "2e-3", "--logging-steps", "1"]


@dataclass
class HeldElements:
    """The numbers `tokenpacker-train` prints when training starts on 2 processes."""

    held: list[int]
    total: int
    largest: str
    largest_held: list[int]
    largest_total: int

    @classmethod
    def from_output(cls, stdout: str) -> "HeldElements":
        match = REPORT.search(stdout)
        assert match, stdout[-3000:]
        numbers = [int(group.replace(",", "")) for group in match.groups()[:3] + match.groups()[4:]]
        return cls(numbers[:2], numbers[2], match.group(4), numbers[3:5], numbers[5])

    def assert_halved(self):
        assert sum(self.held) == self.total and all(abs(held - self.total / 2) < 0.01 * self.total for held in self.held)
        assert self.largest_held == [self.largest_total // 2] * 2  # its 32 rows, 16 on each process


def loss_history(output) -> list[float]:
    """The loss and gradient norm of every step, from the last checkpoint's trainer state."""
    state = json.loads((output / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS and state["epoch"] == 2.0
    return [entry[key] for entry in state["log_history"] if "loss" in entry for key in ("loss", "grad_norm")]


def scene_logits(model, processor) -> torch.Tensor:
    scene = render_scene("test", 0)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat colour is the shape?"}], add_generation_prompt=True, tokenize=False
    )
    with torch.no_grad():
        return model.eval()(**processor(images=scene.image, text=prompt, return_tensors="pt")).logits


def assert_reloads_like(output, reference_logits):
    """The final folder reloads with its processor and gives `reference_logits`; the last checkpoint holds the same
    weights."""
    final = TokenPackerForConditionalGeneration.from_pretrained(output)
    torch.testing.assert_close(scene_logits(final, TokenPackerProcessor.from_pretrained(output)), reference_logits)
    checkpoint = TokenPackerForConditionalGeneration.from_pretrained(output / f"checkpoint-{STEPS}")
    for name, weight in final.state_dict().items():
        assert torch.equal(weight, checkpoint.state_dict()[name]), name


@pytest.fixture(scope="module")
def data_parallel_run(workspace):
    """`torchrun --nproc_per_node 2` (DDP over gloo on CPU): the reference of the sharded runs."""
    output = workspace / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = launch(launcher, distributed_arguments(workspace, output))
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout


def test_the_command_trains_data_parallel_on_two_processes(workspace, data_parallel_run):
    """Each step takes a batch on each process, so 4 steps of 2 scenes per process make 2 epochs of the 8 training
    scenes; every process holds the whole model; the checkpoint and the final folder reload."""
    output, stdout = data_parallel_run
    report = HeldElements.from_output(stdout)
    assert report.held == [report.total] * 2 and report.largest_held == [report.largest_total] * 2
    assert len(loss_history(output)) == 2 * STEPS
    final = TokenPackerForConditionalGeneration.from_pretrained(output)
    initial, processor = new_model(workspace)
    assert not torch.equal(final.lm_head.weight, initial.lm_head.weight)
    logits = scene_logits(final, processor)
    assert (logits - scene_logits(initial, processor)).abs().max() > 0.1  # the comparisons below are not trivial
    assert_reloads_like(output, logits)


def test_fsdp_shards_the_model_and_trains_like_data_parallel(workspace, data_parallel_run):
    """The shipped fsdp.yaml on 2 CPU processes (gloo, float32): each process holds half of the parameters, the
    losses and gradient norms are DDP's, and the gathered checkpoint and final folder reload as DDP's model."""
    ddp_output, _ = data_parallel_run
    output = workspace / "fsdp"
    launcher = accelerate_launch("fsdp.yaml", "--mixed_precision", "no")
    result = launch(launcher, [*distributed_arguments(workspace, output), "--use-cpu"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = HeldElements.from_output(result.stdout)
    report.assert_halved()
    assert loss_history(output) == pytest.approx(loss_history(ddp_output), rel=1e-5)
    ddp_model = TokenPackerForConditionalGeneration.from_pretrained(ddp_output)
    assert_reloads_like(output, scene_logits(ddp_model, TokenPackerProcessor.from_pretrained(ddp_output)))


def test_fsdp_stage_1_trains_the_projector_alone(workspace):
    """fsdp.yaml as shipped (bfloat16 compute) with --stage 1: the frozen tower and language model are sharded in
    units of their own, the projector trains in its unit, and every frozen weight is saved unchanged."""
    output = workspace / "fsdp_stage1"
    arguments = [*command_arguments(workspace, output), "--stage", "1", "--seed", "0"]
    result = launch(accelerate_launch("fsdp.yaml"), arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    HeldElements.from_output(result.stdout).assert_halved()
    trained = TokenPackerForConditionalGeneration.from_pretrained(output).state_dict()
    torch.manual_seed(0)
    initial, _ = new_model(workspace)
    changed = {name for name, weight in initial.state_dict().items() if not torch.equal(weight, trained[name])}
    projector = {name for name in trained if name.startswith("model.multi_modal_projector.")}
    assert changed and changed <= projector


def test_fsdp_wraps_classes_that_the_model_holds():
    """FSDP wraps each class of `_no_split_modules` as a unit and fails on a class the model does not hold; the
    tower's own list names its family's text embeddings."""
    from .builders import tiny_config

    model = TokenPackerForConditionalGeneration(tiny_config())
    held = {type(module).__name__ for module in model.modules()}
    assert {"TokenPackerProjector", "CLIPEncoderLayer", "LlamaDecoderLayer"} <= model._no_split_modules <= held


def test_processes_that_cannot_train_together_are_refused(workspace):
    """fsdp.yaml on a machine without a GPU and without --use-cpu: the 2 processes would each train alone and write
    the same folder; each stops with one clear error before writing anything."""
    output = workspace / "alone"
    arguments = [argument for argument in command_arguments(workspace, output) if argument != "--use-cpu"]
    result = launch(accelerate_launch("fsdp.yaml"), arguments, CUDA_VISIBLE_DEVICES="")
    assert result.returncode != 0
    message = (
        "tokenpacker-train: error: 2 processes were launched (WORLD_SIZE=2) but they do not train together: "
        "no GPU was found for them. On the CPU add --use-cpu, or --ddp-backend gloo under a DeepSpeed configuration"
    )
    assert result.stderr.count(message) == 2, result.stderr[-3000:]
    assert not output.exists()


def test_use_cpu_under_a_deepspeed_launch_is_refused(workspace, monkeypatch):
    """accelerate turns DeepSpeed off for --use-cpu and would train with plain data parallelism instead."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(SystemExit) as exit_info:
        main(command_arguments(workspace, workspace / "deepspeed_cpu"))
    assert exit_info.value.code == (
        "tokenpacker-train: error: --use-cpu turns DeepSpeed off: leave it out and add --ddp-backend gloo to run "
        "DeepSpeed on the CPU"
    )
    assert not (workspace / "deepspeed_cpu").exists()


@pytest.mark.parametrize(
    "name, settings",
    [
        ("fsdp.yaml", {"distributed_type": "FSDP", "fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT"}),
        ("deepspeed_zero2.yaml", {"distributed_type": "DEEPSPEED", "zero_stage": 2}),
        ("deepspeed_zero3.yaml", {"distributed_type": "DEEPSPEED", "zero_stage": 3, "zero3_init_flag": False}),
    ],
)
def test_the_shipped_configurations_load_in_accelerate(name, settings):
    """Where DeepSpeed is not installed (the launches below are skipped) the configurations still load as accelerate
    reads them."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    loaded = {"distributed_type": config.distributed_type.value, **config.fsdp_config, **config.deepspeed_config}
    assert {key: loaded[key] for key in settings} == settings
    assert (config.mixed_precision, config.num_processes, config.use_cpu) == ("bf16", 8, False)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_like_data_parallel(workspace, data_parallel_run, stage):
    """The shipped deepspeed_zero{2,3}.yaml on 2 CPU processes (DeepSpeed's CPU accelerator over gloo, float32):
    ZeRO-2 keeps the whole weights in each process and one optimizer-state partition per process, ZeRO-3 halves the
    weights; the losses are DDP's and the final folder reloads as DDP's model."""
    pytest.importorskip("deepspeed")
    ddp_output, _ = data_parallel_run
    output = workspace / f"zero{stage}"
    launcher = accelerate_launch(f"deepspeed_zero{stage}.yaml", "--mixed_precision", "no")
    arguments = [argument for argument in distributed_arguments(workspace, output) if argument != "--use-cpu"]
    result = launch(launcher, [*arguments, "--ddp-backend", "gloo"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = HeldElements.from_output(result.stdout)
    if stage == 3:
        report.assert_halved()
    else:
        assert report.held == [report.total] * 2
    partitions = sorted(path.name for path in (output / f"checkpoint-{STEPS}" / f"global_step{STEPS}").iterdir())
    assert [name for name in partitions if name.endswith("optim_states.pt")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert loss_history(output) == pytest.approx(loss_history(ddp_output), rel=1e-5)
    ddp_model = TokenPackerForConditionalGeneration.from_pretrained(ddp_output)
    assert_reloads_like(output, scene_logits(ddp_model, TokenPackerProcessor.from_pretrained(ddp_output)))


def test_lora_trains_adapters_and_saves_a_merged_model(workspace):
    pytest.importorskip("peft")
    model_args = ModelArguments(
        vision_tower=str(workspace / "vision"), language_model=str(workspace / "text"), lora_enable=True, lora_r=4, **SETTINGS
    )
    data_args = DataArguments(data_path=str(workspace / "data" / "train.json"))
    torch.manual_seed(0)
    trainer = train(model_args, data_args, training_args(workspace, "lora", learning_rate=1e-2))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    merged = TokenPackerForConditionalGeneration.from_pretrained(workspace / "lora")
    torch.manual_seed(0)
    initial, _ = new_model(workspace)
    for name, weight in initial.state_dict().items():
        same = torch.equal(weight, merged.state_dict()[name])
        frozen_text = name.startswith("model.language_model.") and ("norm" in name or "embed_tokens" in name)
        if name.startswith("model.vision_tower.") or name.startswith("lm_head.") or frozen_text:
            assert same, name
    assert not torch.equal(merged.model.language_model.layers[0].self_attn.q_proj.weight, initial.model.language_model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(merged.model.multi_modal_projector.query_proj.weight, initial.model.multi_modal_projector.query_proj.weight)



def test_bf16_without_a_bfloat16_device_is_one_clear_error(workspace, monkeypatch):
    """The Trainer's rule: bfloat16 needs a GPU (or XLA device) that supports it, unless --use-cpu."""
    import tokenpacker.training as training

    monkeypatch.setattr(training, "is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.setattr(training, "is_torch_xla_available", lambda: False)
    arguments = [argument for argument in command_arguments(workspace, workspace / "bf16") if argument != "--use-cpu"]
    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, "--bf16"])
    assert exit_info.value.code == (
        "tokenpacker-train: error: --bf16 needs a GPU with bfloat16 support and this machine has none: "
        "leave out --bf16, or add --use-cpu to train on the CPU"
    )
    assert not (workspace / "bf16").exists()


def test_unknown_options_are_one_error_line(workspace):
    with pytest.raises(SystemExit) as exit_info:
        main([*command_arguments(workspace, workspace / "unknown"), "--no_such_option", "1"])
    assert exit_info.value.code == (
        "tokenpacker-train: error: Some specified arguments are not used by the HfArgumentParser: "
        "['--no_such_option', '1']"
    )
