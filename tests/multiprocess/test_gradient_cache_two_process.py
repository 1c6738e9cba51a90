"""Gradient caching on 2 processes (gloo): each process embeds its rows 2 at a time (chunks of 2, 2, 1 and 2, 1),
re-runs them in backward and averages the gradients itself; loss and gradients equal the 1-process uncached global
step's. With the local loss for every objective whose terms use a collective of their own or the model's (the
gather of embeddings, local features, fused rows, projections, mask statistics, ``dias_dim``'s sums), and with the
global loss for one objective per family; every term's cached gradients on one process, global and local, are in
``tests/test_gradient_cache.py``."""

from __future__ import annotations

import pytest

from tests.multiprocess.test_custom_term_two_process import unregister  # noqa: F401  (fixture)
from tests.multiprocess.test_local_loss_two_process import GLOBAL_SPECS
from tests.multiprocess.test_two_process_equivalence import assert_equivalent

pytestmark = pytest.mark.multiprocess

#: One spec per code path; the full product with every spec would triple the one torchrun launch all specs share.
LOCAL_CACHED = (
    "clip-infonce", "siglip-sigmoid", "clip-triplet-distance-weighted", "lsc-concat", "gst-infonce-skip", "gst-kl",
    "csa+usa", "dias_dim", "dias_inter-sparse", "dias_intra-sparse", "triplet-all-dias", "label_supcon+gst",
)
GLOBAL_CACHED = ("clip-infonce", "lsc-concat", "csa+usa", "triplet-all-dias", "label_supcon+gst")
SPECS = {
    **{f"{name}-cached": {**GLOBAL_SPECS[name], "gradient_cache_chunk_size": 2} for name in GLOBAL_CACHED},
    **{
        f"{name}-local-cached": {**GLOBAL_SPECS[name], "local_loss": True, "gradient_cache_chunk_size": 2}
        for name in LOCAL_CACHED
    },
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_gradient_cache_two_process_equal_one_process_uncached(name, unregister):  # noqa: F811
    assert_equivalent(SPECS[name])
