"""A training run's output folder: which run it holds, what bge_ray wrote there, and the final export.

``bge_ray_run.json`` names the run (its arguments, the training data's files, the base model's files)
and lists every top-level entry bge_ray wrote. A rerun into the folder continues that run only if it
is the same run; otherwise it is refused with what differs. ``--overwrite_output_dir`` removes the
listed entries and nothing else, and a folder holding files of its own but no run is never written
into. The final model is exported by staging every file first, recording the intent, then renaming;
a crash mid-export is finished by the next run, so the folder never keeps old and new files mixed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from typing import Any

logger = logging.getLogger(__name__)

RUN_FILE = "bge_ray_run.json"
#: Arguments that may change between a run and its resume: where and how often it reports and saves,
#: and ``max_steps`` (a finished run rerun with more steps continues: the batch plan's first steps
#: stay the same, tests/test_train_llm_reranker.py).
RESUMABLE = frozenset({"output_dir", "overwrite_output_dir", "logging_steps", "save_steps", "save_total_limit",
                       "address", "storage_path", "max_failures", "cpus_per_worker", "max_steps"})


class RunMismatch(ValueError):
    """The output folder holds another run (or files that are not a run)."""


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in sorted(value.items()) if k not in RESUMABLE}
    if isinstance(value, (list, tuple)):
        return [_strip(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _file_fingerprint(path: str) -> str:
    from bge_ray.models.fingerprint import folder_fingerprint

    if os.path.isdir(path):
        return f"dir:{folder_fingerprint(path)}"
    st = os.stat(path)
    return f"file:{st.st_size}:{st.st_mtime_ns}"


def run_identity(task, *args_dataclasses) -> dict:
    """What makes a run this run: its arguments (less :data:`RESUMABLE`), the task's own argument
    groups, and fingerprints of the training data and base model files."""
    from bge_ray.models.fingerprint import model_fingerprint

    args = {type(a).__name__: dataclasses.asdict(a) for a in args_dataclasses}
    for _, value in sorted(vars(task).items()):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            args.setdefault(type(value).__name__, dataclasses.asdict(value))
    data_files = {}
    for a in args_dataclasses:
        for path in getattr(a, "train_data", None) or []:
            data_files[os.path.abspath(path)] = _file_fingerprint(path) if os.path.exists(path) else "missing"
    model = next((a.model_name_or_path for a in args_dataclasses if hasattr(a, "model_name_or_path")), None)
    return {"task": type(task).__name__, "args": _strip(args), "train_data": data_files,
            "model": model_fingerprint(model)}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {json.dumps(a)[:120]} -> {json.dumps(b)[:120]}")
    return out


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


class RunDir:
    """The output folder of one run; :meth:`open` checks it and records the run before anything else."""

    def __init__(self, path: str, record: dict):
        self.path, self.record = path, record

    @classmethod
    def open(cls, path: str, identity: dict, overwrite: bool) -> RunDir:
        path = os.path.abspath(path)
        run_file = os.path.join(path, RUN_FILE)
        record = None
        if os.path.isfile(run_file):
            with open(run_file, encoding="utf-8") as f:
                record = json.load(f)
            cls(path, record)._finish_export()
        replaced = overwrite and record is not None
        if replaced:
            cls(path, record).remove_own_files()
            record = None
        if record is None:
            # Files beside a replaced run were there with it; a folder of files and no run is someone else's.
            foreign = [] if replaced or not os.path.isdir(path) else sorted(os.listdir(path))
            if foreign:
                raise RunMismatch(
                    f"{path} is not empty and holds no bge_ray training run ({', '.join(foreign[:5])}"
                    f"{', ...' if len(foreign) > 5 else ''}); choose a new or empty --output_dir"
                    + ("" if overwrite else " (--overwrite_output_dir removes only the files a bge_ray run wrote)"))
            os.makedirs(path, exist_ok=True)
            record = {"identity": identity, "written": [RUN_FILE]}
            _write_json(run_file, record)
        elif record["identity"] != identity:
            diffs = _differences(record["identity"], identity)
            raise RunMismatch(
                f"{path} holds another training run; to continue that one rerun its own command, to start this "
                f"one choose a new --output_dir or pass --overwrite_output_dir (removes that run's files only). "
                f"What differs: " + "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""))
        return cls(path, record)

    def note(self, *names: str) -> None:
        """Record top-level entries this run writes (before writing them)."""
        new = [n for n in names if n not in self.record["written"]]
        if new:
            self.record["written"] += new
            _write_json(os.path.join(self.path, RUN_FILE), self.record)

    def remove_own_files(self) -> None:
        """Every entry a bge_ray run recorded here, the run file last; nothing else."""
        for name in self.record.get("written", []):
            if name == RUN_FILE:
                continue
            full = os.path.join(self.path, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            elif os.path.lexists(full):
                os.remove(full)
        staging = self.record.get("export", {}).get("staging")
        if staging:
            shutil.rmtree(os.path.join(self.path, staging), ignore_errors=True)
        os.remove(os.path.join(self.path, RUN_FILE))
        logger.info("removed the earlier run's %d entries from %s", len(self.record.get("written", [])), self.path)

    def export(self, model_dir: str) -> None:
        """``model_dir``'s files to the top of the folder: staged, the intent recorded, then renamed."""
        staging = f".export-{uuid.uuid4().hex[:12]}"
        self.note(staging)
        shutil.copytree(model_dir, os.path.join(self.path, staging))
        names = sorted(os.listdir(os.path.join(self.path, staging)))
        self.record["export"] = {"staging": staging, "names": names}
        self.record["written"] += [n for n in names if n not in self.record["written"]]
        _write_json(os.path.join(self.path, RUN_FILE), self.record)  # from here a crash is finished, not undone
        self._finish_export()

    def _finish_export(self) -> None:
        pending = self.record.get("export")
        if not pending:
            staging = [n for n in self.record.get("written", []) if n.startswith(".export-")]
            for name in staging:  # staged before the intent was recorded: undo
                shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
            if staging:
                self.record["written"] = [n for n in self.record["written"] if n not in staging]
                _write_json(os.path.join(self.path, RUN_FILE), self.record)
            return
        src = os.path.join(self.path, pending["staging"])
        for name in pending["names"]:
            if os.path.lexists(os.path.join(src, name)):
                dst = os.path.join(self.path, name)
                if os.path.isdir(dst) and not os.path.islink(dst):
                    shutil.rmtree(dst)
                os.replace(os.path.join(src, name), dst)
        # Files an earlier export wrote that this model does not have would be mixed in: removed.
        for name in self.record.get("exported", []):
            if name not in pending["names"] and os.path.lexists(os.path.join(self.path, name)):
                full = os.path.join(self.path, name)
                shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)
        shutil.rmtree(src, ignore_errors=True)
        self.record["exported"] = pending["names"]
        self.record["written"] = [n for n in self.record["written"] if n != pending["staging"]]
        self.record.pop("export")
        _write_json(os.path.join(self.path, RUN_FILE), self.record)

    def write_json(self, name: str, data: dict) -> None:
        self.note(name)
        _write_json(os.path.join(self.path, name), data)
