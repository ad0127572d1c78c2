"""The Ray Train worker loop shared by every training job (embedders, M3, LLM embedders, RetroMAE,
rerankers). A *task* object says what differs: how to build the model, how one global batch turns
into a loss, and how to save in the inference layout. The loop owns the rest: device, DDP, optimizer
and schedule, mixed precision, gradient accumulation and clipping, checkpoints and resumption,
per-step metrics.

Checkpoint layout (one folder per report): ``model/`` (the inference layout, loadable by the
inference classes), ``optimizer.pt``, ``scheduler.pt``, ``state.json`` (optimizer steps done).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

MODEL_DIR = "model"


class TrainTask(Protocol):
    """What a training job plugs into :func:`train_loop_per_worker`."""

    def build(self) -> tuple[torch.nn.Module, Any]:
        """The trainable module and its tokenizer, on CPU."""

    def step(self, model: torch.nn.Module, rows: list[dict], batch: int, device: torch.device) -> Any:
        """One global batch's slice -> a :class:`bge_ray.train.losses.LossOutput`."""

    def save(self, model: torch.nn.Module, tokenizer: Any, folder: str) -> None:
        """Write the inference layout of ``model`` into ``folder``."""

    def load(self, model: torch.nn.Module, folder: str) -> None:
        """Load weights written by :meth:`save` (resumption)."""


@dataclass
class LoopConfig:
    """The optimisation settings the loop needs (from FlagEmbedding's / HF's TrainingArguments)."""

    optimizer_steps: int
    accumulation: int = 1
    global_batch_size: int = 1  # examples per global batch (all workers)
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    logging_steps: int = 1
    save_steps: int = 500
    seed: int = 42
    fp16: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: dict | None = None
    debug_grad_file: str | None = None  # tests: rank 0 saves the first step's gradients here

    @classmethod
    def from_args(cls, train, optimizer_steps: int, accumulation: int, global_batch_size: int, **extra) -> LoopConfig:
        ds = None
        if train.deepspeed:
            with open(train.deepspeed, encoding="utf-8") as f:
                ds = json.load(f)
        names = {f for f in cls.__dataclass_fields__} - {"optimizer_steps", "accumulation", "global_batch_size",
                                                         "deepspeed", "debug_grad_file"}
        return cls(optimizer_steps=optimizer_steps, accumulation=accumulation, global_batch_size=global_batch_size,
                   deepspeed=ds, **{n: getattr(train, n) for n in names}, **extra)


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """HF Trainer's split: no decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the device (HF Trainer's default, adamw_torch_fused)."""
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    try:
        return torch.optim.AdamW(_param_groups(model, cfg.weight_decay), fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(_param_groups(model, cfg.weight_decay), **kw)


def _warmup(cfg: LoopConfig) -> int:
    return cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * cfg.optimizer_steps))


def _autocast(cfg: LoopConfig, device: torch.device):
    if cfg.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if cfg.fp16:
        if device.type != "cuda":
            raise ValueError("--fp16 needs a GPU (use --bf16 on CPU, or neither)")
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def _rng_state() -> dict:
    """This process's random state (dropout masks come from torch's): saved with every checkpoint, so
    a resumed run draws what the uninterrupted run would have."""
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(task: TrainTask, model, tokenizer, optimizer, scheduler, step: int, metrics: dict,
                     history: list | None = None, scaler=None, rank: int = 0) -> str:
    """A temp folder holding the checkpoint (removed again if writing it fails)."""
    folder = tempfile.mkdtemp(prefix="bge_ray_ckpt_")
    try:
        task.save(_unwrap(model), tokenizer, os.path.join(folder, MODEL_DIR))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
            torch.save(scheduler.state_dict(), os.path.join(folder, "scheduler.pt"))
        if scaler is not None:
            torch.save(scaler.state_dict(), os.path.join(folder, "scaler.pt"))
        torch.save(_rng_state(), os.path.join(folder, _rng_file(rank)))
        with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as f:
            json.dump({"step": step, "metrics": metrics, "log_history": history or []}, f)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _rank_files(rank: int) -> str:
    """The temp folder a rank other than 0 reports: its random state only (Ray Train puts every
    rank's files in the same checkpoint folder)."""
    folder = tempfile.mkdtemp(prefix="bge_ray_ckpt_rank_")
    try:
        torch.save(_rng_state(), os.path.join(folder, _rng_file(rank)))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def read_state(folder: str) -> dict:
    """``state.json`` of a checkpoint folder: steps done, last metrics, per-step ``log_history``."""
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
        return json.load(f)


@dataclass
class Restored:
    """What a checkpoint gives a resumed worker besides the weights."""

    step: int = 0
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None
    rng: dict | None = None
    history: list = field(default_factory=list)


