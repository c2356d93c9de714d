"""``ucp inspect``: what a checkpoint is, as a value (``Report``) and as text."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..format import Manifest
from ..storage import Checkpoint


@dataclass(frozen=True)
class AtomRow:
    name: str
    kind: str
    shape: tuple[int, ...]
    split: str
    states: tuple[str, ...]
    numel: int


@dataclass(frozen=True)
class Report:
    path: str
    format_version: str
    writer: str
    layout: str
    family: str | None
    iteration: int | None
    atoms: tuple[AtomRow, ...]
    trainable_numel: int
    total_numel: int
    files: int
    bytes: int

    def to_json(self) -> dict:
        return asdict(self)


def _split_text(split: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in split.items() if k != "kind")
    return f"{split.get('kind', '?')}({extra})" if extra else split.get("kind", "?")


def report(path: str) -> Report:
    ck = Checkpoint.open(path)
    m: Manifest = ck.manifest
    rows = tuple(AtomRow(a.name, a.kind, a.shape, _split_text(a.split), tuple(a.states), a.numel)
                 for a in m.atoms)
    w = m.writer
    return Report(ck.path, m.format_version, f"{w.adapter}/{w.adapter_version} ({w.framework} "
                  f"{w.framework_version}, ucp_plugin {w.plugin_version})", m.layout.describe(), m.family,
                  m.iteration, rows, sum(r.numel for r in rows if r.kind == "param"),
                  sum(r.numel for r in rows), len(m.files), sum(f.bytes for f in m.files))


def render(r: Report) -> str:
    lines = [f"universal checkpoint {r.path}", f"  format     {r.format_version}",
             f"  written by {r.writer}", f"  layout     {r.layout}",
             f"  family     {r.family or '-'}", f"  iteration  {r.iteration}", ""]
    width = max([len(a.name) for a in r.atoms] + [9])
    lines.append(f"  {'parameter':<{width}}  {'kind':<6}  {'shape':<16}  {'split':<28}  {'numel':>10}  states")
    for a in r.atoms:
        lines.append(f"  {a.name:<{width}}  {a.kind:<6}  {str(list(a.shape)):<16}  {a.split:<28}  "
                     f"{a.numel:>10,}  {','.join(a.states)}")
    lines += ["", f"  {len(r.atoms)} atoms, {r.trainable_numel:,} trainable / {r.total_numel:,} elements, "
                  f"{r.files} files, {r.bytes / 2**20:.2f} MiB"]
    return "\n".join(lines)
