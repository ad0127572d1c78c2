"""The one encode loop: sort by length, cut batches, pad on a side thread, run, restore order.

Every model family (dense, M3, rerankers) and every caller (the inference classes, Ray Data actors,
Serve replicas, evaluation) goes through :func:`run_batches`. It keeps no state between calls.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .tokenize import Features, collate

logger = logging.getLogger(__name__)

#: Pin host batches before copying them to a GPU (lets the copy overlap compute).
PIN_MEMORY = True

#: Padded tokens per forward pass on CPU when the caller sets no budget: a pass's activations then stay
#: in cache, which beats uncapped batches on CPU (figures: benchmarks/README.md, "CPU token cap").
CPU_TOKENS_PER_BATCH = 2048


def tokens_per_batch(max_tokens: int | None, device: str) -> int | None:
    """The token budget a pass runs under: ``max_tokens`` when given (0: none), else
    :data:`CPU_TOKENS_PER_BATCH` on CPU and none on an accelerator (where big passes fill the device)."""
    if max_tokens is not None:
        return max_tokens or None
    return CPU_TOKENS_PER_BATCH if device.startswith("cpu") else None


def plan_batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Row indices of each batch, longest texts first.

    ``batch_size`` caps rows per batch; ``max_tokens`` (optional) caps rows x padded width, so short
    texts travel in larger batches (token-budget batching).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Stable sort so equal lengths keep input order (deterministic batches).
    order = np.argsort(-lengths, kind="stable")
    batches = []
    i, n = 0, len(order)
    while i < n:
        rows = batch_size
        if max_tokens:
            width = max(int(lengths[order[i]]), 1)
            rows = max(1, min(batch_size, max_tokens // width))
        batches.append(order[i : i + rows])
        i += rows
    return batches


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _prefetch(make: Callable[[np.ndarray], dict], batches: list[np.ndarray], depth: int = 2) -> Iterator[tuple]:
    """Yield ``(rows, make(rows))`` with padding done on a worker thread, ``depth`` batches ahead."""
    if len(batches) <= 1:
        for rows in batches:
            yield rows, make(rows)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker():
        try:
            for rows in batches:
                if stop.is_set():
                    return
                q.put((rows, make(rows)))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer and re-raised there
            q.put(exc)
            return
        q.put(None)

    t = threading.Thread(target=worker, name="bge_ray-collate", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Drain so a blocked producer can see the stop flag and exit.
        while t.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


def run_batches(
    features: Features,
    forward: Callable[[dict[str, torch.Tensor]], Any],
    *,
    device: str,
    pad: dict[str, int],
    batch_size: int,
    max_tokens: int | None = None,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
    progress: bool = False,
    desc: str = "Inference",
) -> list[tuple[np.ndarray, Any]]:
    """Run ``forward`` over length-sorted padded batches of ``features`` on ``device``.

    Returns ``(row_indices, forward_output)`` per batch; callers scatter outputs back to input order.
    On out-of-memory a batch is split in half and the smaller size is kept for the rest of the call.
    """
    if len(features) == 0:
        return []
    batches = plan_batches(features.lengths, batch_size, max_tokens)
    on_cuda = device.startswith("cuda")

    def make(rows: np.ndarray) -> dict[str, torch.Tensor]:
        return collate(features, rows, pad, padding_side, pad_to_multiple_of, pin_memory=on_cuda and PIN_MEMORY)

    results: list[tuple[np.ndarray, Any]] = []
    row_cap = batch_size
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(features), desc=desc, unit="text")
    with torch.inference_mode():
        for rows, cpu_batch in _prefetch(make, batches):
            start = 0
            while start < len(rows):
                stop = min(start + row_cap, len(rows))
                part = {k: v[start:stop].to(device, non_blocking=True) for k, v in cpu_batch.items()}
                try:
                    out = forward(part)
                except (torch.OutOfMemoryError, RuntimeError) as exc:
                    if not _is_oom(exc) or stop - start == 1:
                        raise
                    del part
                    if on_cuda:
                        torch.cuda.empty_cache()
                    row_cap = max(1, (stop - start) // 2)
                    logger.warning("out of memory at %d rows; continuing with batches of %d", stop - start, row_cap)
                    continue
                results.append((rows[start:stop], out))
                start = stop
            if bar is not None:
                bar.update(len(rows))
    if bar is not None:
        bar.close()
    return results


def scatter_rows(results: list[tuple[np.ndarray, torch.Tensor]], n: int) -> torch.Tensor:
    """Concatenate per-batch row tensors (on any device) back into input order, on the CPU."""
    rows = np.concatenate([r for r, _ in results])
    # Outputs may sit on several devices (multi-GPU); gather on the CPU.
    stacked = torch.cat([o.float().cpu() for _, o in results])
    out = torch.empty((n, *stacked.shape[1:]), dtype=stacked.dtype)
    out[torch.from_numpy(rows)] = stacked
    return out


def scatter_items(results: list[tuple[np.ndarray, list]], n: int) -> list:
    """Like :func:`scatter_rows` for per-example Python objects (lexical weights, ColBERT arrays)."""
    out: list = [None] * n
    for rows, items in results:
        for r, item in zip(rows, items, strict=True):
            out[int(r)] = item
    return out
