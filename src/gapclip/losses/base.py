"""The gap-term interface and registry.

A *gap term* is an extra training objective added to the base contrastive loss:
``loss = base + Σ weight_t · term_t``. Terms are declared in :class:`~gapclip.GapClipConfig` as
``{"name": ..., "weight": ..., "options": {...}}`` and built from this registry, so a config names only terms
that exist and only options they take.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class GapBatch:
    """Everything a loss sees: the *global* batch (gathered over processes), already embedded.

    Rows are (image, caption) pairs: row ``i`` of ``image_embeds`` and of ``text_embeds`` belong together.
    Several rows may show the same image (``image_index`` equal); every loss treats them as positives of
    each other, never as negatives.

    Attributes:
        image_embeds: ``[B, D]`` L2-normalised image embeddings.
        text_embeds: ``[B, D]`` L2-normalised caption embeddings.
        logit_scale: scalar ``exp(log_scale)`` (= 1/temperature), already clamped.
        logit_bias: scalar SigLIP bias, or ``None``.
        image_index: ``[B]`` long, which image each row shows (defaults to ``arange(B)``).
        patch_embeds: ``[B, P, D]`` projected patch tokens (not normalised) or ``None`` when no term needs them.
        patch_mask: ``[B, P]`` bool, valid patches.
        token_embeds: ``[B, L, D]`` projected word tokens (not normalised) or ``None``.
        token_mask: ``[B, L]`` bool, word tokens (padding and special tokens are ``False``).
        extras: further per-row tensors a term asked for (e.g. ``translation_embeds``, ``has_translation``,
            ``teacher_image_embeds``, ``teacher_text_embeds``), gathered like the rest.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    image_index: torch.Tensor | None = None
    patch_embeds: torch.Tensor | None = None
    patch_mask: torch.Tensor | None = None
    token_embeds: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.image_index is None:
            self.image_index = torch.arange(self.image_embeds.shape[0], device=self.image_embeds.device)

    @property
    def batch_size(self) -> int:
        return self.image_embeds.shape[0]

    @property
    def positive_mask(self) -> torch.Tensor:
        """``[B, B]`` bool: ``[i, j]`` is True when row i and row j show the same image."""
        return self.image_index[:, None] == self.image_index[None, :]


class GapTerm(nn.Module):
    """Base class of the registered gap terms.

    Subclasses set ``name`` (the registry key), ``default_options`` (every option the term takes, with its
    default), ``requires`` (which optional :class:`GapBatch` fields they read: ``"local"`` for patch/word
    features, or extras keys such as ``"translation"`` / ``"teacher"``), and implement
    :meth:`forward` returning a scalar. Terms may own parameters (they live in ``GapClipModel.gap_terms`` and
    are saved, resumed and sharded with the model).
    """

    name: ClassVar[str]
    default_options: ClassVar[dict[str, Any]] = {}
    requires: ClassVar[frozenset[str]] = frozenset()
    citation: ClassVar[str] = ""

    def __init__(self, embed_dim: int, **options: Any):
        super().__init__()
        self.embed_dim = embed_dim
        self.options = {**self.default_options, **options}

    def forward(self, batch: GapBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_config_dict(self) -> dict[str, Any]:
        return dict(self.options)


TERM_REGISTRY: dict[str, type[GapTerm]] = {}


def register_term(cls: type[GapTerm]) -> type[GapTerm]:
    """Class decorator adding a :class:`GapTerm` subclass to the registry under ``cls.name``."""
    if cls.name in TERM_REGISTRY and TERM_REGISTRY[cls.name] is not cls:
        raise ValueError(f"A gap term named {cls.name!r} is already registered ({TERM_REGISTRY[cls.name].__name__}).")
    TERM_REGISTRY[cls.name] = cls
    return cls


def validate_term_specs(specs: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Check a config's term list and return it normalised to ``[{"name", "weight", "options"}]``.

    Raises:
        ValueError: unknown name (the valid ones are listed), duplicate name, negative or non-finite weight,
            or an option the term does not take (its options are listed).
    """
    from . import registered_terms  # noqa: F401  (imports every family so the registry is complete)

    normalised: list[dict[str, Any]] = []
    seen: set[str] = set()
    for position, spec in enumerate(specs or []):
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ValueError(
                f"gap_terms[{position}] must be a mapping with a 'name' (and optional 'weight', 'options'), got {spec!r}."
            )
        unknown_keys = set(spec) - {"name", "weight", "options"}
        if unknown_keys:
            raise ValueError(
                f"gap_terms[{position}] ({spec['name']!r}) has unknown keys {sorted(unknown_keys)}; "
                "a term is declared as {'name': ..., 'weight': ..., 'options': {...}}."
            )
        name = spec["name"]
        if name not in TERM_REGISTRY:
            raise ValueError(f"Unknown gap term {name!r} in gap_terms[{position}]. Valid terms: {sorted(TERM_REGISTRY)}.")
        if name in seen:
            raise ValueError(f"Gap term {name!r} is declared twice in gap_terms; declare each term once.")
        seen.add(name)
        weight = spec.get("weight", 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"Weight of gap term {name!r} must be a number, got {weight!r}.") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"Weight of gap term {name!r} must be finite and >= 0, got {weight}.")
        options = dict(spec.get("options") or {})
        term_cls = TERM_REGISTRY[name]
        bad = sorted(set(options) - set(term_cls.default_options))
        if bad:
            raise ValueError(
                f"Gap term {name!r} does not take option(s) {bad}. Its options are: "
                f"{sorted(term_cls.default_options) or 'none'}."
            )
        normalised.append({"name": name, "weight": weight, "options": options})
    return normalised


def build_terms(specs: list[Mapping[str, Any]], embed_dim: int) -> nn.ModuleDict:
    """Instantiate validated term specs into an ``nn.ModuleDict`` keyed by term name."""
    return nn.ModuleDict(
        {spec["name"]: TERM_REGISTRY[spec["name"]](embed_dim, **spec["options"]) for spec in validate_term_specs(specs)}
    )


def describe_terms() -> dict[str, dict[str, Any]]:
    """Registry listing for ``--help`` texts and docs: term name -> its options with defaults and summary."""
    from . import registered_terms  # noqa: F401

    return {
        name: {
            "options": dict(cls.default_options),
            "summary": (inspect.getdoc(cls) or "").split("\n")[0],
        }
        for name, cls in sorted(TERM_REGISTRY.items())
    }


