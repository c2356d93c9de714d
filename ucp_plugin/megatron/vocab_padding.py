"""Megatron's vocabulary padding rows, kept beside the vocabulary atom so a resume is exact.

Megatron pads the word embedding and the output layer to a multiple of ``divisible_by * TP`` rows and
computes the softmax over the padded vocabulary, so the output layer's padding rows are trained (their
logits are pushed down) and enter every later loss. The checkpoint language's ``VocabPartitioned``
atom keeps only the real rows (the model's true shape, what an export needs); the padding rows of the
saving layout go to a companion atom ``<name>@vocab_padding`` of shape [padded - vocab, ...] (global
padded rows vocab, vocab + 1, ...), with the same states. A load whose layout pads to the same size
restores them exactly; one that pads to more rows gets zeros beyond the saved ones, to fewer drops the
extra (both logged: the model then differs from the saved one by those padding logits).

Saved without the true vocabulary size (no ``vocab``/``config`` and no Megatron-LM to ask), the padded
rows are the vocabulary: the atoms hold all of them and the manifest's ``model.padded_vocab`` says so.
Such a checkpoint loads without ceremony wherever the model pads to the same size. Where it pads to
another size the rows must be re-cut, and only then the load asks for the true size (``vocab=N``):
the atoms' first N rows are the vocabulary, the rest its padding rows (``holds_padding``, ``overlay``).
"""
from __future__ import annotations

import logging
import math

import torch

from ..errors import UnsupportedError
from ..format import Region
from ..language import VocabPartitioned
from .model_view import ParamEntry

log = logging.getLogger(__name__)
SUFFIX = "@vocab_padding"


def padded(e: ParamEntry) -> bool:
    return isinstance(e.split, VocabPartitioned) and e.region.pad > 0 and e.region.dim == 0


def atom_name(name: str) -> str:
    return name + SUFFIX


def atom_shape(e: ParamEntry) -> tuple[int, ...]:
    """[padded rows of this layout - vocab, ...]."""
    return (e.local_shape[0] * e.tp - e.global_shape[0], *e.global_shape[1:])


def rows(e: ParamEntry) -> tuple[int, int]:
    """Rows [lo, hi) of the padding atom that are this rank's local padding rows (its last rows)."""
    real_rows = sum(hi - lo for lo, hi in e.region.intervals)
    lo = e.tp_rank * e.local_shape[0] + real_rows - e.global_shape[0]
    return lo, lo + e.region.pad


def region(e: ParamEntry, available: int | None = None) -> Region | None:
    """The padding atom region of this rank's padding rows, cut to ``available`` saved rows."""
    lo, hi = rows(e)
    hi = hi if available is None else min(hi, available)
    return Region(0, ((lo, hi),), 0) if hi > lo else None


def overlay(ck, e: ParamEntry, state: str, start: int, out: torch.Tensor) -> None:
    """Fill the elements of ``out`` (local elements ``[start, start + len(out))``) that are padding
    rows from the saved padding atom, when the checkpoint has one."""
    real, stop = e.real_numel, start + out.numel()
    if not padded(e) or stop <= real:
        return
    name, first = _padding_rows(ck.top, e)
    if name is None:
        return  # saved without padding rows (or by another tool): they stay zero
    saved_rows = ck.top.atom(name).shape[0] - first
    _warn_if_resized(e, saved_rows)
    reg = region(e, saved_rows)
    if reg is None:
        return
    reg = Region(0, tuple((lo + first, hi + first) for lo, hi in reg.intervals), 0)
    inner = math.prod(e.local_shape[1:])
    saved = (reg.intervals[0][1] - reg.intervals[0][0]) * inner
    lo, hi = max(start, real) - real, min(stop - real, saved)
    if hi > lo:
        ck.read_fragment(name, state, reg, lo, hi, out.dtype, out=out[lo + real - start:hi + real - start])


def _padding_rows(manifest, e: ParamEntry) -> tuple[str | None, int]:
    """(atom, first row) of the saved padding rows of ``e``: the companion atom from row 0, or, in a
    checkpoint saved with only the padded size known, the vocabulary atom past its true rows."""
    try:
        manifest.atom(atom_name(e.source))
        return atom_name(e.source), 0
    except KeyError:
        pass
    if holds_padding(manifest, e.source, e.global_shape):
        return e.source, e.global_shape[0]
    return None, 0


def holds_padding(manifest, name: str, shape) -> bool:
    """Whether atom ``name`` of a checkpoint saved with only its padded vocabulary size holds the
    ``shape[0]`` vocabulary rows of ``shape`` followed by padding rows."""
    padded = (manifest.model or {}).get("padded_vocab")
    try:
        saved = tuple(manifest.atom(name).shape)
    except KeyError:
        return False
    return padded is not None and saved[0] == padded >= shape[0] and saved[1:] == tuple(shape[1:])


def vocab_to_load(ck, padded: int) -> int | None:
    """The vocabulary size to load ``ck`` into a model padded to ``padded`` rows, when the caller gave
    none: the true size the checkpoint records, None (the padded rows are the vocabulary) where it
    was saved with the same padded size; a re-cut of the padded rows needs the true size."""
    model = ck.top.model or {}
    saved_padded = model.get("padded_vocab")
    if saved_padded is None:
        return (model.get("config") or {}).get("vocab")
    if saved_padded == padded:
        return None
    raise UnsupportedError(f"{ck.path}: saved with its vocabulary padded to {saved_padded} rows (the true "
                           f"size was not given at save), and this model pads it to {padded} rows: "
                           "pass vocab=N (the true vocabulary size) to load_universal")


def _warn_if_resized(e: ParamEntry, saved_rows: int) -> None:
    mine = atom_shape(e)[0]
    if mine != saved_rows:
        log.warning("%s: saved with %d vocabulary padding rows, this layout has %d; the padding logits "
                    "differ from the saved model's (make the padded vocab sizes equal for an exact resume)",
                    e.source, saved_rows, mine)
