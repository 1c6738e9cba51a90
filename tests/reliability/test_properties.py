"""Property tests of the losses at the GapBatch level (hypothesis): on random small batches with random same-image
duplicates, every base loss and gap term is finite with finite gradients, invariant to a joint permutation of the
rows, and non-negative where its math says so (all but ``dias_dim``, a correlation-based term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gapclip.losses import TERM_REGISTRY, GapBatch, build_terms
from gapclip.losses.contrastive import InfoNCELoss, SigmoidLoss, TripletLoss

TEACHER_DIM = 5
TERM_OPTIONS = {
    "dias_inter": {"sparse": False, "max_batch_size": 64},
    "dias_intra": {"sparse": False, "max_batch_size": 64},
    "gst": {"on_missing": "skip"},
}
NON_NEGATIVE = {"infonce", "sigmoid", "triplet_hardest", "triplet_sum", "csa", "usa", "gst", "gst_kl", "gst_l2",
                "lsc", "dias_inter", "dias_intra"}
BASE = {
    "infonce": InfoNCELoss(), "sigmoid": SigmoidLoss(),
    "triplet_hardest": TripletLoss(mining="hardest"), "triplet_sum": TripletLoss(mining="sum"),
}
_TERMS: dict[tuple[str, int], torch.nn.Module] = {}  # terms own parameters (CUSA projectors): build once per dim


def term(name: str, dim: int) -> torch.nn.Module:
    """``name`` is a registered term, or ``gst_kl`` / ``gst_l2`` (GST with another distance)."""
    key = (name, dim)
    if key not in _TERMS:
        registered, options = name, dict(TERM_OPTIONS.get(name, {}))
        if name.startswith("gst_"):
            registered, options = "gst", {"on_missing": "skip", "distance": name[4:]}
        _TERMS[key] = build_terms([{"name": registered, "options": options}], dim)[registered].double().train()
    return _TERMS[key]


def all_names() -> list[str]:
    names = sorted(TERM_REGISTRY)
    if "gst" in names:
        names += ["gst_kl", "gst_l2"]
    return [n for n in names if n in {"lsc", "gst", "gst_kl", "gst_l2", "dias_dim", "dias_inter", "dias_intra",
                                      "csa", "usa"}]


@st.composite
def batches(draw):
    b = draw(st.integers(2, 6))
    d = draw(st.integers(4, 8))
    p, length = draw(st.integers(2, 6)), draw(st.integers(2, 6))
    image_index = draw(st.lists(st.integers(0, b - 1), min_size=b, max_size=b))
    seed = draw(st.integers(0, 2**31 - 1))
    names = draw(st.lists(st.sampled_from(all_names()), unique=True, min_size=1))
    weights = {n: draw(st.floats(0.0, 3.0, allow_nan=False)) for n in names}
    perm = draw(st.permutations(range(b)))
    g = torch.Generator().manual_seed(seed)

    def rows_mask(n: int, m: int) -> torch.Tensor:
        mask = torch.rand(n, m, generator=g) < 0.6
        mask[torch.arange(n), torch.randint(0, m, (n,), generator=g)] = True  # at least one valid per row
        return mask

    raw = {
        "image": torch.randn(b, d, generator=g, dtype=torch.float64),
        "text": torch.randn(b, d, generator=g, dtype=torch.float64),
        "translation": torch.randn(b, d, generator=g, dtype=torch.float64),
        "patch": torch.randn(b, p, d, generator=g, dtype=torch.float64),
        "token": torch.randn(b, length, d, generator=g, dtype=torch.float64),
        "teacher_image": F.normalize(torch.randn(b, TEACHER_DIM, generator=g, dtype=torch.float64), dim=-1),
        "teacher_text": F.normalize(torch.randn(b, TEACHER_DIM, generator=g, dtype=torch.float64), dim=-1),
        "patch_mask": rows_mask(b, p), "token_mask": rows_mask(b, length),
        "has_translation": torch.rand(b, generator=g) < 0.8,
        "image_index": torch.tensor(image_index),
    }
    raw["has_translation"][0] = True
    scale = float(draw(st.floats(1.0, 100.0)))
    bias = float(draw(st.floats(-10.0, 0.0)))
    return raw, names, weights, list(perm), scale, bias


def make_batch(raw, scale, bias, perm=None):
    if perm is not None:
        raw = {k: v[perm] for k, v in raw.items()}
    leaves = {k: raw[k].clone().requires_grad_(True) for k in ("image", "text", "translation", "patch", "token")}
    batch = GapBatch(
        image_embeds=F.normalize(leaves["image"], dim=-1), text_embeds=F.normalize(leaves["text"], dim=-1),
        logit_scale=torch.tensor(scale, dtype=torch.float64), logit_bias=torch.tensor(bias, dtype=torch.float64),
        image_index=raw["image_index"], patch_embeds=leaves["patch"], patch_mask=raw["patch_mask"],
        token_embeds=leaves["token"], token_mask=raw["token_mask"],
        extras={
            "translation_embeds": F.normalize(leaves["translation"], dim=-1), "has_translation": raw["has_translation"],
            "teacher_image_embeds": raw["teacher_image"], "teacher_text_embeds": raw["teacher_text"],
        },
    )
    return batch, leaves


def evaluate(raw, names, weights, scale, bias, perm=None):
    batch, leaves = make_batch(raw, scale, bias, perm)
    values = {name: loss(batch) for name, loss in BASE.items()}
    values.update({name: term(name, raw["image"].shape[1])(batch) for name in names})
    total = sum(values[n] for n in BASE) + sum(weights[n] * values[n] for n in names)
    for module in _TERMS.values():
        module.zero_grad(set_to_none=True)
    total.backward()
    grads = [leaf.grad for leaf in leaves.values() if leaf.grad is not None]
    grads += [p.grad for n in names for p in term(n, raw["image"].shape[1]).parameters() if p.grad is not None]
    return {k: v.detach() for k, v in values.items()}, grads


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_losses_finite_permutation_invariant_and_non_negative(drawn):
    raw, names, weights, perm, scale, bias = drawn
    values, grads = evaluate(raw, names, weights, scale, bias)
    for name, value in values.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, value)
        if name in NON_NEGATIVE:
            assert value.item() >= -1e-9, (name, value.item())
    for grad in grads:
        assert torch.isfinite(grad).all()
    permuted, _ = evaluate(raw, names, weights, scale, bias, perm)
    for name, value in values.items():
        assert torch.allclose(value, permuted[name], rtol=1e-7, atol=1e-9), (name, value.item(), permuted[name].item())


def test_a_batch_that_shows_one_image_only_stays_finite():
    """Edge case hypothesis rarely draws: every row is a caption of the same image (no negatives at all)."""
    g = torch.Generator().manual_seed(0)
    b, d = 3, 5
    raw = {
        "image": torch.randn(b, d, generator=g, dtype=torch.float64),
        "text": torch.randn(b, d, generator=g, dtype=torch.float64),
        "translation": torch.randn(b, d, generator=g, dtype=torch.float64),
        "patch": torch.randn(b, 3, d, generator=g, dtype=torch.float64),
        "token": torch.randn(b, 4, d, generator=g, dtype=torch.float64),
        "teacher_image": F.normalize(torch.randn(b, TEACHER_DIM, generator=g, dtype=torch.float64), dim=-1),
        "teacher_text": F.normalize(torch.randn(b, TEACHER_DIM, generator=g, dtype=torch.float64), dim=-1),
        "patch_mask": torch.ones(b, 3, dtype=torch.bool), "token_mask": torch.ones(b, 4, dtype=torch.bool),
        "has_translation": torch.ones(b, dtype=torch.bool), "image_index": torch.zeros(b, dtype=torch.long),
    }
    names = all_names()
    values, grads = evaluate(raw, names, {n: 1.0 for n in names}, 10.0, -5.0)
    assert all(torch.isfinite(v) for v in values.values()), values
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert values["triplet_hardest"] == 0 and values["triplet_sum"] == 0  # no negatives: no violation
