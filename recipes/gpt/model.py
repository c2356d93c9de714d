"""A small GPT (pre-LayerNorm, GeLU MLP, learned absolute positions, tied input/output embedding)
over bytes, as a DeepSpeed user would write it: a plain ``torch.nn.Module``."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256
    seq: int = 64
    d_model: int = 128
    heads: int = 4
    layers: int = 4
    ffn: int = 512


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.heads = c.heads
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.attn = CausalSelfAttention(c)
        self.fc, self.fc_out = nn.Linear(c.d_model, c.ffn), nn.Linear(c.ffn, c.d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h))
        return h + self.fc_out(F.gelu(self.fc(self.ln_2(h))))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(c.vocab, c.d_model)
        self.wpe = nn.Embedding(c.seq, c.d_model)
        self.blocks = nn.ModuleList(GPTBlock(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        # tokens trained on (advanced by the training loop): a buffer, saved like the weights
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64))
        for name, p in self.named_parameters():  # GPT-2 initialisation
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim == 2:
                residual = name.endswith("proj.weight") or name.endswith("fc_out.weight")
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.layers) if residual else 0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.wte(x) + self.wpe(torch.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h)
        logits = F.linear(self.ln_f(h), self.wte.weight).float()  # tied output embedding
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
