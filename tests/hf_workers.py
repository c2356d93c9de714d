"""Megatron workers for the Hugging Face tests (run by ``ucp_plugin.testing.launcher`` in fresh processes: the
CPU shim is process-global). Each returns megatron's own logits on probe tokens, the reference the
transformers model must reproduce."""
from __future__ import annotations

import warnings

warnings.filterwarnings("ignore")  # megatron warns about missing apex/TE at every import


def probe_tokens(vocab: int, seq: int, batch: int = 2) -> "torch.Tensor":
    import torch
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(77))


def logits(model, tokens) -> list:
    """Full-vocabulary logits of megatron's forward (gathered over TP; padding rows included), on every
    rank (with PP, the stages run one after another)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from ucp_plugin.megatron.model_view import unwrap

    gpt = unwrap(model)
    gpt.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            return stage_by_stage(gpt, tokens, positions)
        out = gpt(input_ids=tokens, position_ids=positions, attention_mask=None)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        out = gather_from_tensor_model_parallel_region(out)
    return out.float().tolist()


def stage_by_stage(gpt, tokens, positions) -> list:
    """Forward through a pipeline (TP=1) without a schedule: each stage in turn runs on the previous
    stage's output (broadcast over the pipeline group); the last stage's logits go to every rank."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group, mine, stages = (ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank(),
                           ps.get_pipeline_model_parallel_world_size())
    hidden, out = None, None
    for stage in range(stages):
        if stage == mine:
            if hidden is not None:
                gpt.set_input_tensor(hidden)
            out = gpt(input_ids=tokens, position_ids=positions, attention_mask=None)
        if stage < stages - 1:  # megatron's hidden states: [seq, batch, hidden]
            hidden = out if stage == mine else torch.empty(tokens.shape[1], tokens.shape[0], gpt.config.hidden_size)
            dist.broadcast(hidden, src=dist.get_global_rank(group, stage), group=group)
    final = [out.float().tolist() if mine == stages - 1 else None]
    dist.broadcast_object_list(final, src=dist.get_global_rank(group, stages - 1), group=group)
    return final[0]


def train_save_logits(runs: list[dict]) -> list[dict]:
    """Per run {family, model, root, steps}: train ``steps`` steps at TP=PP=1 from the reference
    weights, save a universal checkpoint, return its path and the logits on the probe tokens."""
    from ucp_plugin.megatron.checkpoint import save_universal
    from ucp_plugin.testing.harness import TrainSettings, init_process, setup, token_batches, train_step
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig

    init_process()
    out = []
    for r in runs:
        cfg, sets = ModelConfig(**r["model"]), TrainSettings(steps=r["steps"], global_batch=4, lr=1e-2)
        run = setup(r["family"], cfg, MegatronLayout(), sets)
        for t in token_batches(cfg, sets):
            train_step(run, t)
        path = save_universal(run.model, run.optimizer, r["root"], f"iter_{r['steps']:07d}", r["steps"],
                              family=r["family"], config=cfg)
        out.append({"path": path, "logits": logits(run.model, probe_tokens(cfg.vocab, cfg.seq_length))})
    return out


def load_logits(runs: list[dict]) -> list[dict]:
    """Per run {family, model, layout, path}: load the (weights-only) checkpoint at ``layout`` into a
    model built with other initial weights, return the logits on the probe tokens."""
    from ucp_plugin.megatron.checkpoint import load_universal
    from ucp_plugin.testing.harness import TrainSettings, init_process, setup
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig

    init_process()
    out = []
    for r in runs:
        cfg = ModelConfig(**r["model"])
        run = setup(r["family"], cfg, MegatronLayout(**r["layout"]), TrainSettings(seed=99), reference_init=False)
        load_universal(run.model, None, r["path"], family=r["family"], config=cfg)
        out.append({"logits": logits(run.model, probe_tokens(cfg.vocab, cfg.seq_length))})
    return out
