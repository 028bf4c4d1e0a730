"""Images per second of TokenPackerImageProcessor next to a plain implementation of the original procedure.

The plain side is the tests' reference (`tokenpacker.testing`): expand2square with PIL plus CLIP's image processor
('pad'); ToTensor, Normalize, the grid choice in torch, bilinear resizes and block slicing one by one ('slice'). Both
sides process the same images one at a time, in alternating rounds, and their crops are compared.

    .venv/bin/python benchmarks/image_processing.py [--seconds 3]
"""

import argparse
import time
from functools import partial

import torch

from tokenpacker import TokenPackerImageProcessor
from tokenpacker.testing import photo, reference_pad, reference_slice

CASES = [  # (image_aspect_ratio, max_slices, height, width)
    ("pad", 9, 480, 640),
    ("slice", 9, 1344, 1344),
    ("slice", 16, 1344, 1344),
    ("slice", 9, 768, 1024),
]


def images_per_second(process, images, seconds):
    """Images processed one at a time, in a loop of about `seconds`."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for image in images:
            process(image)
        count += len(images)
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per side and case")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side and case (best is kept)")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| mode | image (h x w) | crops | TokenPackerImageProcessor (img/s) | plain reference (img/s) | speed-up "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for mode, max_slices, height, width in CASES:
        images = [photo(height, width, seed=seed) for seed in range(2)]
        processor = TokenPackerImageProcessor(image_aspect_ratio=mode, max_slices=max_slices)
        reference = reference_pad if mode == "pad" else partial(reference_slice, max_slices=max_slices)

        outputs = processor(images[0])["pixel_values"]
        expected = reference_pad(images[0]) if mode == "pad" else reference_slice(images[0], max_slices)[0]
        difference = (outputs - expected).abs().max().item()
        ours = theirs = 0.0
        for _ in range(args.rounds):  # alternate so that both sides see the same machine load
            ours = max(ours, images_per_second(processor, images, args.seconds / args.rounds))
            theirs = max(theirs, images_per_second(reference, images, args.seconds / args.rounds))
        name = "pad" if mode == "pad" else f"slice, max_slices {max_slices}"
        print(f"| {name} | {height} x {width} | {outputs.shape[0]} | {ours:.1f} | {theirs:.1f} | "
              f"{ours / theirs:.2f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
