#!/usr/bin/env python
"""The method study: what does each gap term do, from a pretrained start and from scratch, against a tuned baseline?

For each regime it (0) selects the schedule length (epochs) of each base loss (InfoNCE, triplet) on the validation
split, (1) its learning rate at that length, (2) each term's weight among ``paper weight × {0.1, 1, 10}`` (a grid
whose best value is at one of its ends grows a step that way, twice at most), (3) trains every variant at the
selected settings — baselines, each term alone and each full method over ``--seeds`` seeds, the other variants
(LSC fusions, GST distances, DIAS readings and ablations) on one seed — and scores them on the test split with a
paired comparison against the baseline (bootstrap interval over test images, t-test over seeds). Results go to
``OUTPUT_DIR/study.md`` and ``study.json`` (``selection-<stage>.md``/``.json`` with ``--stop_after``); runs are
cached in ``OUTPUT_DIR/runs``, so an interrupted study resumes.

    python recipes/study_methods.py --output_dir outputs/study                     # demo data, both regimes
    python recipes/study_methods.py --regime pretrained --families DIAS --seeds 5 --output_dir outputs/dias
    python recipes/study_methods.py --dataset karpathy --karpathy_json dataset_flickr30k.json \\
        --image_root flickr30k-images --translations translations.jsonl --model_name_or_path PATH --output_dir out
    python recipes/study_methods.py --smoke --output_dir /tmp/study                # tiny sizes, a few minutes
    python recipes/study_methods.py --stop_after epochs --output_dir outputs/study  # only the schedule lengths
    python recipes/study_methods.py --regime pretrained --variants "DIAS (full: K-means batches, sparse)" \\
        --pretrained_epochs 32 --pretrained_learning_rates 3e-4 --max_grid_extensions 0 \\
        --fixed_weights dias_dim=1,dias_inter=0.0005,dias_intra=0.01 --output_dir out  # one row, earlier weights
    python recipes/study_methods.py --regime pretrained --variants "+CSA" --pretrained_epochs 32 \\
        --pretrained_learning_rates 1e-4,3e-4,9e-4 --weight_centres csa=10 --output_dir out  # reselect around 10
    python recipes/study_methods.py --regime scratch --variants "+L_dim (shifted, ours);+L_dim (literal Eq. 6)" \\
        --compare "+L_dim (literal Eq. 6) vs +L_dim (shifted, ours)" --output_dir out  # two readings, side by side

Without ``--model_name_or_path`` the pretrained start is the demo CLIP of ``recipes/pretrain_demo.py`` (made on
first use). ``--dry_run`` prints the plan and its estimated run time without training. On a GPU, ``--device cuda``
and larger ``--demo_train``/``--image_size``/epochs scale it up.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser
from transformers.utils import logging

from gapclip.argument_checks import check_model_path
from gapclip.cli import DataArguments
from gapclip.console import format_summary, run_recipe
from gapclip.study import FAMILIES, REGIMES, STOP_AFTER, MethodStudy, StudySettings
from gapclip.study.report import report_stem
from gapclip.study.variants import OWN_WEIGHT_SWEEPS

logger = logging.get_logger("gapclip.study")

#: --smoke: everything tiny, for tests and a first try (the numbers mean nothing).
SMOKE = {
    "data": {"demo_train": 48, "demo_val": 16, "demo_test": 16},
    "settings": {
        "seeds": 2, "image_size": 32, "batch_size": 8, "eval_batch_size": 32, "scratch_width": 32, "scratch_layers": 1,
        "weight_factors": (1.0,), "max_grid_extensions": 1, "bootstrap_resamples": 200,
        "learning_rates": {"pretrained": (1e-4, 1e-3), "scratch": (1e-3, 3e-3)},
        "epochs": {"pretrained": 1, "scratch": 1},
        "pretrain_overrides": {"num_train": 64, "num_val": 16, "width": 32, "layers": 1, "epochs": 1.0,
                               "batch_size": 16},
    },
}


def _whole_numbers(text: str, option: str) -> tuple[int, ...]:
    values = _floats(str(text), option)
    if any(value != int(value) or value < 1 for value in values):
        raise ValueError(f"--{option} must be comma-separated whole numbers >= 1, got {text!r}.")
    return tuple(int(value) for value in values)


def _term_weights(text: str | None, option: str) -> dict[str, float]:
    weights = {}
    for part in filter(str.strip, (text or "").split(",")):
        name, _, value = part.partition("=")
        try:
            weight = float(value)  # no '=' leaves value empty, which float() rejects too
        except ValueError:
            weight = 0.0
        if not weight > 0:  # also rejects 'nan'
            raise ValueError(f"--{option} takes 'term=weight' pairs with positive weights, separated by ',' "
                             f"(e.g. 'dias_dim=1,dias_intra=0.01'); {part.strip()!r} is not one.")
        weights[name.strip()] = weight
    return weights


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--{option} must be comma-separated numbers, got {text!r}.") from None
    if not values:
        raise ValueError(f"--{option} must list at least one number, got {text!r}.")
    return values


def _comparisons(text: str | None) -> tuple[tuple[str, str], ...]:
    """``--compare 'A vs B;C vs D'`` as ``(("A", "B"), ("C", "D"))`` (row names hold commas and colons, not ' vs ')."""
    pairs = []
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        names = [name.strip() for name in part.split(" vs ")]
        if len(names) != 2 or not all(names):
            raise ValueError(f"--compare: {part.strip()!r} must be 'row vs other' (two row names as in study.md).")
        pairs.append((names[0], names[1]))
    return tuple(pairs)


@dataclass
class StudyArguments:
    output_dir: str = field(default="outputs/study", metadata={"help": "Where study.md, study.json and runs/ go."})
    regime: str = field(default="both", metadata={"help": "pretrained | scratch | both"})
    seeds: int = field(default=3, metadata={"help": "Seeds of the main table (other variants: the first seed)."})
    seeds_every_row: bool = field(
        default=False,
        metadata={"help": "Every row runs on --seeds seeds, not only the main table's (with --variants: more seeds "
                          "for chosen single-seed rows)."},
    )
    families: str = field(default="all", metadata={"help": f"all, or a comma-separated subset of {list(FAMILIES)}."})
    variants: str | None = field(
        default=None,
        metadata={"help": "Only these rows, separated by ';' (names as in study.md, e.g. '+CSA;+L_intra (sparse)'), "
                          "with their baselines; overrides --families. Optional rows (e.g. 'Triplet, K-means "
                          "batches') run only when named here."},
    )
    compare: str | None = field(
        default=None,
        metadata={"help": "Further paired comparisons between rows the study runs, 'row vs other' separated by ';' "
                          "(e.g. 'DIAS, literal Eq. 14 mask vs DIAS (full: K-means batches, sparse)'): row minus "
                          "other, reported in their own table, outside the Holm family of the baseline comparisons."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained start (default: the demo CLIP of recipes/pretrain_demo.py)."}
    )
    pretrained_backbone: str = field(default="clip", metadata={"help": "Default start: demo 'clip' or 'vtde'."})
    image_size: int = field(default=48, metadata={"help": "Demo images, demo pretraining and from-scratch models."})
    pretrained_learning_rates: str = field(default="3e-5,1e-4,3e-4", metadata={"help": "Stage-1 grid, pretrained."})
    scratch_learning_rates: str = field(default="3e-4,1e-3,3e-3", metadata={"help": "Stage-1 grid, from scratch."})
    pretrained_epochs: str = field(
        default="1,2,4", metadata={"help": "Stage-0 grid of schedule lengths (epochs), pretrained; one value fixes it."}
    )
    scratch_epochs: str = field(
        default="5,10", metadata={"help": "Stage-0 grid of schedule lengths (epochs), from scratch; one value fixes it"}
    )
    stop_after: str | None = field(
        default=None,
        metadata={"help": "Stop after a selection stage: epochs | learning_rate | weights (no test results); "
                          "default: run everything."},
    )
    weight_factors: str = field(default="0.1,1,10", metadata={"help": "Stage 2 tries paper weight × each factor."})
    fixed_weights: str | None = field(
        default=None,
        metadata={"help": "Terms whose weight is given, not selected (no stage-2 runs for them), e.g. "
                          "'dias_dim=1,dias_inter=0.0005': to rerun rows at the weights an earlier study selected, "
                          "as its study.md prints them (its runs at those float32 values are read back)."},
    )
    weight_centres: str | None = field(
        default=None,
        metadata={"help": "Terms whose stage-2 grid is centred on this weight instead of the paper's (centre × each "
                          "--weight_factors value), e.g. 'csa=10,usa=0.05': to select a weight again under other "
                          "settings around the one an earlier study selected."},
    )
    own_weights: bool = field(
        default=False,
        metadata={"help": "Give the max and mean LSC fusions and the KL and L2 GST distances weight sweeps of their "
                          f"own ({', '.join(OWN_WEIGHT_SWEEPS)}: names for --fixed_weights and --weight_centres) "
                          "instead of the weight selected for the concat fusion (lsc) and the InfoNCE distance "
                          "(gst)."},
    )
    max_grid_extensions: int = field(
        default=2, metadata={"help": "A grid whose best value is at an end grows one step that way, this many times."}
    )
    coordinate_rounds: int = field(
        default=3,
        metadata={"help": "Rounds of the length/learning-rate search at most: while stage 1 moves the rate, the "
                          "length is chosen again at the new rate and the rate at the new length (1: one pass)."},
    )
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training batch size."})
    scratch_width: int = field(default=128, metadata={"help": "Width of the from-scratch CLIP."})
    scratch_layers: int = field(default=3, metadata={"help": "Layers of the from-scratch CLIP."})
    bootstrap_resamples: int = field(default=2000, metadata={"help": "Bootstrap replicates of the comparisons."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    workers: int | None = field(
        default=None,
        metadata={"help": "Runs trained at once, in worker processes (default: 2 on a CPU with 2+ cores, 1 on a GPU; "
                          "1 with --smoke). Each gets cpu_count / workers threads."},
    )
    smoke: bool = field(default=False, metadata={"help": "Tiny sizes for a quick end-to-end check."})
    dry_run: bool = field(default=False, metadata={"help": "Print the plan and the time estimate; train nothing."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})

    def __post_init__(self):
        if self.stop_after not in STOP_AFTER:
            raise ValueError(f"--stop_after must be one of {[s for s in STOP_AFTER if s]}, got {self.stop_after!r}.")
        if self.regime not in (*REGIMES, "both"):
            raise ValueError(f"--regime must be pretrained, scratch or both, got {self.regime!r}.")
        families = FAMILIES if self.families == "all" else tuple(f.strip() for f in self.families.split(","))
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"--families: unknown {unknown}; choose from {list(FAMILIES)} or 'all'.")
        self.family_list = families
        check_model_path("--model_name_or_path", self.model_name_or_path)

    def settings(self) -> StudySettings:
        settings = StudySettings(
            regimes=REGIMES if self.regime == "both" else (self.regime,), seeds=self.seeds,
            seeds_every_row=self.seeds_every_row, families=self.family_list,
            learning_rates={
                "pretrained": _floats(self.pretrained_learning_rates, "pretrained_learning_rates"),
                "scratch": _floats(self.scratch_learning_rates, "scratch_learning_rates"),
            },
            epochs={"pretrained": _whole_numbers(self.pretrained_epochs, "pretrained_epochs"),
                    "scratch": _whole_numbers(self.scratch_epochs, "scratch_epochs")},
            stop_after=self.stop_after,
            variant_names=tuple(name.strip() for name in (self.variants or "").split(";") if name.strip()),
            comparisons=_comparisons(self.compare),
            weight_factors=_floats(self.weight_factors, "weight_factors"),
            fixed_weights=_term_weights(self.fixed_weights, "fixed_weights"),
            weight_centres=_term_weights(self.weight_centres, "weight_centres"), own_weights=self.own_weights,
            max_grid_extensions=self.max_grid_extensions, coordinate_rounds=self.coordinate_rounds,
            batch_size=self.per_device_train_batch_size, scratch_width=self.scratch_width,
            scratch_layers=self.scratch_layers, image_size=self.image_size,
            model_name_or_path=self.model_name_or_path, pretrained_backbone=self.pretrained_backbone,
            bootstrap_resamples=self.bootstrap_resamples, device=self.device,
        )
        return dataclasses.replace(settings, **SMOKE["settings"]) if self.smoke else settings


def build_study(argv: list[str] | None = None) -> tuple[MethodStudy, StudyArguments]:
    """The :class:`MethodStudy` the command line ``argv`` asks for (nothing is prepared or trained yet)."""
    study_args, data_args = HfArgumentParser((StudyArguments, DataArguments)).parse_args_into_dataclasses(argv)
    settings = study_args.settings()
    if study_args.smoke and data_args.dataset == "demo":
        data_args = dataclasses.replace(data_args, **SMOKE["data"])
    if data_args.dataset == "demo":
        data_args = dataclasses.replace(data_args, demo_image_size=settings.image_size)
    workers = study_args.workers if study_args.workers is not None else (1 if study_args.smoke else None)
    command = shlex.join(["python", "recipes/study_methods.py", *(sys.argv[1:] if argv is None else argv)])
    study = MethodStudy(
        settings, data_args, study_args.output_dir, show_progress=not study_args.disable_tqdm, workers=workers,
        command=command,
    )
    return study, study_args


def main(argv: list[str] | None = None) -> dict:
    study, study_args = build_study(argv)
    if study_args.dry_run:
        return study.plan()
    results = study.run()
    stem = report_stem(study.settings.stop_after)
    print((study.output_dir / f"{stem}.md").read_text(), flush=True)  # the recipe's result, for the person who ran it
    out = study.output_dir.resolve()
    print(format_summary(f"Study finished: {out}", [
        ("tables", f"{out / (stem + '.md')}, {out / (stem + '.json')}"),
        ("runs", f"{out / 'runs'} (a rerun reuses them)"),
    ]), flush=True)
    return results


if __name__ == "__main__":
    run_recipe(main)
