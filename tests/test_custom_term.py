"""A gap term of one's own, in one file outside the package (``examples/custom_term.py``): its math against a naive
reference, and training end to end through the recipes (``--term_module``, ``--gap_terms``, ``--extra_columns``) and
as its own script, on 1 and 2 processes, with no change to gapclip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gapclip.cli import import_term_modules
from gapclip.losses import TERM_REGISTRY

from .test_recipes import load_recipe, tiny_flags

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_term.py"
TERM = "label_supcon"


@pytest.fixture
def example():
    """The example imported as --term_module does (registering its term), unregistered afterwards."""
    (module,) = import_term_modules(str(EXAMPLE))
    yield module
    TERM_REGISTRY.pop(TERM, None)
    sys.modules.pop(module.__name__, None)


def naive_supcon(embeds: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon L_out by loops: mean over anchors with a positive of -mean_p log softmax_{a≠i}(z_i·z_a/τ)[p]."""
    per_anchor = []
    n = embeds.shape[0]
    for i in range(n):
        others = [a for a in range(n) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        denominator = torch.logsumexp(torch.stack([embeds[i] @ embeds[a] / temperature for a in others]), 0)
        per_anchor.append(-torch.stack([embeds[i] @ embeds[p] / temperature - denominator for p in positives]).mean())
    return torch.stack(per_anchor).mean()


def test_the_term_matches_the_naive_reference_and_a_hand_computed_case(example):
    term = example.LabelSupConLoss(4, temperature=0.5)
    g = torch.Generator().manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # label 2 and 3 have no positive: not anchors
    torch.testing.assert_close(term.compute_loss_from_embeddings(embeds, labels), naive_supcon(embeds, labels, 0.5))
    # three orthonormal rows, rows 0 and 1 share a label: L = mean over anchors 0, 1 of -log(e^0 / (e^0 + e^0)) = log 2
    eye = torch.eye(3, dtype=torch.float64)
    value = term.compute_loss_from_embeddings(eye, torch.tensor([5, 5, 6]))
    assert value.item() == pytest.approx(float(torch.log(torch.tensor(2.0))))
    assert term.compute_loss_from_embeddings(eye, torch.tensor([1, 2, 3])).item() == 0.0  # no positive anywhere
    with pytest.raises(ValueError, match="option temperature must be > 0"):
        example.LabelSupConLoss(4, temperature=0.0)


def test_registered_from_outside_with_options_from_its_signature(example):
    assert TERM_REGISTRY[TERM] is example.LabelSupConLoss and example.__name__.startswith("_gapclip_term_module_")
    assert example.LabelSupConLoss.default_options == {"temperature": 0.1, "modality": "image"}
    assert [(i.name, i.dtype) for i in example.LabelSupConLoss.inputs] == [("label", torch.long)]
    assert import_term_modules(str(EXAMPLE)) == [example]  # importing again is a no-op
    assert import_term_modules(f" {EXAMPLE} , json") == [example, json]  # files and modules, comma-separated
    with pytest.raises(ValueError, match="no such file"):
        import_term_modules(str(ROOT / "examples" / "missing.py"))
    with pytest.raises(ValueError, match="no module of that name"):
        import_term_modules("no_such_module_anywhere")


def test_the_same_file_imported_under_another_name_registers_again(example, monkeypatch):
    """``import custom_term`` in a script that also passes ``--term_module custom_term.py``: one definition, no clash."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("custom_term_again", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "custom_term_again", module)
    spec.loader.exec_module(module)
    assert TERM_REGISTRY[TERM] is module.LabelSupConLoss is not example.LabelSupConLoss


def test_the_model_gathers_and_passes_the_label(example, make_clip_model, clip_inputs):
    model = make_clip_model(gap_terms=[{"name": TERM, "weight": 0.5, "options": {"temperature": 0.2}}])
    assert [i.name for i in model.declared_term_inputs] == ["label"]
    labels = torch.tensor([0, 0, 1, 1])
    out = model(**clip_inputs, return_loss=True, term_inputs={"label": labels})
    expected = naive_supcon(out.image_embeds.detach(), labels, 0.2)
    assert out.loss_terms[TERM].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"gap term\(s\) \['label_supcon'\] need input 'label'.*--extra_columns"):
        model(**clip_inputs, return_loss=True)


def test_trains_through_a_recipe_unchanged(example, tiny_demo_root, tmp_path):
    labels = example.write_demo_labels(tiny_demo_root, tmp_path / "labels.jsonl")
    spec = json.dumps([{"name": TERM, "weight": 0.5, "options": {"modality": "text"}}])
    flags = tiny_flags(
        tmp_path / "out", "--max_steps", "3", "--logging_steps", "1", "--term_module", str(EXAMPLE),
        "--extra_columns", str(labels), "--gap_terms", spec,
    )
    result = load_recipe("train_clip_lgmgc").main(flags)
    config = result["trainer"].model.config
    assert config.gap_terms == [{"name": TERM, "weight": 0.5, "options": {"modality": "text"}}]
    logged = [entry for entry in result["trainer"].state.log_history if f"loss_{TERM}" in entry]
    assert len(logged) == 3 and all(entry[f"loss_{TERM}"] > 0 for entry in logged)
    assert f"loss_{TERM}" in result["rows"]["after training"]
    card = (tmp_path / "out" / "export" / "README.md").read_text()
    assert "khosla2020supcon" in card  # the term's own citation


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _assert_trained_with_the_term(out: Path, steps: int) -> None:
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    assert any(f"loss_{TERM}" in entry for entry in state["log_history"])
    rows = json.loads((out / "retrieval.json").read_text())
    assert list(rows) == ["before training", "after training"] and f"loss_{TERM}" in rows["after training"]


@pytest.mark.slow
def test_the_example_script_smoke_run(tmp_path):
    """``python examples/custom_term.py --smoke`` (the documented command) trains and reports."""
    out = tmp_path / "smoke"
    result = _run([sys.executable, str(EXAMPLE), "--smoke", "--output_dir", str(out)], tmp_path)
    _assert_trained_with_the_term(out, 10)
    assert "| after training" in result.stdout
    labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 96 and {row["label"] for row in labels} == {0, 1, 2, 3}  # 4 demo backgrounds


@pytest.mark.slow
@pytest.mark.multiprocess
def test_trains_through_a_recipe_on_two_processes(tiny_demo_root, tmp_path):
    """torchrun, 2 CPU processes: each imports the term module, the label column is gathered with the batch."""
    labels = tmp_path / "labels.jsonl"
    entries = json.loads((tiny_demo_root / "dataset_demo.json").read_text())["images"]
    # another labelling than the script's: the number of objects in the image
    labels.write_text("".join(json.dumps({"image_id": str(e["imgid"]), "label": len(e["objects"])}) + "\n"
                              for e in entries))
    out = tmp_path / "out"
    flags = tiny_flags(
        out, "--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--term_module", str(EXAMPLE), "--extra_columns", str(labels),
        "--gap_terms", json.dumps([{"name": TERM, "weight": 0.5}]),
    )
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(ROOT / "recipes" / "train_clip_lgmgc.py"), *flags], tmp_path)
    _assert_trained_with_the_term(out, 3)
