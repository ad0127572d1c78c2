"""The training output folder (bge_ray.train.run_dir): one run per folder, overwrite removes only the
run's own files, an export interrupted mid-way is finished by the next run, never left mixed."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from bge_ray.train import run_dir
from bge_ray.train.run_dir import RUN_FILE, RunDir, RunMismatch

IDENTITY = {"task": "EmbedderTask", "args": {"RayArgs": {"num_workers": 2}, "TrainArgs": {"seed": 42}},
            "train_data": {"/data/a.jsonl": "file:10:1"}, "model": "dir:/m:abc"}


def _model(tmp_path, name: str, files: dict[str, str]):
    folder = tmp_path / name
    folder.mkdir()
    for f, text in files.items():
        (folder / f).write_text(text)
    return folder


def test_another_run_into_a_used_folder_is_refused_naming_what_differs(tmp_path):
    out = tmp_path / "out"
    RunDir.open(str(out), IDENTITY, overwrite=False)
    RunDir.open(str(out), IDENTITY, overwrite=False)  # the same run: resumes
    other = json.loads(json.dumps(IDENTITY))
    other["args"]["RayArgs"]["num_workers"] = 4
    other["train_data"] = {"/data/b.jsonl": "file:12:2"}
    with pytest.raises(RunMismatch) as err:
        RunDir.open(str(out), other, overwrite=False)
    msg = str(err.value)
    assert "args.RayArgs.num_workers: 2 -> 4" in msg and "/data/a.jsonl" in msg and "/data/b.jsonl" in msg
    assert "--overwrite_output_dir" in msg and "new --output_dir" in msg


def test_a_folder_of_other_files_is_never_written_into_even_with_overwrite(tmp_path):
    cwd = tmp_path / "project"
    cwd.mkdir()
    (cwd / "train.py").write_text("print('mine')")
    (cwd / "data").mkdir()
    for overwrite in (False, True):
        with pytest.raises(RunMismatch, match="not empty and holds no bge_ray training run"):
            RunDir.open(str(cwd), IDENTITY, overwrite=overwrite)
    assert sorted(os.listdir(cwd)) == ["data", "train.py"]


def test_overwrite_removes_only_what_the_run_wrote(tmp_path):
    out = tmp_path / "out"
    d = RunDir.open(str(out), IDENTITY, overwrite=False)
    d.note("checkpoints")
    (out / "checkpoints" / "run").mkdir(parents=True)
    d.export(str(_model(tmp_path, "m1", {"config.json": "{}", "model.safetensors": "w1"})))
    d.write_json("training_summary.json", {"steps": 1})
    (out / "NOTES.md").write_text("the user's own notes")
    other = {**IDENTITY, "model": "dir:/m:def"}
    d2 = RunDir.open(str(out), other, overwrite=True)
    assert sorted(os.listdir(out)) == ["NOTES.md", RUN_FILE]
    assert d2.record["identity"] == other


def test_an_export_cut_short_is_finished_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    d = RunDir.open(str(out), IDENTITY, overwrite=False)
    d.export(str(_model(tmp_path, "old", {"config.json": "old", "model.safetensors": "old", "pytorch_model.bin": "old"})))
    new = _model(tmp_path, "new", {"config.json": "new", "model.safetensors": "new", "tokenizer.json": "new"})
    real_replace, calls = os.replace, []

    def crash_after_one(src, dst):
        if ".export-" in str(src):
            if calls:
                raise KeyboardInterrupt("power cut")
            calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(run_dir.os, "replace", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        d.export(str(new))
    monkeypatch.setattr(run_dir.os, "replace", real_replace)
    assert (out / "config.json").read_text() == "new" and (out / "model.safetensors").read_text() == "old"  # mixed
    RunDir.open(str(out), IDENTITY, overwrite=False)  # the next run finishes the export first
    files = {p.name: p.read_text() for p in out.iterdir() if p.is_file() and p.name != RUN_FILE}
    assert files == {"config.json": "new", "model.safetensors": "new", "tokenizer.json": "new"}
    assert not [p for p in out.iterdir() if p.name.startswith(".export-")]


def test_an_export_cut_short_while_staging_is_undone(tmp_path, monkeypatch):
    out = tmp_path / "out"
    d = RunDir.open(str(out), IDENTITY, overwrite=False)
    d.export(str(_model(tmp_path, "old", {"model.safetensors": "old"})))

    def copy_half(src, dst):
        os.makedirs(dst)
        shutil.copy(os.path.join(src, "model.safetensors"), dst)
        raise OSError("disk full")

    monkeypatch.setattr(run_dir.shutil, "copytree", copy_half)
    with pytest.raises(OSError):
        d.export(str(_model(tmp_path, "new", {"model.safetensors": "new", "config.json": "new"})))
    monkeypatch.undo()
    RunDir.open(str(out), IDENTITY, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == [RUN_FILE, "model.safetensors"]
    assert (out / "model.safetensors").read_text() == "old"


def test_a_failed_checkpoint_save_leaves_no_temp_folder(tmp_path, monkeypatch):
    import tempfile

    from bge_ray.train import loop

    class BrokenTask:
        def save(self, model, tokenizer, folder):
            os.makedirs(folder)
            (tmp_path / "started").touch()
            raise OSError("no space left on device")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(OSError, match="no space"):
        loop._save_checkpoint(BrokenTask(), object(), None, None, None, 1, {})
    assert (tmp_path / "started").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bge_ray_ckpt_")]
