"""Refuse a target layout a checkpoint's model cannot have, before anything is built or read.

``validate_layout(source, layout)`` needs only the checkpoint's manifest (its family, ``ModelConfig``
and atom shapes) and the family's spec: it runs the language's ``ModelSpec.check_layout`` (TP must
divide the heads / query groups / FFN of every dense split parameter, ETP -- TP unless the layout sets
it -- that of every expert parameter, PP must not exceed the layers, EP must divide the experts) and,
for a ``MegatronLayout``, megatron's own rules (``MegatronLayout.check_model``: MoE with TP > 1 needs
sequence parallelism, uneven stages must add up). The error keeps the language's reason and adds the
valid TP / PP / EP (and, for a MoE model, ETP) sizes of the whole model.

Call it before building the model at the target layout: megatron itself would fail inside its layer
constructors (``divide()`` assertions) with no word on the checkpoint. ``load_universal`` calls it
again with the layout it finds, before reading any tensor.
"""
from __future__ import annotations

import os

from ..errors import LayoutError, UnsupportedError
from ..format import MANIFEST, Layout, Manifest
from ..language import ModelSpec
from ..models.config import ModelConfig
from ..storage import Checkpoint, resolve
from .build import family_module
from .layout import MegatronLayout
from .vocab_padding import SUFFIX

MAX_TP = 64


def read_manifest(source) -> Manifest:
    """The manifest of a checkpoint folder (or its parent with ``latest``), Checkpoint or Manifest,
    reading nothing else."""
    if isinstance(source, Manifest):
        return source
    if isinstance(source, Checkpoint):
        return source.top
    folder = resolve(str(source))
    where = os.path.join(folder, MANIFEST)
    with open(where) as f:
        return Manifest.from_json(f.read(), where)


def manifest_model(manifest: Manifest) -> tuple[str, ModelConfig, ModelSpec]:
    """(family, ModelConfig, spec) of the model a Megatron-adapter checkpoint holds."""
    config = (manifest.model or {}).get("config")
    if not manifest.family or not config:
        raise UnsupportedError(f"checkpoint by {manifest.writer.adapter!r} records no model family/config, "
                               "so the target layout cannot be checked up front; pass spec= to "
                               "validate_layout")
    cfg = ModelConfig(**config)
    return manifest.family, cfg, family_module(manifest.family).spec(cfg)


def atom_shapes(manifest: Manifest) -> dict[str, tuple[int, ...]]:
    """Shapes of the model's atoms (companion vocabulary-padding atoms are not model parameters)."""
    return {a.name: tuple(a.shape) for a in manifest.atoms if not a.name.endswith(SUFFIX)}


def valid_sizes(spec: ModelSpec, shapes: dict) -> dict[str, list[int]]:
    """The TP (with ETP = TP), PP, EP and, for a MoE model, ETP sizes, each alone, this model can be
    split into."""
    def ok(tp=1, pp=1, ep=1, etp=None) -> bool:
        try:
            spec.check_layout(tp, pp, ep, shapes, etp)
        except LayoutError:
            return False
        return True

    sizes = {"TP": [t for t in range(1, MAX_TP + 1) if ok(tp=t)],
             "PP": [p for p in range(1, (spec.num_layers or 1) + 1) if ok(pp=p)],
             "EP": [e for e in range(1, (spec.num_experts or 1) + 1) if ok(ep=e)]}
    if spec.num_experts:
        sizes["ETP"] = [e for e in range(1, MAX_TP + 1) if ok(etp=e)]
    return sizes


def describe_model(family: str, cfg: ModelConfig | None) -> str:
    if cfg is None:
        return f"this {family} model"
    moe = f", experts={cfg.experts}, moe_ffn={cfg.expert_ffn}" if cfg.experts else ""
    return (f"this {family} model (layers={cfg.layers}, heads={cfg.heads}, query_groups={cfg.groups}, "
            f"ffn={cfg.ffn}{moe})")


def validate_layout(source, layout: MegatronLayout | Layout, spec: ModelSpec | None = None) -> None:
    """Raise LayoutError with the reason and the valid choices if the model saved in ``source`` (a
    path, Checkpoint or Manifest) cannot be loaded at ``layout``'s TP/PP/EP/ETP (and, for a
    MegatronLayout, megatron's own layout rules). Expert parameters are checked against
    ``layout.etp`` when it is set. Reads only the manifest."""
    manifest = read_manifest(source)
    cfg = None
    if spec is None:
        _, cfg, spec = manifest_model(manifest)
    shapes = atom_shapes(manifest)
    try:
        spec.check_layout(layout.tp, layout.pp, layout.ep, shapes, layout.etp)
        if isinstance(layout, MegatronLayout):
            layout.check_model(spec.num_layers or 0, spec.num_experts or 0)
    except LayoutError as e:
        valid = "; ".join(f"{k} in {v}" for k, v in valid_sizes(spec, shapes).items())
        where = source.path + ": " if isinstance(source, Checkpoint) else \
            "" if isinstance(source, Manifest) else f"{source}: "
        etp = f" ETP={layout.etp}" if layout.etp is not None else ""
        raise LayoutError(f"{where}{describe_model(spec.family, cfg)} cannot be loaded at TP={layout.tp} "
                          f"PP={layout.pp} EP={layout.ep}{etp}: {e}. Valid sizes for this model: {valid}") \
            from None
