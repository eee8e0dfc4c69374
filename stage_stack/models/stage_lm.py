"""The STAGE language model: MusicGen's decoder with a SEP token and prefix conditioning.

The whole forward pass is in this file (see docs/DESIGN.md and
../shared/reference/stage-reference.md §1):

    codes [B, K, S] --sum of K embeddings--> + sinusoid(per-sample positions)
      --> n_layers x [pre-norm self-attn (causal + key padding, KV cache),
                      pre-norm cross-attn to the text memory (optional),
                      pre-norm GELU FFN]
      --> final LayerNorm --> K heads --> logits [B, K, S, card]

Self-attention q/k/v are stored fused (`qkv`), cross-attention k/v are fused (`kv`): one GEMV
instead of three per step, which matters because decoding is memory-bound. The importers
concatenate the upstream split projections in q, k, v order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


POSITION_MODES = ("stage", "aligned")


@dataclass(frozen=True)
class StageLMConfig:
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    ffn_dim: int = 4096
    card: int = 2048
    n_q: int = 4
    cross_attention: bool = True
    text_dim: int = 768  # width of the text encoder output that `text_proj` maps to `dim`
    norm_eps: float = 1e-5
    # "stage": upstream's positions, counted from a row's first valid step through context, SEP
    # and target. "aligned": target frame t takes the position of context frame t (the context
    # is time-aligned with the target window), so "look at the same moment of the context" is a
    # same-position match instead of an offset the LM must learn (see layout.TokenLayout).
    positions: Literal["stage", "aligned"] = "stage"

    def __post_init__(self) -> None:
        if self.positions not in POSITION_MODES:
            raise ValueError(f"StageLMConfig.positions must be one of {list(POSITION_MODES)}, got {self.positions!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"StageLMConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"StageLMConfig.{f.name} must be positive, got {value}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def pad_token(self) -> int:
        return self.card

    @property
    def sep_token(self) -> int:
        return self.card + 1

    @property
    def input_card(self) -> int:
        # audio codes + PAD + SEP
        return self.card + 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StageLMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"StageLMConfig: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """STAGE's per-sample positions: pos[s] = max(0, s - first valid step) ([B, S] -> [B, S])."""
    steps = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    has_valid = attention_mask.any(dim=-1, keepdim=True)
    first = torch.where(has_valid, attention_mask.int().argmax(dim=-1, keepdim=True), 0)
    return (steps - first).clamp(min=0)


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] embedding with period 10000, computed in float32 ([B, S] -> [B, S, dim])."""
    half = dim // 2
    inv_freq = 10000.0 ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / (half - 1))
    phase = positions.to(torch.float32)[..., None] * inv_freq
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class KVCache:
    """Preallocated per-layer keys/values, written in place so decoding never re-runs the prefix."""

    def __init__(self, config: StageLMConfig, batch: int, max_steps: int, device, dtype) -> None:
        shape = (batch, config.n_heads, max_steps, config.head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0  # steps already written
        self.memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # cross-attn k/v

    @property
    def max_steps(self) -> int:
        return self.keys[0].shape[2]


def _attend(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """SDPA with a boolean mask; a query with no allowed key gets 0 instead of NaN."""
    has_key = allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key)
    return out.masked_fill(~has_key, 0.0) if not bool(has_key.all()) else out


class Linear(nn.Linear):
    """nn.Linear that multiplies a handful of rows as W @ x^T (same parameters and keys).

    A decoding step feeds one column for 2-4 rows (the CFG halves) and is bound by reading the
    weights. For such skinny float32 inputs MKL streams the weight about twice as fast in this
    orientation as in F.linear's x @ W^T (benchmarks/README.md). Larger inputs use F.linear.
    """

    SKINNY_ROWS = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.SKINNY_ROWS or x.dtype != torch.float32 or x.device.type != "cpu" or self.bias is not None:
            return super().forward(x)
        flat = x.reshape(rows, self.in_features).contiguous()
        # contiguous output: a transposed view would send later ops down slower strided paths
        return (self.weight @ flat.t()).t().contiguous().view(*x.shape[:-1], self.out_features)


class SelfAttention(nn.Module):
    def __init__(self, config: StageLMConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = Linear(config.dim, 3 * config.dim, bias=False)
        self.out = Linear(config.dim, config.dim, bias=False)

    def forward(self, x, allowed, layer: int, cache: KVCache | None) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = (t.view(B, S, self.n_heads, -1).transpose(1, 2) for t in self.qkv(x).split(D, dim=-1))
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + S] = k
            cache.values[layer][:, :, start : start + S] = v
            k = cache.keys[layer][:, :, : start + S]
            v = cache.values[layer][:, :, : start + S]
        y = _attend(q.to(k.dtype), k, v, allowed).to(x.dtype)  # the cache may be wider than x (see new_cache)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class CrossAttention(nn.Module):
    def __init__(self, config: StageLMConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.q = Linear(config.dim, config.dim, bias=False)
        self.kv = Linear(config.dim, 2 * config.dim, bias=False)
        self.out = Linear(config.dim, config.dim, bias=False)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, D = memory.shape
        k, v = (t.view(B, L, self.n_heads, -1).transpose(1, 2) for t in self.kv(memory).split(D, dim=-1))
        return k, v

    def forward(self, x, memory_kv, allowed) -> torch.Tensor:
        B, S, D = x.shape
        q = self.q(x).view(B, S, self.n_heads, -1).transpose(1, 2)
        y = _attend(q, *memory_kv, allowed)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class FeedForward(nn.Module):
    def __init__(self, config: StageLMConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.dim, config.ffn_dim, bias=False)
        self.fc2 = Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: StageLMConfig) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.self_attn = SelfAttention(config)
        if config.cross_attention:
            self.cross_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
            self.cross_attn = CrossAttention(config)
        self.ffn_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(self, x, self_allowed, query_valid, layer, cache, memory_kv, cross_allowed):
        # Upstream (x-transformers) zeroes attention outputs at masked query steps; valid steps
        # never see them, but doing the same keeps masked-step logits comparable too.
        x = x + self.self_attn(self.self_norm(x), self_allowed, layer, cache) * query_valid
        if memory_kv is not None:
            x = x + self.cross_attn(self.cross_norm(x), memory_kv, cross_allowed) * query_valid
        return x + self.ffn(self.ffn_norm(x))


class StageLM(nn.Module):
    def __init__(self, config: StageLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.ModuleList(nn.Embedding(config.input_card, config.dim) for _ in range(config.n_q))
        if config.cross_attention:
            self.text_proj = nn.Linear(config.text_dim, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.heads = nn.ModuleList(Linear(config.dim, config.card, bias=False) for _ in range(config.n_q))

    # -- conditioning -------------------------------------------------------------------------
    def project_text(self, text_hidden: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """T5 hidden states [B, L, text_dim] -> cross-attention memory [B, L, dim], padding zeroed."""
        return self.text_proj(text_hidden) * text_mask[..., None].to(text_hidden.dtype)

    def null_memory(self, batch: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(batch, 1, self.config.dim, device=device, dtype=dtype),
                torch.ones(batch, 1, dtype=torch.bool, device=device))

    def prepare_memory(self, memory, memory_mask, batch: int, device, dtype):
        """Apply the null-condition rule (reference §1) without touching the caller's tensors."""
        if memory is None:
            return self.null_memory(batch, device, dtype)
        memory = memory.to(dtype)
        memory_mask = memory_mask.to(torch.bool)
        null_rows = ~memory_mask.any(dim=-1)
        if bool(null_rows.any()):
            memory = memory.masked_fill(null_rows[:, None, None], 0.0)
            memory_mask = memory_mask | null_rows[:, None]
        return memory, memory_mask

    def memory_kv(self, memory, memory_mask, batch: int, device, dtype):
        memory, memory_mask = self.prepare_memory(memory, memory_mask, batch, device, dtype)
        kv = [blk.cross_attn.memory_kv(memory) for blk in self.blocks]
        return kv, memory_mask

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        codes: torch.Tensor,
        attention_mask: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, K, S, card] for `codes` [B, K, S].

        attention_mask [B, past + S] marks valid steps (key padding and position origin) for
        the cached steps and the new ones. With a `cache`, only the new S steps are computed
        and their keys/values are appended. `positions` [B, S] come from the TokenLayout
        batch; they default to STAGE's per-sample positions from the mask, which only a
        `positions="stage"` LM may use. `last_only` computes the heads on the last step only.
        """
        B, K, S = codes.shape
        past = cache.length if cache is not None else 0
        if attention_mask.shape != (B, past + S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + S)}")
        attention_mask = attention_mask.to(torch.bool)
        if positions is None:
            if self.config.positions != "stage":
                raise ValueError(f"this LM uses {self.config.positions!r} positions, which depend on the context "
                                 "length: pass positions= from the TokenLayout batch")
            positions = positions_from_mask(attention_mask)[:, past:]
        dtype = self.final_norm.weight.dtype

        x = sum(self.embeddings[k](codes[:, k]) for k in range(K))
        x = x + sinusoid(positions, self.config.dim).to(x.dtype)

        causal = torch.ones(S, past + S, dtype=torch.bool, device=codes.device).tril(diagonal=past)
        self_allowed = (causal[None] & attention_mask[:, None, :])[:, None]  # [B, 1, S, past+S]
        query_valid = attention_mask[:, past:, None].to(x.dtype)

        memory_kv = cross_allowed = None
        if self.config.cross_attention:
            if cache is not None and cache.memory_kv is not None:
                memory_kv, mem_mask = cache.memory_kv
            else:
                memory_kv, mem_mask = self.memory_kv(memory, memory_mask, B, codes.device, dtype)
                if cache is not None:
                    cache.memory_kv = (memory_kv, mem_mask)
            cross_allowed = mem_mask[:, None, None, :]

        for i, block in enumerate(self.blocks):
            kv = memory_kv[i] if memory_kv is not None else None
            x = block(x, self_allowed, query_valid, i, cache, kv, cross_allowed)
        if cache is not None:
            cache.length += S

        x = self.final_norm(x)
        if last_only:
            x = x[:, -1:]
        return torch.stack([head(x) for head in self.heads], dim=1)

    def new_cache(self, batch: int, max_steps: int) -> KVCache:
        p = self.final_norm.weight
        # On CPU, keys/values (and so decode attention) stay float32 under a bf16/fp16 model: without
        # AMX, PyTorch's half-precision attention for one query over ~500-1000 keys is 4-6x slower
        # than float32 (benchmarks/README.md) and made a bf16 decode step ~1.5x slower.
        dtype = torch.float32 if p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        return KVCache(self.config, batch, max_steps, p.device, dtype)

    @torch.no_grad()
    def reset_special_rows(self) -> None:
        """Zero the PAD row of every table (reference §1: PAD contributes nothing)."""
        for emb in self.embeddings:
            emb.weight[self.config.pad_token].zero_()


def init_weights(model: StageLM, seed: int | None = None) -> StageLM:
    """Fresh weights for a new small expert (MusicGen-like init), PAD rows zeroed."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    std = 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for block in model.blocks:  # scale residual outputs by depth (GPT-2 style)
            for lin in (block.self_attn.out, block.ffn.fc2):
                lin.weight.mul_(1.0 / math.sqrt(2 * model.config.n_layers))
    model.reset_special_rows()
    return model
