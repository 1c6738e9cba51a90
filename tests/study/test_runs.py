"""Run cache keys: what changes a run's result changes its key, and nothing else does."""

from __future__ import annotations

from gapclip.study import runs
from gapclip.study.runs import RunSpec, run_key


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
