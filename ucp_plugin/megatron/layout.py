"""A Megatron parallel layout (TP/PP/EP/DP/SP + optimizer kind) as a validated value, and the one place
that initialises megatron's ``parallel_state`` from it.

Megatron's rank order is "tp-cp-ep-dp-pp": TP is innermost, PP outermost. Expert parallelism is carved
out of the data-parallel ranks (the experts of one layer are spread over EP ranks that each see
different data), so EP must divide DP; the expert-tensor-parallel size is megatron's default, TP.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LayoutError

OPTIMIZERS = ("distributed", "ddp")


@dataclass(frozen=True)
class MegatronLayout:
    """``world_size = tp * pp * dp``. ``first_stage_layers``/``last_stage_layers`` make an uneven
    pipeline (megatron's ``num_layers_in_{first,last}_pipeline_stage``); the other stages split the
    remaining layers evenly. ``optimizer`` is "distributed" (DistributedOptimizer: fp32 main params
    and Adam states sharded over DP) or "ddp" (every DP rank holds the full optimizer state)."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    sp: bool = False
    optimizer: str = "distributed"
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "ep"):
            if getattr(self, name) < 1:
                raise LayoutError(f"MegatronLayout.{name} must be >= 1, not {getattr(self, name)}")
        if self.dp % self.ep:
            raise LayoutError(f"EP={self.ep} must divide DP={self.dp}: megatron carves expert-parallel "
                              f"ranks out of the data-parallel ones; valid EP: "
                              f"{[d for d in range(1, self.dp + 1) if self.dp % d == 0]}")
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

    def describe(self) -> str:
        extra = ",sp" if self.sp else ""
        extra += f",first{self.first_stage_layers}" if self.first_stage_layers is not None else ""
        extra += f",last{self.last_stage_layers}" if self.last_stage_layers is not None else ""
        return f"tp{self.tp}.pp{self.pp}.dp{self.dp}.ep{self.ep}{extra}.{self.optimizer}"


def init_parallel_state(layout: MegatronLayout) -> None:
    """Initialise (or re-initialise) megatron's process groups for ``layout`` on an initialised
    default process group of exactly ``layout.world_size`` ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise LayoutError("torch.distributed is not initialised; call torch.distributed.init_process_group "
                          "(e.g. through ucp_plugin.launcher.run_workers) first")
    if dist.get_world_size() != layout.world_size:
        raise LayoutError(f"layout {layout.describe()} needs {layout.world_size} ranks "
                          f"(tp*pp*dp), the job has {dist.get_world_size()}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # gloo is already the default backend here: megatron's extra gloo copies of the groups would only
    # cost rendezvous time
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, create_gloo_process_groups=False)
