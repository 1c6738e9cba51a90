"""``study.json`` and ``study.md``: per method the per-seed and mean ± std test metrics and the paired comparison
with its baseline, and with its control where the study ran one (``Variant.control``: the same batches without the
terms); see :mod:`gapclip.study.stats` for the statistics."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .stats import cluster_bootstrap_rsum, holm, mean_std, paired_seed_test, verdict

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "modality_gap")
_HEADERS = ("i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "RSUM", "Gap")


def _baseline_of(variant: Any, variants: list[Any]) -> Any:
    return next(v for v in variants if v.base == variant.base and v.is_baseline)


def _compare(study: Any, finished: dict[int, Any], other_runs: dict[int, Any], text_to_image: np.ndarray):
    """The paired comparison of a row's finished runs with another row's (its baseline's, or its control's) on the
    seeds both have: RSUM by cluster bootstrap over test images and by t-test over seeds, the gap by t-test over
    seeds."""
    shared = sorted(set(finished) & set(other_runs))
    if not shared:
        return None
    bootstrap = cluster_bootstrap_rsum(
        [(finished[s]["ranks"]["i2t"], finished[s]["ranks"]["t2i"]) for s in shared],
        [(other_runs[s]["ranks"]["i2t"], other_runs[s]["ranks"]["t2i"]) for s in shared],
        text_to_image, num_resamples=study.settings.bootstrap_resamples,
    )
    seed_rsum = paired_seed_test(
        {s: finished[s]["test"]["rsum"] for s in shared}, {s: other_runs[s]["test"]["rsum"] for s in shared}
    )
    seed_gap = paired_seed_test(
        {s: finished[s]["test"]["modality_gap"] for s in shared},
        {s: other_runs[s]["test"]["modality_gap"] for s in shared},
    )
    return {
        "seeds": shared,
        "rsum": {"bootstrap": bootstrap, "seeds": seed_rsum, "verdict": verdict(bootstrap, seed_rsum)},
        "modality_gap": {"seeds": seed_gap},
    }


def summarise_regime(
    study: Any, regime: str, outcome: dict[str, Any], context: Any, *, wall_seconds: float, run_seconds: float,
    run_count: int, trained_count: int,
):
    """The ``study.json`` section of one regime. ``wall_seconds`` is this invocation's (a resumed study reads
    finished runs back), in which ``trained_count`` of the runs were trained; ``run_seconds`` sums the training time
    recorded by each of its ``run_count`` runs, whenever they ran."""
    variants = [v for v in study.settings.variants() if v.name in outcome["runs"]]
    text_to_image = np.concatenate(
        [np.full(len(captions), row) for row, captions in enumerate(context.test["captions"])]
    )
    finished_runs = {  # by row, the runs that did not diverge
        v.name: {seed: r for seed, r in outcome["runs"][v.name].items() if r.get("test") is not None} for v in variants
    }
    methods: dict[str, Any] = {}
    for variant in variants:
        runs = outcome["runs"][variant.name]
        finished = finished_runs[variant.name]
        entry: dict[str, Any] = {
            "family": variant.family, "base": variant.base, "sampler": variant.sampler, "main_table": variant.main,
            "terms": variant.gap_terms(outcome["weights"]), "learning_rate": outcome["learning_rate"][variant.base],
            "epochs": outcome["epochs"][variant.base],
            "seeds": {
                str(seed): {**{m: r["test"][m] for m in METRICS}, "best_epoch": r["best_epoch"]}
                for seed, r in finished.items()
            },
            "diverged_seeds": [seed for seed, r in runs.items() if r.get("test") is None],
        }
        if finished:
            stats = {m: mean_std([r["test"][m] for r in finished.values()]) for m in METRICS}
            entry["mean"] = {m: value[0] for m, value in stats.items()}
            entry["std"] = {m: value[1] for m, value in stats.items()}
        entry["vs_baseline"] = None
        if not variant.is_baseline and finished:
            baseline = _baseline_of(variant, variants)
            vs = _compare(study, finished, finished_runs[baseline.name], text_to_image)
            entry["vs_baseline"] = vs and {"baseline": baseline.name, **vs}
        control = next((v for v in variants if v.name == variant.control), None)
        if control is not None and finished:  # only when the study ran the control too (it may be an optional row)
            vs = _compare(study, finished, finished_runs[control.name], text_to_image)
            entry["vs_control"] = vs and {"control": control.name, **vs}
        methods[variant.name] = entry
    # the regime's comparisons are one family: the more rows a study compares, the more reach p < 0.05 by chance
    compared = {(name, kind): e[kind]["rsum"]["bootstrap"]["p"]
                for name, e in methods.items() for kind in ("vs_baseline", "vs_control") if e.get(kind)}
    for (name, kind), p in holm(compared).items():
        methods[name][kind]["rsum"]["holm"] = {"p": p, "family_size": len(compared)}
    declared = _declared_comparisons(study, finished_runs, text_to_image)
    return {
        "start": context.extra.get("start"),
        "start_digest": context.extra.get("start_digest"),  # config and weights by content: which start, exactly
        "cache_key": context.key,  # the context part of every run's key (runs/<regime>/<run key>.json)
        "epoch_grid": list(study.settings.epochs[regime]),
        "epochs": outcome["epochs"],
        "stopped_after": study.settings.stop_after,
        "learning_rate_grid": list(study.settings.learning_rates[regime]),
        "weight_factors": list(study.settings.weight_factors),
        "selection": outcome["selection"],
        "methods": methods,
        "wall_seconds": round(wall_seconds, 1),
        "run_seconds": round(run_seconds, 1),
        "run_count": run_count,
        "trained_count": trained_count,
        **({"comparisons": declared} if declared else {}),  # only when the study declared some (--compare)
    }


def _declared_comparisons(study: Any, finished_runs: dict[str, dict[int, Any]], text_to_image: np.ndarray):
    """``StudySettings.comparisons``: each ``row`` minus ``other`` on the seeds both finished, with the statistics of
    :func:`_compare`. They are further questions a study was designed to ask (e.g. one equation read two ways), so they
    stay out of the Holm family of the baseline and control comparisons: their p is the bootstrap's, unadjusted."""
    declared = []
    for row, other in study.settings.comparisons:
        vs = None
        if row in finished_runs and other in finished_runs:  # a row whose data lacks what it needs did not run
            vs = _compare(study, finished_runs[row], finished_runs[other], text_to_image)
        declared.append({"row": row, "other": other, **(vs or {"seeds": []})})
    return declared


