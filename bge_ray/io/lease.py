"""One run at a time per output: a lease object that a second run started into the same output sees,
and refuses to start.

Object stores reachable through pyarrow have no create-if-absent, so each run writes a key of its own
(``_leases/<token>.json``, never overwritten by another run), then lists the folder: a run that sees
any other live lease deletes its own and refuses. Two runs racing to start may both refuse (neither
writes a shard), but never both proceed. A lease is live while its heartbeat (rewritten by a thread
every ``ttl / 4`` seconds) is younger than ``ttl``; a crashed run's lease expires by itself.
Writing the lease is also the job's first write, so an unwritable or missing bucket fails here,
before any embedding.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from .store import Store

logger = logging.getLogger(__name__)

LEASES = "_leases"


class OutputInUse(RuntimeError):
    """Another live run holds the output."""


class Lease:
    """``with Lease(store):`` holds ``store`` for this run (see the module docstring)."""

    def __init__(self, store: Store, ttl: float = 120.0):
        self.store, self.ttl = store, float(ttl)
        self.token = f"{time.time_ns()}-{uuid.uuid4().hex[:12]}"
        self.key = f"{LEASES}/{self.token}.json"
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                "heartbeat": time.time(), "ttl": self.ttl}

    def _others(self) -> list[dict]:
        """Live leases of other runs; expired ones are removed on the way."""
        live = []
        for name in self.store.list(LEASES):
            if not name.endswith(".json") or name == os.path.basename(self.key):
                continue
            try:
                rec = self.store.read_json(f"{LEASES}/{name}")
            except (OSError, ValueError):
                continue  # released between the listing and the read, or being rewritten
            if time.time() - float(rec.get("heartbeat", 0)) > float(rec.get("ttl", self.ttl)):
                logger.info("removing expired lease %s (run on %s pid %s)", name, rec.get("host"), rec.get("pid"))
                try:
                    self.store.delete(f"{LEASES}/{name}")
                except OSError:
                    pass
                continue
            live.append(rec)
        return live

    def _refuse(self, others: list[dict]) -> OutputInUse:
        rec = others[0]
        age = time.time() - float(rec.get("heartbeat", 0))
        return OutputInUse(
            f"{self.store.url()} is in use by another run (host {rec.get('host')}, pid {rec.get('pid')}, started "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(float(rec.get('started', 0))))}, last heartbeat "
            f"{age:.0f} s ago); wait for it to finish, or, if it died, for its lease to expire "
            f"({rec.get('ttl', self.ttl):.0f} s after its last heartbeat)"
        )

    def acquire(self) -> Lease:
        others = self._others()
        if others:
            raise self._refuse(others)
        try:
            self.store.write_json(self.key, self._record())
        except OSError as e:
            raise OSError(f"cannot write to {self.store.url()}: {e}") from e
        others = self._others()
        if others:
            self.store.delete(self.key)
            raise self._refuse(others)
        self._thread = threading.Thread(target=self._beat, name="bge-ray-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.store.write_json(self.key, self._record())
            except OSError as e:  # a missed beat is retried; the lease only lapses after ttl
                logger.warning("lease heartbeat on %s failed: %s", self.store.url(self.key), e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.store.delete(self.key)
        except OSError as e:
            logger.warning("could not remove lease %s: %s", self.store.url(self.key), e)
            return
        if self.store.local:  # leave no empty _leases/ folder in a finished output
            try:
                os.rmdir(self.store.path(LEASES))
            except OSError:
                pass  # another run's lease is still there, or the folder is gone

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
