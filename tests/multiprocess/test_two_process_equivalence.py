"""2-process (gloo) gathered loss and gradients equal the 1-process ones on the concatenated batch.

Every spec of the multiprocess test modules runs in one `torchrun` launch (cached for the session), since
starting two Python processes with torch costs more than all the steps together.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.multiprocess.two_process_step import REPO_ROOT, single_process_reference

pytestmark = pytest.mark.multiprocess

SPECS = {
    "clip-infonce": {"gap_terms": []},
    "siglip-sigmoid": {"backbone": "siglip", "gap_terms": []},
    "clip-triplet": {"base_loss": "triplet", "gap_terms": []},
    "clip-triplet-distance-weighted": {"base_loss": "triplet", "triplet_mining": "distance_weighted", "gap_terms": []},
}
SPEC_MODULES = (
    "test_lgmgc_two_process", "test_dias_two_process", "test_cusa_two_process", "test_custom_term_two_process",
    "test_local_loss_two_process", "test_gradient_cache_two_process",
)
_RESULTS: dict[str, tuple[list[dict], list[dict]]] = {}


def _key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def run_two_process(specs: list[dict], out_dir: Path) -> list[tuple[list[dict], list[dict]]]:
    spec_path = out_dir / "specs.json"
    spec_path.write_text(json.dumps({"specs": specs}))
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": python_path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.multiprocess.two_process_step", str(spec_path), str(out_dir / "out")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    results = []
    for index in range(len(specs)):
        folder = out_dir / "out" / str(index)
        values = [json.loads((folder / f"values_rank{r}.json").read_text()) for r in range(2)]
        grads = [load_file(str(folder / f"grads_rank{r}.safetensors")) for r in range(2)]
        results.append((values, grads))
    return results


def _all_known_specs() -> list[dict]:
    specs = list(SPECS.values())
    for name in SPEC_MODULES:
        try:
            specs.extend(importlib.import_module(f"tests.multiprocess.{name}").SPECS.values())
        except (ImportError, AttributeError):
            continue
    return specs


def two_process_results(spec: dict) -> tuple[list[dict], list[dict]]:
    if _key(spec) not in _RESULTS:
        pending = [s for s in _all_known_specs() if _key(s) not in _RESULTS]
        if _key(spec) not in {_key(s) for s in pending}:
            pending.append(spec)
        with tempfile.TemporaryDirectory() as tmp:
            for item, result in zip(pending, run_two_process(pending, Path(tmp))):
                _RESULTS[_key(item)] = result
    return _RESULTS[_key(spec)]


def assert_equivalent(spec: dict, tmp_path=None) -> None:
    ref_values, ref_grads = single_process_reference(spec)
    values, grads = two_process_results(spec)
    for rank in range(2):
        for key, ref in ref_values.items():
            assert values[rank][key] == pytest.approx(ref, abs=1e-6, rel=1e-6), (rank, key)
        assert set(grads[rank]) == set(ref_grads)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[rank][name], ref, atol=1e-6, rtol=1e-5, msg=f"rank {rank} grad {name}")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_base_losses_two_process_equal_one_process(name):
    assert_equivalent(SPECS[name])
