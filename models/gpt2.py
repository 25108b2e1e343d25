"""GPT-2 small (Radford et al., 2019), in plain torch with the parameter names of Hugging Face's
``GPT2LMHeadModel``: 124,439,808 parameters, the LM head being tied to the token embedding.

Hugging Face stores the projections as ``Conv1D`` with (in, out) weights; here they are
``nn.Linear`` with (out, in) weights, the same parameters transposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPT2Config:
    """Sizes of a GPT-2 model; the defaults are GPT-2 small."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5


GPT2_SMALL = GPT2Config()


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each position sees itself and earlier positions only."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = x.shape
        q, k, v = (
            t.view(batch, seq_len, self.n_head, -1).transpose(1, 2)
            for t in self.c_attn(x).split(hidden, dim=2)
        )
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.resid_dropout(self.c_proj(out.transpose(1, 2).reshape(batch, seq_len, hidden)))


class MLP(nn.Module):
    """Feed-forward block: 4x expansion with GPT-2's tanh-approximated GELU."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer decoder block."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """Token and position embeddings, the blocks, and the final LayerNorm."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with a language-model head tied to the token embedding.

    ``forward(input_ids)`` takes int64 ids of shape (batch, seq_len), seq_len <= n_positions,
    and returns next-token logits of shape (batch, seq_len, vocab_size).
    """

    def __init__(self, config: GPT2Config = GPT2_SMALL) -> None:
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(_init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * layers).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(
                f"GPT-2 takes token ids of shape (batch, seq_len), got {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] > self.config.n_positions:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds n_positions={self.config.n_positions}; "
                "use shorter sequences"
            )
        return self.lm_head(self.transformer(input_ids))


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases; LayerNorm keeps ones and zeros."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def lm_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: `output` logits (batch, seq_len, vocab), `target` ids (batch, seq_len)."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def gpt2(**overrides: int | float) -> GPT2LMHeadModel:
    """GPT-2 small (12 layers, 768 hidden, 12 heads); keyword arguments override GPT2Config fields."""
    return GPT2LMHeadModel(replace(GPT2_SMALL, **overrides))
