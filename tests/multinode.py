"""A real two-node Ray cluster on this machine: two raylets on 127.0.0.1, started with ``ray start``
as on any cluster, each with one CPU and a custom resource naming it, torn down by process id.

Jobs run against it as separate driver processes (``RAY_ADDRESS``), as ``ray job submit`` would
run them, so the pytest process keeps its own local Ray for the other tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0")
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class TwoNodeCluster:
    """Head (resource ``node_head``) and worker (``node_worker``) raylets, both on 127.0.0.1."""

    temp_dir: str
    port: int
    pids: set[int] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ray_start(self, *args: str) -> None:
        before = self._processes()
        cmd = [RAY, "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
               "--disable-usage-stats", *args]
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
        self.pids |= self._processes() - before

    def start(self) -> TwoNodeCluster:
        self._ray_start("--head", "--port", str(self.port), "--temp-dir", self.temp_dir, "--include-dashboard",
                        "false", "--resources", '{"node_head": 1}', "--min-worker-port", "20000",
                        "--max-worker-port", "20999")
        self._ray_start("--address", self.address, "--resources", '{"node_worker": 1}',
                        "--min-worker-port", "21000", "--max-worker-port", "21999")
        self.wait_for_nodes(2)
        return self

    def _processes(self) -> set[int]:
        """Every process of this cluster: their command lines name its temp dir (the session), or
        its GCS port."""
        found = set()
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if self.temp_dir in cmd or f"127.0.0.1:{self.port}" in cmd:
                found.add(p.info["pid"])
        return found

    def run_python(self, code: str, timeout: float = 60) -> str:
        """Run ``code`` in a driver attached to the cluster; its stdout."""
        env = {**_env(), "RAY_ADDRESS": self.address}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"driver failed:\n{out.stdout}\n{out.stderr[-4000:]}")
        return out.stdout

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        code = ("import ray, time\nray.init(log_to_driver=False)\n"
                f"deadline = time.time() + {timeout}\n"
                f"while len([x for x in ray.nodes() if x['Alive']]) < {n} and time.time() < deadline:\n"
                "    time.sleep(0.5)\n"
                "print(len([x for x in ray.nodes() if x['Alive']]))\n")
        alive = int(self.run_python(code, timeout=timeout + 30).strip().splitlines()[-1])
        if alive < n:
            raise RuntimeError(f"{alive} of {n} Ray nodes came up")

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
    temp_dir = tempfile.mkdtemp(prefix="bgeray2n_", dir="/tmp")
    cluster = TwoNodeCluster(temp_dir, _free_port())
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
