"""`ray job submit` of jobs/embed_corpus.py against a real head node started with the `ray` CLI.

The job's working directory (this checkout, minus the virtualenv, outputs and caches) is uploaded
to the head, so this checks what a cluster user sees: the script imports ``bge_ray`` from the
uploaded copy, joins the cluster through ``RAY_ADDRESS`` and writes its output where it is told.

Teardown never calls ``ray stop``: that kills every Ray process on the machine by name, other
sessions' included. The head runs as ``ray start --head --block`` in a session (process group) of
its own, with its own ``--temp-dir`` as the working directory of every process it starts:

1. SIGTERM to the ``ray start --block`` process: its Node shuts down every process it spawned
   (GCS, raylet, dashboard, agents, log monitor) and the raylet takes its workers with it;
   ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0`` skips the 30 s drain meant for Serve on Kubernetes.
2. SIGKILL to that process group, for anything of ours the first step left.
3. A sweep of /proc for processes whose cwd or command line lies under our temp dir. The raylet
   puts each worker in a process group of its own, and the job supervisor starts the job's driver
   in a new session, so step 2 cannot reach those; but every one of them runs in our temp dir
   (inherited from ``ray start``, or the job's unpacked working dir under ``<temp-dir>/session_*``).
   A process of another session has neither, so nothing outside this test is touched.

The teardown then checks that no process under the temp dir is left, and deletes the temp dir.
(Checked by hand with a job still running: step 1 alone left nothing within 2 s; the job
supervisor's watcher kills the driver's group when the supervisor dies. 2 and 3 are the net.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY_CLI = str(VENV_BIN / "ray")

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# Left out of the uploaded working dir (gitignore patterns, relative to the repo root).
UPLOAD_EXCLUDES = [
    ".venv", ".git", "outputs", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info",
    "build", ".whl", ".gl", ".carry", "benchmarks/results",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # every Ray process on 127.0.0.1
        RAY_AUTH_MODE="disabled",  # explicit: the default depends on ~/.ray/auth_token existing
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # The job's entrypoint says `python`: it must be this virtualenv's.
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def _our_pids(temp_dir: str) -> list[int]:
    """Processes running in (cwd) or naming (command line) our temp dir, except this one."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:  # gone, or not ours to inspect
            continue
        if cwd == temp_dir or cwd.startswith(temp_dir + os.sep) or temp_dir in cmdline:
            found.append(int(entry))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(temp_dir: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = _our_pids(temp_dir)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _our_pids(temp_dir)
    return left


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> list[int]:
    """Stop exactly the head this test started; returns pids still alive afterwards (none expected)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
    left = _wait_gone(temp_dir, 10)
    if left:
        _signal_all(left, signal.SIGTERM)
        left = _wait_gone(temp_dir, 10)
    if left:
        _signal_all(left, signal.SIGKILL)
        left = _wait_gone(temp_dir, 5)
    return left


def _wait_for_dashboard(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Ray dashboard at {url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def ray_head(tmp_path):
    """A head node from the `ray` CLI on loopback, with the job server; stopped (only it) afterwards."""
    # Short, so Unix socket paths under <temp-dir>/session_*/sockets stay within 107 bytes.
    temp_dir = os.path.realpath(tempfile.mkdtemp(prefix="bgerj_", dir="/tmp"))
    dash_port = _free_port()
    cmd = [
        RAY_CLI, "start", "--head", "--block",
        f"--port={_free_port()}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        # Fixed defaults (10001, 52365) would collide with any other head on the machine.
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    log = tmp_path / "ray_start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=temp_dir, env=_ray_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{dash_port}"
    try:
        _wait_for_dashboard(url, proc, log)
        yield {"url": url, "temp_dir": temp_dir, "log": log}
    finally:
        left = _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still alive after teardown: {left}"


def _job_status(url: str, submission_id: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/jobs/{submission_id}", timeout=10) as r:
        return json.loads(r.read())


def _job_logs(url: str, submission_id: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/api/jobs/{submission_id}/logs", timeout=10) as r:
            return json.loads(r.read()).get("logs", "")
    except OSError as e:
        return f"(logs unavailable: {e})"


def test_embed_job_via_ray_job_submit(ray_head, tmp_path):
    url = ray_head["url"]
    out = (tmp_path / "job_out").resolve()  # the job runs in its unpacked working dir: absolute path
    submission_id = f"bge-ray-test-{uuid.uuid4().hex[:8]}"
    # First print where bge_ray comes from, to prove the job uses the uploaded copy, not this checkout.
    entrypoint = (
        'python -c "import bge_ray; print(\'BGE_RAY_FROM\', bge_ray.__file__)" && '
        f"python jobs/embed_corpus.py --output {out} --max-length 128 --batch-size 16 "
        "--rows-per-call 16 --num-actors 1"
    )
    cmd = [
        RAY_CLI, "job", "submit",
        "--address", url,
        "--submission-id", submission_id,
        "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}),
        "--", "bash", "-c", entrypoint,
    ]
    try:
        proc = subprocess.run(cmd, env=_ray_env(), capture_output=True, text=True, timeout=150, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`ray job submit` did not finish in 150 s; job logs:\n{_job_logs(url, submission_id)[-4000:]}\n{e}")
    logs = _job_logs(url, submission_id)
    status = _job_status(url, submission_id)
    detail = f"rc={proc.returncode}\nstderr:\n{proc.stderr[-2000:]}\njob logs:\n{logs[-4000:]}"
    assert status["status"] == "SUCCEEDED", f"job ended {status['status']}: {status.get('message')}\n{detail}"
    assert proc.returncode == 0, detail

    # bge_ray came from the uploaded working dir, unpacked under the head's temp dir.
    origin = next((line.split(" ", 1)[1] for line in logs.splitlines() if line.startswith("BGE_RAY_FROM ")), None)
    assert origin is not None, detail
    assert origin.startswith(ray_head["temp_dir"] + os.sep) and "working_dir_files" in origin, origin
    assert "embedded 60 rows" in logs, detail

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == manifest["unique_ids"] == 60
    assert manifest["dim"] == 384
    assert sum(s["rows"] for s in manifest["shards"]) == 60
    assert all((out / s["file"]).is_file() for s in manifest["shards"])
    assert (out / "index.faiss").is_file() and (out / "ids.parquet").is_file()
