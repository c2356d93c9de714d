"""``optim_state`` and the RNG helpers of ``state.py`` without a process group: ``step`` written back in
each optimizer's own form, new states on the buffer's dtype/device, deterministic re-seeding."""
from __future__ import annotations

import random
import types

import pytest
import torch

from ucp_plugin.deepspeed import optim_state as O
from ucp_plugin.deepspeed import state as S
from ucp_plugin.errors import StateMismatchError, UnsupportedError


class FusedAdam(torch.optim.Optimizer):
    """Stands for DeepSpeed's: defined outside ``torch.optim``, keeps ``step`` as an int."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-3})


def _flat(n=6, dtype=torch.float32):
    return torch.nn.Parameter(torch.zeros(n, dtype=dtype))


def test_fresh_torch_state_gets_a_cpu_float_tensor_step():
    t = _flat()
    opt = torch.optim.AdamW([t])
    O.restore_entry(opt, t, {"exp_avg": torch.arange(6.0)}, {"step": 7})
    step = opt.state[t]["step"]
    assert torch.is_tensor(step) and step.dtype == torch.float32 and step.device.type == "cpu" and step.item() == 7
    assert torch.equal(opt.state[t]["exp_avg"], torch.arange(6.0))


def test_capturable_torch_state_keeps_step_on_the_parameter_device():
    t = _flat()
    opt = torch.optim.AdamW([t], capturable=True)
    O.restore_entry(opt, t, {}, {"step": 3})
    assert opt.state[t]["step"].device == t.device and opt.state[t]["step"].item() == 3


def test_fresh_deepspeed_state_gets_an_int_step():
    t = _flat()
    opt = FusedAdam([t])
    O.restore_entry(opt, t, {"exp_avg": torch.ones(6)}, {"step": 4})
    assert type(opt.state[t]["step"]) is int and opt.state[t]["step"] == 4


def test_existing_values_keep_their_type_and_storage():
    t = _flat()
    opt = FusedAdam([t])
    buf = torch.zeros(6)
    opt.state[t] = {"step": 1, "exp_avg": buf, "other": torch.tensor(0.0)}
    O.restore_entry(opt, t, {"exp_avg": torch.full((6,), 2.0)}, {"step": 9, "other": 5})
    entry = opt.state[t]
    assert entry["step"] == 9 and type(entry["step"]) is int
    assert entry["exp_avg"] is buf and torch.equal(buf, torch.full((6,), 2.0))  # DeepSpeed's views stay valid
    assert torch.is_tensor(entry["other"]) and entry["other"].item() == 5


def test_new_states_take_the_buffer_dtype():
    t = _flat(dtype=torch.float64)
    opt = torch.optim.AdamW([t])
    O.restore_entry(opt, t, {"exp_avg": torch.ones(6, dtype=torch.float32)}, {})
    assert opt.state[t]["exp_avg"].dtype == torch.float64 and opt.state[t]["exp_avg"].shape == t.shape


def test_split_state_reads_int_and_tensor_steps_alike():
    for step in (3, torch.tensor(3.0)):
        tensors, scalars = O.split_state({"step": step, "exp_avg": torch.ones(4)}, 4, "here")
        assert scalars == {"step": 3} and type(scalars["step"]) is int and set(tensors) == {"exp_avg"}
    with pytest.raises(UnsupportedError, match="'odd'"):
        O.split_state({"odd": "text"}, 4, "here")


def test_adam_family_moves_between_classes_but_not_to_sgd():
    state = {"optimizer": {"class": "DeepSpeedCPUAdam"}}
    S.check_optimizer(FusedAdam([_flat()]), state, "ck")
    S.check_optimizer(torch.optim.AdamW([_flat()]), state, "ck")
    with pytest.raises(StateMismatchError, match="saved by DeepSpeedCPUAdam"):
        S.check_optimizer(torch.optim.SGD([_flat()], lr=0.1), state, "ck")


def test_reseed_is_deterministic_and_differs_per_rank():
    def draw(seed, step, rank):
        S.reseed(seed, step, rank)
        return torch.rand(4), random.random()

    a, b = draw(1234, 3, 0), draw(1234, 3, 0)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], draw(1234, 3, 1)[0]) and not torch.equal(a[0], draw(1234, 4, 0)[0])


class _Source:
    def __init__(self, dp, saved):
        self.path, self.dp, self.tp, self.saved = "ck", dp, 1, saved

    def rank_state(self, rank, world_size):
        return self.saved

    def common_state(self):
        return {"rng": {"seed": 99}}


def test_rng_is_restored_on_the_same_layout_and_reseeded_on_another(tmp_path):
    import torch.distributed as dist

    view = types.SimpleNamespace(dp=1, stage=1, param_dtype="float32",
                                 params=types.SimpleNamespace(layout=lambda base: base))
    engine = types.SimpleNamespace(global_steps=5)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(7)
        saved = S.rank_state()
        expected = torch.rand(3)
        torch.manual_seed(8)
        assert S.restore_rng(_Source(1, saved), engine, view) == "restored"
        assert torch.equal(torch.rand(3), expected)
        assert S.restore_rng(_Source(2, saved), engine, view) == "reseeded"
        after_reshard = torch.rand(3)
        S.reseed(99, 5, 0)
        assert torch.equal(torch.rand(3), after_reshard)
        assert S.restore_rng(_Source(2, None), engine, view) == "reseeded"  # a new rank without a state
    finally:
        dist.destroy_process_group()
