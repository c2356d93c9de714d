"""Which atom each engine parameter is, and which part of it: the one place the DeepSpeed adapter
names, writes and reads atoms.

Plain DeepSpeed (``PlainMap``): a parameter is its own atom, whole, under its module name. A
DeepSpeed engine around a model-parallel model (a megatron-core model with an ``mpu``: the
Megatron-DeepSpeed set-up) holds TP shards: each local parameter is a region of a global atom, with a
global name, a split and a replica rule. An integration supplies that as a *binding*
(``register_binding``; importing ``ucp_plugin.integrations.megatron_deepspeed`` registers megatron's),
so this adapter never imports a model framework. Element offsets the engine hands over (``start``) are
always in the local parameter's own flat order; the map turns them into atom coordinates.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..errors import StateMismatchError
from ..format import WEIGHT_STATE, Atom, Layout, Region, dtype_name
from ..dsfiles.native import SPLIT



def _some(names: list) -> str:
    return ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def read_into(source, out, *args) -> torch.Tensor:
    """``source.read(*args)``, copied into ``out`` when given; a source that reads in place
    (``reads_in_place``: the universal reader) fills ``out`` directly, with no temporary."""
    if out is None:
        return source.read(*args)
    if getattr(source, "reads_in_place", False):
        return source.read(*args, out=out)
    return out.copy_(source.read(*args))


class ParamMap:
    """Plain DeepSpeed: local name = atom name, whole tensor, written once. Subclasses (bindings)
    override every method; ``view`` is the adapter's ``EngineView``."""
    adapter, adapter_version, family = "deepspeed.zero", "1", None

    def __init__(self, view):
        self.shapes = view.shapes

    def layout(self, base: Layout) -> Layout:
        return base

    def model_info(self) -> dict:
        return {}

    def writes(self, name: str) -> bool:
        """Whether this rank writes its elements of ``name`` (a TP replica may leave it to rank 0)."""
        return True

    def write(self, writer, name: str, kind: str, start: int, tensors: dict, scalars: dict) -> None:
        """Local elements [start, start + n) of every state in ``tensors`` (1-D, length n)."""
        shape = self.shapes[name]
        writer.add_atom(Atom(name, kind, shape, SPLIT, {k: dtype_name(v.dtype) for k, v in tensors.items()},
                             scalars))
        for key, flat in tensors.items():
            if flat.numel():
                writer.add(name, key, flat, Region.whole(shape), start)

    def atom(self, source, name: str):
        return source.atoms[name]

    def has(self, source, name: str) -> bool:
        return name in source.atoms

    def read(self, source, name: str, state: str, start: int, stop: int, dtype, out=None) -> torch.Tensor:
        """Local elements [start, stop) of ``name``'s ``state`` (into ``out`` when given: 1-D, any
        dtype, typically a slice of the engine's buffer)."""
        return read_into(source, out, name, state, start, stop, dtype)

    def read_weight(self, source, name: str, start: int, stop: int, dtype, out=None) -> torch.Tensor:
        return self.read(source, name, WEIGHT_STATE[self.atom(source, name).kind], start, stop, dtype, out)

    def check(self, source, view, strict: bool) -> None:
        """Every parameter/buffer of the model is in the checkpoint with the same shape (and, when
        ``strict``, nothing else is)."""
        optional = () if strict else view.frozen  # saved with exclude_frozen_parameters=True
        wanted = list(view.trainable) + [n for n in view.frozen if n in source.atoms or n not in optional] \
            + list(view.buffers)
        missing = [n for n in wanted if n not in source.atoms]
        if missing:
            raise StateMismatchError(f"{source.path}: the model has {len(missing)} tensor(s) the checkpoint "
                                     f"lacks: {_some(missing)}; load a checkpoint of this model (same "
                                     "configuration)")
        shapes = {**view.shapes, **{n: source.atoms[n].shape for n in view.buffers}}
        bad = [n for n in wanted if tuple(source.atoms[n].shape) != tuple(shapes[n])]
        if bad:
            n = bad[0]
            raise StateMismatchError(f"{source.path}: {n!r} has shape {tuple(source.atoms[n].shape)} in the "
                                     f"checkpoint but {tuple(shapes[n])} in the model ({len(bad)} tensor(s) "
                                     f"differ: {_some(bad)}); load a checkpoint of the same model configuration")
        extra = sorted(set(source.atoms) - set(wanted))
        if strict and extra:
            raise StateMismatchError(f"{source.path}: the checkpoint has {len(extra)} tensor(s) the model "
                                     f"lacks: {_some(extra)}; pass load_module_strict=False to ignore them")


class Binding(Protocol):
    """A framework adapter's description of a model-parallel model inside a DeepSpeed engine."""

    def claims(self, engine) -> bool:
        """True for engines this binding maps (decided from ``engine.mpu``: it runs at initialize,
        before ``engine.module`` exists)."""

    def problems(self, engine) -> list[str]:
        """Settings of this model-parallel set-up the binding cannot save exactly."""

    def param_map(self, engine, view) -> ParamMap: ...


_BINDINGS: list[Binding] = []


def register_binding(binding: Binding) -> None:
    """Add ``binding``; the integration that defines it registers it when imported. A second binding
    of the same class raises: two would claim the same engines and the first would silently win."""
    if any(type(b) is type(binding) for b in _BINDINGS):
        raise ValueError(f"a {type(binding).__qualname__} is already registered with the DeepSpeed adapter; "
                         "register each binding once (at its module's import)")
    _BINDINGS.append(binding)


def binding_for(engine) -> Binding | None:
    return next((b for b in _BINDINGS if b.claims(engine)), None)


def param_map(engine, view) -> ParamMap:
    binding = binding_for(engine)
    return binding.param_map(engine, view) if binding is not None else ParamMap(view)
