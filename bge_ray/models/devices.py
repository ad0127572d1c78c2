"""Device and dtype resolution shared by every model class."""

from __future__ import annotations

import ctypes
import sys

import torch

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(block_bytes: int = 32 << 20, keep_bytes: int = 256 << 20) -> bool:
    """For a process that runs CPU inference (our actors and replicas): glibc serves blocks up to
    ``block_bytes`` from its heap and keeps up to ``keep_bytes`` freed, instead of mapping fresh pages
    for each activation tensor and unmapping them when the tensor is freed (every page of the next
    one then faults on first touch; figures in benchmarks/README.md, "Allocator").
    Returns False where it does not apply (not Linux / glibc); the process is then left as it was.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(
        mallopt(param, value) == 1
        for param, value in ((_M_MMAP_THRESHOLD, block_bytes), (_M_TRIM_THRESHOLD, keep_bytes), (_M_TOP_PAD, 64 << 20))
    )


def resolve_devices(devices: str | int | list[str] | list[int] | None) -> list[str]:
    """Normalise FlagEmbedding's ``devices`` argument to a list of torch device strings.

    ``None`` means every visible GPU, else ``["cpu"]``; ints are CUDA ordinals.
    """
    if devices is None:
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return ["mps"]
        return ["cpu"]
    if isinstance(devices, (str, int)):
        devices = [devices]  # type: ignore[list-item]
    if not isinstance(devices, (list, tuple)) or not devices:
        raise ValueError(f"devices must be a string, an int or a non-empty list of them, got {devices!r}")
    out = []
    for d in devices:
        if isinstance(d, bool) or not isinstance(d, (str, int)):
            raise ValueError(f"devices entries must be strings or ints, got {d!r}")
        out.append(f"cuda:{d}" if isinstance(d, int) else d)
    return out


def resolve_dtype(use_fp16: bool, use_bf16: bool, device: str) -> torch.dtype:
    """Half precision only where it helps: CPU kernels run fp32 (as FlagEmbedding does)."""
    if device.startswith("cpu"):
        return torch.float32
    if use_bf16:
        return torch.bfloat16
    if use_fp16:
        return torch.float16
    return torch.float32
