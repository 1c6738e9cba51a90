"""What the method study trains: the baselines, every method variant, and the weight sweeps that set their weights.

Each variant is one base loss plus zero or more gap terms. A term's weight is not fixed here: it is the weight its
*sweep* selected on the validation split (:data:`SWEEPS`, each next to the paper's weight), so every term is tuned
on the same footing as the baseline's learning rate. Variants that share a sweep (the three LSC fusions share
``lsc``; the three GST distances share ``gst``) use the same selected weight; a full method uses the selected weight
of each of its terms, each chosen alone. With ``own_weights`` (``default_variants(own_weights=True)``), the max and
mean fusions and the KL and L2 distances each get a sweep of their own (:data:`OWN_WEIGHT_SWEEPS`): their losses have
other scales than the concat fusion's and the InfoNCE distance's, whose weight they share by default.

Bases follow the papers: LG-MGC and CUSA add their terms to CLIP's InfoNCE; DIAS adds its terms to the triplet
loss of Eq. 3 with distance-weighted negatives, summed over the batch (the VSE++/SCAN convention its weights are
set against). Each family is compared with the baseline of its own base loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BASELINES", "OWN_WEIGHT_SWEEPS", "SWEEPS", "TERM_NEEDS", "TermUse", "Variant", "Sweep", "default_variants"]

#: What a term needs from the dataset beyond images and captions: GST a generated caption per image ("translation"
#: column), CUSA precomputed teacher embeddings.
TERM_NEEDS: dict[str, frozenset[str]] = {
    "gst": frozenset({"translation"}), "csa": frozenset({"teacher"}), "usa": frozenset({"teacher"}),
}

#: The two base losses and the model options each one uses.
BASELINES: dict[str, dict[str, Any]] = {
    "infonce": {"base_loss": "infonce"},
    "triplet": {"base_loss": "triplet", "triplet_mining": "distance_weighted", "triplet_reduction": "sum"},
}


@dataclass(frozen=True)
class Sweep:
    """A term (with fixed options) whose weight is chosen on validation among ``paper_weight × factors``.

    ``shares``: the sweep whose selected weight this term uses unless a study gives it its own (``own_weights``).
    """

    name: str
    term: str
    base: str
    paper_weight: float
    options: tuple[tuple[str, Any], ...] = ()
    source: str = ""
    shares: str | None = None

    def spec(self, weight: float) -> dict[str, Any]:
        return {"name": self.term, "weight": float(weight), "options": dict(self.options)}

    @property
    def needs(self) -> frozenset[str]:
        return TERM_NEEDS.get(self.term, frozenset())


#: Paper weights: LG-MGC's supplement gives none (our default 1.0); DIAS Sec. 4.4 (ω_dim = 10, ω_inter = 0.05,
#: ω_intra = 0.1); CUSA's released settings (α = 0.1, β = 0.5).
SWEEPS: dict[str, Sweep] = {
    sweep.name: sweep
    for sweep in (
        Sweep("lsc", "lsc", "infonce", 1.0, (("fusion", "concat"), ("k", 4)), "LG-MGC: none given (ours: 1.0)"),
        Sweep("lsc_max", "lsc", "infonce", 1.0, (("fusion", "max"), ("k", 4)), "LG-MGC: none given (ours: 1.0)",
              shares="lsc"),
        Sweep("lsc_mean", "lsc", "infonce", 1.0, (("fusion", "mean"), ("k", 4)), "LG-MGC: none given (ours: 1.0)",
              shares="lsc"),
        Sweep("gst", "gst", "infonce", 1.0, (("distance", "infonce"),), "LG-MGC: none given (ours: 1.0)"),
        Sweep("gst_kl", "gst", "infonce", 1.0, (("distance", "kl"),), "LG-MGC: none given (ours: 1.0)",
              shares="gst"),
        Sweep("gst_l2", "gst", "infonce", 1.0, (("distance", "l2"),), "LG-MGC: none given (ours: 1.0)",
              shares="gst"),
        Sweep("dias_dim", "dias_dim", "triplet", 10.0, (("correlation_transform", "shift"),), "DIAS Sec. 4.4"),
        Sweep("dias_dim_literal", "dias_dim", "triplet", 10.0, (("correlation_transform", "none"),), "DIAS Sec. 4.4"),
        Sweep("dias_inter", "dias_inter", "triplet", 0.05, (), "DIAS Sec. 4.4"),
        Sweep("dias_intra", "dias_intra", "triplet", 0.1, (), "DIAS Sec. 4.4"),
        Sweep("csa", "csa", "infonce", 0.1, (), "CUSA released settings (α)"),
        Sweep("usa", "usa", "infonce", 0.5, (), "CUSA released settings (β)"),
    )
}


#: The sweeps only a study with ``own_weights`` uses: each LSC fusion and GST distance besides the main ones.
OWN_WEIGHT_SWEEPS: tuple[str, ...] = tuple(name for name, sweep in SWEEPS.items() if sweep.shares)


@dataclass(frozen=True)
class TermUse:
    """A term in a variant: its registry name and options, weighted by the weight ``sweep`` selected."""

    sweep: str
    options: tuple[tuple[str, Any], ...] = ()

    def spec(self, weight: float) -> dict[str, Any]:
        sweep = SWEEPS[self.sweep]
        return {"name": sweep.term, "weight": float(weight), "options": {**dict(sweep.options), **dict(self.options)}}


@dataclass(frozen=True)
class Variant:
    """One row of the study.

    Args:
        name: display name.
        family: ``"baseline"``, ``"LG-MGC"``, ``"DIAS"`` or ``"CUSA"``.
        base: ``"infonce"`` or ``"triplet"`` (its baseline is the row with the same base and no term).
        terms: the gap terms.
        sampler: ``"random"`` batches, or DIAS's ``"kmeans"`` neighbour batches.
        main: in the multi-seed main table (baselines, each term alone, each full method); otherwise one seed
            (unless ``StudySettings.seeds_every_row``).
        optional: not in a study unless named (``--variants``): rows added after full studies were committed, which
            must not change those studies' plans.
        control: the row this one is also compared with when both are in a study (besides its baseline): the same
            batches without the terms, so that a difference is the terms' and not the batches'.
    """

    name: str
    family: str
    base: str
    terms: tuple[TermUse, ...] = ()
    sampler: str = "random"
    main: bool = False
    optional: bool = False
    control: str | None = None

    @property
    def needs(self) -> frozenset[str]:
        """Dataset requirements of its terms (see :data:`TERM_NEEDS`)."""
        return frozenset().union(*(SWEEPS[use.sweep].needs for use in self.terms))

    @property
    def is_baseline(self) -> bool:
        return not self.terms and self.sampler == "random"

    def gap_terms(self, weights: dict[str, float]) -> list[dict[str, Any]]:
        return [use.spec(weights[use.sweep]) for use in self.terms]


def _term_use(main: str, option: str, value: str, own_weights: bool = False) -> TermUse:
    """Sweep ``main``'s term with ``option=value``, weighted by the weight ``main`` selected or, with ``own_weights``,
    by the sweep of its own that has that option (a sweep that ``shares`` ``main``'s weight by default), if any."""
    if own_weights:
        for sweep in SWEEPS.values():
            if sweep.shares == main and dict(sweep.options)[option] == value:
                return TermUse(sweep.name)
    return TermUse(main, ((option, value),))


def _lsc(fusion: str, own_weights: bool = False) -> TermUse:
    return _term_use("lsc", "fusion", fusion, own_weights)


def _gst(distance: str, own_weights: bool = False) -> TermUse:
    return _term_use("gst", "distance", distance, own_weights)


_DIAS_FULL = (TermUse("dias_dim"), TermUse("dias_inter"), TermUse("dias_intra"))
_DENSE = (("sparse", False),)
_LITERAL_EQ14 = (("selection", "difference"),)


_KMEANS_CONTROL = "Triplet, K-means batches"


def default_variants(own_weights: bool = False) -> list[Variant]:
    """Every row of the study, in table order (the ``optional`` ones only when named).

    ``own_weights``: the max and mean LSC fusions and the KL and L2 GST distances are weighted by sweeps of their own
    (:data:`OWN_WEIGHT_SWEEPS`) instead of the concat fusion's and the InfoNCE distance's; the full LG-MGC (concat +
    InfoNCE) is the same either way. A term trained at the same weight is the same run either way."""
    return [
        Variant("InfoNCE baseline", "baseline", "infonce", main=True),
        Variant("Triplet baseline", "baseline", "triplet", main=True),
        # LG-MGC (supplement Tables 2-3): each LSC fusion, each GST distance, the full method
        Variant("+LSC (concat)", "LG-MGC", "infonce", (_lsc("concat"),), main=True),
        Variant("+LSC (max)", "LG-MGC", "infonce", (_lsc("max", own_weights),)),
        Variant("+LSC (mean)", "LG-MGC", "infonce", (_lsc("mean", own_weights),)),
        Variant("+GST (InfoNCE)", "LG-MGC", "infonce", (_gst("infonce"),), main=True),
        Variant("+GST (KL)", "LG-MGC", "infonce", (_gst("kl", own_weights),)),
        Variant("+GST (L2)", "LG-MGC", "infonce", (_gst("l2", own_weights),)),
        Variant("LG-MGC (LSC concat + GST InfoNCE)", "LG-MGC", "infonce", (_lsc("concat"), _gst("infonce")), main=True),
        # DIAS (paper Table 4): each term alone on random batches, then the full method and its ablations
        Variant("+L_dim (shifted, ours)", "DIAS", "triplet", (TermUse("dias_dim"),), main=True),
        Variant("+L_dim (literal Eq. 6)", "DIAS", "triplet", (TermUse("dias_dim_literal"),)),
        Variant("+L_inter (sparse)", "DIAS", "triplet", (TermUse("dias_inter"),), main=True),
        Variant("+L_intra (sparse)", "DIAS", "triplet", (TermUse("dias_intra"),), main=True),
        Variant("DIAS (full: K-means batches, sparse)", "DIAS", "triplet", _DIAS_FULL, "kmeans", main=True,
                control=_KMEANS_CONTROL),
        Variant("DIAS, dense constraints", "DIAS", "triplet",
                (TermUse("dias_dim"), TermUse("dias_inter", _DENSE), TermUse("dias_intra", _DENSE)), "kmeans",
                control=_KMEANS_CONTROL),
        Variant("DIAS, literal Eq. 14 mask", "DIAS", "triplet",
                (TermUse("dias_dim"), TermUse("dias_inter", _LITERAL_EQ14), TermUse("dias_intra", _LITERAL_EQ14)),
                "kmeans", control=_KMEANS_CONTROL),
        Variant("DIAS, random batches", "DIAS", "triplet", _DIAS_FULL),
        # the other half of the batches-vs-terms question "DIAS, random batches" asks: the K-means batches alone
        Variant(_KMEANS_CONTROL, "DIAS", "triplet", (), "kmeans", optional=True),
        # CUSA (paper Table 5)
        Variant("+CSA", "CUSA", "infonce", (TermUse("csa"),), main=True),
        Variant("+USA", "CUSA", "infonce", (TermUse("usa"),), main=True),
        Variant("CUSA (CSA + USA)", "CUSA", "infonce", (TermUse("csa"), TermUse("usa")), main=True),
    ]
