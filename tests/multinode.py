"""A real two-node Ray cluster on this machine: two raylets, every process on 127.0.0.1, each node
with 2 logical CPUs and a custom resource naming it, torn down by process id.

``ray start`` cannot do this: for a second node it wants ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``, and
then it turns ``--node-ip-address 127.0.0.1`` into the machine's network address. So a small host
process (``python -m tests.multinode``) starts both nodes with Ray's own ``cluster_utils.Cluster``
under ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (loopback) and holds them until it is killed. With one
CPU per node an actor-pool Data job hangs (../shared/DESIGN.md); two logical CPUs per node run.

Jobs run against it as separate driver processes (``RAY_ADDRESS``), as ``ray job submit`` would
run them, so the pytest process keeps its own local Ray for the other tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

NODE_CPUS = 2


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class TwoNodeCluster:
    """Head (resource ``node_head``) and worker (``node_worker``) raylets, both on 127.0.0.1."""

    temp_dir: str
    address: str = ""
    host: subprocess.Popen | None = None
    pids: set[int] = field(default_factory=set)

    def start(self, timeout: float = 120) -> TwoNodeCluster:
        ready = Path(self.temp_dir) / "address"
        self.host = subprocess.Popen([sys.executable, "-m", "tests.multinode", self.temp_dir, str(ready)],
                                     env=_env(), cwd=Path(__file__).resolve().parents[1],
                                     stdout=subprocess.DEVNULL, stderr=open(Path(self.temp_dir) / "host.log", "w"))
        wait_until(lambda: ready.exists() or self.host.poll() is not None, timeout, "the two Ray nodes")
        if not ready.exists():
            raise RuntimeError(f"the cluster host exited:\n{(Path(self.temp_dir) / 'host.log').read_text()[-4000:]}")
        self.address = ready.read_text().strip()
        self.pids = self._processes() | {self.host.pid}
        return self

    def _processes(self) -> set[int]:
        """Every process of this cluster: their command lines name its temp dir (the session)."""
        found = set()
        for p in psutil.process_iter(["pid", "cmdline"]):
            if self.temp_dir in " ".join(p.info["cmdline"] or []):
                found.add(p.info["pid"])
        return found

    def run_python(self, code: str, timeout: float = 60) -> str:
        """Run ``code`` in a driver attached to the cluster; its stdout."""
        env = {**_env(), "RAY_ADDRESS": self.address}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"driver failed:\n{out.stdout}\n{out.stderr[-4000:]}")
        return out.stdout

    def worker_raylet_pid(self) -> int:
        """The worker node's raylet: the raylet process whose resources name ``node_worker``."""
        for p in psutil.process_iter(["pid", "name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "raylet" in (p.info["name"] or "") and self.temp_dir in cmd and "node_worker" in cmd:
                return p.info["pid"]
        raise RuntimeError("no raylet of the worker node found")

    def kill_worker_node(self) -> int:
        """SIGKILL the worker node's raylet (its workers then exit: they lose their raylet)."""
        pid = self.worker_raylet_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        pids = self.pids | self._processes()
        procs = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                p.kill()
                procs.append(p)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=15)


def start_two_node_cluster() -> TwoNodeCluster:
    cluster = TwoNodeCluster(tempfile.mkdtemp(prefix="bgeray2n_", dir="/tmp"))
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def _host(temp_dir: str, ready: str) -> None:
    """The cluster host: both nodes on loopback, the head's address written to ``ready``, then wait."""
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Cluster would record its address in /tmp/ray/ray_current_cluster, where every later
    # ray.init() without an address on this machine would find it (and hang once it is gone).
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    common = {"num_cpus": NODE_CPUS, "object_store_memory": 300 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
        **common, "resources": {"node_head": 1}, "temp_dir": temp_dir, "include_dashboard": False,
        "node_ip_address": "127.0.0.1"})
    cluster.add_node(**common, resources={"node_worker": 1}, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    with open(ready + ".tmp", "w") as f:
        f.write(cluster.address)
    os.replace(ready + ".tmp", ready)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    _host(sys.argv[1], sys.argv[2])