def _machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {
        "platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_write": [round(x, 2) for x in load] if load else None,
    }


def report_stem(stop_after: str | None) -> str:
    """``study``, or ``selection-<stage>`` for a study stopped after a selection stage (``StudySettings.stop_after``),
    so that a partial run never overwrites the report of a finished one in the same folder."""
    return "study" if stop_after is None else f"selection-{stop_after.replace('_', '-')}"


def write_reports(study: Any, results: dict[str, Any], started: float) -> None:
    """Write ``study.json`` and ``study.md`` (see :func:`report_stem`) into the study's output folder (called after
    every regime)."""
    results["settings"] = {
        "regimes": list(study.settings.regimes), "seeds": study.settings.seeds,
        "families": list(study.settings.families), "batch_size": study.settings.batch_size,
        "image_size": study.settings.image_size, "scratch_model": {
            "width": study.settings.scratch_width, "layers": study.settings.scratch_layers},
        "bootstrap_resamples": study.settings.bootstrap_resamples,
        # only when set, so that the reports of studies made before the option stay as they were
        **({"own_weights": True} if study.settings.own_weights else {}),
    }
    results["data"] = {k: v for k, v in vars(study.data_args).items() if v is not None}
    if study.command:
        results["command"] = study.command
    results["machine"] = _machine()
    results["wall_seconds"] = round(time.time() - started, 1)
    out = Path(study.output_dir)
    stem = report_stem(study.settings.stop_after)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    (out / f"{stem}.md").write_text(render_markdown(results))


