"""Starting or joining Ray, and sizing actor pools for the machine or cluster at hand."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True):
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, as under ``ray job submit``), else start
    a private local one on loopback with auth off and usage stats off."""
    local = address is None and not os.environ.get("RAY_ADDRESS")
    if local:
        # Keep a laptop run on 127.0.0.1 and free of the token auth a shared cluster would want.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray starts workers at nice 15, below its own daemons; on a small machine every daemon wake-up
        # then stalls the model's threads (benchmarks/README.md, "Worker niceness").
        os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    if ray.is_initialized():
        return ray
    kwargs = {"log_to_driver": not quiet or not local}
    if local:
        # "local": a new Ray even where /tmp/ray/ray_current_cluster names another (maybe dead) one.
        address = "local"
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    ray.init(address=address, **kwargs)
    return ray


@dataclass(frozen=True)
class ActorPlan:
    """How many embedding actors, and what each asks Ray for."""

    num_actors: int
    num_cpus: float
    num_gpus: float
    torch_threads: int | None
    read_cpus: float = 1.0  # what each read / convert task asks for

    def for_blocks(self, n_blocks: int) -> ActorPlan:
        """No more actors than blocks of work (an actor with nothing to do still loads the model); on
        CPU the actors kept take over the dropped ones' cores as torch threads."""
        n = max(1, min(self.num_actors, n_blocks))
        if n == self.num_actors:
            return self
        threads = self.torch_threads
        if threads and not self.num_gpus:
            threads = max(1, threads * self.num_actors // n)
        return replace(self, num_actors=n, torch_threads=threads)


#: Default CPU actor count cap (each actor holds its own copy of the model).
MAX_DEFAULT_CPU_ACTORS = 8


def plan_actors(num_actors: int | None = None, use_gpu: bool | None = None) -> ActorPlan:
    """One actor per GPU when the cluster has GPUs; on CPU, ``num_actors`` sharing the cores, by default
    one single-threaded actor per core up to :data:`MAX_DEFAULT_CPU_ACTORS` (threads split beyond).

    Why one thread per actor: torch's threads wait on each other at every op, so on a machine that
    also runs Ray's daemons and the pipeline's reads, independent actors lose less (benchmarks/README.md,
    "Actors and threads").
    The cap bounds the model copies in memory on large nodes.

    On a small machine the actors must leave Ray Data room to schedule read tasks: actors that
    reserve every CPU starve the reads and the pipeline hangs without an error. Actors' CPU
    requests are bookkeeping only; ``torch_threads`` sets what each actually uses.
    """
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    cpus = float(res.get("CPU", 1))
    if use_gpu is None:
        use_gpu = gpus > 0
    read_cpus = 1.0 if cpus >= 8 else 0.25
    if use_gpu:
        if gpus == 0:
            raise RuntimeError("use_gpu was requested but the Ray cluster has no GPUs")
        n = num_actors or gpus
        return ActorPlan(n, 1.0, 1.0 if n <= gpus else gpus / n, None, read_cpus)
    n = num_actors or max(1, min(int(cpus), MAX_DEFAULT_CPU_ACTORS))
    share = cpus / n
    actor_cpus = max(0.1, min(share, (cpus - 2 * read_cpus) / n))
    return ActorPlan(n, actor_cpus, 0.0, max(1, int(share)), read_cpus)


def actor_device(torch_threads: int | None = None) -> str:
    """Inside an actor: cap torch's CPU threads to the actor's share, keep freed activation memory
    (:func:`bge_ray.models.devices.keep_freed_memory`), return the device to load on."""
    import torch

    from bge_ray.models.devices import keep_freed_memory

    keep_freed_memory()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    return "cuda:0" if torch.cuda.is_available() else "cpu"
