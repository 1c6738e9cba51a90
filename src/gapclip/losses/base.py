"""The gap-term interface and registry.

A *gap term* is an extra training objective added to the base contrastive loss:
``loss = base + Σ weight_t · term_t``. Terms are declared in :class:`~gapclip.GapClipConfig` as
``{"name": ..., "weight": ..., "options": {...}}`` and built from this registry, so a config names only terms
that exist and only options they take.

A term owns everything about itself, so that a new one is one class in one file:

- its **options**: keyword-only arguments of its ``__init__`` with type annotations and defaults. The registry reads
  them from the signature: :attr:`GapTerm.default_options`, the checks of a config's options (type, ``Literal``
  choices), :meth:`GapTerm.get_config_dict`, :func:`describe_terms` and the recipes' flags
  (:func:`gapclip.cli.term_option_field`) all come from there;
- the **per-row inputs** it reads beyond the embeddings (:class:`TermInput`, e.g. a dataset column), which the
  collator and the model pass through generically, and how to encode them (:meth:`GapTerm.encode_inputs`);
- its parameters (saved, resumed and sharded with the model) and its ``citation``.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


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
        extras: what the terms' :meth:`GapTerm.encode_inputs` hooks made of their declared inputs (e.g. GST's
            ``translation_embeds``/``has_translation``, CUSA's ``teacher_image_embeds``), gathered like the rest.
        local_rows: ``None`` for the *global form*: a loss returns its value on the whole batch (every process
            computes the same). A slice for the *local form* (``GapClipConfig.local_loss``): the rows of this
            process' samples inside the global batch; a loss returns only their *share*, the part of its value that
            belongs to those rows as queries against all the batch, divided by the *global* normaliser, so that the
            shares of all processes add up to the global value (the model scales and reports them, see
            :mod:`gapclip.distributed`). In the local form the local features (``patch_embeds``, ``patch_mask``,
            ``token_embeds``, ``token_mask``) are *not* gathered: they hold this process' rows only (row ``k`` is
            global row ``local_rows.start + k``), and a term gathers whatever it derives from them (LSC its fused
            embeddings, ``dias_dim`` its sums).
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
    extras: dict[str, Any] = field(default_factory=dict)
    local_rows: slice | None = None

    def __post_init__(self):
        if self.image_index is None:
            self.image_index = torch.arange(self.image_embeds.shape[0], device=self.image_embeds.device)

    @property
    def batch_size(self) -> int:
        return self.image_embeds.shape[0]

    @property
    def is_local(self) -> bool:
        """The local form: compute only the share of :attr:`rows` (see :attr:`local_rows`)."""
        return self.local_rows is not None

    @property
    def rows(self) -> slice:
        """The query rows this process computes: :attr:`local_rows`, or every row in the global form."""
        return self.local_rows if self.local_rows is not None else slice(0, self.batch_size)

    @property
    def positive_mask(self) -> torch.Tensor:
        """``[B, B]`` bool: ``[i, j]`` is True when row i and row j show the same image."""
        return self.image_index[:, None] == self.image_index[None, :]

    @property
    def local_positive_mask(self) -> torch.Tensor:
        """``[b, B]`` bool: the :attr:`positive_mask` rows of :attr:`rows` (``b·B`` memory, not ``B²``)."""
        return self.image_index[self.rows, None] == self.image_index[None, :]


#: How a :class:`TermInput` is collated: the name of a built-in rule or ``callable(values, collator)``.
CollateRule = Literal["tensor", "text"] | Callable[[list[Any], Any], Any]


@dataclass(frozen=True)
class TermInput:
    """One extra per-row input a gap term reads, declared in the term's :attr:`GapTerm.inputs`.

    The collator (:class:`gapclip.data.GapClipCollator`) takes it from each training item, i.e. from the dataset
    column of the same name (or from an input provider such as CUSA's teacher store), and puts the collated value
    into the batch's ``term_inputs`` mapping under ``name``; the model hands it to the term's
    :meth:`GapTerm.encode_inputs` and gathers the result over processes with the rest of the global batch.

    Attributes:
        name: the dataset column / item key, and the key in ``term_inputs``.
        collate: ``"tensor"`` (default): every row's value (a number or a nested list/array) is converted with
            ``torch.as_tensor(value, dtype=dtype)`` and the rows are stacked; a row without a value is an error that
            names it. ``"text"``: the rows' strings are tokenised like the captions into
            ``{"input_ids", "attention_mask", "present"}``; a row without text (``None``) is encoded as ``""`` and
            marked ``False`` in ``present`` (the term decides what that means); ``present`` is left out when every
            row has text, so a term learns that without reading a mask on the host. Or a callable
            ``collate(values, collator) -> Tensor | dict[str, Tensor]`` (``collator.encode_texts`` tokenises).
        dtype: tensor dtype of ``collate="tensor"``.
        per_caption: the column holds one value per caption (a list aligned with ``captions``); each row takes the
            value of its own caption.
        gather: the value is per row (first dimension = batch) and is concatenated over processes like the
            embeddings (default). ``False`` for a value that is not per row (e.g. a table a custom ``collate``
            builds), which every process keeps as it is.
        help: how to provide the input, shown when a batch lacks it (e.g. which recipe makes the column).
    """

    name: str
    collate: CollateRule = "tensor"
    dtype: torch.dtype = torch.float32
    per_caption: bool = False
    gather: bool = True
    help: str = ""

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name or ""):
            raise ValueError(f"TermInput name must be an identifier (a dataset column name), got {self.name!r}.")
        if not callable(self.collate) and self.collate not in ("tensor", "text"):
            raise ValueError(
                f"TermInput {self.name!r}: collate must be 'tensor', 'text' or a callable, got {self.collate!r}."
            )


class DualEncoder(Protocol):
    """What :meth:`GapTerm.encode_inputs` may call on the model (``GapClipModel`` implements it)."""

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ...

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class TermOption:
    """One option of a gap term, read from its ``__init__`` signature (see :meth:`GapTerm.option_specs`)."""

    name: str
    default: Any
    annotation: Any = None
    help: str = ""

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The accepted values of a ``Literal[...]`` option, else ``None``."""
        return _literal_choices(self.annotation)

    def check(self, term: str, value: Any) -> Any:
        """Return ``value`` (an int given for a float option becomes a float) or raise a ValueError naming it."""
        return _check_value(term, self.name, value, self.annotation)


class _DefaultOptions:
    """``GapTerm.default_options``: computed from the ``__init__`` signature, so it cannot drift from it."""

    def __get__(self, instance: Any, owner: type[GapTerm]) -> dict[str, Any]:
        return {name: option.default for name, option in owner.option_specs().items()}


class GapTerm(nn.Module):
    """Base class of the registered gap terms.

    A subclass sets ``name`` (the registry key), ``citation`` (BibTeX, cited by the model card of a model trained
    with it), optionally ``requires = {"local"}`` (the model then computes projected patch/word tokens) and
    ``inputs`` (the :class:`TermInput` per-row inputs it reads), and implements :meth:`forward` on a
    :class:`GapBatch`, returning a scalar. Its options are keyword-only arguments of ``__init__`` with defaults and
    type annotations, stored under their own names (``self.k = k``)::

        @register_term
        class MyLoss(GapTerm):
            name = "my_loss"

            def __init__(self, embed_dim: int, *, margin: float = 0.2, mode: Literal["sum", "mean"] = "mean"):
                super().__init__(embed_dim)
                self.margin, self.mode = margin, mode

    Options are checked against their annotations before ``__init__`` runs (``bool``/``int``/``float``/``str`` and
    ``Literal`` choices; an int is accepted for a float). Terms may own parameters: they live in
    ``GapClipModel.gap_terms`` and are saved, resumed and sharded with the model.

    **Local loss** (``GapClipConfig.local_loss``, O(b·B) memory per process instead of O(B²)): a term that sets
    ``supports_local_loss = True`` computes, when ``batch.is_local``, only its share: the rows ``batch.rows`` as
    queries against the whole (gathered) batch, divided by the global normaliser (``batch.batch_size``, or the global
    count of the rows it averages over), so that the processes' shares add up to its global value; its local features
    are this process' rows only (see :class:`GapBatch`). What needs more than the rows (a column statistic, a sum over
    the batch) is gathered or summed by the term itself (:func:`gapclip.distributed.gather_features`,
    :func:`~gapclip.distributed.all_reduce_with_grad`). A term without it makes ``local_loss`` a ``ValueError`` that
    names it. A term whose share of *any* block of rows reads nothing but the gathered batch (no collective, no state
    that changes between calls) also sets ``row_block_shares = True``: gradient caching then computes the objective
    a block of rows at a time (``rows × B`` matrices of a bounded size instead of ``B × B``).
    """

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset()
    inputs: ClassVar[tuple[TermInput, ...]] = ()
    citation: ClassVar[str] = ""
    supports_local_loss: ClassVar[bool] = False
    row_block_shares: ClassVar[bool] = False
    default_options: ClassVar[dict[str, Any]] = _DefaultOptions()

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "default_options" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} sets default_options; declare the options as keyword-only arguments of __init__ "
                "with defaults instead (default_options is read from the signature)."
            )
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        _option_parameters(cls)  # a signature the registry cannot read is an error at class creation

        @functools.wraps(init)
        def checked_init(self, embed_dim: int, **options: Any) -> None:
            specs = type(self).option_specs()
            options = {key: specs[key].check(type(self).term_name(), value) if key in specs else value
                       for key, value in options.items()}
            init(self, embed_dim, **options)

        cls.__init__ = checked_init

    @classmethod
    def term_name(cls) -> str:
        return getattr(cls, "name", cls.__name__)

    @classmethod
    def option_specs(cls) -> dict[str, TermOption]:
        """Every option of the term (name → :class:`TermOption`), in signature order."""
        return _option_specs(cls)

    @property
    def options(self) -> dict[str, Any]:
        """The options this term was built with (each stored under its own name)."""
        values = {}
        for name in self.option_specs():
            if not hasattr(self, name):  # a TypeError: nn.Module would turn an AttributeError into another one
                raise TypeError(
                    f"Gap term {self.term_name()!r} does not store its option {name!r} as self.{name}; store every "
                    "option under its own name (get_config_dict and the model card read them from there)."
                )
            values[name] = getattr(self, name)
        return values

    def encode_inputs(self, inputs: Mapping[str, Any], model: DualEncoder) -> dict[str, Any]:
        """Turn this term's collated :attr:`inputs` (keyed by input name) into :attr:`GapBatch.extras` entries.

        Runs inside the model's forward, before the gather, with ``model`` to encode through its towers (GST encodes
        its translations with the text tower here). The default passes the inputs on unchanged. The returned
        entries share one namespace with the other terms' (a key two terms return is computed by the first).
        """
        return dict(inputs)

    def forward(self, batch: GapBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_config_dict(self) -> dict[str, Any]:
        return self.options


TERM_REGISTRY: dict[str, type[GapTerm]] = {}


def register_term(cls: type[GapTerm]) -> type[GapTerm]:
    """Class decorator adding a :class:`GapTerm` subclass to the registry under ``cls.name``.

    Registering the same class again, or a new definition of it (same qualified name, from the same module or the
    same file, e.g. a module imported again or under another name), is allowed; another class under a taken name is a
    ValueError.
    """
    if not (isinstance(cls, type) and issubclass(cls, GapTerm)):
        raise TypeError(f"register_term expects a GapTerm subclass, got {cls!r}.")
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` (the key of its gap_terms entries).")
    taken = TERM_REGISTRY.get(cls.name)
    if taken is not None and taken is not cls:
        if not _same_definition(taken, cls):
            raise ValueError(f"A gap term named {cls.name!r} is already registered ({taken.__name__}).")
        logger.info(f"Gap term {cls.name!r} registered again ({cls.__module__}.{cls.__qualname__}).")
    TERM_REGISTRY[cls.name] = cls
    return cls


def _same_definition(a: type, b: type) -> bool:
    """Two classes from one definition: the same module, or the same file imported under two module names."""
    if a.__qualname__ != b.__qualname__:
        return False
    if a.__module__ == b.__module__:
        return True
    files = [getattr(sys.modules.get(cls.__module__), "__file__", None) for cls in (a, b)]
    return None not in files and os.path.realpath(files[0]) == os.path.realpath(files[1])


def validate_term_specs(specs: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Check a config's term list and return it normalised to ``[{"name", "weight", "options"}]``.

    Raises:
        ValueError: unknown name (the valid ones are listed), duplicate name, negative or non-finite weight,
            an option the term does not take (its options are listed), or an option value of the wrong type or
            outside its ``Literal`` choices.
    """
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
            raise ValueError(
                f"Unknown gap term {name!r} in gap_terms[{position}]. Valid terms: {sorted(TERM_REGISTRY)}. A term of "
                "your own must be registered (@register_term) before the config is built, e.g. with the recipes' "
                "--term_module."
            )
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
        specs_by_name = TERM_REGISTRY[name].option_specs()
        bad = sorted(set(options) - set(specs_by_name))
        if bad:
            raise ValueError(
                f"Gap term {name!r} does not take option(s) {bad}. Its options are: {sorted(specs_by_name) or 'none'}."
            )
        options = {key: specs_by_name[key].check(name, value) for key, value in options.items()}
        normalised.append({"name": name, "weight": weight, "options": options})
    return normalised


def build_terms(specs: list[Mapping[str, Any]], embed_dim: int) -> nn.ModuleDict:
    """Instantiate validated term specs into an ``nn.ModuleDict`` keyed by term name."""
    return nn.ModuleDict(
        {spec["name"]: TERM_REGISTRY[spec["name"]](embed_dim, **spec["options"]) for spec in validate_term_specs(specs)}
    )


def describe_terms() -> dict[str, dict[str, Any]]:
    """Registry listing for ``--help`` texts and docs: term name → its options (defaults), choices, option help,
    inputs and one-line summary."""
    listing = {}
    for name, cls in sorted(TERM_REGISTRY.items()):
        specs = cls.option_specs()
        listing[name] = {
            "options": {key: option.default for key, option in specs.items()},
            "choices": {key: list(option.choices) for key, option in specs.items() if option.choices},
            "help": {key: option.help for key, option in specs.items() if option.help},
            "inputs": [term_input.name for term_input in cls.inputs],
            "summary": (inspect.getdoc(cls) or "").split("\n")[0],
        }
    return listing


# ---------------------------------------------------------------------------------------------------------------------
# Options from the __init__ signature
# ---------------------------------------------------------------------------------------------------------------------
def _option_parameters(cls: type[GapTerm]) -> list[inspect.Parameter]:
    """The option parameters of ``cls.__init__`` (after ``self`` and ``embed_dim``); TypeError if not readable."""
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    parameters = list(inspect.signature(init).parameters.values())[2:]
    for parameter in parameters:
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or parameter.default is inspect.Parameter.empty:
            raise TypeError(
                f"{cls.__name__}.__init__(self, embed_dim, *, ...): every option must be a keyword-only argument with "
                f"a default (after `*`); {parameter.name!r} is not."
            )
    return parameters


@functools.cache
def _option_specs(cls: type[GapTerm]) -> dict[str, TermOption]:
    parameters = _option_parameters(cls)
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    try:
        hints = typing.get_type_hints(init)
    except (NameError, TypeError):  # annotations naming what only a local scope knows: no type checks then
        hints = {}
    help_texts = _docstring_args(inspect.getdoc(cls))
    return {
        parameter.name: TermOption(
            parameter.name, parameter.default, hints.get(parameter.name), help_texts.get(parameter.name, "")
        )
        for parameter in parameters
    }


def _docstring_args(doc: str | None) -> dict[str, str]:
    """``{name: text}`` from the ``Args:`` section of a Google-style docstring (``a / b: text`` documents both)."""
    if not doc:  # e.g. under ``python -OO``
        return {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return {}
    entries: dict[str, str] = {}
    current: list[str] = []
    indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            if indent is not None:
                break
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        match = re.match(r"([\w\s/,]+?)(?: \([^)]*\))?: (.*)", line.strip()) if width == indent else None
        if match:
            current = [name.strip() for name in re.split(r"[/,]", match.group(1)) if name.strip()]
            for name in current:
                entries[name] = match.group(2).strip()
        else:
            for name in current:
                entries[name] += " " + line.strip()
    return entries


def _literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return None


def _check_value(term: str, option: str, value: Any, annotation: Any) -> Any:
    if annotation is None or annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        if value is None and type(None) in members:
            return value
        errors = []
        for member in (m for m in members if m is not type(None)):
            try:
                return _check_value(term, option, value, member)
            except ValueError as error:
                errors.append(str(error))
        if len(errors) == 1:
            raise ValueError(errors[0])
        raise ValueError(f"Gap term {term!r}: option {option}={value!r} is not valid.")
    choices = _literal_choices(annotation)
    if choices is not None:
        if not any(value == choice and type(value) is type(choice) for choice in choices):
            raise ValueError(
                f"Gap term {term!r}: option {option}={value!r} is not valid; accepted values are {list(choices)}."
            )
        return value
    if annotation is bool and not isinstance(value, bool):
        raise ValueError(f"Gap term {term!r}: option {option} must be true or false, got {value!r}.")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"Gap term {term!r}: option {option} must be an integer, got {value!r}.")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"Gap term {term!r}: option {option} must be a number, got {value!r}.")
        return float(value)
    if annotation is str and not isinstance(value, str):
        raise ValueError(f"Gap term {term!r}: option {option} must be a string, got {value!r}.")
    return value


__all__ = [
    "DualEncoder",
    "GapBatch",
    "GapTerm",
    "TERM_REGISTRY",
    "TermInput",
    "TermOption",
    "build_terms",
    "describe_terms",
    "register_term",
    "validate_term_specs",
]
