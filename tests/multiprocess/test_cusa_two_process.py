"""CUSA terms: a 2-process (gloo) step equals the 1-process step on the concatenated batch.

The model gathers the teacher embeddings with the rest of the batch, so the teacher targets P are taken over the
global batch on every process; the term parameters (projectors, temperatures) get identical gradients everywhere.
"""

from __future__ import annotations

import pytest

from tests.multiprocess.test_two_process_equivalence import assert_equivalent

pytestmark = pytest.mark.multiprocess

CSA = {"name": "csa", "weight": 0.1}
USA = {"name": "usa", "weight": 0.5}
SPECS = {
    "csa": {"gap_terms": [CSA]},
    "usa": {"gap_terms": [USA]},
    "csa+usa": {"gap_terms": [CSA, USA]},
    "csa+usa-siglip": {"backbone": "siglip", "gap_terms": [CSA, {**USA, "options": {"init_temperature": 0.2}}]},
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_cusa_two_process_equal_one_process(name, tmp_path):
    assert_equivalent(SPECS[name], tmp_path)
