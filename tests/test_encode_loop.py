"""The shared encode loop: batch planning, padding, order restoration, OOM back-off, several devices."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from bge_ray.models.encode import (
    CPU_TOKENS_PER_BATCH,
    plan_batches,
    run_batches,
    scatter_rows,
    tokens_per_batch,
)
from bge_ray.models.tokenize import Features, collate


def _features(lengths):
    ids = [[i + 1] * n for i, n in enumerate(lengths)]
    return Features.from_columns({"input_ids": ids})


def test_plan_batches_sorts_longest_first_and_covers_every_row():
    lengths = np.array([3, 9, 1, 9, 5, 2, 7])
    batches = plan_batches(lengths, batch_size=3)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(7))
    assert lengths[rows].tolist() == sorted(lengths.tolist(), reverse=True)
    assert [len(b) for b in batches] == [3, 3, 1]


def test_token_budget_gives_short_texts_bigger_batches():
    lengths = np.array([100] * 4 + [10] * 40)
    batches = plan_batches(lengths, batch_size=64, max_tokens=200)
    assert [len(b) for b in batches[:2]] == [2, 2]
    assert all(len(b) <= 20 for b in batches[2:]) and sum(len(b) for b in batches) == 44


def test_cpu_passes_get_a_cache_sized_token_budget_unless_told():
    assert tokens_per_batch(None, "cpu") == CPU_TOKENS_PER_BATCH
    assert tokens_per_batch(None, "cuda:0") is None
    assert tokens_per_batch(4096, "cpu") == 4096 and tokens_per_batch(4096, "cuda:1") == 4096
    assert tokens_per_batch(0, "cpu") is None


def test_cpu_token_budget_splits_passes_without_changing_vectors(tiny_bert):
    from bge_ray.models.embedder import FlagModel

    texts = [" ".join(["word"] * (20 + i % 30)) for i in range(96)]
    capped = FlagModel(str(tiny_bert), devices="cpu", batch_size=64, use_fp16=False)
    uncapped = FlagModel(str(tiny_bert), devices="cpu", batch_size=64, use_fp16=False, max_tokens_per_batch=0)
    calls = {"capped": [], "uncapped": []}
    for name, m in (("capped", capped), ("uncapped", uncapped)):
        m.model.register_forward_hook(lambda mod, args, kw, out, n=name: calls[n].append(kw["input_ids"].numel()),
                                      with_kwargs=True)
    np.testing.assert_allclose(capped.encode_corpus(texts), uncapped.encode_corpus(texts), atol=1e-5)
    assert max(calls["capped"]) <= CPU_TOKENS_PER_BATCH < max(calls["uncapped"])
    assert len(calls["capped"]) > len(calls["uncapped"]) == 2


def test_collate_pads_right_and_left():
    f = _features([2, 4])
    right = collate(f, np.array([0, 1]), {"input_ids": 0})
    assert right["input_ids"].tolist() == [[1, 1, 0, 0], [2, 2, 2, 2]]
    assert right["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    left = collate(f, np.array([0, 1]), {"input_ids": 0}, padding_side="left", pad_to_multiple_of=3)
    assert left["input_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 2, 2, 2, 2]]
    assert left["attention_mask"].sum(1).tolist() == [2, 4]


def _row_value_forward(batch):
    # Output per row = the id it carries: order restoration can be checked exactly.
    return batch["input_ids"][:, :1].float()


def test_run_batches_restores_input_order():
    lengths = [5, 1, 7, 3, 3, 9, 2]
    f = _features(lengths)
    res = run_batches(f, _row_value_forward, device="cpu", pad={"input_ids": 0}, batch_size=2)
    out = scatter_rows(res, len(lengths))
    assert out[:, 0].tolist() == [float(i + 1) for i in range(len(lengths))]


def test_out_of_memory_halves_the_batch_and_loses_nothing(caplog):
    calls = []

    def forward(batch):
        calls.append(len(batch["input_ids"]))
        if len(batch["input_ids"]) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return _row_value_forward(batch)

    f = _features([4] * 16)
    res = run_batches(f, forward, device="cpu", pad={"input_ids": 0}, batch_size=16)
    out = scatter_rows(res, 16)
    assert out[:, 0].tolist() == [float(i + 1) for i in range(16)]
    assert calls[:3] == [16, 8, 4] and max(calls[3:]) <= 3
    assert "out of memory" in caplog.text


def test_errors_that_are_not_out_of_memory_propagate():
    def forward(batch):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batches(_features([2, 3]), forward, device="cpu", pad={"input_ids": 0}, batch_size=2)


def test_several_devices_share_one_process(tiny_bert):
    from bge_ray import FlagModel

    texts = [f"text number {i} " * (i % 7 + 1) for i in range(40)]
    one = FlagModel(str(tiny_bert), devices="cpu", batch_size=4).encode(texts)
    two = FlagModel(str(tiny_bert), devices=["cpu", "cpu"], batch_size=4).encode(texts)
    np.testing.assert_allclose(one, two, atol=1e-5)


_FAULTS = """
import resource, sys
import numpy as np
from bge_ray.models.devices import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "1" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    # A forward pass's activations: several blocks of 3-24 MB alive at once, then freed.
    live = [np.ones(mb << 18, dtype=np.float32) for mb in (6, 12, 12, 3, 24)]
    del live
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_page_faults_on_repeated_activation_sized_blocks():
    import subprocess

    def run(flag):
        out = subprocess.run([sys.executable, "-c", _FAULTS, flag], capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        return applied == "True", int(faults)

    (_, default_faults), (applied, kept_faults) = run("0"), run("1")
    assert applied
    # Default glibc returns most of each round's 57 MB (14.6k pages) to the OS and faults it back in
    # the next round (measured ~116k faults in 50 rounds); kept, only the first round faults.
    assert default_faults > 10 * 14_600 // 2 and kept_faults < 3 * 14_600