def _restore(task: TrainTask, model, checkpoint, rank: int) -> Restored:
    """Weights into ``model``; the rest of the checkpoint's state for this rank."""

    def load(d, name):
        path = os.path.join(d, name)
        # Random states hold numpy / Python objects, which weights_only loading refuses.
        return torch.load(path, map_location="cpu", weights_only=not name.startswith("rng_")) if os.path.exists(path) else None

    with checkpoint.as_directory() as d:
        state = read_state(d)
        task.load(model, os.path.join(d, MODEL_DIR))
        return Restored(int(state["step"]), load(d, "optimizer.pt"), load(d, "scheduler.pt"), load(d, "scaler.pt"),
                        load(d, _rng_file(rank)), state.get("log_history", []))


def _move_optimizer_state(state: dict, device: torch.device) -> dict:
    for s in state.get("state", {}).values():
        for k, v in s.items():
            if torch.is_tensor(v) and k != "step":
                s[k] = v.to(device)
    return state


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config = {"task": TrainTask, "loop": LoopConfig}``."""
    import ray.train
    import ray.train.torch
    from transformers import get_scheduler

    task: TrainTask = config["task"]
    cfg: LoopConfig = config["loop"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    threads = config.get("torch_threads")
    if threads:
        torch.set_num_threads(threads)

    model, tokenizer = task.build()
    if cfg.gradient_checkpointing:
        backbone = getattr(model, "backbone", model)
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    restored = Restored()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        restored = _restore(task, model, checkpoint, rank)
        logger.info("rank %d: resuming after optimizer step %d", rank, restored.step)
    start_step, history = restored.step, restored.history
    resumed_from = start_step if checkpoint is not None else None
    device = ray.train.torch.get_device()
    model.train()

    if cfg.deepspeed:
        engine, optimizer, scheduler = _deepspeed(model, cfg, device)
        ddp = engine
        if checkpoint is not None:
            _deepspeed_restore(engine, checkpoint)
    else:
        if world_size > 1:
            ddp = ray.train.torch.prepare_model(model)
        else:
            ddp = model.to(device)
        optimizer = _adamw(model, cfg)
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=_warmup(cfg),
                                  num_training_steps=cfg.optimizer_steps)
        if restored.optimizer is not None:
            optimizer.load_state_dict(_move_optimizer_state(restored.optimizer, device))
            scheduler.load_state_dict(restored.scheduler)
    scaler = torch.amp.GradScaler("cuda") if cfg.fp16 and not cfg.deepspeed else None
    if scaler is not None and restored.scaler is not None:
        scaler.load_state_dict(restored.scaler)
    if restored.rng is not None:
        _set_rng_state(restored.rng)  # last: building and loading the model drew from it
    shard = ray.train.get_dataset_shard(f"rank{rank}")
    from .data import iter_global_batches

    step = start_step
    t0, groups_done, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
    last_saved = start_step
    for b, rows in iter_global_batches(shard, start_batch=start_step * cfg.accumulation):
        micro = b % cfg.accumulation
        sync = micro == cfg.accumulation - 1
        no_sync = ddp.no_sync() if (not sync and hasattr(ddp, "no_sync") and not cfg.deepspeed) else contextlib.nullcontext()
        with no_sync:
            with _autocast(cfg, device):
                out = task.step(ddp, rows, b, device)
            if out.backward is not None:  # None: the task back-propagated itself (gradient caching)
                loss = out.backward / cfg.accumulation
                if cfg.deepspeed:
                    ddp.backward(loss)
                elif scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
        loss_sum += float(out.value)
        loss_n += 1
        groups_done += cfg.global_batch_size
        if not sync:
            continue
        if cfg.debug_grad_file and step == start_step and rank == 0:
            grads = {n: p.grad.detach().cpu().clone() for n, p in _unwrap(ddp).named_parameters() if p.grad is not None}
            torch.save({"grads": grads, "loss": loss_sum / loss_n}, cfg.debug_grad_file)
        if cfg.deepspeed:
            ddp.step()
        else:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        _maybe_inject_fault(step, rank)
        elapsed = time.perf_counter() - t0
        metrics = {"step": step, "loss": loss_sum / loss_n, "learning_rate": scheduler.get_last_lr()[0],
                   "groups_per_s": groups_done / max(elapsed, 1e-9), "epoch": int(rows[0]["epoch"])}
        if resumed_from is not None:  # the first step after a resume says from where
            metrics["resumed_from_step"], resumed_from = resumed_from, None
        loss_sum, loss_n = 0.0, 0
        history.append(metrics)
        final = step >= cfg.optimizer_steps
        if final or (cfg.save_steps and step % cfg.save_steps == 0):
            _report_checkpoint(task, ddp, tokenizer, optimizer, scheduler, step, metrics, rank, cfg, history, scaler)
            last_saved = step
        elif cfg.logging_steps and step % cfg.logging_steps == 0:
            ray.train.report(metrics)
        if final:
            break
    if last_saved != step:  # data ran out before the planned step count (should not happen)
        _report_checkpoint(task, ddp, tokenizer, optimizer, scheduler, step, {"step": step}, rank, cfg, history,
                           scaler)


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Test hook: ``BGE_RAY_TRAIN_FAULT=<step>:<marker file>`` kills rank 0's worker process once,
    right after optimizer step ``<step>`` (the marker makes the retry run through), after
    ``BGE_RAY_TRAIN_FAULT_DELAY`` seconds: Ray Train registers a reported checkpoint when it next polls
    the workers (every 2 s), so a worker dying sooner than that loses its last checkpoint."""
    spec = os.environ.get("BGE_RAY_TRAIN_FAULT", "")
    if not spec or rank != 0:
        return
    at, _, marker = spec.partition(":")
    if int(at) != step or os.path.exists(marker):
        return
    time.sleep(float(os.environ.get("BGE_RAY_TRAIN_FAULT_DELAY", "0")))
    open(marker, "w").close()
    os._exit(1)


