"""LM-Cocktail model merging: a weighted average of checkpoints of one architecture, with the weights
given or computed from a few examples of the target task (``softmax(-loss / temperature)`` over the
models' losses on them, LM-Cocktail's procedure).

Works on folders in the inference layout: the ``*.safetensors`` weights are averaged (in float32,
written back in the first model's dtype), M3's ``colbert_linear.pt`` / ``sparse_linear.pt`` heads too;
config, tokenizer and pooling files come from the first model. LoRA runs are merged after
``--save_merged_lora_model`` (their ``merged_model/`` folders).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

HEADS = ("colbert_linear.pt", "sparse_linear.pt")


class MergeError(ValueError):
    """Checkpoints that cannot be merged; the message names the models and the first mismatch."""


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    from .embedder import read_safetensors

    try:
        return read_safetensors(folder)
    except FileNotFoundError as exc:
        raise MergeError(f"{exc} (merge folders saved by save_pretrained)") from None


def merge_state_dicts(states: Sequence[dict], weights: Sequence[float], names: Sequence[str] | None = None) -> dict:
    """``sum_i weights[i] * states[i]`` key by key; every state must have the same keys and shapes."""
    names = list(names or [f"model {i}" for i in range(len(states))])
    if len(states) != len(weights):
        raise MergeError(f"{len(states)} models but {len(weights)} weights")
    if len(states) < 2:
        raise MergeError("merging needs at least two models")
    first = states[0]
    for name, state in zip(names[1:], states[1:], strict=True):
        if set(state) != set(first):
            extra = sorted(set(state) ^ set(first))[:3]
            raise MergeError(f"{names[0]} and {name} are different architectures (parameters differ: {extra})")
        for k, v in first.items():
            if state[k].shape != v.shape:
                raise MergeError(f"{names[0]} and {name} differ in {k}: {tuple(v.shape)} vs {tuple(state[k].shape)}")
    out = {}
    for k, v in first.items():
        if not v.is_floating_point():
            out[k] = v.clone()  # integer buffers (position ids) are not averaged
            continue
        acc = torch.zeros_like(v, dtype=torch.float32)
        for w, state in zip(weights, states, strict=True):
            acc += float(w) * state[k].float()
        out[k] = acc.to(v.dtype)
    return out


def mix_models(folders: Sequence[str], weights: Sequence[float], output_path: str) -> str:
    """Average ``folders`` with ``weights`` (summing to 1) into ``output_path`` (written to a temp
    folder, then renamed)."""
    from safetensors.torch import save_file

    if abs(sum(weights) - 1.0) > 1e-3:
        raise MergeError(f"weights must sum to 1, got {list(weights)} (sum {sum(weights):.4f})")
    merged = merge_state_dicts([load_weights(f) for f in folders], weights, folders)
    output_path = os.path.abspath(output_path.rstrip("/"))
    parent, name = os.path.split(output_path)
    os.makedirs(parent, exist_ok=True)
    # A temp folder of its own beside the output (two merges never share one), renamed into place;
    # an existing output is moved aside first and removed only once the new one is there.
    tmp = tempfile.mkdtemp(prefix=f".{name}.merge-", dir=parent)
    try:
        shutil.copytree(folders[0], tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json", "checkpoints",
                                                      "training_summary.json", "bge_ray_run.json", ".*", *HEADS))
        save_file({k: v.contiguous() for k, v in merged.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        present = [h for h in HEADS if all(os.path.isfile(os.path.join(f, h)) for f in folders)]
        for head in present:
            states = [torch.load(os.path.join(f, head), map_location="cpu", weights_only=True) for f in folders]
            torch.save(merge_state_dicts(states, weights, folders), os.path.join(tmp, head))
        old = None
        if os.path.exists(output_path):
            old = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
            os.replace(output_path, os.path.join(old, name))
        try:
            os.replace(tmp, output_path)
        except BaseException:
            if old is not None:
                os.replace(os.path.join(old, name), output_path)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("merged %s with weights %s -> %s", list(folders), [round(w, 4) for w in weights], output_path)
    return output_path


def weights_from_losses(losses: Sequence[float], temperature: float = 5.0) -> list[float]:
    """LM-Cocktail's weights: ``softmax(-loss / temperature)`` (lower loss on the examples, more weight)."""
    if temperature <= 0:
        raise MergeError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(-torch.tensor(losses, dtype=torch.float64) / temperature, dim=0).tolist()


def example_loss(folder: str, kind: str, examples: list[dict], max_length: int = 512, neg_number: int = 7,
                 batch_size: int = 16, seed: int = 0) -> float:
    """Mean loss of the model in ``folder`` on training-format examples (query, pos, neg): in-batch
    InfoNCE at temperature 0.05 for embedders (LM-Cocktail's), the group cross-entropy for rerankers."""
    from .data import GroupOptions, build_groups
    from .losses import ContrastiveLoss

    rows = [{**e, "slot": i, "file": "examples", "line": i + 1, "type": None, "prompt": None}
            for i, e in enumerate(examples)]
    opts = GroupOptions(train_group_size=neg_number + 1, seed=seed)
    total, n = 0.0, 0
    with torch.no_grad():
        if kind == "embedder":
            from bge_ray.models.auto import FlagAutoModel
            from bge_ray.models.embedder import FlagModel

            try:
                model = FlagAutoModel.from_finetuned(folder, devices="cpu", use_fp16=False, normalize_embeddings=True)
            except ValueError:  # a folder that names no pooling: cls, as LM-Cocktail scores embedders
                model = FlagModel(folder, pooling_method="cls", devices="cpu", use_fp16=False)
            loss_fn = ContrastiveLoss(0.05)
            for s in range(0, len(rows), batch_size):
                q, p, _ = build_groups(rows[s:s + batch_size], 0, opts)
                qe = torch.from_numpy(model.encode(q, max_length=max_length)).reshape(len(q), -1)
                pe = torch.from_numpy(model.encode(p, max_length=max_length)).reshape(len(p), -1)
                total += float(loss_fn(qe, pe).value) * len(q)
                n += len(q)
        elif kind == "reranker":
            from bge_ray.models.auto import FlagAutoReranker

            from .reranker import group_loss

            model = FlagAutoReranker.from_finetuned(folder, devices="cpu", use_fp16=False)
            for s in range(0, len(rows), batch_size):
                q, p, _ = build_groups(rows[s:s + batch_size], 0, opts)
                g = len(p) // len(q)
                scores = model.compute_score([(qq, pp) for i, qq in enumerate(q) for pp in p[i * g:(i + 1) * g]],
                                             max_length=max_length)
                total += float(group_loss(torch.tensor(scores, dtype=torch.float32), g)) * len(q)
                n += len(q)
        else:
            raise MergeError(f"model_type must be embedder or reranker for weights from examples, got {kind!r}")
    return total / max(n, 1)


def mix_models_with_data(folders: Sequence[str], kind: str, examples: list[dict], output_path: str,
                         temperature: float = 5.0, **loss_kw) -> tuple[str, list[float], list[float]]:
    """Weights from the models' losses on ``examples``, then :func:`mix_models`; returns
    (output path, weights, losses)."""
    losses = [example_loss(f, kind, examples, **loss_kw) for f in folders]
    weights = weights_from_losses(losses, temperature)
    return mix_models(folders, weights, output_path), weights, losses
