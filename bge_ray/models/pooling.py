"""Sentence pooling over a transformer's last hidden state."""

from __future__ import annotations

import torch

POOLING_METHODS = ("cls", "mean", "last_token")


def check_pooling(method: str) -> str:
    if method not in POOLING_METHODS:
        raise ValueError(f"pooling_method must be one of {POOLING_METHODS}, got {method!r}")
    return method


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pool ``hidden`` [batch, seq, dim] to [batch, dim]; padding never contributes."""
    if method == "cls":
        return hidden[:, 0]
    if method == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / attention_mask.sum(dim=1, keepdim=True).to(hidden.dtype)
    if method == "last_token":
        # Left padding puts every sequence's last token in the final column.
        if bool((attention_mask[:, -1] == 1).all()):
            return hidden[:, -1]
        last = attention_mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling_method must be one of {POOLING_METHODS}, got {method!r}")
