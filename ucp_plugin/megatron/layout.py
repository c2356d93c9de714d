"""A Megatron parallel layout (TP/PP/EP/ETP/DP/SP + optimizer kind) as a validated value, and the one
place that says whether a model fits it. (``ucp_plugin.testing.build.init_parallel_state`` initialises
megatron's ``parallel_state`` from it for tests and recipes; Megatron-LM does that itself.)

Megatron's rank order is "tp-cp-ep-dp-pp": TP is innermost, PP outermost. The expert layers re-cut the
TP x DP ranks of a pipeline stage as ETP x EP x expert-DP: each expert is split over ETP
(expert-tensor-parallel) ranks, the experts of a layer over EP ranks, and the rest replicate them. So
ETP * EP must divide TP * DP (megatron: the world size must be divisible by ETP * EP * PP). ETP is
TP by default (``etp=None``), and the rule is then: EP divides DP. (With EP = 1 and ETP != TP,
``ucp_plugin.testing.build.build_stage_model`` marks the expert parameters for expert-DP gradient
reduction, which megatron-core 0.16 does only at EP > 1: ``mark_expert_data_parallel`` there.)
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LayoutError
from ..language import check_expert_grid

OPTIMIZERS = ("distributed", "ddp")


@dataclass(frozen=True)
class MegatronLayout:
    """``world_size = tp * pp * dp``. ``first_stage_layers``/``last_stage_layers`` make an uneven
    pipeline (megatron's ``num_layers_in_{first,last}_pipeline_stage``); the other stages split the
    remaining layers evenly. ``optimizer`` is "distributed" (DistributedOptimizer: fp32 main params
    and Adam states sharded over DP) or "ddp" (every DP rank holds the full optimizer state).
    ``etp`` is megatron's ``expert_tensor_parallel_size``: the TP size of the expert layers only
    (None: TP, megatron's default); the experts' DP size is then ``tp * dp // (etp * ep)``."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    sp: bool = False
    optimizer: str = "distributed"
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    etp: int | None = None

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "ep"):
            if getattr(self, name) < 1:
                raise LayoutError(f"MegatronLayout.{name} must be >= 1, not {getattr(self, name)}")
        if self.etp is not None and (not isinstance(self.etp, int) or self.etp < 1):
            raise LayoutError(f"MegatronLayout.etp must be None (= TP) or >= 1, not {self.etp!r}")
        check_expert_grid(self.tp, self.dp, self.ep, self.etp)
        if self.sp and self.tp == 1:
            raise LayoutError("sequence parallelism (sp=True) needs TP > 1; set sp=False for TP=1")
        if self.optimizer not in OPTIMIZERS:
            raise LayoutError(f"MegatronLayout.optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if (self.first_stage_layers or self.last_stage_layers) and self.pp == 1:
            raise LayoutError("first_stage_layers/last_stage_layers need PP > 1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def check_model(self, layers: int, experts: int) -> None:
        """Raise LayoutError naming the fix if this layout cannot hold the model."""
        if experts and experts % self.ep:
            raise LayoutError(f"EP={self.ep} does not divide the {experts} experts; valid EP: "
                              f"{[d for d in range(1, experts + 1) if experts % d == 0]}")
        if experts and self.tp > 1 and not self.sp:
            raise LayoutError("megatron-core refuses MoE with TP > 1 without sequence parallelism; "
                              "set sp=True")
        if not experts and self.ep > 1:
            raise LayoutError(f"EP={self.ep} needs a Mixture-of-Experts model; set ep=1")
        if not experts and self.etp not in (None, self.tp):
            raise LayoutError(f"ETP={self.etp} needs a Mixture-of-Experts model; leave etp unset")
        self._check_stages(layers)

    def _check_stages(self, layers: int) -> None:
        first, last = self.first_stage_layers, self.last_stage_layers
        ends = (first or 0) + (last or 0)
        middle = self.pp - (first is not None) - (last is not None)
        rest = layers - ends
        if rest < 0 or (middle == 0 and rest) or (middle and (rest % middle or rest == 0)):
            raise LayoutError(f"{layers} layers cannot be split over PP={self.pp} with first_stage_layers="
                              f"{first}, last_stage_layers={last}: the stages in between must share the "
                              "remaining layers evenly (at least one each)")

    @property
    def expert_tp(self) -> int:
        """The expert layers' tensor-parallel size."""
        return self.tp if self.etp is None else self.etp

    def describe(self) -> str:
        extra = ",sp" if self.sp else ""
        extra += f",etp{self.etp}" if self.etp is not None else ""
        extra += f",first{self.first_stage_layers}" if self.first_stage_layers is not None else ""
        extra += f",last{self.last_stage_layers}" if self.last_stage_layers is not None else ""
        return f"tp{self.tp}.pp{self.pp}.dp{self.dp}.ep{self.ep}{extra}.{self.optimizer}"
