"""Held-out accuracy of TokenPacker against an average-pooling projector with the same number of tokens.

The baseline is the paper's "Avg-pool" row: the patch features averaged over each s x s region, then the same
two-layer MLP into the language model. It is trained with exactly the `tokenpacker-train` arguments given here, from
the same base models and data, and both models answer the held-out scenes of `tokenpacker.shapes`:

    python benchmarks/avg_pool_baseline.py <the tokenpacker-train arguments of the TokenPacker model> \\
        --test_path runs/shapes/test.json --tokenpacker_model runs/tiny-shapes

The baseline is trained in memory and not saved (its projector is not a TokenPacker one); the scores are printed and
written to `<output_dir>/accuracy.json`.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import HfArgumentParser

from tokenpacker import TokenPackerForConditionalGeneration, TokenPackerProcessor
from tokenpacker.modeling.modeling_tokenpacker import TokenPackerMLP
from tokenpacker.shapes import evaluate
from tokenpacker.training import (
    DataArguments,
    ModelArguments,
    TokenPackerTrainingArguments,
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


def main(argv: list[str]):
    parser = HfArgumentParser((ModelArguments, DataArguments, TokenPackerTrainingArguments, BenchmarkArguments))
    model_args, data_args, training_args, benchmark_args = parser.parse_args_into_dataclasses(args=argv)
    model, processor = load_model_and_processor(model_args)
    model.model.multi_modal_projector = AvgPoolProjector(model.config)
    model.model.multi_modal_projector.apply(model._init_weights)
    make_trainer(model, processor, model_args, data_args, training_args).train()

    accuracy = {"avg_pool": evaluate(model, processor, benchmark_args.test_path)}
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
