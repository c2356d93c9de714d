"""``ucp convert NATIVE_DIR OUT``: a plain DeepSpeed ZeRO-1/2/3 checkpoint (``engine.save_checkpoint``
without the plugin) rewritten offline as a universal checkpoint in the consolidated form.

It reads through ``deepspeed.native.NativeSource`` (what ``engine.load_checkpoint`` with the plugin
reads: ``plan.zero`` says which saved rank's file holds which element of each parameter). Streaming:
each atom is assembled from its fragments and written once, straight to its file
``atoms/<name>.safetensors`` (no temporary copy of the checkpoint); the memory-mapped rank files are
released whenever the bytes read since the last release reach the largest parameter's fp32 size L.
Memory bound, per worker: one atom's S states (Adam: fp32, exp_avg, exp_avg_sq; at most S x L) plus
the pages touched in the mapped files since the last release (at most L + S x L), i.e.
``(2S + 1) x L`` above the interpreter's baseline (a test checks it).
``workers`` processes convert disjoint atoms. Resumable: an atom file that an interrupted run finished
is kept (one cut short fails to open and is rewritten); the manifest, written last, commits.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from .. import __version__
from ..errors import FormatError
from ..format import MANIFEST, Atom, FileEntry, Layout, Manifest, Writer
from ..plan import zero as Z
from ..storage.files import atomic_write_text, open_tensors, save_tree
from .convert import _atom_file, atom_record, write_atom

ADAPTER = "deepspeed.native-convert"
STAGES = {Z.PER_PARAM: 0, Z.ZERO3: 3}


def _source(folder: str):
    from ..deepspeed.native import NativeSource
    return NativeSource(folder)


def atom_bytes(atom: Atom) -> int:
    return atom.numel * sum(getattr(torch, d).itemsize for d in atom.states.values())


def _finished(out: str, atom: Atom) -> dict[str, torch.Tensor] | None:
    """The states of an atom file a previous run completed, or None."""
    path = os.path.join(out, _atom_file(atom.name))
    if not os.path.isfile(path):
        return None
    try:
        with open_tensors(path) as f:
            flat = {s: f.get_tensor(s) for s in atom.states}
    except Exception:  # cut short by the interruption: written again
        return None
    return flat if all(t.numel() == atom.numel for t in flat.values()) else None


class Reader:
    """A source whose mapped rank files are released once the bytes read since the last release reach
    ``budget`` (the largest parameter's fp32 bytes): the pages touched never exceed budget plus one
    atom, and small atoms do not pay a re-mapping each (re-opening costs a torch.load per rank file)."""

    def __init__(self, source, budget: int):
        self.source, self.budget, self.since = source, budget, 0

    def atom(self, atom: Atom) -> dict[str, torch.Tensor]:
        tensors = {s: self.source.read(atom.name, s, 0, atom.numel, getattr(torch, d))
                   for s, d in atom.states.items()}
        self.since += atom_bytes(atom)
        if self.since >= self.budget:
            self.source.release()
            self.since = 0
        return tensors


def convert_atom(reader: Reader, out: str, atom: Atom) -> tuple[Atom, FileEntry]:
    flat = _finished(out, atom)
    if flat is not None:
        return atom_record(out, atom, flat)
    return write_atom(out, atom, reader.atom(atom))


def budget(source) -> int:
    return max(a.numel for a in source.atoms.values()) * 4


_WORKER: dict = {}


def _work(folder: str, out: str, atom: Atom) -> tuple[Atom, FileEntry]:
    if _WORKER.get("folder") != folder:  # one source per worker process, opened on its first atom
        source = _source(folder)
        _WORKER.update(folder=folder, reader=Reader(source, budget(source)))
    return convert_atom(_WORKER["reader"], out, atom)


def header(source) -> Manifest:
    cfg = (source.model.get("ds_config") or {}).get("zero_optimization") or {}
    stage = int(cfg.get("stage", STAGES.get(source.kind, 1)))
    dtype = "bfloat16" if source.dtype == "bf16" else "float32"
    return Manifest(Writer(ADAPTER, "1", __version__, "deepspeed", str(source.model.get("ds_version", ""))),
                    Layout(dp=source.dp, zero_stage=stage, param_dtype=dtype), (),
                    iteration=source.model.get("global_steps"))


def convert_native(folder: str, out: str, workers: int = 1, progress: bool = False) -> str:
    from tqdm import tqdm

    source = _source(folder)
    if os.path.isfile(os.path.join(out, MANIFEST)):
        raise FormatError(f"{out}: already a converted checkpoint (ucp.json); choose a new folder")
    os.makedirs(os.path.join(out, "atoms"), exist_ok=True)
    atoms = sorted(source.atoms.values(), key=lambda a: a.name)
    done: dict[str, tuple[Atom, FileEntry]] = {}
    with tqdm(total=sum(map(atom_bytes, atoms)), unit="B", unit_scale=True, desc="convert",
              disable=not progress) as bar:
        if workers <= 1:
            reader = Reader(source, budget(source))
            for atom in atoms:
                done[atom.name] = convert_atom(reader, out, atom)
                bar.update(atom_bytes(atom))
        else:
            with ProcessPoolExecutor(workers) as pool:
                futures = {pool.submit(_work, folder, out, a): a for a in atoms}
                for f in as_completed(futures):
                    done[futures[f].name] = f.result()
                    bar.update(atom_bytes(futures[f]))
    files = [done[a.name][1] for a in atoms] + _state_files(source, out)
    manifest = header(source)
    manifest = Manifest(manifest.writer, manifest.layout, tuple(done[a.name][0] for a in atoms), tuple(files),
                        iteration=manifest.iteration, state_ranks=0)
    atomic_write_text(os.path.join(out, MANIFEST), manifest.to_json())
    return out


def _state_files(source, out: str) -> list[FileEntry]:
    """The training state (engine counters, scheduler, optimizer hyperparameters) as ``state/common``."""
    os.makedirs(os.path.join(out, "state"), exist_ok=True)
    written = save_tree(os.path.join(out, "state", "common"), source.common_state())
    return [FileEntry(os.path.relpath(p, out), size, digest) for p, size, digest in written]
