"""A ``transformers.Trainer`` run with DeepSpeed (ZeRO-2 or ZeRO-3) that saves universal checkpoints
and resumes them on another number of processes.

What a Trainer user adds (see README.md): ``import ucp_plugin.deepspeed`` and
``"checkpoint": {"universal": true}`` in the DeepSpeed config; ``trainer.train(resume_from_checkpoint=...)``
then works on any number of processes (Trainer calls ``engine.load_checkpoint``, which the plugin serves).

The model is a tiny GPT-2 built from its config (dropout 0, no download); the data are random token
sequences of a fixed seed. The global batch is fixed (``GLOBAL_BATCH`` = per-device batch x processes)
and Trainer's sampler order does not depend on the process count, so every step sees the same
sequences at every world size. ``worker`` (for ``ucp_plugin.testing.launcher.run_workers``) returns each
rank's own mean loss per step (recorded in ``compute_loss``; Trainer's logged loss is rounded).
Run by hand: ``torchrun --nproc-per-node 2 -m recipes.hf_trainer.train --out runs/hf --stage 2``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

GLOBAL_BATCH, SEQ, VOCAB, SAMPLES = 6, 16, 96, 96


def ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
            "checkpoint": {"universal": True},  # the plugin: save and load universal checkpoints
            "steps_per_print": 10**9}


def dataset():
    import torch
    from torch.utils.data import Dataset

    tokens = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(5))

    class Tokens(Dataset):
        def __len__(self):
            return SAMPLES

        def __getitem__(self, i):
            return {"input_ids": tokens[i], "labels": tokens[i]}

    return Tokens()


def model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=SEQ, vocab_size=VOCAB, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def make_trainer(stage: int, out: str, max_steps: int, save_steps: int):
    import torch
    from transformers import Trainer, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", 1))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=max_steps,
                             save_steps=save_steps, save_strategy="steps", logging_steps=1, learning_rate=3e-3,
                             weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=2,
                             seed=42, use_cpu=True, ddp_backend="gloo", deepspeed=ds_config(stage),
                             report_to=[], disable_tqdm=True, save_only_model=False, dataloader_num_workers=0)
    losses: list[float] = []

    class Recording(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)  # the model's own mean over this rank's tokens
            losses.append(outputs.loss.detach().float().item())
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    trainer = Recording(model=model(), args=args, train_dataset=dataset())
    trainer.model_accepts_loss_kwargs = False
    return trainer, losses, torch


def run(stage: int, out: str, max_steps: int, save_steps: int, resume: str | None = None) -> dict:
    trainer, losses, _ = make_trainer(stage, out, max_steps, save_steps)
    trainer.train(resume_from_checkpoint=resume)
    first = trainer.state.global_step - len(losses) + 1
    return {"rank": int(os.environ.get("RANK", 0)), "first_step": first, "losses": losses}


def worker(runs: list[dict]) -> list[dict]:
    """``run_workers`` entry: several runs one after another in this process."""
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip a 50 s op build (unused on gloo)
    import ucp_plugin.deepspeed  # noqa: F401  -- the plugin: universal save/load for DeepSpeed engines
    return [run(**r) for r in runs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--stage", type=int, default=2, choices=[2, 3])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-steps", type=int, default=3)
    p.add_argument("--resume", default=None, help="a checkpoint-N folder (any process count)")
    a = p.parse_args()
    print(worker([dict(stage=a.stage, out=a.out, max_steps=a.steps, save_steps=a.save_steps, resume=a.resume)]))


if __name__ == "__main__":
    main()
