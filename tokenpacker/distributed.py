"""What the package's commands share when they run as several processes (`torchrun`, `accelerate launch`)."""

import torch


def end_process_group():
    """Once every process is done, takes down the process group of a launch with several processes (nothing to do
    otherwise). Left to the interpreter's exit, gloo's threads could outlive their process group and abort the process
    ("terminate called without an active exception") after a successful run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
