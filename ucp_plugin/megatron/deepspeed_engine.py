"""A megatron-core model trained by a DeepSpeed engine (the Megatron-DeepSpeed set-up), checkpointed
by the DeepSpeed adapter with megatron's atom names, so its checkpoints and megatron's own are one
format: either framework resumes the other's, at any TP x DP and ZeRO stage.

Use::

    engine, *_ = deepspeed.initialize(model=gpt_model, optimizer=..., mpu=MegatronMPU(),
                                      config={..., "checkpoint": {"universal": true}})

``MegatronMPU`` is the ``mpu`` DeepSpeed asks for, answered by megatron-core's ``parallel_state``.
DeepSpeed reads ``get_model_parallel_*`` for the group over which it sums gradient norms and, with
``is_model_parallel_parameter`` (megatron's ``tensor_model_parallel`` attribute), to count a
replicated parameter once: both are the tensor-parallel group here. Its optional ``family``,
``config`` and ``vocab`` describe the model where megatron cannot (the unpadded vocabulary size).

Importing this module registers ``MegatronBinding`` with the DeepSpeed adapter: for an engine whose
``mpu`` is a ``MegatronMPU`` each local parameter becomes the region of its global atom that
``model_view`` computes, written by the rank the split designates (TP rank 0 for a replicated
parameter), vocabulary padding rows going to the ``@vocab_padding`` companion atom.

Supported: TP x DP, ZeRO stages 0-3, fp32 and bf16. Refused (``problems``): pipeline parallelism
(a DeepSpeed engine cannot drive megatron-core's pipeline schedule), MoE/expert parallelism and
sequence parallelism (a DeepSpeed engine does not reduce their gradients over the groups megatron
does), each at ``deepspeed.initialize`` (SP and MoE right after the engine wraps the model:
``patches/deepspeed_engine_configure_distributed_model.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..deepspeed.params import ParamMap, register_binding
from ..errors import StateMismatchError, UnsupportedError
from ..format import Layout
from ..models.config import ModelConfig
from .build import unwrap
from .checkpoint import RankView, check_atoms, model_info, read_local, write_entry, writes
from .model_view import layers_per_stage, param_entries, resolve_spec
from .validate import validate_layout
from .vocab_padding import SUFFIX as PADDING_SUFFIX


@dataclass(frozen=True)
class MegatronMPU:
    """DeepSpeed's mpu interface over megatron-core's ``parallel_state`` (initialise it first)."""
    family: str | None = None
    config: ModelConfig | None = None
    vocab: int | None = None

    @staticmethod
    def _ps():
        from megatron.core import parallel_state

        return parallel_state

    def get_model_parallel_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps().get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_model_parallel_src_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_src_rank()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank

    def get_data_parallel_rank(self) -> int:
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps().get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        import torch.distributed as dist

        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps().get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps().get_pipeline_model_parallel_rank()


class MegatronParamMap(ParamMap):
    """The DeepSpeed adapter's view of a megatron-core model's parameters (``params.ParamMap``)."""
    adapter, adapter_version = "deepspeed.megatron", "1"

    def __init__(self, engine, view, mpu: MegatronMPU):
        super().__init__(view)
        from megatron.core import parallel_state as ps

        chunks = [engine.module]
        self.family, self.config, spec = resolve_spec(chunks, mpu.family, mpu.config, mpu.vocab)
        names = engine.param_names
        self.entries = {names[e.param]: e for e in param_entries(chunks, spec, self.config)}
        self.tp, self.stages = ps.get_tensor_model_parallel_world_size(), layers_per_stage(chunks)

    def layout(self, base: Layout) -> Layout:
        return replace(base, tp=self.tp, layers_per_stage=self.stages)

    def model_info(self) -> dict:
        return model_info(self.config)

    def writes(self, name: str) -> bool:
        return writes(self.entries[name]) is not None

    def write(self, writer, name: str, kind: str, start: int, tensors: dict, scalars: dict) -> None:
        e = self.entries[name]
        n = next(iter(tensors.values())).numel()
        write_entry(writer, e, start, start + n, tensors, scalars, writes(e))

    def atom(self, source, name: str):
        return source.atoms[self.entries[name].source]

    def has(self, source, name: str) -> bool:
        return self.entries[name].source in source.atoms

    def read(self, source, name: str, state: str, start: int, stop: int, dtype, out=None) -> torch.Tensor:
        e = self.entries[name]
        source.note_request(e.source, state, stop - start)  # padding rows: same dtype, its own atom
        return read_local(source.checkpoint, e, state, start, stop, dtype, out)

    def check(self, source, view, strict: bool) -> None:
        ck = getattr(source, "checkpoint", None)
        if ck is None:
            raise UnsupportedError(f"{source.path}: a native DeepSpeed checkpoint of a megatron-core model "
                                   "cannot be resharded (its TP fragments carry no atom names); save it "
                                   'with "checkpoint": {"universal": true}')
        validate_layout(ck, Layout(tp=self.tp))
        rank_view = RankView(self.family, self.config, tuple(self.entries.values()), self.layout(Layout()))
        check_atoms(ck, rank_view)
        lost = [n for n in view.buffers if n not in source.atoms]
        if lost:
            raise StateMismatchError(f"{ck.path}: the model's buffers {lost[:5]} are not in the checkpoint; "
                                     "load a checkpoint of this model")
        used = {e.source for e in self.entries.values()}
        stored = {a.name for a in ck.top.atoms
                  if a.kind in ("param", "frozen") and not a.name.endswith(PADDING_SUFFIX)}
        if strict and stored - used:
            raise StateMismatchError(f"{ck.path}: the checkpoint has parameters this model lacks: "
                                     f"{sorted(stored - used)[:5]}; pass load_module_strict=False to ignore them")


class MegatronBinding:
    """Registered with the DeepSpeed adapter on import: engines built with ``mpu=MegatronMPU()``."""

    def claims(self, engine) -> bool:
        return isinstance(getattr(engine, "mpu", None), MegatronMPU)

    def problems(self, engine) -> list[str]:
        from megatron.core import parallel_state as ps

        found = []
        if ps.get_pipeline_model_parallel_world_size() > 1:
            found.append("pipeline parallelism of a megatron-core model in a DeepSpeed engine (PP="
                         f"{ps.get_pipeline_model_parallel_world_size()}; use megatron's optimizer and "
                         "ucp_plugin.megatron.checkpoint for PP)")
        if ps.get_expert_model_parallel_world_size() > 1:
            found.append("expert parallelism of a megatron-core model in a DeepSpeed engine")
        module = getattr(engine, "module", None)
        config = getattr(unwrap(module), "config", None) if module is not None else None
        if config is not None and config.sequence_parallel:
            found.append("sequence parallelism of a megatron-core model in a DeepSpeed engine")
        if config is not None and config.num_moe_experts:
            found.append("MoE layers of a megatron-core model in a DeepSpeed engine")
        return found

    def param_map(self, engine, view) -> ParamMap:
        return MegatronParamMap(engine, view, engine.mpu)


register_binding(MegatronBinding())
