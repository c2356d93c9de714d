"""Megatron's vocabulary padding rows, kept beside the vocabulary atom so a resume is exact.

Megatron pads the word embedding and the output layer to a multiple of ``divisible_by * TP`` rows and
computes the softmax over the padded vocabulary, so the output layer's padding rows are trained (their
logits are pushed down) and enter every later loss. The checkpoint language's ``VocabPartitioned``
atom keeps only the real rows (the model's true shape, what an export needs); the padding rows of the
saving layout go to a companion atom ``<name>@vocab_padding`` of shape [padded - vocab, ...] (global
padded rows vocab, vocab + 1, ...), with the same states. A load whose layout pads to the same size
restores them exactly; one that pads to more rows gets zeros beyond the saved ones, to fewer drops the
extra (both logged: the model then differs from the saved one by those padding logits).
"""
from __future__ import annotations

import logging
import math

import torch

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
    name = atom_name(e.source)
    try:
        atom = ck.top.atom(name)
    except KeyError:
        return  # saved without padding rows (or by another tool): they stay zero
    _warn_if_resized(e, atom.shape[0])
    reg = region(e, atom.shape[0])
    if reg is None:
        return
    inner = math.prod(e.local_shape[1:])
    saved = (reg.intervals[0][1] - reg.intervals[0][0]) * inner
    lo, hi = max(start, real) - real, min(stop - real, saved)
    if hi > lo:
        ck.read_fragment(name, state, reg, lo, hi, out.dtype, out=out[lo + real - start:hi + real - start])


def _warn_if_resized(e: ParamEntry, saved_rows: int) -> None:
    mine = atom_shape(e)[0]
    if mine != saved_rows:
        log.warning("%s: saved with %d vocabulary padding rows, this layout has %d; the padding logits "
                    "differ from the saved model's (make the padded vocab sizes equal for an exact resume)",
                    e.source, saved_rows, mine)
