"""Contrastive and distillation losses for embedder training (FlagEmbedding's definitions), with
cross-worker negatives that give the same gradients as one worker holding the whole global batch.

Scores are ``q @ p.T / temperature``; passages come in groups of ``G`` per query, positive first.

Gradient scaling across workers: with cross-worker negatives every rank computes the *same* global
loss from gathered embeddings, but only its own slice carries gradient. Summing the ranks'
gradients gives the full gradient; DDP averages them instead, so the global part of the loss is
multiplied by the world size before ``backward`` (``LossOutput.backward``). Parts computed on the
local slice only (the ``kl_div`` distillation term) are already averaged correctly by DDP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    backward: torch.Tensor | None  # what to call .backward() on (scaled for DDP averaging); None: done
    value: torch.Tensor  # the loss as defined, detached (same on every rank once reduced)
    scores: torch.Tensor | None = None


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' ``t`` concatenated in rank order; the local slice keeps its autograd graph."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.detach())
    parts[rank] = t
    return torch.cat(parts, dim=0)


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return t.detach()
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / size


def group_scores(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """From [Q, Q*G] all-pairs scores to [Q, G]: each query against its own group."""
    q = scores.size(0)
    idx = torch.arange(q, device=scores.device).unsqueeze(1) * group_size + torch.arange(group_size, device=scores.device)
    return scores.gather(1, idx)


def kl_div_loss(teacher_targets: torch.Tensor, student_scores: torch.Tensor) -> torch.Tensor:
    """FlagEmbedding's ``kl_div``: cross-entropy of the student's group softmax against the teacher's."""
    return -torch.mean(torch.sum(torch.log_softmax(student_scores, dim=-1) * teacher_targets, dim=-1))


def m3_kd_loss(teacher_targets: torch.Tensor, scores: torch.Tensor, group_size: int,
               first: torch.Tensor | None = None) -> torch.Tensor:
    """FlagEmbedding's ``m3_kd_loss``: for each group member ``i`` in turn, cross-entropy with member
    ``i`` as the target while members ``< i`` are masked out, weighted by the teacher's probability.
    ``first``: column of each query's group start (default ``q * group_size``)."""
    if first is None:
        first = torch.arange(scores.size(0), device=scores.device) * group_size
    loss = scores.new_zeros(())
    mask = torch.zeros_like(scores)
    for i in range(group_size):
        target = first + i
        ce = F.cross_entropy(scores + mask, target, reduction="none")
        loss = loss + torch.mean(teacher_targets[:, i] * ce)
        mask = mask.scatter(1, target.unsqueeze(1), torch.finfo(scores.dtype).min)
    return loss


class ContrastiveLoss:
    """InfoNCE over groups, in-batch and (optionally) cross-worker negatives, with optional teacher
    distillation. ``no_in_batch_neg`` batches score each query against its own group only."""

    def __init__(self, temperature: float = 0.02, negatives_cross_device: bool = False, kd_loss_type: str = "kl_div"):
        if kd_loss_type not in ("kl_div", "m3_kd_loss"):
            raise ValueError(f"kd_loss_type must be kl_div or m3_kd_loss, got {kd_loss_type!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.cross_device = negatives_cross_device
        self.kd_loss_type = kd_loss_type

    def scores(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return q @ p.transpose(0, 1) / self.temperature

    def __call__(self, q: torch.Tensor, p: torch.Tensor, teacher_scores: torch.Tensor | None = None,
                 no_in_batch_neg: bool = False, score_fn=None) -> LossOutput:
        """``q`` [B, d], ``p`` [B*G, d]; ``teacher_scores`` [B, G] raw teacher scores (softmaxed here).
        ``score_fn(q, p) -> [Q, P]`` replaces the dot product (M3's sparse and ColBERT scores)."""
        score_fn = score_fn or self.scores
        group = p.size(0) // q.size(0)
        targets = None if teacher_scores is None else torch.softmax(teacher_scores.detach().float(), dim=-1)
        if no_in_batch_neg:
            local = group_scores(score_fn(q, p), group)  # same definition, the off-group columns unused
            zero = torch.zeros(q.size(0), dtype=torch.long, device=q.device)
            if targets is None:
                loss = F.cross_entropy(local, zero)
            elif self.kd_loss_type == "kl_div":
                loss = kl_div_loss(targets, local) + F.cross_entropy(local, zero)
            else:
                loss = m3_kd_loss(targets, local, group, first=zero)
            return LossOutput(loss, mean_across_ranks(loss), local)

        rank, size = world()
        if self.cross_device and size > 1:
            all_q, all_p = gather_with_grad(q), gather_with_grad(p)
        else:
            all_q, all_p, size = q, p, 1
        scores = score_fn(all_q, all_p)  # [W*B, W*B*G]
        first = torch.arange(all_q.size(0), device=q.device) * group
        if targets is not None and self.kd_loss_type == "m3_kd_loss":
            global_part = m3_kd_loss(gather_with_grad(targets) if size > 1 else targets, scores, group, first)
            local_part = None
        else:
            global_part = F.cross_entropy(scores, first)
            local_part = None
            if targets is not None:  # kl_div on this rank's queries against their own groups
                b = q.size(0)
                mine = group_scores(scores, group)[rank * b:(rank + 1) * b] if size > 1 else group_scores(scores, group)
                local_part = kl_div_loss(targets, mine)
        backward = global_part * size + (local_part if local_part is not None else 0.0)
        # Cross-worker, the global part is already the same on every rank; otherwise each rank has its own.
        value = global_part.detach() if size > 1 else mean_across_ranks(global_part)
        if local_part is not None:
            value = value + mean_across_ranks(local_part)
        return LossOutput(backward, value, scores)
