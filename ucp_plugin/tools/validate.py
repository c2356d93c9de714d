"""``ucp validate``: can a checkpoint be loaded on a target layout? Derived from the checkpoint's own
metadata (each atom's split, the model's layers and experts), before any job is launched. Every check
is the language's (``check_split``: expert atoms against ETP when one is given, the others against
TP; ``check_expert_grid``: ETP x EP must divide TP x DP), the same ones ``validate_layout`` runs."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from ..errors import LayoutError
from ..format import Manifest
from ..language import check_expert_grid, check_experts, check_pipeline, check_split, split_from_json
from ..storage import Checkpoint

MAX_SIZE = 16  # the nearest-layout search tries every TP, PP, EP (and ETP) up to this


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


def reasons(m: Manifest, tp: int, pp: int, ep: int, zero_stage: int | None, etp: int | None = None) -> list[str]:
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
        try:
            check_split(atom.name, split_from_json(atom.split), atom.shape, tp, etp)
        except LayoutError as e:
            key = (atom.split.get("kind"), str(e).split(": ", 1)[-1].split(";")[0])
            if key not in seen:  # one line per distinct reason, not one per layer
                seen.add(key)
                out.append(str(e))
    return out


def _grid(tp: int, dp: int, ep: int, etp: int | None) -> list[str]:
    try:
        check_expert_grid(tp, dp, ep, etp)
    except LayoutError as e:
        return [str(e)]
    return []


def _name(tp: int, pp: int, dp: int, ep: int, etp: int | None) -> str:
    return f"TP{tp}·PP{pp}·DP{dp}" + (f"·EP{ep}" if ep > 1 else "") + \
        (f"·ETP{etp}" if etp is not None and etp != tp else "")


def _nearest(m: Manifest, tp: int, pp: int, dp: int, ep: int, etp: int | None, zero_stage) -> tuple[str, ...]:
    """Up to 5 valid layouts of the same world size, fewest changes first: TP/PP/EP varied with the
    given ETP, and, when an ETP is given, ETP varied at the given TP/PP/EP."""
    world, sizes = tp * pp * dp, range(1, MAX_SIZE + 1)
    candidates = [(t, p, e, etp) for t, p, e in product(sizes, sizes, sizes)]
    if etp is not None:
        candidates += [(tp, pp, ep, x) for x in sizes if x != etp]
    found = []
    for t, p, e, x in candidates:
        if world % (t * p):
            continue
        d = world // (t * p)
        if _grid(t, d, e, x) or reasons(m, t, p, e, zero_stage, x):
            continue
        found.append((abs(t - tp) + abs(p - pp) + abs(e - ep) + abs((x or t) - (etp or tp)), t, p, d, e, x))
    return tuple(_name(t, p, d, e, x) for _, t, p, d, e, x in sorted(found, key=lambda f: f[:5])[:5])


def validate(path: str, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1,
             zero_stage: int | None = None, etp: int | None = None) -> Verdict:
    """``etp``: the expert layers' tensor-parallel size (None: TP)."""
    m = Checkpoint.open(path, verify=False).top
    target = _name(tp, pp, dp, ep, etp) + (f" ZeRO-{zero_stage}" if zero_stage is not None else "")
    why = reasons(m, tp, pp, ep, zero_stage, etp) + _grid(tp, dp, ep, etp)
    nearest = _nearest(m, tp, pp, dp, ep, etp, zero_stage) if why else ()
    return Verdict(path, target, tuple(why), nearest)