def _cell(mean: float, std: float, n: int, decimals: int) -> str:
    return f"{mean:.{decimals}f}" if n < 2 else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _row(name: str, entry: dict[str, Any]) -> str:
    n = len(entry["seeds"])
    if not n:
        return f"| {name} | 0 | " + " | ".join("diverged" for _ in METRICS) + " | | | | | |"
    cells = [_cell(entry["mean"][m], entry["std"][m], n, 3 if m == "modality_gap" else 1) for m in METRICS]
    comparison = _comparison_cells(entry.get("vs_baseline"))
    diverged = f" ({len(entry['diverged_seeds'])} diverged)" if entry["diverged_seeds"] else ""
    return f"| {name} | {n}{diverged} | " + " | ".join(cells + comparison) + " |"


def _comparison_cells(vs: dict[str, Any] | None, *, adjusted: bool = True) -> list[str]:
    """ΔRSUM [95% CI], p (Holm; with ``adjusted=False`` the bootstrap's own), p (seeds), ΔGap and the verdict of one
    comparison (blank without one)."""
    if not vs:
        return ["", "", "", "", ""]
    boot, seeds, gap = vs["rsum"]["bootstrap"], vs["rsum"]["seeds"], vs["modality_gap"]["seeds"]
    holm = vs["rsum"].get("holm") if adjusted else {"p": boot["p"], "family_size": 1}
    return [
        f"{boot['diff']:+.1f} [{boot['ci_low']:+.1f}, {boot['ci_high']:+.1f}]",
        _holm_cell(holm, boot["num_resamples"]),
        "" if seeds["p"] is None else f"{seeds['p']:.3f}",
        f"{gap['diff']:+.3f}",
        vs["rsum"]["verdict"],
    ]


