"""Check that a 2-process (gloo, CPU) training step equals the 1-process step on the concatenated batch.

Run as ``torchrun --nproc_per_node 2 -m tests.multiprocess.two_process_step SPEC.json OUT_DIR`` from the repository
root (each rank writes its loss, loss terms and DDP-averaged gradients), or call :func:`single_process_reference` for
the 1-process side. A spec names the objective (``gap_terms``, ``base_loss`` ...) and optionally a ``term_module``
registering terms of one's own; the batch carries a value for every per-row input in :data:`INPUT_MAKERS`, and the
model reads the ones its terms declare. ``local_loss: true`` computes the 2-process side in the local form,
``gradient_cache_chunk_size: C`` with gradient caching (the processes averaging their gradients in its backward); the
1-process reference is always the plain global step.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gapclip.cli import import_term_modules
from gapclip.configuration import GapClipConfig
from gapclip.distributed import end_process_group
from gapclip.gradient_cache import gradient_cached_forward
from gapclip.modeling import GapClipModel
from gapclip.testing import tiny_clip_config, tiny_siglip_config

GLOBAL_BATCH = 8
TEACHER_DIM = 12
REPO_ROOT = Path(__file__).resolve().parents[2]


def make_model(spec: dict[str, Any]) -> GapClipModel:
    import_term_modules(",".join(str(REPO_ROOT / path) for path in spec.get("term_modules", [])))
    torch.manual_seed(spec.get("seed", 0))
    backbone = tiny_siglip_config() if spec.get("backbone") == "siglip" else tiny_clip_config()
    config = GapClipConfig(
        backbone, gap_terms=spec.get("gap_terms"), base_loss=spec.get("base_loss", "auto"),
        triplet_mining=spec.get("triplet_mining", "hardest"),
        triplet_reduction=spec.get("triplet_reduction", "mean"), local_loss=spec.get("local_loss", False),
    )
    model = GapClipModel(config)
    model.eval()  # no dropout: the two runs must see the same function
    # float64, so that summation order (which differs between 1 and 2 processes) stays far below the 1e-6 tolerance.
    return model.double()


def _unit_rows(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, TEACHER_DIM, generator=generator, dtype=torch.float64), dim=-1)


def _translation(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 60, (n, 6), generator=generator)
    ids[:, 0], ids[:, -1] = 2, 3
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "present": torch.ones(n, dtype=torch.bool)}


#: A deterministic global-batch value for each per-row input a term may declare (by input name).
INPUT_MAKERS: dict[str, Callable[[int, torch.Generator], Any]] = {
    "translation": _translation,  # GST: tokenised generated captions
    "teacher_image_embeds": _unit_rows,  # CUSA
    "teacher_text_embeds": _unit_rows,
    "label": lambda n, generator: torch.randint(0, 3, (n,), generator=generator),  # examples/custom_term.py
}


#: Rows showing the same image: 0 and 1 (both on rank 0), and 4, 5, 7 (across ranks: rank 0 holds rows 0-4).
SAME_IMAGE_ROWS = ((0, 1), (4, 5, 7))


def make_batch(spec: dict[str, Any]) -> dict[str, Any]:
    """A deterministic global batch with every known term input; unless ``shared_image`` is false, the rows of each
    :data:`SAME_IMAGE_ROWS` group show one image (same image index, pixels, label, teacher image embedding and
    translation), so they are positives of each other within a process and across processes."""
    generator = torch.Generator().manual_seed(spec.get("data_seed", 1))
    n, length = GLOBAL_BATCH, 9
    input_ids = torch.randint(4, 60, (n, length), generator=generator)
    lengths = torch.randint(4, length + 1, (n,), generator=generator)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    input_ids[:, 0] = 2
    input_ids[torch.arange(n), lengths - 1] = 3
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    image_index = torch.arange(n)
    pixel_values = torch.randn(n, 3, 32, 32, generator=generator, dtype=torch.float64)
    term_inputs = {name: make(n, generator) for name, make in INPUT_MAKERS.items()}
    if spec.get("shared_image", True):
        for first, *others in SAME_IMAGE_ROWS:
            for row in others:
                image_index[row] = image_index[first]
                pixel_values[row] = pixel_values[first]
                for name in ("label", "teacher_image_embeds"):  # one image, one label, one teacher embedding
                    term_inputs[name][row] = term_inputs[name][first]
                for key, value in term_inputs["translation"].items():
                    value[row] = value[first]
    for row in spec.get("missing_translation_rows", ()):  # GST's on_missing="skip"
        term_inputs["translation"]["present"][row] = False
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_index": image_index,
        "term_inputs": term_inputs,
    }


def rows(value: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a batch value (tensors, nested dicts of tensors)."""
    if isinstance(value, dict):
        return {key: rows(item, start, stop) for key, item in value.items()}
    return value[start:stop]


def _step(
    model: GapClipModel, batch: dict[str, Any], gradient_cache_chunk_size: int | None = None
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    if gradient_cache_chunk_size:
        # block_elements=0: the objective's blocks are a chunk's rows, so the blockwise objective is what is checked
        outputs = gradient_cached_forward(
            model, batch, gradient_cache_chunk_size, sync_gradients=lambda: True, block_elements=0
        )
    else:
        outputs = model(**batch, return_loss=True)
    outputs.loss.backward()
    values = {"loss": outputs.loss.item(), **{k: v.item() for k, v in outputs.loss_terms.items()}}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return values, grads


def single_process_reference(spec: dict[str, Any]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The plain step of one process on the whole batch: global loss, no gradient caching."""
    plain = {key: value for key, value in spec.items() if key not in ("local_loss", "gradient_cache_chunk_size")}
    return _step(make_model(plain), make_batch(plain))


def main(spec_path: str, out_dir: str) -> None:
    """Run every spec of the JSON file (``{"specs": [spec, ...]}`` or one spec) and write spec ``i``'s results to
    ``OUT_DIR/i/``: one process group for all of them, since starting processes dominates the cost."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    payload = json.loads(Path(spec_path).read_text())
    specs = payload["specs"] if "specs" in payload else [payload]
    for index, spec in enumerate(specs):
        model = make_model(spec)
        batch = make_batch(spec)
        # Uneven split on purpose (the last batch of an epoch): rank 0 gets 5 rows, rank 1 gets 3.
        bounds = [0, 5, GLOBAL_BATCH] if world == 2 else torch.linspace(0, GLOBAL_BATCH, world + 1).long().tolist()
        chunk_size = spec.get("gradient_cache_chunk_size")
        values, grads = _step(model, rows(batch, bounds[rank], bounds[rank + 1]), chunk_size)
        for name in sorted(grads if not chunk_size else ()):  # what DDP does: average the gradients over processes
            dist.all_reduce(grads[name])
            grads[name] /= world
        out = Path(out_dir) / str(index)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in grads.items()}, str(out / f"grads_rank{rank}.safetensors"))
        (out / f"values_rank{rank}.json").write_text(json.dumps(values))
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
