"""A GPT in the nanoGPT manner, for character-level text: tokens [B, T] -> logits [B, T, V].

Pre-LayerNorm blocks of causal self-attention (`F.scaled_dot_product_attention`, which picks a
fused kernel on GPUs) and a 4x MLP with GELU; learned position embeddings; the output layer
shares its weight with the token embedding (tied). Linear layers and norms carry no bias.
Weights start as in GPT-2: normal(0, 0.02), the projections back into the residual stream
scaled by 1 / sqrt(2 n_layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.out_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=False), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=False), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied: one matrix reads tokens in and writes them out
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        if t > self.block_size:
            raise ValueError(f"a sequence of {t} tokens is longer than the model's block size {self.block_size}")
        pos = torch.arange(t, device=tokens.device)
        x = self.drop(self.wte(tokens.long()) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@torch.no_grad()
def sample_tokens(models: list[nn.Module], tokens: Tensor, new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Sample from one model or from an ensemble (the mean of the models' next-token
    probabilities), in eval mode; `temperature` 0 takes the most likely token."""
    block = min(m.block_size for m in models)
    for _ in range(new_tokens):
        context = tokens[:, -block:]
        probs = torch.stack([F.softmax(m(context)[:, -1].float() / max(temperature, 1e-8), dim=-1)
                             for m in models]).mean(0)
        if top_k is not None:
            cut = torch.topk(probs, min(top_k, probs.shape[-1])).values[:, [-1]]
            probs = torch.where(probs < cut, torch.zeros_like(probs), probs)
        nxt = (probs.argmax(-1, keepdim=True) if temperature == 0
               else torch.multinomial(probs, 1, generator=generator))
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens
