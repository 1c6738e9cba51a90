"""LG-MGC terms: a 2-process (gloo) step equals the 1-process step on the concatenated batch (loss and gradients)."""

from __future__ import annotations

import pytest

from tests.multiprocess.test_two_process_equivalence import assert_equivalent

pytestmark = pytest.mark.multiprocess

SPECS = {
    **{f"lsc-{f}": {"gap_terms": [{"name": "lsc", "options": {"fusion": f}}]} for f in ("concat", "max", "mean")},
    **{f"gst-{d}": {"gap_terms": [{"name": "gst", "options": {"distance": d}}]} for d in ("infonce", "kl", "l2")},
    # Rows without a translation on both processes (one of them is a same-image row) are left out of GST.
    **{
        f"gst-{d}-skip": {
            "gap_terms": [{"name": "gst", "options": {"distance": d, "on_missing": "skip"}}],
            "missing_translation_rows": [3, 6],
        }
        for d in ("infonce", "kl", "l2")
    },
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_lgmgc_two_process_equal_one_process(name, tmp_path):
    assert_equivalent(SPECS[name], tmp_path)
