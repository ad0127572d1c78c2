"""Training survives a worker crash (FailureConfig retry from the last checkpoint) and a rerun of
the same command after a failed run resumes where it stopped; both, with dropout on, end with the
loss trajectory and weights of an uninterrupted run (every rank's random state is checkpointed).
Another run into a used folder is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray.train
import torch

from tests.test_train_embedder import _args, _train_file

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _train(model, train, out, **kw):
    from bge_ray.train.embedder import EmbedderTask
    from bge_ray.train.runner import run_training

    max_failures = kw.pop("max_failures", 0)
    env = kw.pop("worker_env", None)
    m, d, t, r = _args(model, train, out, 2, 2, max_steps=4, save_steps=2, negatives_cross_device=True, **kw)
    r.max_failures = max_failures
    return run_training(EmbedderTask(m, d, t, "cls"), m, d, t, r, worker_env=env)


# Ray Train registers a reported checkpoint at its next poll of the workers (every 2 s): the fault waits
# past it, or the restart would find no checkpoint and train from step 0 (matching just as well).
FAULT_DELAY = {"BGE_RAY_TRAIN_FAULT_DELAY": "5"}


def _losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "training_summary.json").read_text())["log_history"]]


def _same(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def clean_run(ray_local, tiny_bert, tmp_path_factory):
    """The uninterrupted run both tests compare with: (train file, its output folder, its result)."""
    root = tmp_path_factory.mktemp("resume")
    train = _train_file(root)
    return train, root / "clean", _train(tiny_bert, train, root / "clean")


def test_worker_crash_resumes_from_checkpoint_and_matches_an_uninterrupted_run(tiny_bert, clean_run, tmp_path):
    train, clean_dir, clean = clean_run
    marker = tmp_path / "crashed-once"
    crashed = _train(tiny_bert, train, tmp_path / "crash", max_failures=1,
                     worker_env={"BGE_RAY_TRAIN_FAULT": f"3:{marker}", **FAULT_DELAY})
    assert marker.exists(), "the fault was not injected"
    history = json.loads((tmp_path / "crash" / "training_summary.json").read_text())["log_history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]  # step 3 redone once, from the step-2 checkpoint
    assert [h.get("resumed_from_step") for h in history] == [None, None, 2, None]
    assert crashed.optimizer_steps == clean.optimizer_steps == 4
    assert _losses(tmp_path / "crash") == pytest.approx(_losses(clean_dir), abs=1e-6)
    diff = _same(_weights(clean_dir), _weights(tmp_path / "crash"))
    assert diff < 1e-6, diff
    # Training did move the weights away from the base checkpoint.
    base, trained = _weights(Path(tiny_bert)), _weights(clean_dir)
    shared = set(base) & set(trained)
    assert max((base[k] - trained[k]).abs().max().item() for k in shared) > 1e-4


def test_rerunning_after_a_failed_run_resumes_it(tiny_bert, clean_run, tmp_path):
    train, clean_dir, clean = clean_run
    marker = tmp_path / "crashed-once"
    with pytest.raises(ray.train.TrainingFailedError):
        _train(tiny_bert, train, tmp_path / "run", worker_env={"BGE_RAY_TRAIN_FAULT": f"3:{marker}", **FAULT_DELAY})
    assert not (tmp_path / "run" / "training_summary.json").exists()  # nothing exported as if finished
    resumed = _train(tiny_bert, train, tmp_path / "run")
    history = json.loads((tmp_path / "run" / "training_summary.json").read_text())["log_history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert [h.get("resumed_from_step") for h in history] == [None, None, 2, None]
    assert resumed.optimizer_steps == clean.optimizer_steps
    assert _losses(tmp_path / "run") == pytest.approx(_losses(clean_dir), abs=1e-6)
    assert _same(_weights(clean_dir), _weights(tmp_path / "run")) < 1e-6
    # A finished run rerun: nothing to do, the same model comes out.
    before = _weights(tmp_path / "run")
    _train(tiny_bert, train, tmp_path / "run")
    assert _same(before, _weights(tmp_path / "run")) == 0.0
    assert torch.is_tensor(next(iter(before.values())))


def test_another_run_into_a_used_output_dir_is_refused(tiny_bert, clean_run, tmp_path):
    from bge_ray.train.run_dir import RunMismatch

    train, clean_dir, _ = clean_run
    before = _weights(clean_dir)
    other = tmp_path / "other.jsonl"
    other.write_text(train.read_text().replace("river", "lake"))
    with pytest.raises(RunMismatch, match=r"holds another training run.*train_data"):
        _train(tiny_bert, other, clean_dir)
    from bge_ray.train.embedder import EmbedderTask
    from bge_ray.train.runner import run_training

    m, d, t, r = _args(tiny_bert, train, clean_dir, 1, 2, max_steps=4, save_steps=2, negatives_cross_device=True)
    with pytest.raises(RunMismatch, match=r"RayArgs\.num_workers: 2 -> 1"):
        run_training(EmbedderTask(m, d, t, "cls"), m, d, t, r)
    assert _same(before, _weights(clean_dir)) == 0.0  # the finished run's model is untouched
