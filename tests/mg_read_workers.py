"""Workers for tests/test_megatron_load_reads.py: megatron runs (``mg_workers.run_plan``) that may
freeze parameters, and loads that count the tensor bytes they read."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

warnings.filterwarnings("ignore")  # megatron warns about missing apex/TE at every import


@contextmanager
def _frozen(names: tuple[str, ...]):
    """The model parameters named in ``names`` are frozen before the harness builds megatron's DDP
    and optimizer around the model, as a user freezing part of a model does."""
    from ucp_plugin.testing import harness

    real = harness.wrap

    def wrap(model, layout, settings):
        for name, param in model.named_parameters():
            if name in names:
                param.requires_grad_(False)
        return real(model, layout, settings)

    harness.wrap = wrap
    try:
        yield
    finally:
        harness.wrap = real


@contextmanager
def _opened_checkpoints():
    """The list of every ``Checkpoint`` opened inside (to read their ``bytes_read``)."""
    from ucp_plugin.storage import Checkpoint

    opened, real = [], Checkpoint.open

    def open_(path, verify=True):
        opened.append(real(path, verify))
        return opened[-1]

    Checkpoint.open = staticmethod(open_)
    try:
        yield opened
    finally:
        Checkpoint.open = staticmethod(real)


def save_run(frozen: tuple[str, ...] = (), **args) -> dict:
    from mg_workers import save_run as save

    with _frozen(tuple(frozen)):
        return save(**args)


def load_run(family: str, model: dict, layout: dict, settings: dict, root: str, frozen: tuple[str, ...] = (),
             verify: bool = True) -> dict:
    """Resume at ``layout``; the tensor bytes this rank read, then the losses of the remaining steps."""
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig
    from ucp_plugin.testing.harness import TrainSettings, resume, token_batches, train_step

    cfg, sets = ModelConfig(**model), TrainSettings(**settings)
    with _frozen(tuple(frozen)), _opened_checkpoints() as opened:
        run, state = resume(family, cfg, MegatronLayout(**layout), sets, root,
                            described=dict(family=family, config=cfg, verify=verify))
    it = state["iteration"]
    losses = [train_step(run, t) for t in token_batches(cfg, sets)[it:]]
    return {"losses": losses, "iteration": it, "bytes_read": sum(ck.bytes_read for ck in opened)}


def run_plan(runs: list[dict]) -> dict:
    from mg_workers import run_plan as run_all

    return run_all(runs, {"save": save_run, "load": load_run})
