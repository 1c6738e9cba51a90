"""The method study: tune the baselines, sweep each term's weight, then run every variant over seeds.

For each regime (``pretrained``: fine-tune a pretrained dual encoder; ``scratch``: train a small CLIP from scratch):

0. **Schedule length.** For each base loss (InfoNCE; triplet with distance-weighted negatives, summed), train at
   every schedule length of the regime's ``epochs`` grid (seed 0, at the middle learning rate of the grid) and keep
   the length with the best *validation* RSUM. Within every run, in every stage, the epoch with the best validation
   RSUM is the model kept (early stopping under a cosine schedule of that length); stage 0 chooses the length of the
   schedule itself, which early stopping cannot (a run whose best epoch is its last may want a longer one).
1. **Baselines.** For each base loss, at its selected schedule length, train at every learning rate of the grid
   (seed 0) and keep the one with the best validation RSUM.
2. **Weight sweeps.** For each term (alone, on its family's base loss at that base's selected learning rate, seed
   0), train at ``paper weight × factor`` for every factor and keep the weight with the best validation RSUM.
3. **Variants.** Every row of :func:`~gapclip.study.variants.default_variants` at the selected settings: the main
   table (baselines, each term alone, each full method) over ``seeds`` seeds, the other variants on one seed.
   Runs identical to a stage-1/2 run (same settings, seed 0) are that run, not a rerun.

Each term inherits its base loss's schedule length and learning rate (tuned once, on the baseline: a method is
never given a longer search than its baseline). Stages 0 and 1 are a coordinate search: the length is chosen at the
middle learning rate, the learning rate at that length, and while the rate moves, the length is chosen again at the
new rate and the rate at the new length (``coordinate_rounds`` rounds at most), until the pair is a fixed point. One
pass is not enough: on the demo data, stage 0 chose 16 epochs at 1e-4, stage 1 then chose 3e-4, and at 3e-4 a
32-epoch schedule scored 14.6 validation RSUM more than 16 (InfoNCE, pretrained start). Only stage 3's test-split
numbers are reported as results; the test split never enters a selection. Every run is cached on disk under
``output_dir/runs/<regime>/`` by a key of everything it depends on, so an interrupted study resumes where it stopped
and a finished run is never redone.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .report import summarise_regime, write_reports
from .pool import RunExecutor, default_workers
from .runs import RunContext, RunSpec, RunStore, load_run
from .variants import BASELINES, OWN_WEIGHT_SWEEPS, SWEEPS, Variant, default_variants

logger = logging.get_logger(__name__)

__all__ = ["FAMILIES", "REGIMES", "STOP_AFTER", "MethodStudy", "StudySettings"]

REGIMES = ("pretrained", "scratch")
FAMILIES = ("LG-MGC", "DIAS", "CUSA")
#: ``StudySettings.stop_after``: run the study up to (and including) that selection stage; None: everything.
STOP_AFTER = (None, "epochs", "learning_rate", "weights")


@dataclass
class StudySettings:
    """The study's own settings (the data comes from :class:`gapclip.cli.DataArguments`).

    Args:
        regimes: ``("pretrained", "scratch")`` or one of them.
        seeds: seeds of the main table (the other variants run on the first seed, unless ``seeds_every_row``).
        seeds_every_row: every row runs on ``seeds`` seeds, not only the main table's (with ``variant_names``: to
            give chosen single-seed rows more seeds).
        families: method families to study (with the baselines of their base losses).
        variant_names: only these rows (names as in the tables, e.g. ``"+CSA"``), with the baselines of their base
            losses (an optional row, ``Variant.optional``, runs only when named here); empty: every non-optional
            row of ``families``. With one-value grids it reruns chosen rows under other settings
            (e.g. a longer schedule) without the rest of the study.
        learning_rates: per regime, the learning-rate grid of stage 1.
        epochs: per regime, the schedule lengths (epochs of the cosine schedule) stage 0 chooses from; one value fixes
            the length (no stage 0). Each run keeps its best epoch on validation.
        weight_factors: stage 2 tries ``paper weight × factor`` for each factor.
        fixed_weights: terms (sweep names, e.g. ``"dias_dim"``) whose weight is given, not selected: stage 2 trains
            nothing for them and every variant uses the given weight. For reruns of chosen rows under other settings
            with the weights an earlier study selected (a full method's terms were selected at different factors of
            their paper weights, which one ``weight_factors`` value cannot express).
        weight_centres: terms whose stage-2 grid is ``centre × factor`` instead of ``paper weight × factor``: to
            select a weight again under other settings (e.g. a longer schedule) on a grid around the weight an earlier
            study selected, which may lie far from the paper's.
        max_grid_extensions: a schedule-length, learning-rate or weight grid whose best value is at an end grows by
            one more step that way, at most this many times.
        coordinate_rounds: rounds of stages 0-1 at most: after the first, while stage 1 moves the learning rate, the
            length is chosen again at the new rate and the rate at the new length (1: a single pass).
        model_name_or_path: the pretrained start; default the demo CLIP of ``recipes/pretrain_demo.py`` (made on
            first use, at ``image_size``).
        image_size: image size of the demo data, of the demo pretraining and of a from-scratch model.
        pretrain_overrides: ``gapclip.pretrain.PretrainSettings`` fields for the default pretrained start.
        own_weights: the max and mean LSC fusions and the KL and L2 GST distances get stage-2 sweeps of their own
            (``lsc_max``, ``lsc_mean``, ``gst_kl``, ``gst_l2``; :data:`~gapclip.study.variants.OWN_WEIGHT_SWEEPS`),
            instead of using the weight selected for the concat fusion (``lsc``) and the InfoNCE distance (``gst``).
        comparisons: further paired comparisons between two rows the study runs, ``(row, other)``: ``row`` minus
            ``other`` with the same statistics as a row against its baseline (e.g. two readings of one paper's
            equation), reported apart from the baseline and control comparisons and outside their Holm family.
    """

    regimes: tuple[str, ...] = REGIMES
    seeds: int = 3
    seeds_every_row: bool = False
    families: tuple[str, ...] = FAMILIES
    learning_rates: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {"pretrained": (3e-5, 1e-4, 3e-4), "scratch": (3e-4, 1e-3, 3e-3)}
    )
    epochs: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"pretrained": (1, 2, 4), "scratch": (5, 10)})
    weight_factors: tuple[float, ...] = (0.1, 1.0, 10.0)
    fixed_weights: dict[str, float] = field(default_factory=dict)
    weight_centres: dict[str, float] = field(default_factory=dict)
    max_grid_extensions: int = 2
    coordinate_rounds: int = 3
    batch_size: int = 64
    eval_batch_size: int = 128
    scratch_width: int = 128
    scratch_layers: int = 3
    image_size: int = 48
    model_name_or_path: str | None = None
    pretrained_backbone: str = "clip"
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    bootstrap_resamples: int = 2000
    device: str = "auto"
    stop_after: str | None = None
    variant_names: tuple[str, ...] = ()
    own_weights: bool = False
    comparisons: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if not self.regimes or any(regime not in REGIMES for regime in self.regimes):
            raise ValueError(f"regimes must be among {list(REGIMES)}, got {self.regimes!r}.")
        if not self.families or any(family not in FAMILIES for family in self.families):
            raise ValueError(f"families must be among {list(FAMILIES)}, got {self.families!r}.")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}.")
        for regime in self.regimes:
            if not self.learning_rates.get(regime) or any(not lr > 0 for lr in self.learning_rates[regime]):
                raise ValueError(f"learning_rates[{regime!r}] must list positive numbers, got "
                                 f"{self.learning_rates.get(regime)!r}.")
            grid = self.epochs.get(regime)
            grid = (grid,) if isinstance(grid, int) else tuple(grid or ())
            if not grid or any(isinstance(e, bool) or int(e) != e or e < 1 for e in grid):
                raise ValueError(f"epochs[{regime!r}] must list whole numbers of epochs >= 1, got "
                                 f"{self.epochs.get(regime)!r}.")
            self.epochs = {**self.epochs, regime: tuple(sorted(int(e) for e in grid))}
        if self.max_grid_extensions < 0:
            raise ValueError(f"max_grid_extensions must be >= 0, got {self.max_grid_extensions}.")
        if isinstance(self.coordinate_rounds, bool) or not isinstance(self.coordinate_rounds, int) \
                or self.coordinate_rounds < 1:
            raise ValueError(f"coordinate_rounds must be a whole number >= 1, got {self.coordinate_rounds!r}.")
        if not self.weight_factors or any(not f > 0 for f in self.weight_factors):
            raise ValueError(f"weight_factors must list positive numbers, got {self.weight_factors!r}.")
        for option in ("fixed_weights", "weight_centres"):
            given = getattr(self, option)
            unknown = sorted(set(given) - set(SWEEPS))
            if unknown:
                raise ValueError(f"{option}: unknown terms {unknown}; the terms are {list(SWEEPS)}.")
            bad = {name: w for name, w in given.items() if isinstance(w, bool) or not float(w) > 0}
            if bad:
                raise ValueError(f"{option} must be positive numbers, got {bad}.")
        own = sorted(set(OWN_WEIGHT_SWEEPS) & (set(self.fixed_weights) | set(self.weight_centres)))
        if own and not self.own_weights:
            raise ValueError(f"{own}: these fusions' and distances' weights are their own only with own_weights "
                             "(--own_weights); without it they use the weight of lsc (concat) and gst (InfoNCE).")
        both = sorted(set(self.fixed_weights) & set(self.weight_centres))
        if both:
            raise ValueError(f"{both}: a term's weight is either given (fixed_weights) or selected on a grid around a "
                             "centre (weight_centres), not both.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}.")
        if self.stop_after not in STOP_AFTER:
            raise ValueError(f"stop_after must be one of {list(STOP_AFTER)}, got {self.stop_after!r}.")
        known = [v.name for v in default_variants()]
        unknown = [name for name in self.variant_names if name not in known]
        if unknown:
            raise ValueError(f"variant_names (--variants): unknown {unknown}; the rows are {known}.")
        rows = [v.name for v in self.variants()] if self.comparisons else []
        for pair in self.comparisons:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"comparisons (--compare): {pair!r} must name two different rows, 'row vs other'.")
            missing = [name for name in pair if name not in rows]
            if missing:
                raise ValueError(f"comparisons (--compare): {missing} not among the rows this study runs {rows}; "
                                 "name them in --variants (or their family in --families) too.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available here.")

    @property
    def use_cpu(self) -> bool:
        return self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())

    def variants(self) -> list[Variant]:
        """The rows of the requested families (or the named rows), and the baselines of the base losses they use."""
        named = set(self.variant_names)
        every = default_variants(self.own_weights)
        rows = [v for v in every if (v.name in named if named else v.family in self.families and not v.optional)]
        bases = {v.base for v in rows}
        return [v for v in every if v in rows or (v.family == "baseline" and v.base in bases)]


class MethodStudy:
    """Runs the study for ``settings`` on the data of ``data_args`` and writes ``study.md`` / ``study.json``.

    Example::

        >>> from gapclip.cli import DataArguments
        >>> study = MethodStudy(StudySettings(regimes=("pretrained",)), DataArguments(demo_image_size=48), "out")
        >>> results = study.run()  # resumable: finished runs are read back from out/runs/
    """

    def __init__(
        self, settings: StudySettings, data_args: Any, output_dir: str | Path, *, show_progress: bool = True,
        workers: int | None = None, command: str | None = None,
    ):
        self.settings = settings
        self.command = command  # the command line that made the study, written into its reports
        self.data_args = data_args
        self.output_dir = Path(output_dir)
        self.show_progress = show_progress
        self.workers = default_workers(settings.use_cpu) if workers is None else workers
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}.")

    # ------------------------------------------------------------------ what runs
    def available_variants(self, available: set[str]) -> list[Variant]:
        return [v for v in self.settings.variants() if v.needs <= available]

    def needed_bases(self, available: set[str]) -> list[str]:
        return [base for base in BASELINES if any(v.base == base for v in self.available_variants(available))]

    def needed_sweeps(self, available: set[str]) -> list[str]:
        used = {use.sweep for v in self.available_variants(available) for use in v.terms}
        return [name for name in SWEEPS if name in used]

    def unused_weight_terms(self, available: set[str], option: str = "fixed_weights") -> list[str]:
        """The terms ``option`` (``fixed_weights`` or ``weight_centres``) names that no variant this study runs on its
        data uses (what is given for them does nothing)."""
        return sorted(set(getattr(self.settings, option)) - set(self.needed_sweeps(available)))

    def weight_grid(self, name: str) -> tuple[float, ...]:
        """Stage 2's grid for term ``name``: its centre (``weight_centres``, else its paper weight) × each factor."""
        centre = self.settings.weight_centres.get(name)
        if centre is None:
            # left unrounded: a weight is part of its run's cache key, and the committed runs were keyed by these values
            return tuple(SWEEPS[name].paper_weight * f for f in self.settings.weight_factors)
        return tuple(float(f"{float(centre) * f:.12g}") for f in self.settings.weight_factors)

    def seeds_of(self, variant: Variant) -> list[int]:
        return list(range(self.settings.seeds)) if variant.main or self.settings.seeds_every_row else [0]

    @staticmethod
    def is_stage_run(variant: Variant, seed: int) -> bool:
        """Is (variant, seed) the very run that stage 1 or 2 trained (so it is read back, not redone)?"""
        if seed != 0 or variant.sampler != "random" or len(variant.terms) > 1:
            return False
        if not variant.terms:
            return True
        use = variant.terms[0]
        return use.spec(1.0) == SWEEPS[use.sweep].spec(1.0)  # the term exactly as its sweep trained it

    # ------------------------------------------------------------------ the stages
    def _stages(
        self, regime: str, available: set[str], fetch: Callable[[list[RunSpec]], list[dict]]
    ) -> dict[str, Any]:
        """Stages 0-3 (up to ``stop_after``); ``fetch(specs) -> records`` trains (or reads back) a stage's independent
        runs at once. Returns the selections and every variant's runs."""
        settings = self.settings
        selection: dict[str, Any] = {"epochs": {}, "learning_rate": {}, "weights": {}}
        outcome: dict[str, Any] = {"selection": selection, "runs": {}, "weights": {}, "learning_rate": {}}
        bases = self.needed_bases(available)

        # 0-1. schedule length and learning rate of each base loss (a coordinate search, repeated to a fixed point)
        epochs, learning_rate = self._tune_baselines(regime, bases, fetch, selection)
        outcome["epochs"] = epochs
        if settings.stop_after == "epochs":
            return outcome
        outcome["learning_rate"] = learning_rate
        if settings.stop_after == "learning_rate":
            return outcome

        # 2. weight of each term, alone on its base loss
        sweeps = self.needed_sweeps(available)
        fixed = {name: float(settings.fixed_weights[name]) for name in sweeps if name in settings.fixed_weights}
        weights, grids = self._select(
            {name: self.weight_grid(name) for name in sweeps if name not in fixed},
            lambda name, weight: RunSpec.make(
                f"{regime}: sweep {name} weight={weight:g}", SWEEPS[name].base, [SWEEPS[name].spec(weight)],
                learning_rate=learning_rate[SWEEPS[name].base], epochs=epochs[SWEEPS[name].base], seed=0,
            ),
            fetch,
        )
        weights.update(fixed)
        for name in sweeps:
            sweep = SWEEPS[name]
            selection["weights"][name] = {
                "selected": weights[name], "paper": sweep.paper_weight, "source": sweep.source,
                **({"fixed": True} if name in fixed else {}),
                **({"centre": float(settings.weight_centres[name])} if name in settings.weight_centres else {}),
                "validation_rsum": {f"{w:g}": _val(r) for w, r in sorted(grids.get(name, {}).items())},
                "baseline_validation_rsum": selection["learning_rate"][sweep.base]["validation_rsum"][
                    f"{learning_rate[sweep.base]:g}"],
            }
        outcome["weights"] = weights
        if settings.stop_after == "weights":
            return outcome

        # 3. every variant at the selected settings
        cells = [(v, seed) for v in self.available_variants(available) for seed in self.seeds_of(v)]
        records = fetch([
            RunSpec.make(
                f"{regime}: {v.name}, seed {seed}", v.base, v.gap_terms(weights),
                learning_rate=learning_rate[v.base], epochs=epochs[v.base], seed=seed, sampler=v.sampler,
            )
            for v, seed in cells
        ])
        for (variant, seed), record in zip(cells, records):
            outcome["runs"].setdefault(variant.name, {})[seed] = record
        return outcome

    def _tune_baselines(
        self, regime: str, bases: list[str], fetch: Callable[[list[RunSpec]], list[dict]], selection: dict[str, Any]
    ) -> tuple[dict[str, int], dict[str, float]]:
        """Stages 0 and 1 for every base loss: (schedule length, learning rate), each recorded in ``selection``.

        Round 1 is stage 0 on the regime's length grid at the middle learning rate, then stage 1 on the rate grid at
        the selected length. The two interact (a higher rate may want a longer or a shorter schedule), so while the
        rate stage 1 selects differs from the one the length was chosen at, another round (up to
        ``coordinate_rounds``) chooses the length again at the new rate, on a grid centred on the current length
        (÷2, ×1, ×2, extended at its ends as any grid), and, if the length moved, the rate again at the new length
        (÷3, ×1, ×3 around the current rate). A base loss whose pair no longer moves is at a fixed point: its length
        is the best at its rate and its rate the best at its length. Runs already trained (the same length and rate,
        seed 0) are read back, not redone. With one length (or one rate) there is nothing to iterate.
        """
        settings = self.settings
        search = len(settings.epochs[regime]) > 1 and len(settings.learning_rates[regime]) > 1
        rounds = settings.coordinate_rounds if search else 1
        probe = dict.fromkeys(bases, middle(settings.learning_rates[regime]))
        epochs: dict[str, int] = {}
        learning_rate: dict[str, float] = {}
        length_rounds: dict[str, list[dict]] = {base: [] for base in bases}
        rate_rounds: dict[str, list[dict]] = {base: [] for base in bases}
        to_length = list(bases)
        for round_ in range(1, rounds + 1):
            # stage 0: the length, at each base loss's current rate
            length_grid = {
                base: settings.epochs[regime] if round_ == 1 else _centred(epochs[base], 2, whole=True)
                for base in to_length
            }
            chosen, grids = self._select(
                length_grid,
                lambda base, length: RunSpec.make(
                    f"{regime}: {base} baseline, {length:g} epochs, lr={probe[base]:g}", base, [],
                    learning_rate=probe[base], epochs=int(length), seed=0,
                ),
                fetch, whole=True,
            )
            to_rate = []
            for base in to_length:
                length = int(chosen[base])
                length_rounds[base].append({
                    "round": round_, "selected": length, "grid": [int(e) for e in length_grid[base]],
                    "learning_rate": probe[base], **_grid_scores(grids[base], lambda e: str(int(e))),
                })
                if round_ == 1 or length != epochs[base]:
                    to_rate.append(base)
                epochs[base] = length
            if settings.stop_after == "epochs" or not to_rate:
                break
            # stage 1: the rate, at each moved base loss's new length
            rate_grid = {
                base: settings.learning_rates[regime] if round_ == 1 else _centred(learning_rate[base], 3)
                for base in to_rate
            }
            chosen, grids = self._select(
                rate_grid,
                lambda base, lr: RunSpec.make(
                    f"{regime}: {base} baseline, lr={lr:g}", base, [], learning_rate=lr, epochs=epochs[base], seed=0
                ),
                fetch,
            )
            to_length = []
            for base in to_rate:
                rate_rounds[base].append({
                    "round": round_, "selected": chosen[base], "grid": list(rate_grid[base]), "epochs": epochs[base],
                    **_grid_scores(grids[base], lambda lr: f"{lr:g}"),
                })
                learning_rate[base] = chosen[base]
                if chosen[base] != probe[base]:
                    probe[base] = chosen[base]
                    to_length.append(base)
            if not to_length:
                break
        for base in bases:
            fixed_point = (learning_rate.get(base) == length_rounds[base][-1]["learning_rate"]
                           or len(length_rounds[base]) > len(rate_rounds[base]))
            selection["epochs"][base] = {**length_rounds[base][-1], "rounds": length_rounds[base]}
            if rate_rounds[base]:
                selection["learning_rate"][base] = {**rate_rounds[base][-1], "rounds": rate_rounds[base],
                                                    "fixed_point": fixed_point if search else None}
        return epochs, learning_rate

    def _select(
        self, grids: dict[str, tuple[float, ...]], make_spec: Callable[[str, float], RunSpec],
        fetch: Callable[[list[RunSpec]], list[dict]], *, whole: bool = False,
    ) -> tuple[dict[str, float], dict[str, dict[float, dict]]]:
        """The value of each grid with the best validation RSUM. A grid whose best value is at one of its ends is
        extended by one more step in that direction (the ratio of its two outermost values there; ``whole``: rounded
        to a whole number, at least 1), up to ``max_grid_extensions`` times, so that a selection is not an artefact of
        where the grid stopped. All grids' runs of a round are fetched together."""
        records: dict[str, dict[float, dict]] = {group: {} for group in grids}
        extensions = dict.fromkeys(grids, 0)
        pending = {group: sorted(values) for group, values in grids.items()}
        while pending:
            cells = [(group, value) for group, values in pending.items() for value in values]
            for (group, value), record in zip(cells, fetch([make_spec(group, value) for group, value in cells])):
                records[group][value] = record
            pending = {}
            for group, grid in records.items():
                ordered, best = sorted(grid), _argmax(grid)
                if len(ordered) < 2 or extensions[group] >= self.settings.max_grid_extensions:
                    continue
                if best == ordered[-1]:
                    step = best * ordered[-1] / ordered[-2]
                elif best == ordered[0]:
                    step = best * ordered[0] / ordered[1]
                else:
                    continue
                step = float(max(1, round(step))) if whole else float(f"{step:.12g}")
                if step in grid:  # a whole-number grid that cannot grow further that way (e.g. below 1 epoch)
                    continue
                pending[group] = [step]
                extensions[group] += 1
        return {group: _argmax(grid) for group, grid in records.items()}, records

    # ------------------------------------------------------------------ running
    def _regimes(self):
        """Yield (regime, context, available inputs, run folder, runs to do), announcing each regime's plan."""
        from .context import build_context, load_study_data, study_inputs

        self.output_dir.mkdir(parents=True, exist_ok=True)
        datasets = load_study_data(self.data_args)
        available, teachers, self.skipped = study_inputs(self, datasets)
        for option in ("fixed_weights", "weight_centres"):
            unused = self.unused_weight_terms(available, option)
            if unused:
                logger.warning(
                    f"--{option}: no variant this study runs on this data uses {unused}, so what it gives for them is "
                    f"ignored (the variants' terms: {self.needed_sweeps(available)}). Check --variants and the term "
                    "names."
                )
        for regime in self.settings.regimes:
            context = build_context(self, regime, datasets, teachers)
            folder = self.output_dir / "runs" / regime
            total, missing = self.count_runs(regime, available, context, folder)
            todo = len(missing)
            self._warn_of_runs_from_another_start(regime, context, todo)
            estimate = self._estimate(context, missing)
            logger.warning(
                f"Study, {regime} regime: {total} runs ({total - todo} already done); about {estimate / 60:.0f} min "
                "for the rest on this machine (from a timed training step and evaluation; terms add up to ~30 %)."
                + (" Until the selection runs have scores, both are lower bounds: the grid extensions and search "
                   "rounds their scores call for are not counted." if todo else "")
            )
            yield regime, context, available, folder, {"runs": total, "to_do": todo, "estimated_seconds": estimate}

    def _warn_of_runs_from_another_start(self, regime: str, context: RunContext, todo: int) -> None:
        """A study folder copied to another machine keeps its runs, but the start remade there differs (float
        rounding), so they are cached under another key and would otherwise be trained again without a word."""
        earlier = _earlier_section(self.output_dir, regime)
        if not todo or earlier is None or earlier.get("cache_key") in (None, context.key):
            return
        digests = ""
        then, now = earlier.get("start_digest"), context.extra.get("start_digest")
        if then or now:
            digests = f"; start weights digest {then} there, {now} now"
        logger.warning(
            f"Study, {regime} regime: the runs recorded in {earlier['file']} were made from another start, other "
            f"data or other batch settings (context key {earlier['cache_key']} there, {context.key} now{digests}). "
            "They are not reused: this study trains its own. To reuse them, give it the very start they came from "
            "(--model_name_or_path) and the same data and batch flags."
        )

    def plan(self) -> dict[str, dict[str, float]]:
        """The runs of each regime, how many are still to do, and the estimated time (nothing is trained, but the
        data, the teachers and the pretrained start are prepared)."""
        return {regime: plan for regime, _, _, _, plan in self._regimes()}

    def run(self) -> dict[str, Any]:
        """Run (or resume) every regime; returns the content of ``study.json``."""
        started = time.time()
        results: dict[str, Any] = {"regimes": {}}
        for regime, context, available, folder, plan in self._regimes():
            results["skipped"] = self.skipped
            regime_start = time.time()
            run_seconds: dict[RunSpec, float] = {}  # every distinct run of the regime, sweeps included

            def fetch(specs: list[RunSpec]) -> list[dict]:
                records = executor.fetch(specs)
                for spec, record in zip(specs, records):
                    run_seconds[replace(spec, label="")] = float(record.get("wall_seconds", 0.0))
                return records

            with tqdm(total=plan["to_do"], desc=f"study ({regime})", disable=not self.show_progress) as bar, \
                    RunExecutor(context, folder, workers=self.workers, progress=bar) as executor:
                outcome = self._stages(regime, available, fetch)
            results["regimes"][regime] = summarise_regime(
                self, regime, outcome, context, wall_seconds=time.time() - regime_start,
                run_seconds=sum(run_seconds.values()), run_count=len(run_seconds), trained_count=executor.trained,
            )
            results["regimes"][regime]["plan"] = plan
            write_reports(self, results, started)
        return results

    def count_runs(
        self, regime: str, available: set[str], context: RunContext, folder: Path
    ) -> tuple[int, list[RunSpec]]:
        """(number of runs of the regime, the runs not on disk yet), walking the stages over the cache. A missing run
        stands in with validation RSUM 0, so selections that depend on it (and the grid extensions and schedule
        lengths they cause) are provisional until it has run: the counts are then estimates."""
        seen: set[str] = set()
        missing: dict[str, RunSpec] = {}
        store = RunStore(folder, context.key)

        def fetch(specs: list[RunSpec]) -> list[dict]:
            records = []
            for spec in specs:
                key = store.key(spec)
                seen.add(key)
                record = load_run(folder, key)
                if record is None:
                    missing[key] = spec
                    record = {"validation": {"rsum": 0.0}, "best_epoch": None}
                records.append(record)
            return records

        self._stages(regime, available, fetch)
        return len(seen), list(missing.values())

    def _estimate(self, context: RunContext, todo: list[RunSpec]) -> float:
        """Seconds for the runs ``todo``: a training step and an evaluation timed at a worker's thread count, each
        run's epochs added up, divided over the workers."""
        from .context import run_time_model

        if not todo:
            return 0.0
        threads = torch.get_num_threads()
        if self.workers > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.workers))
        try:
            per_epoch, per_run = run_time_model(context)
        finally:
            torch.set_num_threads(threads)
        total = sum(spec.epochs * per_epoch + per_run for spec in todo)
        return total / min(self.workers, len(todo))


