"""2-process (gloo) gathered loss and gradients equal the 1-process ones on the concatenated batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gapclip.testing_multiprocess import single_process_reference

pytestmark = pytest.mark.multiprocess

SPECS = {
    "clip-infonce": {"gap_terms": []},
    "siglip-sigmoid": {"backbone": "siglip", "gap_terms": []},
    "clip-triplet": {"base_loss": "triplet", "gap_terms": []},
}


def run_two_process(spec: dict, tmp_path) -> tuple[list[dict], list[dict]]:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gapclip.testing_multiprocess", str(spec_path), str(tmp_path / "out")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    values = [json.loads((tmp_path / "out" / f"values_rank{r}.json").read_text()) for r in range(2)]
    grads = [load_file(str(tmp_path / "out" / f"grads_rank{r}.safetensors")) for r in range(2)]
    return values, grads


def assert_equivalent(spec: dict, tmp_path) -> None:
    ref_values, ref_grads = single_process_reference(spec)
    values, grads = run_two_process(spec, tmp_path)
    for rank in range(2):
        for key, ref in ref_values.items():
            assert values[rank][key] == pytest.approx(ref, abs=1e-6, rel=1e-6), (rank, key)
        assert set(grads[rank]) == set(ref_grads)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[rank][name], ref, atol=1e-6, rtol=1e-5, msg=f"rank {rank} grad {name}")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_base_losses_two_process_equal_one_process(name, tmp_path):
    assert_equivalent(SPECS[name], tmp_path)
