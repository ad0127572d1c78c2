"""Gradient caching (Gao et al., 2021): a contrastive step whose memory no longer grows with the
batch. Embed every sub-batch without a graph, take the loss and its gradient with respect to the
embeddings, then re-run each sub-batch with a graph and back-propagate its slice of that gradient.
The parameter gradients equal those of one big forward/backward (same loss, same negatives); only
one sub-batch's activations are alive at a time. Dropout is replayed: each sub-batch's second pass
restores the random state of its first.

Under DDP the re-runs go around DDP's forward (it allows one backward per forward), so the gradients
are averaged across workers here, once per step, as DDP would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _split(features: dict, size: int) -> list[dict]:
    n = next(iter(features.values())).shape[0]
    return [{k: v[s:s + size] for k, v in features.items()} for s in range(0, n, size)]


class _RngState:
    """CPU (and current CUDA device) random state, to replay a sub-batch's dropout."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def replay(self):
        devices = [torch.cuda.current_device()] if self.cuda is not None else []
        ctx = torch.random.fork_rng(devices=devices)
        ctx.__enter__()
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        return ctx


def _no_grad_reps(encode, chunks):
    states, reps = [], []
    with torch.no_grad():
        for c in chunks:
            states.append(_RngState())
            reps.append(encode(c))
    return states, torch.cat(reps).detach().requires_grad_(True)


def _average_gradients(module: torch.nn.Module) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    size = dist.get_world_size()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def grad_cache_step(module: torch.nn.Module, encode: Callable[[dict], torch.Tensor], queries: dict, passages: dict,
                    sub_batch_size: int, loss_fn):
    """Run ``loss_fn(q_reps, p_reps) -> LossOutput`` with gradients accumulated into ``module``'s
    parameters sub-batch by sub-batch. Returns the LossOutput with ``backward`` set to None (done)."""
    module = getattr(module, "module", module)  # DDP: hooks stay idle outside its forward
    q_chunks, p_chunks = _split(queries, sub_batch_size), _split(passages, sub_batch_size)
    q_states, q_reps = _no_grad_reps(encode, q_chunks)
    p_states, p_reps = _no_grad_reps(encode, p_chunks)
    out = loss_fn(q_reps, p_reps)
    out.backward.backward()
    for chunks, states, reps in ((q_chunks, q_states, q_reps), (p_chunks, p_states, p_reps)):
        start = 0
        for c, state in zip(chunks, states, strict=True):
            ctx = state.replay()
            try:
                r = encode(c)
            finally:
                ctx.__exit__(None, None, None)
            r.backward(reps.grad[start:start + r.shape[0]])
            start += r.shape[0]
    _average_gradients(module)
    out.backward = None
    return out