def _pair_table(headings: tuple[str, str, str], pairs: list[tuple[str, str, dict[str, Any]]], *,
                adjusted: bool) -> list[str]:
    """One row per comparison of a row with another (its control, or a row ``--compare`` names): ``headings`` name
    the two rows' columns and the p column."""
    first, second, p_heading = headings
    header = [first, second, "Seeds", "ΔRSUM [95% CI]", p_heading, "p (seeds)", "ΔGap", "Verdict"]
    lines = _table_head(header, left_columns=2)
    for name, other, vs in pairs:
        if not vs["seeds"]:
            lines.append(f"| {name} | {other} | 0 | not compared: no seed finished in both | | | | |")
            continue
        cells = _comparison_cells(vs, adjusted=adjusted)
        lines.append(f"| {name} | {other} | {len(vs['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def _control_table(methods: dict[str, Any]) -> list[str]:
    """The rows compared with their control (the same batches without the terms) as well as with their baseline."""
    pairs = [(name, e["vs_control"]["control"], e["vs_control"]) for name, e in methods.items() if e.get("vs_control")]
    return _pair_table(("Method", "Control", "p (Holm)"), pairs, adjusted=True)


def _declared_table(comparisons: list[dict[str, Any]]) -> list[str]:
    """``--compare``'s comparisons, outside the Holm family: their p is the bootstrap's, unadjusted."""
    pairs = [(c["row"], c["other"], c) for c in comparisons]
    return _pair_table(("Row", "Minus", "p (bootstrap)"), pairs, adjusted=False)


def _holm_cell(holm: dict[str, Any] | None, num_resamples: int) -> str:
    """A comparison's p with the size of the family Holm adjusted it in (a family of one: unadjusted)."""
    if holm is None:
        return ""
    if holm["p"] == 0.0:  # no replicate crossed 0: p is below the bootstrap's resolution, 2 / resamples
        return f"<{min(1.0, holm['family_size'] * 2.0 / num_resamples):.3f}"
    return f"{holm['p']:.3f}"


def _table_head(header: list[str], left_columns: int) -> list[str]:
    """A markdown table's header and alignment lines: the first ``left_columns`` columns left-aligned, the rest right."""
    return ["| " + " | ".join(header) + " |",
            "|" + "|".join([":---"] * left_columns + ["---:"] * (len(header) - left_columns)) + "|"]


def _table(methods: dict[str, Any], names: list[str]) -> list[str]:
    header = ["Method", "Seeds", *_HEADERS, "ΔRSUM [95% CI]", "p (Holm)", "p (seeds)", "ΔGap", "Verdict"]
    return _table_head(header, left_columns=1) + [_row(name, methods[name]) for name in names]


def _invocation(section: dict[str, Any]) -> str:
    """What this invocation did of a regime's runs: a read-back's wall time says nothing about the runs' own."""
    trained, wall = section["trained_count"], section["wall_seconds"] / 60
    if trained == 0:
        return "all read back from earlier invocations: none trained in this one"
    read_back = section["run_count"] - trained
    return f"{trained} trained in this invocation, {wall:.1f} min wall" + (f"; {read_back} read back" if read_back else "")


def render_markdown(results: dict[str, Any]) -> str:
    lines = ["# Method study", ""]
    settings = results["settings"]
    data = results["data"]
    lines.append(
        f"Data: `{data.get('dataset')}` (train `{data.get('train_split')}`, selection on `{data.get('eval_split')}`, "
        f"results on `{data.get('test_split')}`); seeds: {settings['seeds']}; batch {settings['batch_size']}; "
        f"wall time of this invocation {results['wall_seconds'] / 60:.1f} min (finished runs are read back) on "
        f"{results['machine']['cpus']} CPUs "
        f"(torch {results['machine']['torch']}, load average {results['machine']['load_average_at_write']})."
    )
    if results.get("command"):
        lines += ["", f"Command: `{results['command']}`"]
    lines += [
        "",
        "ΔRSUM: method minus its baseline (same base loss), on seed-averaged per-query hits, with a 95 % paired "
        "cluster-bootstrap interval over test images (test-set noise); a row run on one seed is compared with its "
        "baseline's first seed, a row on several seeds with the baseline's same seeds. p (Holm): the bootstrap p of "
        "ΔRSUM adjusted by Holm's step-down over all of the regime's comparisons in this report, so below 0.05 a "
        "difference survives a correction for the number of rows compared. p (seeds): paired t-test of the per-seed "
        "RSUM (training noise). Verdict: *gain*/*loss* only when the interval excludes 0 and every seed's difference "
        "has the same sign (no multiplicity correction: read it with p (Holm)); otherwise *no measurable "
        "difference*. ΔGap: mean per-seed difference of the modality gap (negative = smaller gap).",
    ]
    for skipped, reason in results.get("skipped", {}).items():
        lines.append(f"- Skipped `{skipped}`: {reason}.")
    for regime, section in results["regimes"].items():
        lines += ["", f"## Regime: {regime}", ""]
        lines.append(
            f"Each run: a cosine schedule of its base loss's selected length, the epoch with the best validation RSUM "
            f"kept. {section['run_count']} runs, {section['run_seconds'] / 60:.1f} min of run time summed over them "
            f"({_invocation(section)})."
        )
        if section.get("start_digest"):
            lines.append(f"Start: `{section['start']}`, weights digest `{section['start_digest']}` (runs are cached "
                         "under it: only runs of this very start are reused).")
        if section.get("stopped_after"):
            lines.append(f"Stopped after the `{section['stopped_after']}` selection (`--stop_after`): no test results.")
        lines += ["", "Schedule length (stage 0, validation RSUM of each length at the middle learning rate, in a "
                  "later round at the rate stage 1 selected, seed 0; best epoch in parentheses; † a length added "
                  "because the best one was at the end of the grid):", ""]
        for base, sel in section["selection"].get("epochs", {}).items():
            for step in sel.get("rounds", [sel]):
                grid = ", ".join(
                    f"{e}{'' if int(e) in step['grid'] else '†'}: {_fmt(v)} ({step['best_epoch'][e]})"
                    for e, v in step["validation_rsum"].items()
                )
                lines.append(f"- {base}{_round(step)} (lr {step['learning_rate']:g}): {grid} → "
                             f"**{step['selected']} epochs**")
        if section["selection"]["learning_rate"]:
            lines += ["", "Learning rate (stage 1, validation RSUM of each grid value at the selected length, seed 0; "
                      "† a value added because the best one was at the end of the grid; a round after the first "
                      "chooses the length again at the new rate, then the rate at the new length):", ""]
        for base, sel in section["selection"]["learning_rate"].items():
            for step in sel.get("rounds", [sel]):
                grid = ", ".join(
                    f"{lr}{'' if float(lr) in step['grid'] else '†'}: {_fmt(v)}"
                    for lr, v in step["validation_rsum"].items()
                )
                lines.append(f"- {base}{_round(step)}{_at(step)}: {grid} → **{step['selected']:g}**")
            if sel.get("fixed_point") is False:
                lines.append(f"  ({base}: the rate still moved in the last of the rounds allowed, "
                             "`--coordinate_rounds`; the length was chosen at the rate before)")
        if section["selection"]["weights"]:
            lines += ["", "Term weights (stage 2, validation RSUM of each weight, seed 0; paper weight in italics):", ""]
            for name, sel in section["selection"]["weights"].items():
                if sel.get("fixed"):
                    lines.append(f"- {name}: **{sel['selected']:g}**, given (`--fixed_weights`), not selected in this "
                                 f"study (paper: *{sel['paper']:g}*)")
                    continue
                centre = sel.get("centre", sel["paper"])
                swept = [float(f"{centre * f:g}") for f in section["weight_factors"]]
                around = f" (grid around {centre:g}, `--weight_centres`)" if "centre" in sel else ""
                grid = ", ".join(
                    (f"*{w}*" if float(w) == sel["paper"] else w) + ("" if float(w) in swept else "†") + f": {_fmt(v)}"
                    for w, v in sel["validation_rsum"].items()
                )
                baseline = sel["baseline_validation_rsum"]
                # stage 2 picks among the grid's weights, never "off": say so when the baseline beat every one of them
                scores = list(sel["validation_rsum"].values())
                below = baseline is not None and bool(scores) and all(v is not None and v < baseline for v in scores)
                lines.append(
                    f"- {name}{around}: {grid} → **{sel['selected']:g}** (its baseline: {_fmt(baseline)}"
                    + ("; every weight scores below it: the grid has no \"off\" point, so the best of them is used)"
                       if below else ")")
                )
        methods = section["methods"]
        if not methods:
            continue
        main = [name for name, entry in methods.items() if entry["main_table"]]
        single = [name for name, entry in methods.items() if not entry["main_table"]]
        lines += ["", "### Main table: test split, mean ± std over seeds", ""] + _table(methods, main)
        if single:
            seeds = "one seed" if all(len(methods[n]["seeds"]) < 2 for n in single) else "mean ± std over seeds"
            lines += ["", f"### Other variants: test split, {seeds}", ""] + _table(methods, single)
        if any(entry.get("vs_control") for entry in methods.values()):
            lines += ["", "### Against the same batches without the terms (the terms' own effect)", "",
                      "ΔRSUM and ΔGap: the row minus its control, the row with the same base loss and batches and no "
                      "term, on the seeds both have; statistics and Holm family as above.", ""]
            lines += _control_table(methods)
        if section.get("comparisons"):
            lines += ["", "### Further comparisons between rows (`--compare`)", "",
                      "ΔRSUM and ΔGap: the row minus the other row, on the seeds both have; statistics as above, but "
                      "outside the Holm family: p (bootstrap) is unadjusted.", ""]
            lines += _declared_table(section["comparisons"])
    return "\n".join(lines) + "\n"


def _round(step: dict) -> str:
    return f", round {step['round']}" if step.get("round", 1) > 1 else ""


def _at(step: dict) -> str:
    return f" ({step['epochs']} epochs)" if step.get("round", 1) > 1 else ""


def _fmt(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.1f}"
