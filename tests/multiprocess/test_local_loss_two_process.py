"""Local loss (``GapClipConfig.local_loss``): each of 2 processes (gloo) computes only its own samples' rows of the
objective, and the loss and the DDP-averaged gradients equal the 1-process global step's at 1e-6, for every base loss
and gap term of the other equivalence modules (the term of ``examples/custom_term.py`` included), with uneven
batches (5 + 3 rows) and rows of one image within a process and across processes."""

from __future__ import annotations

import pytest

from tests.multiprocess import (
    test_cusa_two_process,
    test_custom_term_two_process,
    test_dias_two_process,
    test_lgmgc_two_process,
    test_two_process_equivalence,
)
from tests.multiprocess.test_custom_term_two_process import unregister  # noqa: F401  (fixture)
from tests.multiprocess.test_two_process_equivalence import assert_equivalent

pytestmark = pytest.mark.multiprocess

GLOBAL_SPECS = {
    name: spec
    for module in (
        test_two_process_equivalence, test_lgmgc_two_process, test_dias_two_process, test_cusa_two_process,
        test_custom_term_two_process,
    )
    for name, spec in module.SPECS.items()
}
SPECS = {f"{name}-local": {**spec, "local_loss": True} for name, spec in GLOBAL_SPECS.items()}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_local_loss_two_process_equal_one_process_global(name, unregister):  # noqa: F811
    assert_equivalent(SPECS[name])
