"""``ucp import HF_DIR OUT --family llama|mixtral|gpt`` (``import_hf``): a Hugging Face transformers
folder (config.json + model.safetensors, sharded or not) as a weights-only universal checkpoint in the
consolidated form, which the megatron-core adapter loads at any TP/PP/EP (``load_universal(model, None,
OUT)``), e.g. to start continued pre-training from HF weights on any layout.

It inverts the family's ``hf_spec`` (the same ``HfRule`` data the exporter reads), so export -> import
-> export is bitwise. Atoms are assembled one at a time from the HF tensors (a stacked expert tensor
is read one expert slice at a time) and written to their own file; the manifest is written last.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import torch

from .. import __version__
from ..errors import FormatError
from ..format import MANIFEST, Atom, Layout, Manifest, Writer
from ..language.hf import HfRule, HfSpec, match
from ..megatron.checkpoint import model_info
from ..storage.files import atomic_write_text, fsync_path
from ..storage.atom_files import write_atom
from .hf_export import FAMILIES

INDEX = "model.safetensors.index.json"


def _family(family: str, where: str):
    if family not in FAMILIES:
        raise FormatError(f"{where}: unknown family {family!r}; choose one of {FAMILIES}")
    return importlib.import_module(f"ucp_plugin.models.{family}")


def model_config(hf_dir: str, family: str):
    """The ModelConfig of an HF folder, refused (one line, naming the file) when its config is not the
    family's model type or differs from what megatron's model of that family computes."""
    from transformers import AutoConfig

    from ..models import ModelConfig
    where = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(where):
        raise FormatError(f"{where}: missing; not a Hugging Face model folder")
    module = _family(family, where)
    hf = AutoConfig.from_pretrained(hf_dir).to_dict()
    if hf.get("model_type") != module.HF_MODEL_TYPE:
        others = [f for f in FAMILIES if _family(f, where).HF_MODEL_TYPE == hf.get("model_type")]
        hint = f"; use --family {others[0]}" if others else ""
        raise FormatError(f"{where}: model_type {hf.get('model_type')!r} does not match family {family!r} "
                          f"(expects {module.HF_MODEL_TYPE!r}){hint}")
    sizes = {field: hf[key] for key, field in module.HF_FIELDS.items() if hf.get(key) is not None}
    sizes.setdefault("ffn", sizes.get("moe_ffn") or 4 * sizes["hidden"])  # GPT-2's n_inner=None: 4 * n_embd
    cfg = ModelConfig(**sizes)
    spec = module.hf_spec(cfg)
    for key, want in spec.fixed.items():  # dropout does not change the weights: not checked
        if key in hf and not key.endswith(("pdrop", "dropout")) and hf[key] != want and not (isinstance(want, dict) and _sub(want, hf[key])):
            raise FormatError(f"{where}: {key}={hf[key]!r}, megatron's {family} model computes with {want!r}; "
                              "this model cannot be expressed in that family")
    return cfg, spec, module


def _sub(want: dict, got) -> bool:
    return isinstance(got, dict) and all(got.get(k) == v for k, v in want.items())


class HfFolder:
    """The tensors of an HF folder, by name: shapes from the headers, slices read on demand."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open
        index = os.path.join(hf_dir, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FormatError(f"{hf_dir}: no model.safetensors nor {INDEX}")
        self.files = {}
        for name in files:
            handle = safe_open(os.path.join(hf_dir, name), framework="pt")
            for key in handle.keys():
                self.files[key] = handle
        self.shapes = {k: tuple(h.get_slice(k).get_shape()) for k, h in self.files.items()}

    def read(self, name: str, index: int | None) -> torch.Tensor:
        sl = self.files[name].get_slice(name)
        return sl[index] if index is not None else sl[:]


def atom_sources(spec: HfSpec, shapes: dict) -> dict[str, list[tuple[HfRule, str, int | None]]]:
    """For each atom: the (rule, HF tensor, stack index) it is assembled from."""
    out: dict[str, list] = {}
    for name, shape in shapes.items():
        hits = [(r, f) for r in spec.rules if (f := match(r.hf, name)) is not None]
        if not hits:
            raise FormatError(f"HF tensor {name!r} has no megatron atom in the {spec.model_type!r} mapping; is "
                              "the folder of another model type or version?")
        for rule, fields in hits:
            for index in (range(shape[0]) if rule.stack is not None else [None]):
                values = {**fields, **({rule.stack: index} if index is not None else {})}
                atom = rule.atom.format(*[values[i] for i in range(len(values))])
                out.setdefault(atom, []).append((rule, name, index))
    return out


def _atom_shape(rule: HfRule, hf_shape: tuple) -> tuple[int, ...]:
    shape = hf_shape[1:] if rule.stack is not None else hf_shape
    shape = shape[::-1] if rule.transpose else shape
    return ((rule.rows.atom_rows,) + tuple(shape[1:])) if rule.rows else tuple(shape)


def assemble(folder: HfFolder, sources: list, shape: tuple[int, ...]) -> torch.Tensor:
    atom = torch.empty(shape, dtype=torch.float32)
    for rule, name, index in sources:
        t = folder.read(name, index).float()
        t = t.t() if rule.transpose else t
        if rule.rows is None:
            atom.copy_(t)
            continue
        at = 0
        for lo, hi in rule.rows.ranges():
            atom[lo:hi] = t[at:at + hi - lo]
            at += hi - lo
    return atom


def import_hf(hf_dir: str, out: str, family: str, progress: bool = False) -> str:
    from tqdm import tqdm
    import transformers

    cfg, spec, module = model_config(hf_dir, family)
    folder = HfFolder(hf_dir)
    sources = atom_sources(spec, folder.shapes)
    shapes = {a: _atom_shape(src[0][0], folder.shapes[src[0][1]]) for a, src in sources.items()}
    replanned = {t.name: t.shape for t in spec.plan(shapes)}
    if replanned != folder.shapes:  # a tensor missing (k_proj, an expert) or of another size
        bad = sorted(set(replanned.items()) ^ set(folder.shapes.items()))[0][0]
        raise FormatError(f"{hf_dir}: HF tensor {bad!r} is missing or has a shape the {family} config does not "
                          "give; the folder does not match its config.json")
    megatron = module.spec(cfg)
    if os.path.exists(out) and os.listdir(out):
        raise FormatError(f"{out}: output folder exists and is not empty; choose a new folder")
    staging = out.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "atoms"))
    atoms, files = [], []
    for name in tqdm(sorted(shapes), desc="import", unit="atom", disable=not progress):
        meta = Atom(name, "param", shapes[name], megatron.split_for(name).to_json(), {"fp32": "float32"})
        done, entry = write_atom(staging, meta, {"fp32": assemble(folder, sources[name], shapes[name])})
        atoms.append(done)
        files.append(entry)
    manifest = Manifest(Writer("hf.import", "1", __version__, "transformers", transformers.__version__),
                        Layout(), tuple(atoms), tuple(files), family=family, iteration=0,
                        model=model_info(cfg))
    atomic_write_text(os.path.join(staging, MANIFEST), manifest.to_json())
    if os.path.exists(out):
        os.rmdir(out)
    os.replace(staging, out)
    fsync_path(os.path.dirname(os.path.abspath(out)))
    return out
