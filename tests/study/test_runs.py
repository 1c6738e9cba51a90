"""Run cache keys: what changes a run's result changes its key, and nothing else does; a run is found again by its
spec."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from gapclip.study import runs
from gapclip.study.runs import RunSpec, RunStore, run_key


def _spec(base: str, **kwargs) -> RunSpec:
    return RunSpec.make("label", base, [], learning_rate=1e-4, epochs=2, seed=0, **kwargs)


def test_the_label_is_not_part_of_the_key():
    assert run_key(_spec("infonce"), "ctx") == run_key(RunSpec.make("other", "infonce", [], learning_rate=1e-4,
                                                                     epochs=2, seed=0), "ctx")


def test_a_base_loss_revision_redoes_only_that_base_losses_runs(monkeypatch):
    before = {base: run_key(_spec(base), "ctx") for base in ("infonce", "triplet")}
    monkeypatch.setitem(runs.BASE_LOSS_REVISIONS, "triplet", "another draw")
    after = {base: run_key(_spec(base), "ctx") for base in ("infonce", "triplet")}
    assert after["infonce"] == before["infonce"] and after["triplet"] != before["triplet"]
    assert run_key(_spec("infonce", sampler="kmeans"), "ctx") != before["infonce"]
    assert run_key(_spec("infonce"), "other context") != before["infonce"]


def _dias_intra(weight: float, *, seed: int = 0) -> RunSpec:
    return RunSpec.make(f"dias_intra={weight!r}", "triplet", [{"name": "dias_intra", "weight": weight}],
                        learning_rate=3e-4, epochs=2, seed=seed)


def _save(folder, spec: RunSpec, context_key: str, *, with_ranks: bool = True) -> str:
    key = run_key(spec, context_key)
    record = {"label": spec.label, "spec": asdict(spec), "test": {"rsum": 1.0}}
    ranks = {"i2t": np.zeros(2, dtype=np.int64), "t2i": np.zeros(2, dtype=np.int64)}
    runs.save_run(folder, key, {"record": record, "ranks": ranks})
    if not with_ranks:
        (folder / f"{key}.npz").unlink()
    return key


def test_weights_of_one_float32_value_weigh_a_float32_loss_identically():
    # the premise of RunStore's read-back: the product stage 2's grid makes and the weight a user types
    assert 0.1 * 0.1 != 0.01 and np.float32(0.1 * 0.1) == np.float32(0.01)
    loss = torch.randn(1000)
    assert torch.equal(loss * (0.1 * 0.1), loss * 0.01)


def test_a_run_is_found_by_its_own_key_or_by_a_spec_whose_weights_are_the_same_float32_values(tmp_path):
    stored = _save(tmp_path, _dias_intra(0.1 * 0.1), "ctx")
    store = RunStore(tmp_path, "ctx")
    assert store.key(_dias_intra(0.1 * 0.1)) == stored
    assert run_key(_dias_intra(0.01), "ctx") != stored
    assert store.key(_dias_intra(0.01)) == stored  # typed in as --fixed_weights dias_intra=0.01
    assert runs.load_run(tmp_path, store.key(_dias_intra(0.01)))["spec"]["gap_terms"][0][1] == 0.1 * 0.1
    # anything that changes the computation still gets its own key
    assert store.key(_dias_intra(0.0101)) == run_key(_dias_intra(0.0101), "ctx")
    assert store.key(_dias_intra(0.01, seed=1)) == run_key(_dias_intra(0.01, seed=1), "ctx")
    assert RunStore(tmp_path, "another context").key(_dias_intra(0.01)) == run_key(_dias_intra(0.01), "another context")


def test_a_run_without_its_ranks_is_not_read_back_for_an_equivalent_spec(tmp_path):
    _save(tmp_path, _dias_intra(0.1 * 0.1), "ctx", with_ranks=False)
    assert RunStore(tmp_path, "ctx").key(_dias_intra(0.01)) == run_key(_dias_intra(0.01), "ctx")


def test_equivalent_specs_not_run_yet_share_the_run_to_come(tmp_path):
    store = RunStore(tmp_path, "ctx")
    first = store.key(_dias_intra(0.01))
    assert first == run_key(_dias_intra(0.01), "ctx")
    assert store.key(_dias_intra(0.1 * 0.1)) == first


def test_the_executor_reads_each_finished_run_once_and_trains_each_missing_run_once(tmp_path, monkeypatch):
    from gapclip.study import pool
    from gapclip.study.runs import RunContext

    done = _dias_intra(0.01)
    _save(tmp_path, done, "ctx")
    context = RunContext(regime="scratch", train=None, validation=None, test=None, processor=None,
                         build_backbone=None, key="ctx", work_dir=tmp_path / "work")
    reads, trained = [], []

    def counting_load_run(folder, key):
        reads.append(key)
        return runs.load_run(folder, key)

    def fake_training(spec, key, context, folder):
        trained.append(key)
        _save(folder, spec, context.key)

    monkeypatch.setattr(pool, "load_run", counting_load_run)
    monkeypatch.setattr(pool, "train_and_save", fake_training)
    missing = _dias_intra(0.02)
    same_float32 = _dias_intra(float(np.float32(0.02)))  # another float, one float32 value: the same run
    with pool.RunExecutor(context, tmp_path, workers=1) as executor:
        records = executor.fetch([done, missing, _dias_intra(0.1 * 0.1), missing, same_float32])
    done_key, missing_key = run_key(done, "ctx"), run_key(missing, "ctx")
    assert trained == [missing_key] and executor.trained == 1
    # one read to find each key on disk, one more for the run trained in between; the 0.1 × 0.1 spec is the 0.01 run
    assert sorted(reads) == sorted([done_key, missing_key, missing_key])
    # the first spec asked for is the one trained, whatever equivalent specs follow it
    assert [r["spec"]["gap_terms"][0][1] for r in records] == [0.01, 0.02, 0.01, 0.02, 0.02]