def _report_checkpoint(task, model, tokenizer, optimizer, scheduler, step, metrics, rank, cfg, history,
                       scaler=None) -> None:
    import ray.train

    if cfg.deepspeed:
        _deepspeed_gather_and_save(task, model, tokenizer, step, metrics, rank, history)
        return
    if rank != 0:
        folder = _rank_files(rank)
    else:
        folder = _save_checkpoint(task, model, tokenizer, optimizer, scheduler, step, metrics, history, scaler, rank)
    try:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- DeepSpeed (the `deepspeed` extra, GPU clusters) -------------------------------------------------------
def _deepspeed(model, cfg: LoopConfig, device):
    """ZeRO through DeepSpeed's engine on the process group Ray Train set up; "auto" values in the
    JSON are filled from our arguments as HF's integration does."""
    try:
        import deepspeed
    except ImportError as exc:
        raise RuntimeError("--deepspeed needs the deepspeed extra: pip install 'bge_ray[deepspeed]'") from exc
    if device.type != "cuda":
        raise RuntimeError("--deepspeed runs on GPU workers only (--use_gpu); on CPU train with plain DDP")
    ds = json.loads(json.dumps(cfg.deepspeed))
    fills = {"train_micro_batch_size_per_gpu": None, "gradient_accumulation_steps": cfg.accumulation,
             "gradient_clipping": cfg.max_grad_norm}
    for k, v in fills.items():
        if ds.get(k) == "auto":
            if v is None:
                ds.pop(k)
            else:
                ds[k] = v
    ds.setdefault("gradient_accumulation_steps", cfg.accumulation)
    if "train_micro_batch_size_per_gpu" not in ds:
        ds["train_micro_batch_size_per_gpu"] = 1  # our batches are pre-built; DeepSpeed only counts them
    ds.pop("train_batch_size", None)
    if cfg.bf16:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    if cfg.fp16:
        ds["fp16"] = {**ds.get("fp16", {}), "enabled": True}
    from transformers import get_scheduler

    model.to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=_warmup(cfg),
                              num_training_steps=cfg.optimizer_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds)
    return engine, optimizer, scheduler


DEEPSPEED_DIR = "deepspeed"


def _deepspeed_restore(engine, checkpoint) -> None:
    """Optimizer partitions, scheduler and loss scaler from DeepSpeed's part of the checkpoint (the
    weights came from the inference layout already)."""
    with checkpoint.as_directory() as d:
        ds_dir = os.path.join(d, DEEPSPEED_DIR)
        if os.path.isdir(ds_dir):
            engine.load_checkpoint(ds_dir, tag="latest", load_optimizer_states=True, load_lr_scheduler_states=True)
        else:
            logger.warning("the checkpoint has no DeepSpeed state (an earlier bge_ray): optimizer and schedule restart")


def _deepspeed_gather_and_save(task, engine, tokenizer, step, metrics, rank, history) -> None:
    """ZeRO-3 shards parameters: gather them on every rank, rank 0 writes the inference layout. Every
    rank also writes its part of DeepSpeed's own checkpoint (optimizer partitions, scheduler, loss
    scaler; DeepSpeed names each rank's files apart) and its random state: Ray Train gathers every
    rank's files in one checkpoint folder, which :func:`_deepspeed_restore` reads on resume."""
    import deepspeed
    import ray.train

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if rank == 0:
            folder = _save_checkpoint(task, module, tokenizer, None, None, step, metrics, history)
    if rank != 0:
        folder = _rank_files(rank)
    try:
        engine.save_checkpoint(os.path.join(folder, DEEPSPEED_DIR), tag="latest")  # collective: every rank
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
