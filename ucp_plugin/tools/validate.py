"""``ucp validate``: can a checkpoint be loaded on a target layout? Derived from the checkpoint's own
metadata (each atom's split, the model's layers and experts), before any job is launched."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from ..errors import LayoutError
from ..format import Manifest
from ..language import check_experts, check_pipeline, split_from_json
from ..storage import Checkpoint


@dataclass(frozen=True)
class Verdict:
    path: str
    target: str
    reasons: tuple[str, ...]
    nearest: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.reasons

    def render(self) -> str:
        if self.ok:
            return f"{self.path}: loadable on {self.target}"
        lines = [f"{self.path}: NOT loadable on {self.target}"] + [f"  - {r}" for r in self.reasons]
        if self.nearest:
            lines.append(f"  nearest valid layouts: {', '.join(self.nearest)}")
        return "\n".join(lines)


def reasons(m: Manifest, tp: int, pp: int, ep: int, zero_stage: int | None) -> list[str]:
    out = []
    family = m.family or "checkpointed"
    for check, size, n in ((check_pipeline, int(m.model.get("num_layers", 0)), pp),
                           (check_experts, int(m.model.get("num_experts", 0)), ep)):
        try:
            check(family, size, n)
        except LayoutError as e:
            out.append(str(e).split("; valid")[0])
    if zero_stage is not None and zero_stage not in (0, 1, 2, 3):
        out.append(f"ZeRO stage {zero_stage} does not exist (0, 1, 2 or 3)")
    seen = set()
    for atom in m.atoms:
        split = split_from_json(atom.split)
        try:
            split.check(atom.name, atom.shape, tp)
        except LayoutError as e:
            key = (atom.split.get("kind"), str(e).split(": ", 1)[-1].split(";")[0])
            if key not in seen:  # one line per distinct reason, not one per layer
                seen.add(key)
                out.append(str(e).split("; valid")[0])
    return out


def _nearest(m: Manifest, tp: int, pp: int, dp: int, ep: int, zero_stage) -> tuple[str, ...]:
    world = tp * pp * dp
    found = []
    for t, p, e in product(range(1, 17), range(1, 17), range(1, 17)):
        if world % (t * p) or (world // (t * p)) % e or reasons(m, t, p, e, zero_stage):
            continue
        found.append((abs(t - tp) + abs(p - pp) + abs(e - ep), t, p, world // (t * p), e))
    return tuple(f"TP{t}·PP{p}·DP{d}" + (f"·EP{e}" if e > 1 else "") for _, t, p, d, e in sorted(found)[:5])


def validate(path: str, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1,
             zero_stage: int | None = None) -> Verdict:
    m = Checkpoint.open(path, verify=False).manifest
    target = f"TP{tp}·PP{pp}·DP{dp}" + (f"·EP{ep}" if ep > 1 else "") + \
        (f" ZeRO-{zero_stage}" if zero_stage is not None else "")
    why = reasons(m, tp, pp, ep, zero_stage)
    if ep > 1 and dp % ep:
        why.append(f"EP={ep} must divide DP={dp} (with expert tensor parallelism equal to TP, megatron-core "
                   "spreads experts over the data-parallel ranks)")
    nearest = _nearest(m, tp, pp, dp, ep, zero_stage) if why else ()
    return Verdict(path, target, tuple(why), nearest)
