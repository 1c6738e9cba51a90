#!/usr/bin/env python
"""A gap term of your own, in one file: supervised contrast on a per-image class label (a dataset column).

gapclip knows no method by name: a term declares its options (keyword arguments of ``__init__``), the per-row inputs
it reads (``TermInput``: here the dataset column ``label``) and its citation, and ``@register_term`` makes it
available to every recipe. This file defines one, ``label_supcon``, and trains it.

Run it (offline; it labels each demo image with its background colour and trains a small CLIP from scratch):

    python examples/custom_term.py --smoke                       # a tiny run, under a minute on CPU
    python examples/custom_term.py --output_dir outputs/custom   # the demo-sized run; any recipe flag works
    torchrun --nproc_per_node 2 examples/custom_term.py --smoke  # 2 processes (the label is gathered)

or train it through any recipe, unchanged, next to that recipe's own terms: ``--term_module`` imports this file
(registering the term), ``--gap_terms`` adds it to the objective, ``--extra_columns`` attaches the ``label`` column
(a JSONL file of ``{"image_id": ..., "label": ...}`` lines; ``write_demo_labels`` writes one for the demo data):

    python recipes/train_clip_lgmgc.py --term_module examples/custom_term.py --extra_columns labels.jsonl \\
        --gap_terms '[{"name": "label_supcon", "weight": 0.5, "options": {"temperature": 0.2}}]'

A checkpoint trained with the term loads wherever the term is registered (``--term_module`` on the evaluation and
export recipes, or ``import`` this file before ``GapClipModel.from_pretrained``); the exported release is a plain
backbone and needs nothing.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from gapclip import GapBatch, GapTerm, register_term
from gapclip.argument_checks import check_declared_choices
from gapclip.cli import demo_root, parse_args, run_training, term_option_field
from gapclip.console import run_recipe
from gapclip.losses import TermInput

SUPCON_CITATION = """@inproceedings{khosla2020supcon,
  title={Supervised Contrastive Learning},
  author={Khosla, Prannay and Teterwak, Piotr and Wang, Chen and Sarna, Aaron and Tian, Yonglong and Isola, Phillip
          and Maschinot, Aaron and Liu, Ce and Krishnan, Dilip},
  booktitle={NeurIPS},
  year={2020}
}"""


@register_term
class LabelSupConLoss(GapTerm):
    """Supervised contrast on a class label per image: rows of the same class pull together (SupCon, L_out).

    With ``z_i`` the normalised embeddings of the chosen ``modality``, ``τ`` the temperature and ``P(i)`` the other
    rows whose ``label`` equals row i's (other captions of the same image included):

    ``L = (1/|I'|) Σ_{i∈I'} -(1/|P(i)|) Σ_{p∈P(i)} log[exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ)]``

    over the rows ``I'`` that have at least one positive (0 when no row has one). The batch is the global one: the
    model gathers ``label`` over processes with the embeddings, so two processes compute the loss of one.

    Local loss (``--local_loss``): the term declares ``supports_local_loss`` and, when ``batch.is_local``, returns
    only the share of its process' rows (``batch.rows``, as queries against the whole gathered batch) divided by the
    *global* ``|I'|``, which the gathered labels give every process; the model adds the shares up.

    References: Khosla et al., *Supervised Contrastive Learning*, NeurIPS 2020 (arXiv:2004.11362), Eq. 2.

    Args:
        embed_dim: the model's embedding dimension (given by the registry; unused).
        temperature: τ, the softmax temperature (> 0).
        modality: which embeddings are contrasted: image or text.

    Inputs: ``image_embeds``/``text_embeds`` ``[B, D]`` (normalised) and ``extras["label"]`` ``[B]`` (long), from
    the dataset column ``label``.
    """

    name: ClassVar[str] = "label_supcon"
    citation: ClassVar[str] = SUPCON_CITATION
    supports_local_loss: ClassVar[bool] = True
    inputs: ClassVar[tuple[TermInput, ...]] = (
        TermInput(
            "label", dtype=torch.long,
            help="Attach a 'label' column: --extra_columns FILE.jsonl with {\"image_id\": ..., \"label\": int} lines.",
        ),
    )

    def __init__(self, embed_dim: int, *, temperature: float = 0.1, modality: Literal["image", "text"] = "image"):
        super().__init__(embed_dim)
        if not temperature > 0:
            raise ValueError(f"Gap term 'label_supcon': option temperature must be > 0, got {temperature}.")
        self.temperature = temperature
        self.modality = modality

    def forward(self, batch: GapBatch) -> torch.Tensor:
        embeds = batch.image_embeds if self.modality == "image" else batch.text_embeds
        return self.compute_loss_from_embeddings(embeds, batch.extras["label"], rows=batch.local_rows)

    def compute_loss_from_embeddings(
        self, embeds: torch.Tensor, labels: torch.Tensor, rows: slice | None = None
    ) -> torch.Tensor:
        """The loss on normalised ``[B, D]`` embeddings and ``[B]`` labels (model-free); with ``rows``, the share of
        those query rows (``[b, B]`` memory)."""
        n = embeds.shape[0]
        rows = slice(0, n) if rows is None else rows
        own = torch.arange(rows.start, rows.stop, device=embeds.device)
        self_mask = own[:, None] == torch.arange(n, device=embeds.device)[None, :]
        logits = (embeds[rows] @ embeds.t() / self.temperature).masked_fill(self_mask, float("-inf"))
        log_prob = F.log_softmax(logits, dim=1).masked_fill(self_mask, 0.0)
        positives = (labels[rows, None] == labels[None, :]) & ~self_mask
        counts = positives.sum(dim=1)
        has_positive = counts > 0
        # |I'| over the whole batch: the rows whose label another row shares.
        _, label_of_row, rows_per_label = torch.unique(labels, return_inverse=True, return_counts=True)
        anchors = (rows_per_label[label_of_row] > 1).sum().clamp_min(1)
        per_row = -(log_prob * positives).sum(dim=1)[has_positive] / counts[has_positive]
        return per_row.sum() / anchors  # 0 with a graph when no row has a positive


# ---------------------------------------------------------------------------------------------------------------------
# Training it: the recipes' own arguments and run, plus this term's weight and options
# ---------------------------------------------------------------------------------------------------------------------
#: ``--smoke``: a tiny run (64 demo images of 32 px, a 1-layer CLIP, 10 steps); flags given after it still win.
SMOKE_FLAGS = [
    "--dataset", "demo", "--demo_train", "64", "--demo_val", "16", "--demo_test", "16", "--demo_image_size", "32",
    "--scratch_width", "32", "--scratch_layers", "1", "--max_steps", "10", "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "32", "--learning_rate", "5e-3", "--eval_strategy", "no", "--save_strategy", "no",
    "--load_best_model_at_end", "false", "--logging_steps", "5", "--report_to", "none", "--disable_tqdm", "true",
    "--dataloader_pin_memory", "false", "--output_dir", "outputs/custom-term-smoke",
]


@dataclass
class LabelSupConArguments:
    label_weight: float = field(default=0.5, metadata={"help": "Weight of the label_supcon term."})
    label_temperature: float = term_option_field("label_supcon", "temperature")
    label_modality: str = term_option_field("label_supcon", "modality")
    smoke: bool = field(default=False, metadata={"help": "A tiny run (< 1 min on CPU); later flags override it."})

    def __post_init__(self):
        check_declared_choices(self)  # argparse checks a flag's choices; this covers a YAML/JSON config file too

    def gap_terms(self) -> list[dict]:
        options = {"temperature": self.label_temperature, "modality": self.label_modality}
        return [{"name": "label_supcon", "weight": self.label_weight, "options": options}]


def write_demo_labels(demo_folder: str | os.PathLike, output_file: str | os.PathLike) -> Path:
    """Write ``{"image_id", "label"}`` lines for a demo set: each image's class is its background colour."""
    entries = json.loads(Path(demo_folder, "dataset_demo.json").read_text())["images"]
    classes = sorted({entry["background"] for entry in entries})
    lines = [json.dumps({"image_id": str(e["imgid"]), "label": classes.index(e["background"])}) for e in entries]
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    partial = output_file.with_name(f"{output_file.name}.{os.getpid()}.tmp")
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, output_file)  # every process may write it: whole files only
    return output_file


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke" in argv:
        argv = [*SMOKE_FLAGS, *argv]
    model_args, data_args, method, lora_args, training_args = parse_args(LabelSupConArguments, argv)
    if not data_args.extra_columns:
        if data_args.dataset != "demo":
            raise ValueError("--extra_columns FILE.jsonl is needed: the 'label' column of each image.")
        labels = write_demo_labels(demo_root(data_args), Path(training_args.output_dir, "labels.jsonl"))
        data_args.extra_columns = str(labels)
    return run_training(model_args, data_args, training_args, method.gap_terms(), lora_args=lora_args)


if __name__ == "__main__":
    run_recipe(main)  # a configuration error: one line on stderr, not a traceback (GAPCLIP_DEBUG=1 for it)
