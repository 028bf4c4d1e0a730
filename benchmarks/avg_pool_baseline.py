"""Held-out accuracy of TokenPacker against an average-pooling projector with the same number of tokens.

The baseline is the paper's "Avg-pool" row: the patch features averaged over each s x s region, then the same
two-layer MLP into the language model. It is trained with exactly the `tokenpacker-train` arguments given here, from
the same base models and data, and both models answer the held-out scenes of `tokenpacker.shapes`:

    python benchmarks/avg_pool_baseline.py <the tokenpacker-train arguments of the TokenPacker model> \\
        --test-path runs/shapes/test.json --tokenpacker-model runs/tiny-shapes

The baseline is trained in memory and not saved (its projector is not a TokenPacker one); the scores are printed and
written to `<output_dir>/accuracy.json`.

Beside them, a linear probe tells whether the pooled features still hold the answers: a logistic regression (on the
features standardized over the probe's training scenes) of the colour, the shape and the position from the frozen
tower's features averaged as the baseline averages them, fitted on the training scenes train-0... and scored on the
held-out scenes test-0... (`--probe-train`, `--probe-test`; 0 skips the probe).
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import set_seed

from tokenpacker import TokenPackerForConditionalGeneration, TokenPackerProcessor
from tokenpacker.modeling.modeling_tokenpacker import TokenPackerMLP
from tokenpacker.shapes import COLOURS, KINDS, POSITIONS, attribute_labels, evaluate, render_scene
from tokenpacker.training import (
    DataArguments,
    ModelArguments,
    TokenPackerTrainingArguments,
    argument_parser,
    load_model_and_processor,
    make_trainer,
)


class AvgPoolProjector(nn.Module):
    """s x s average pooling of the patch grid, then Linear -> activation -> Linear to the language model's width."""

    def __init__(self, config):
        super().__init__()
        self.grid_size = config.patch_grid_size
        self.scale_factor = config.scale_factor
        text_size = config.text_config.hidden_size
        self.output_proj = TokenPackerMLP(config.vision_config.hidden_size, text_size, text_size, config.projector_hidden_act)

    def forward(self, patch_features: torch.Tensor, multi_level_features: torch.Tensor) -> torch.Tensor:
        # (crops, grid*grid, C) -> (crops, (grid/s)**2, C); the multi-level features are not used
        crops, _, channels = patch_features.shape
        patch_map = patch_features.view(crops, self.grid_size, self.grid_size, channels).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(patch_map, self.scale_factor).flatten(2).transpose(1, 2)
        return self.output_proj(pooled)


@dataclass
class BenchmarkArguments:
    test_path: str = field(metadata={"help": "Held-out single-question conversations (test.json of tokenpacker.shapes)."})
    tokenpacker_model: str | None = field(
        default=None, metadata={"help": "The TokenPacker model trained with the same arguments, scored alongside."}
    )
    probe_train: int = field(default=3000, metadata={"help": "Training scenes of the linear probe (0: no probe)."})
    probe_test: int = field(default=600, metadata={"help": "Held-out scenes the linear probe is scored on."})


def probe_classes() -> dict[str, list[str]]:
    """The answers the probe tells apart, per question kind."""
    return {"colour": sorted(COLOURS), "shape": list(KINDS), "position": [name for row in POSITIONS for name in row]}


@torch.no_grad()
def pooled_features(model, processor, split: str, count: int, batch_size: int = 100) -> tuple[torch.Tensor, dict]:
    """The average-pooled tower features of scenes 0..count-1 of `split`, flattened per scene, and their answers."""
    captured = []
    hook = model.model.multi_modal_projector.output_proj.register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].flatten(1))
    )
    labels = []
    try:
        for start in range(0, count, batch_size):
            scenes = [render_scene(split, index) for index in range(start, min(count, start + batch_size))]
            pixel_values = processor.image_processor([scene.image for scene in scenes], return_tensors="pt")["pixel_values"]
            model.model.get_image_features(pixel_values.to(model.device))
            labels.append(attribute_labels(scenes))  # colour, kind, position: the columns in probe_classes' order
    finally:
        hook.remove()
    labels = torch.cat(labels)
    return torch.cat(captured).float().cpu(), {name: labels[:, column] for column, name in enumerate(probe_classes())}


def linear_probe(model, processor, num_train: int, num_test: int) -> dict[str, float]:
    """Held-out accuracy of a logistic regression of each answer on the pooled features (L-BFGS, L2 1e-3)."""
    train_features, train_answers = pooled_features(model, processor, "train", num_train)
    test_features, test_answers = pooled_features(model, processor, "test", num_test)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    train_features, test_features = (train_features - mean) / std, (test_features - mean) / std
    accuracy = {}
    for name, labels in train_answers.items():
        classes = len(probe_classes()[name])
        weight = torch.zeros(train_features.shape[1], classes, requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(train_features @ weight + bias, labels) + 1e-3 * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            predicted = (test_features @ weight + bias).argmax(-1)
        accuracy[name] = (predicted == test_answers[name]).float().mean().item()
    # the spread of the pooled features over scenes, against their size: how much the shape moves them
    raw = test_features * std + mean
    accuracy["feature_spread_over_size"] = (raw.std(0).mean() / raw.abs().mean()).item()
    return accuracy


def main(argv: list[str]):
    parser = argument_parser(
        ModelArguments, DataArguments, TokenPackerTrainingArguments, BenchmarkArguments, prog="avg_pool_baseline.py"
    )
    model_args, data_args, training_args, benchmark_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)
    model, processor = load_model_and_processor(model_args)
    model.model.multi_modal_projector = AvgPoolProjector(model.config)
    model.model.multi_modal_projector.apply(model._init_weights)
    make_trainer(model, processor, model_args, data_args, training_args).train()

    accuracy = {"avg_pool": evaluate(model, processor, benchmark_args.test_path)}
    if benchmark_args.probe_train > 0:
        accuracy["avg_pool_feature_probe"] = linear_probe(
            model, processor, benchmark_args.probe_train, benchmark_args.probe_test
        )
    if benchmark_args.tokenpacker_model is not None:
        tokenpacker = TokenPackerForConditionalGeneration.from_pretrained(benchmark_args.tokenpacker_model)
        accuracy["tokenpacker"] = evaluate(
            tokenpacker, TokenPackerProcessor.from_pretrained(benchmark_args.tokenpacker_model), benchmark_args.test_path
        )
    output = Path(training_args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "accuracy.json").write_text(json.dumps(accuracy, indent=1))
    print(json.dumps(accuracy, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
