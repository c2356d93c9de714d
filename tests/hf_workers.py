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
    """Full-vocabulary logits of megatron's forward (gathered over TP; padding rows included)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from ucp_plugin.megatron.model_view import unwrap

    gpt = unwrap(model)
    gpt.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        out = gpt(input_ids=tokens, position_ids=positions, attention_mask=None)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        out = gather_from_tensor_model_parallel_region(out)
    return out.float().tolist()


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