def _centred(value: float, ratio: float, *, whole: bool = False) -> tuple[float, ...]:
    """``value`` and its neighbours a factor ``ratio`` either side (whole numbers ``>= 1`` when ``whole``)."""
    if whole:
        return tuple(sorted({max(1, round(value / ratio)), int(value), int(round(value * ratio))}))
    return tuple(float(f"{v:.12g}") for v in (value / ratio, value, value * ratio))


def middle(grid: tuple[float, ...]) -> float:
    """The middle value of a grid (the lower of the two middle ones for an even count)."""
    ordered = sorted(grid)
    return ordered[(len(ordered) - 1) // 2]


def _grid_scores(grid: dict[float, dict], name: Callable[[float], str]) -> dict[str, dict[str, Any]]:
    """A selection grid's validation RSUM and best epoch per value, keyed by ``name(value)``, in grid order."""
    ordered = sorted(grid.items())
    return {"validation_rsum": {name(value): _val(record) for value, record in ordered},
            "best_epoch": {name(value): record.get("best_epoch") for value, record in ordered}}


def _earlier_section(output_dir: Path, regime: str) -> dict | None:
    """``regime``'s section of the report an earlier invocation left in ``output_dir`` (``study.json``, else a
    ``--stop_after`` report), with ``file`` naming it; None when there is none or it cannot be read."""
    for file in [output_dir / "study.json", *sorted(output_dir.glob("selection-*.json"))]:
        try:
            section = json.loads(file.read_text())["regimes"][regime]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return {**section, "file": str(file)}
    return None


def _val(record: dict | None) -> float | None:
    if record is None or record.get("validation") is None:
        return None
    return record["validation"]["rsum"]


def _argmax(grid: dict[float, dict]) -> float:
    """The grid value whose run has the best validation RSUM (diverged runs never win; ties: the first)."""
    best, best_value = None, -math.inf
    for value, record in grid.items():
        score = _val(record)
        if score is not None and score > best_value:
            best, best_value = value, score
    if best is None:
        raise RuntimeError(f"every run of a selection grid diverged: {sorted(grid)}; lower the learning rates.")
    return best
