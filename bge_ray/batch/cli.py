"""Argument helpers shared by the job scripts (FlagEmbedding-style flags)."""

from __future__ import annotations

from collections.abc import Sequence

#: Help of every job's token-budget flag (the default lives in ``bge_ray.models.encode.tokens_per_batch``).
MAX_TOKENS_HELP = "padded tokens per forward pass (default: 2048 on CPU, which keeps activations in cache; none on GPU; 0: no cap)"


def hf_bool(text: str) -> bool:
    """argparse type for HfArgumentParser-style booleans: ``--flag``, ``--flag True``, ``--flag false``."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "t"):
        return True
    if value in ("0", "false", "no", "n", "f"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def actors_for_devices(devices: Sequence[str] | None) -> tuple[int | None, bool | None]:
    """FlagEmbedding's ``--devices cuda:0 cuda:1`` -> (num_actors, use_gpu); None leaves both to Ray."""
    if not devices:
        return None, None
    gpu = [d for d in devices if str(d).startswith("cuda") or str(d).isdigit()]
    if gpu and len(gpu) != len(devices):
        raise ValueError(f"--devices mixes GPUs and other devices: {list(devices)}")
    return len(devices), bool(gpu)
