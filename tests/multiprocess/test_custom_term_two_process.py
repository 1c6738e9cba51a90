"""A term of one's own (``examples/custom_term.py``, imported by path): a 2-process (gloo) step equals the 1-process
step on the concatenated batch, its ``label`` input gathered by the model like the built-in terms' inputs."""

from __future__ import annotations

import sys

import pytest

from gapclip.losses import TERM_REGISTRY
from tests.multiprocess.test_two_process_equivalence import assert_equivalent

pytestmark = pytest.mark.multiprocess

SUPCON = {"name": "label_supcon", "weight": 0.5, "options": {"temperature": 0.2}}
SPECS = {
    "label_supcon": {"term_modules": ["examples/custom_term.py"], "gap_terms": [SUPCON]},
    "label_supcon+gst": {
        "term_modules": ["examples/custom_term.py"], "gap_terms": [SUPCON, {"name": "gst", "weight": 1.0}],
    },
}


@pytest.fixture
def unregister():
    """The 1-process reference imports the example (registering its term): undo both afterwards."""
    yield
    TERM_REGISTRY.pop("label_supcon", None)
    for name in [name for name in sys.modules if name.startswith("_gapclip_term_module_custom_term")]:
        del sys.modules[name]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_custom_term_two_process_equal_one_process(name, tmp_path, unregister):
    assert_equivalent(SPECS[name], tmp_path)
