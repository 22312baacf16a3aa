"""`launch doctor --only data` with the real command and 2 gloo ranks: a healthy recipe passes with its loader's
figures; a sample that raises and a sample of another shape fail, naming the index and the error; a slow dataset
(it sleeps per item, as a slow disk would) warns that the loader is the bottleneck, recommends more workers, and
reads a random subset of the samples to stay within the check's time budget."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import write_recipe
from test_doctor import doctor


def flawed(tmp_path: Path, **kwargs) -> str:
    args = ", ".join(f"{k}: {v}" for k, v in kwargs.items())
    return write_recipe(tmp_path, f"data.train={{_target_: components.FlawedDataset, {args}}}")


def test_a_healthy_recipe_passes_with_its_loader_figures(tmp_path):
    r, results = doctor(tmp_path, "--only", "data")
    d = results["data"]
    assert d["status"] == "pass", d
    assert "batches/s at num_workers=" in d["figure"] and "read 256 samples, all fine" in d["figure"], d["figure"]
    assert "pin_memory does not apply on the CPU" in d["figure"]
    settings = {s["num_workers"]: s["batches_per_s"] for s in d["details"]["settings"]}
    assert 0 in settings and 1 in settings and all(rate > 1 for rate in settings.values()), settings
    steps = d["details"]["steps"]
    assert steps["num_workers"] == 0 and 0 <= steps["waiting_share"] < 1 and steps["compute_s"] > 0, steps
    assert d["details"]["scan"] == {"mode": "all", "read": 256, "of": 256, "shapes_compared": True, "errors": [],
                                    "n_errors": 0, "different": [], "n_different": 0}
    assert "data" in r.stdout and d["seconds"] < 30


def test_a_sample_that_raises_is_named_with_its_index_and_error(tmp_path):
    _, results = doctor(tmp_path, "--only", "data", recipe=flawed(tmp_path, raise_at=37), expect=1)
    d = results["data"]
    assert d["status"] == "fail", d
    assert d["figure"] == "256 samples read: 1 raises", d["figure"]
    assert "index 37: ValueError: corrupt record 37: checksum mismatch" in d["advice"], d["advice"]
    assert d["details"]["scan"]["errors"] == [[37, "ValueError: corrupt record 37: checksum mismatch"]]


def test_a_sample_of_another_shape_is_named_with_its_index(tmp_path):
    _, results = doctor(tmp_path, "--only", "data", recipe=flawed(tmp_path, odd_at=101), expect=1)
    d = results["data"]
    assert d["status"] == "fail", d
    assert d["figure"] == "256 samples read: 1 differs in structure", d["figure"]
    assert "index 101: sample[0] has shape [31], not [32] like 255 others" in d["advice"], d["advice"]
    assert d["details"]["scan"]["structure"] == "(tensor float32 [32], tensor int64 [])"


def test_a_slow_dataset_warns_recommends_more_workers_and_stays_within_its_budget(tmp_path):
    # 20000 samples of 5 ms: 50 s per rank to read them all, so the scan reads a random subset
    _, results = doctor(tmp_path, "--only", "data", recipe=flawed(tmp_path, num_samples=20000, sleep_s=0.005))
    d = results["data"]
    assert d["status"] == "warn", d
    assert d["details"]["waiting_share"] > 0.8, d["details"]
    assert "the loader is the bottleneck: at num_workers=0 a step waits" in d["advice"], d["advice"]
    recommended = d["details"]["recommended"]["num_workers"]
    assert recommended >= 2 and f"set data.num_workers={recommended}" in d["advice"], d["advice"]
    assert re.search(r"it waits on I/O, so more workers than this rank.s \d+ CPUs? help", d["advice"]), d["advice"]
    rates = {s["num_workers"]: s["batches_per_s"] for s in d["details"]["settings"]}
    assert rates[recommended] > 1.5 * rates[0], rates
    tried, steps = d["details"]["tried"], d["details"]["steps"]  # measured in training steps, not only expected
    assert tried["num_workers"] == recommended and tried["step_s"] < steps["step_s"] / 2, (tried, steps)
    scan = d["details"]["scan"]
    assert scan["mode"] == "random" and 100 < scan["read"] < 20000, scan
    assert f"read {scan['read']} of 20000 samples (a random subset" in d["figure"], d["figure"]
    assert d["seconds"] < 40, d["seconds"]
