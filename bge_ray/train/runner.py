"""Driver side of every training job: read and plan the data, size the Ray Train worker group,
run :func:`bge_ray.train.loop.train_loop_per_worker`, and export the final model to ``output_dir``.

Layout of ``output_dir`` (HF Trainer's habit): the final model's files at the top, loadable by the
inference classes; Ray Train's run (checkpoints, state) under ``checkpoints/``; ``bge_ray_run.json``
names the run (:mod:`bge_ray.train.run_dir`). Rerunning the same command resumes from the last
checkpoint; another run into the folder is refused with what differs; ``--overwrite_output_dir``
starts afresh, removing only what the earlier run wrote.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

from .arguments import DataArgs, ModelArgs, RayArgs, TrainArgs
from .data import load_sources, plan_training, rank_datasets
from .loop import MODEL_DIR, LoopConfig, read_state, train_loop_per_worker
from .run_dir import RunDir, run_identity

logger = logging.getLogger(__name__)

SUMMARY = "training_summary.json"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainResult:
    output_dir: str
    optimizer_steps: int
    metrics: dict
    seconds: float
    examples: int

    def summary_line(self, unit: str = "groups", per_group: int | None = None) -> str:
        """The job's last line: steps, examples, time, final loss and throughput."""
        m = self.metrics
        rate = m.get("groups_per_s", 0.0)
        pairs = f" = {rate * per_group:.1f} pairs/s" if per_group else ""
        return (f"trained {self.optimizer_steps} steps on {self.examples} examples in {self.seconds:.1f} s "
                f"(final loss {m.get('loss', float('nan')):.4f}, {rate:.2f} {unit}/s{pairs}); "
                f"model: {self.output_dir}")


def _progress_callback():
    """A driver-side Ray Train callback printing one line per reported step (rank 0's metrics)."""
    import ray.train

    class Progress(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0] if metrics else {}
            if "loss" in m:
                print(f"step {m['step']}: loss {m['loss']:.4f}, lr {m['learning_rate']:.2e}, "
                      f"{m['groups_per_s']:.2f} groups/s{' (checkpoint)' if checkpoint else ''}", flush=True)

    return Progress()


def worker_resources(ray_args: RayArgs) -> tuple[dict, int]:
    """Ray resources per worker and the torch threads each uses."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    n = ray_args.num_workers
    if ray_args.cpus_per_worker:
        per = ray_args.cpus_per_worker
    else:
        # Leave a sliver for Ray Data and the Train controller on small machines.
        per = max(0.25, min(cpus / n, (cpus - 0.25) / n))
    threads = max(1, int(round(cpus / n))) if not ray_args.use_gpu else None
    return {"CPU": per}, threads


def _export(checkpoint, run_dir: RunDir) -> list:
    """The checkpoint's model files to the top of the output folder (:meth:`RunDir.export`); returns
    the run's per-step log history."""
    with checkpoint.as_directory() as d:
        history = read_state(d).get("log_history", [])
        run_dir.export(os.path.join(d, MODEL_DIR))
    return history


def run_training(task, model_args: ModelArgs, data_args: DataArgs, train_args: TrainArgs, ray_args: RayArgs,
                 need_neg: bool = True, debug_grad_file: str | None = None,
                 worker_env: dict[str, str] | None = None, read_data=None) -> TrainResult:
    """Plan the data, train on a Ray Train worker group and write the final model to ``output_dir``.
    ``worker_env``: environment variables for the training workers. ``read_data() -> (examples,
    sources)`` replaces the FlagEmbedding training-jsonl reader (pre-training corpora)."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    from bge_ray.batch.runtime import init_ray

    t0 = time.perf_counter()
    if hasattr(task, "validate"):
        task.validate()
    output_dir = os.path.abspath(train_args.output_dir)
    run_dir = RunDir.open(output_dir, run_identity(task, model_args, data_args, train_args, ray_args),
                          train_args.overwrite_output_dir)
    init_ray(ray_args.address)
    if read_data is not None:
        table, sources = read_data()
    else:
        table, sources = load_sources(
            data_args.train_data, train_args.per_device_train_batch_size, data_args.knowledge_distillation,
            need_neg=need_neg and data_args.train_group_size > 1,
            max_example_num_per_dataset=data_args.max_example_num_per_dataset, seed=train_args.seed,
            small_threshold=data_args.small_threshold, drop_threshold=data_args.drop_threshold)
    world = ray_args.num_workers
    plan = plan_training(sources, world, train_args.seed, train_args.num_train_epochs, train_args.max_steps,
                         train_args.gradient_accumulation_steps,
                         getattr(data_args, "same_dataset_within_batch", False))
    global_batch = len(plan.batches[0].rows)
    loop = LoopConfig.from_args(train_args, plan.optimizer_steps, train_args.gradient_accumulation_steps, global_batch,
                                debug_grad_file=debug_grad_file)
    resources, threads = worker_resources(ray_args)
    logger.info("%d examples in %d dataset(s); %d global batches of %d (%d per worker x %d workers) -> %d "
                "optimizer steps", len(table), len(sources), len(plan.batches), global_batch,
                global_batch // world, world, plan.optimizer_steps)
    storage = os.path.abspath(ray_args.storage_path or os.path.join(output_dir, CHECKPOINTS))
    if os.path.dirname(storage) == output_dir:
        run_dir.note(os.path.basename(storage))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task, "loop": loop, "torch_threads": threads},
        torch_config=TorchConfig(backend="nccl" if ray_args.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=world, use_gpu=ray_args.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=ray_args.run_name or "run", storage_path=storage,
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
            callbacks=[_progress_callback()],
            failure_config=ray.train.FailureConfig(max_failures=ray_args.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train_args.save_total_limit)),
        datasets=rank_datasets(table, plan),
        dataset_config=ray.train.DataConfig(datasets_to_split=[],
                                            execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint (error: {result.error})")
    history = _export(result.checkpoint, run_dir)
    metrics = dict(result.metrics or {})
    seconds = time.perf_counter() - t0
    summary = {"optimizer_steps": plan.optimizer_steps, "global_batch_size": global_batch, "num_workers": world,
               "examples": len(table), "seconds": seconds, "final_metrics": metrics, "log_history": history,
               "args": {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
                        "train": dataclasses.asdict(train_args), "ray": dataclasses.asdict(ray_args)}}
    run_dir.write_json(SUMMARY, summary)
    logger.info("trained %d steps in %.1f s; model in %s", plan.optimizer_steps, seconds, output_dir)
    return TrainResult(output_dir, plan.optimizer_steps, metrics, seconds, len(table))
