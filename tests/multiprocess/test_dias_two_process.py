"""DIAS terms: the 2-process (gloo) gathered loss and gradients, β included, equal the 1-process ones."""

from __future__ import annotations

import pytest

from tests.multiprocess.test_two_process_equivalence import assert_equivalent

pytestmark = pytest.mark.multiprocess

SPECS = {
    "dias_dim": {"gap_terms": [{"name": "dias_dim", "weight": 10.0}]},
    "dias_inter-dense": {"gap_terms": [{"name": "dias_inter", "weight": 0.05, "options": {"sparse": False}}]},
    "dias_inter-sparse": {
        "gap_terms": [{"name": "dias_inter", "weight": 0.05, "options": {"beta_init": -0.3, "max_batch_size": 16}}]
    },
    "dias_intra-dense": {"gap_terms": [{"name": "dias_intra", "weight": 0.1, "options": {"sparse": False}}]},
    "dias_intra-sparse": {"gap_terms": [{"name": "dias_intra", "weight": 0.1, "options": {"beta_init": -0.3}}]},
    "triplet-all-dias": {
        "base_loss": "triplet",
        "triplet_mining": "distance_weighted",
        "gap_terms": [
            {"name": "dias_dim", "weight": 10.0},
            {"name": "dias_inter", "weight": 0.05},
            {"name": "dias_intra", "weight": 0.1},
        ],
    },
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_dias_two_process_equal_one_process(name, tmp_path):
    assert_equivalent(SPECS[name], tmp_path)
