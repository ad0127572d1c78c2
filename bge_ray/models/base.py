"""State and plumbing shared by every inference class: loading, devices, replicas, instructions."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .devices import resolve_devices, resolve_dtype
from .encode import run_batches, tokens_per_batch
from .loading import load_hf_model, load_tokenizer, resolve_model_path
from .tokenize import Features

logger = logging.getLogger(__name__)


def format_instruction(instruction_format: str, instruction: str, text: str) -> str:
    """``instruction_format.format(instruction, text)``; a literal ``\\n`` in the format means newline."""
    return instruction_format.replace("\\n", "\n").format(instruction, text)


class InferenceModel:
    """A tokenizer plus one model replica per target device.

    Subclasses set ``auto_class`` (the transformers Auto class to load with) and implement their
    encode / score methods on top of :meth:`_run`.
    """

    auto_class: Any = None  # transformers.AutoModel unless a subclass says otherwise

    def __init__(
        self,
        model_name_or_path: str | None,
        use_fp16: bool = True,
        use_bf16: bool = False,
        devices: str | int | list | None = None,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 256,
        max_tokens_per_batch: int | None = None,
        load_weights: bool = True,
        **load_kwargs: Any,
    ):
        self.model_name_or_path = model_name_or_path
        self.model_path = resolve_model_path(model_name_or_path, cache_dir=cache_dir)
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.target_devices = resolve_devices(devices)
        self.batch_size = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.trust_remote_code = trust_remote_code
        self.dtype = resolve_dtype(use_fp16, use_bf16, self.target_devices[0])
        self.tokenizer = self._load_tokenizer()
        # load_weights=False: the tokenizer side only, for the CPU stage that tokenises for the actors.
        self.model = self._load_model(**load_kwargs) if load_weights else None
        self._replicas: dict[str, torch.nn.Module] = {}

    # -- loading (subclasses override to add heads or change classes) --------------------------
    def _load_tokenizer(self):
        return load_tokenizer(self.model_path, trust_remote_code=self.trust_remote_code)

    def _load_model(self, **kwargs):
        return load_hf_model(
            self.model_path, self.auto_class, dtype=self.dtype, trust_remote_code=self.trust_remote_code, **kwargs
        )

    # -- devices --------------------------------------------------------------------------------
    def _replica(self, device: str) -> torch.nn.Module:
        """The model on ``device``: the first device holds ``self.model``, others get copies."""
        if device not in self._replicas:
            if not self._replicas:
                model = self.model
            else:
                model = copy.deepcopy(self.model)
            dtype = resolve_dtype(self.use_fp16, self.use_bf16, device)
            self._replicas[device] = model.to(device=device, dtype=dtype).eval()
        return self._replicas[device]

    def _run(
        self,
        features: Features,
        make_forward: Callable[[torch.nn.Module, str], Callable[[dict], Any]],
        batch_size: int,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        desc: str = "Inference",
    ) -> list[tuple[np.ndarray, Any]]:
        """Run batches over all target devices; with several, rows are dealt out in length order."""
        from .tokenize import pad_values

        pad = pad_values(self.tokenizer)
        progress = len(features) >= max(batch_size, 1024)

        def on(device: str, sub: Features, index: np.ndarray | None):
            model = self._replica(device)
            res = run_batches(
                sub,
                make_forward(model, device),
                device=device,
                pad=pad,
                batch_size=batch_size,
                max_tokens=tokens_per_batch(self.max_tokens_per_batch, device),
                padding_side=padding_side,
                pad_to_multiple_of=pad_to_multiple_of,
                progress=progress and index is None,
                desc=desc,
            )
            return res if index is None else [(index[r], o) for r, o in res]

        devices = self.target_devices
        if len(devices) == 1 or len(features) < 2 * batch_size:
            return on(devices[0], features, None)
        # Deal rows out in length order so every device gets the same token load.
        order = np.argsort(-features.lengths, kind="stable")
        parts = []
        for d in range(len(devices)):
            idx = order[d :: len(devices)]
            sub = Features({k: [v[i] for i in idx] for k, v in features.columns.items()}, features.lengths[idx])
            parts.append((devices[d], sub, idx))
        for device in devices:  # replicate before threads start
            self._replica(device)
        with ThreadPoolExecutor(len(devices)) as pool:
            outs = list(pool.map(lambda p: on(*p), parts))
        return [item for out in outs for item in out]

    def _run_items(
        self,
        items: list,
        prepare: Callable[[list], Features],
        make_forward: Callable[[torch.nn.Module, str], Callable[[dict], Any]],
        batch_size: int,
        **run_kwargs: Any,
    ) -> tuple[list[tuple[np.ndarray, Any]], np.ndarray]:
        """Tokenise (``prepare``) and run ``items``; returns the batch results and every item's length.

        On an accelerator the items go in chunks and the next chunk is tokenised on a thread while the
        current one runs: tokenisation then costs no wall time (on a GPU it takes as long as the
        model). Each chunk is still length-sorted, so padding barely grows. On CPU, where the model
        needs every core and dwarfs tokenisation, one global sort is better.
        """
        n = len(items)
        chunk = self._chunk_size(n, batch_size)
        if chunk >= n:
            features = prepare(items)
            return self._run(features, make_forward, batch_size, **run_kwargs), features.lengths
        starts = list(range(0, n, chunk))
        results: list[tuple[np.ndarray, Any]] = []
        lengths = np.zeros(n, dtype=np.int64)
        with ThreadPoolExecutor(1, thread_name_prefix="bge_ray-tokenize") as pool:
            pending = pool.submit(prepare, items[: chunk])
            for i, start in enumerate(starts):
                features = pending.result()
                if i + 1 < len(starts):
                    nxt = starts[i + 1]
                    pending = pool.submit(prepare, items[nxt : nxt + chunk])
                lengths[start : start + len(features)] = features.lengths
                for rows, out in self._run(features, make_forward, batch_size, **run_kwargs):
                    results.append((rows + start, out))
        return results, lengths

    def _chunk_size(self, n: int, batch_size: int) -> int:
        if all(d.startswith("cpu") for d in self.target_devices) or n <= 4 * batch_size:
            return n
        # Small first chunks start the accelerator early; beyond 16k texts sorting gains nothing.
        return max(4 * batch_size, min(16384, -(-n // 4)))

    def stop_self_pool(self) -> None:
        """FlagEmbedding API: release device memory (there is no process pool to stop here)."""
        for device, model in list(self._replicas.items()):
            if device != "cpu":
                model.to("cpu")
        self._replicas.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def as_list(texts: str | Sequence[str], what: str = "sentences") -> tuple[list[str], bool]:
    """Accept one string or a sequence of them; report whether a single string came in."""
    if isinstance(texts, str):
        return [texts], True
    if texts is None:
        raise TypeError(f"{what} is None, expected a string or a list of strings")
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    if not isinstance(texts, Sequence):
        texts = list(texts)
    return list(texts), False
