"""Where a script runs: the device, the distributed process group (torchrun), and mixed precision.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python script.py` is rank 0 of 1. NCCL on
GPUs, gloo on the CPU.
"""
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from cli import UserError

AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_device(name):
    """`--device`: 'auto' is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device cpu")
    return device


class RunContext:
    """Device, distributed rank and AMP settings of this process (torchrun sets RANK/WORLD_SIZE)."""

    def __init__(self, args):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        device = choose_device(args.device)
        if self.distributed and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0
        self.amp_dtype = AMP_DTYPES[getattr(args, "amp", "no")]
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def all_max(self, values):
        """Element-wise max of a list of floats over all ranks."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def all_true(self, flag):
        """A bool tensor on the device, True where it is True on every rank: an all-reduce queued on the device,
        no wait for the host (NCCL)."""
        if not self.distributed:
            return flag
        value = flag.to(torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value.bool()

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def raise_together(self, error):
        """Every rank's view of a step that may fail on some ranks: raises the local UserError `error`, or one that
        names another rank's failure, on every rank as soon as any rank has one (none hangs waiting for the rest)."""
        failed = self.all_max([1.0 if error is not None else 0.0])[0] > 0
        if error is not None:
            raise error
        if failed:
            raise UserError("another process of this run failed (its message says why); nothing more was written here")

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
