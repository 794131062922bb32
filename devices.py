"""Devices, mixed precision, torch.distributed and seeds: where a run computes, and in what."""
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from files import UserError


def pick_device(name: str | None = None) -> torch.device:
    """The requested device, or the best available one (CUDA, then Apple MPS, then CPU)."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}': use cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' is not available on this machine (no CUDA): use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device '{name}' is not available on this machine (no Apple MPS): use --device cpu or auto")
    return device


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU computes in `dtype` natively: bf16 with AVX512-BF16 or AMX, fp16 with AMX-FP16.

    Elsewhere PyTorch emulates them, many times slower than fp32 (docs/performance.md, "Without native bf16").
    """
    features = {torch.bfloat16: ("avx512_bf16", "amx_tile"), torch.float16: ("amx_fp16",)}[dtype]
    return any(cpu_supports(feature) for feature in features)


def cpu_supports(feature: str) -> bool:
    """torch.cpu's check for an instruction-set extension ("avx512_bf16", "amx_tile", ...); False where this
    version of PyTorch has no such check."""
    return getattr(torch.cpu, f"_is_{feature}_supported", lambda: False)()


# The compute capability from which an NVIDIA GPU has tensor cores for a dtype: bf16 from Ampere
# (8.0), fp16 from Volta (7.0). Older GPUs emulate bf16 (torch.cuda.is_bf16_supported() still says
# yes) and run fp16 without tensor cores.
CUDA_NATIVE_FROM = {torch.bfloat16: (8, 0), torch.float16: (7, 0)}


def has_native(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `device` computes in `dtype` natively: for CUDA the GPU asked for, not the current one."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= CUDA_NATIVE_FROM[dtype]
    return device.type == "cpu" and cpu_has_native(dtype)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision: autocast dtype
PRECISION_HELP = ("autocast precision; auto = bf16 where the hardware computes it natively (CPUs with AVX512-BF16 "
                  "or AMX, GPUs of compute capability 8.0+), fp16 with loss scaling on GPUs of compute capability "
                  "7.x (fp16 tensor cores, no bf16), else fp32")


def precision_name(dtype: torch.dtype | None) -> str:
    """The --precision name of an autocast dtype (None: fp32)."""
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--precision` (None means plain fp32); see PRECISION_HELP for auto."""
    if precision == "auto":
        # fp16 only on GPUs: the CPUs that have it natively (AMX-FP16) have bf16 too
        candidates = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.bfloat16,)
        return next((dtype for dtype in candidates if has_native(dtype, device)), None)
    dtype = PRECISIONS[precision]
    if dtype is not None and device.type in ("cpu", "cuda") and not has_native(dtype, device):
        if device.type == "cpu":
            lacks = f"this CPU has no native {precision} arithmetic, so PyTorch emulates it, many times slower than fp32"
        else:
            major, minor = torch.cuda.get_device_capability(device)
            lacks = (f"this GPU (compute capability {major}.{minor}) has no {precision} tensor cores, so it runs "
                     f"slowly or emulated")
        print(f"warning: {lacks}; --precision auto picks {precision_name(autocast_dtype('auto', device))} here",
              file=sys.stderr)
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision in `dtype` on `device`, or plain fp32 for None: the one place autocast is set up."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun, even with one process: one device per local rank,
    and the process group from the environment (nccl on CUDA, gloo on CPU). A plain `python` run is
    rank 0 of 1, without a process group."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def barrier() -> None:
    """Wait for every process (a no-op outside torchrun)."""
    if dist.is_initialized():
        dist.barrier()


def gather(obj) -> list:
    """Every process's `obj`, in rank order (a list of one outside torchrun)."""
    if not dist.is_initialized():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
