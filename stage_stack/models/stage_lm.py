"""The STAGE language model: MusicGen's decoder with a SEP token and prefix conditioning.

The whole forward pass is in this file (see docs/DESIGN.md and
../shared/reference/stage-reference.md §1):

    codes [B, K, S] --sum of K embeddings--> + sinusoid(per-sample positions)
      (K = the codec's codebooks, plus a chord stream first when `chord_classes` > 0)
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
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import native


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
    # 0 (upstream): context and target share one codec and one set of embedding rows. > 0: the
    # context comes from a second codec with this many codes per codebook (an expert file's
    # `context_codec`), embedded in rows card + 2 .. card + 2 + context_card - 1 of each table
    # (layout.TokenLayout shifts them there), so one codec can carry what the expert must hear
    # and another what it must play.
    context_card: int = 0
    # 0 (upstream): the LM's streams are the codec's n_q codebooks. > 0: one more stream comes
    # first, a chord token per frame (stage_stack.chords: this many classes, card >= it), so the
    # delay pattern generates a frame's chord one step before its first codebook and the audio
    # codes follow it as their own past. The chord stream is never decoded; the context's is PAD.
    chord_classes: int = 0

    def __post_init__(self) -> None:
        if self.positions not in POSITION_MODES:
            raise ValueError(f"StageLMConfig.positions must be one of {list(POSITION_MODES)}, got {self.positions!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"StageLMConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("context_card", "chord_classes"):
                if value < 0:
                    raise ValueError(f"StageLMConfig.{f.name} must be 0 (off) or positive, got {value}")
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"StageLMConfig.{f.name} must be positive, got {value}")
        if self.chord_classes > self.card:
            raise ValueError(f"StageLMConfig.chord_classes ({self.chord_classes}) must not exceed card ({self.card}): "
                             "chord tokens share the audio codes' embedding rows and heads; use a codec with at "
                             f"least {self.chord_classes} codes per codebook, or no chord stream")

    @property
    def streams(self) -> int:
        """The LM's token streams: the codec's n_q codebooks, plus the chord stream when it has one."""
        return self.n_q + (1 if self.chord_classes else 0)

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

    @property
    def context_offset(self) -> int:
        """What a context code is shifted by in the LM's input: 0 with one codec."""
        return self.input_card if self.context_card else 0

    @property
    def embedding_rows(self) -> int:
        return self.input_card + self.context_card

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


@dataclass(frozen=True)
class RowGroup:
    """Rows [start, stop) of a batch whose keys before step `first` are all masked.

    The unconditional CFG rows hear a PAD context that no query may attend to (reference §3),
    so their cache need not hold it: at MusicGen-small size with 10 s of context that is a
    quarter of the cache, and of the keys each decode step reads.
    """

    start: int
    stop: int
    first: int = 0


class KVCache:
    """Preallocated per-layer keys/values, written in place so decoding never re-runs the prefix.

    Two ways to read it:
    - dynamic (the default): attention reads the `length` steps written so far; shapes grow by
      one step per call, which eager mode does not mind.
    - static (`static=True`): every call has the same shapes, as torch.compile without
      recompiles and CUDA graphs need. A one-step write goes to the slot in the tensor `step`
      (not a Python int, so nothing is guarded on it), attention reads every slot and the
      causal mask hides the unwritten ones. The owner advances it (`advance`): the forward
      pass never reads or writes a Python counter of a static cache.

    `groups` split the rows (default: one group, every step kept): group g keeps steps
    [g.first, max_steps) only, in its own buffers, and attention runs per group. Steps before
    `first` must be masked for every row of the group; writes to them are dropped (a static
    one-step write before `first` lands in slot 0, which the causal mask hides until step
    `first` overwrites it). A multi-step write that ends before a group's `first` (a prefill
    chunk) keeps nothing for it, and its queries there, all masked, attend to nothing (output 0).

    `dtype=torch.int8` stores keys and values as int8 with one float32 scale per (row, head,
    step), the absolute maximum over the head's channels / 127: half the bytes of a bf16 cache,
    for a MusicGen-size call the difference between meeting a peak-RSS budget or not. Attention
    then reads `QuantizedKV` (`_attend_group`).
    """

    def __init__(self, config: StageLMConfig, batch: int, max_steps: int, device, dtype, static: bool = False,
                 groups: tuple[RowGroup, ...] | None = None) -> None:
        self.groups = groups if groups is not None else (RowGroup(0, batch),)
        if (self.groups[0].start, self.groups[-1].stop) != (0, batch) or any(
                a.stop != b.start for a, b in zip(self.groups, self.groups[1:])) or any(
                g.start >= g.stop or not 0 <= g.first < max_steps for g in self.groups):
            raise ValueError(f"groups must split rows 0..{batch} in order, each keeping a step < {max_steps}: "
                             f"{self.groups}")
        # Zeros, not empty: a static cache's attention reads unwritten slots too (masked, weight
        # 0, and 0 x NaN garbage would still be NaN), and a call's peak memory then shows at its
        # start instead of at its last step.
        shapes = [(g.stop - g.start, config.n_heads, max_steps - g.first, config.head_dim) for g in self.groups]
        self.keys = [[torch.zeros(s, device=device, dtype=dtype) for s in shapes] for _ in range(config.n_layers)]
        self.values = [[torch.zeros(s, device=device, dtype=dtype) for s in shapes] for _ in range(config.n_layers)]
        self.quantized = dtype == torch.int8
        if self.quantized:  # zero scales: an unwritten slot reads as 0, as in a float cache
            scale_shapes = [(*s[:3], 1) for s in shapes]
            self.key_scales, self.value_scales = (
                [[torch.zeros(s, device=device) for s in scale_shapes] for _ in range(config.n_layers)]
                for _ in range(2))
        elif dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"KVCache dtype must be a float dtype or torch.int8, got {dtype}")
        self.length = 0  # steps already written
        self.static = static
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # == length, as a tensor (static writes)
        # each group's write slot (step - first), kept in tensors for the same reason
        self.slots = [torch.zeros(1, dtype=torch.long, device=device) for _ in self.groups]
        self.key_steps = torch.arange(max_steps, device=device)
        self.memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # cross-attn k/v

    @property
    def max_steps(self) -> int:
        return self.key_steps.shape[0]

    def query_steps(self, S: int) -> torch.Tensor:
        """Sequence indices [S] of the steps being fed now."""
        if self.static and S == 1:
            return self.step
        return self.key_steps[self.length : self.length + S]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> list:
        """Write the new steps' keys/values; return each group's keys/values for attention to read
        (a (keys, values) pair, a QuantizedKV for an int8 cache, or None when nothing is kept yet)."""
        S = k.shape[2]
        buffers = [self.keys[layer], self.values[layer]]
        if self.quantized:
            buffers += [self.key_scales[layer], self.value_scales[layer]]
            (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
            new = (k, v, k_scale, v_scale)
        else:
            new = (k, v)
        out = []
        for gi, (g, slot) in enumerate(zip(self.groups, self.slots)):
            kept = [b[gi] for b in buffers]
            if self.static and S == 1:
                for buf, x in zip(kept, new):
                    buf.index_copy_(2, slot, x[g.start : g.stop].to(buf.dtype))
                views = kept
            else:
                span = self._write_span(g, S)
                if span is None:  # a prefill chunk that ends before `first`: nothing to keep or read
                    out.append(None)
                    continue
                skip, at = span
                for buf, x in zip(kept, new):
                    buf[:, :, at : at + S - skip] = x[g.start : g.stop, :, skip:]
                # dynamic, or a static cache's (eager) prefill chunk: the steps written so far
                end = self.length + S - g.first
                views = [buf[:, :, :end] for buf in kept]
            out.append(QuantizedKV(*views) if self.quantized else tuple(views))
        return out

    def _write_span(self, g: RowGroup, S: int) -> tuple[int, int] | None:
        """Where S new steps of a dynamic write land in group g: (skip, at), the first `skip` steps
        being before g's first kept one (masked, dropped) and the rest going to slots from `at`;
        None when every one is dropped."""
        skip = max(0, g.first - self.length)
        return None if skip >= S else (skip, self.length + skip - g.first)

    def decode_slot(self, gi: int) -> int | None:
        """The slot a one-step write of row group `gi` lands in, or None when this step is before the
        group's first kept one in a dynamic cache (nothing kept, nothing to read). A static cache's
        write before `first` lands in slot 0, hidden until step `first` overwrites it."""
        if self.static:
            return int(self.slots[gi])
        span = self._write_span(self.groups[gi], 1)
        return None if span is None else span[1]

    def advance(self, S: int) -> None:
        self.length += S
        self.step.fill_(self.length)
        for g, slot in zip(self.groups, self.slots):
            slot.fill_(max(0, self.length - g.first))

    @property
    def nbytes(self) -> int:
        layers = self.keys + self.values + (self.key_scales + self.value_scales if self.quantized else [])
        return sum(t.numel() * t.element_size() for layer in layers for t in layer)


class QuantizedKV(NamedTuple):
    """One row group's int8 keys/values [rows, heads, steps, head_dim] and their float32 scales
    [rows, heads, steps, 1]: key = keys * key_scale."""

    keys: torch.Tensor
    values: torch.Tensor
    key_scale: torch.Tensor
    value_scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return ((self.keys.to(torch.float32) * self.key_scale).to(dtype),
                (self.values.to(torch.float32) * self.value_scale).to(dtype))


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim (one head's channels of one step): (int8, float32 scale)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12).div_(127.0)
    return x.div(scale).round_().clamp_(-127, 127).to(torch.int8), scale


def quantized_attention(q: torch.Tensor, kv: QuantizedKV, blocked: torch.Tensor | None = None,
                        kernel: str | None = None) -> torch.Tensor:
    """matmul_attention over an int8 cache without dequantizing it: a key's scale multiplies its
    score and a value's scale its probability.

    `kernel` (default: this machine's choice, stage_stack.machine) "native" reads the int8 cache
    once in C (stage_stack.native); "matmul" converts the int8 buffers to float32 each step
    (which on an AMD EPYC ran as fast as a bf16 cache's products) for two batched products.
    """
    if (kernel or _kernels().decode_attention_int8) == "native":
        if native.load().avx512 and native.attend_int8_takes(q, *kv):  # else: two products
            return native.attend_int8(q, *kv, blocked).to(q.dtype)
    return matmul_attention(q.float(), kv.keys.to(torch.float32), kv.values.to(torch.float32), blocked,
                            key_scale=kv.key_scale, value_scale=kv.value_scale).to(q.dtype)


def native_int8_attention(head_dim: int) -> bool:
    """Whether this machine runs one query's attention over an int8 cache in stage_stack.native's
    kernel (its choice, and a build that can) for heads of `head_dim` (a multiple of 16, <= 256)."""
    return (_kernels().decode_attention_int8 == "native" and head_dim % 16 == 0 and head_dim <= 256
            and native.load().avx512)


def _native_int8_kv(x: torch.Tensor, cache: KVCache) -> bool:
    """Whether one decode step's attention over `cache` runs natively for rows `x` (the step's qkv,
    or the block input of a fused step): contiguous float32 or bf16 CPU rows as many as the cache's,
    an int8 cache, outside autograd and torch.compile."""
    return (cache.quantized and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.is_contiguous() and cache.groups[-1].stop == x.shape[0]
            and native_int8_attention(cache.keys[0][0].shape[-1])
            and not _needs_autograd(x) and not torch.compiler.is_compiling())


def _native_decode_attention(qkv: torch.Tensor, cache: KVCache, layer: int, masks) -> torch.Tensor:
    """KVCache.store + _attend_group for one decode step over an int8 cache, in one native call per
    row group (stage_stack.native.attend_step): the ~40 small torch ops they take per layer cost
    more than the attention itself at MusicGen-small size (benchmarks/README.md). Same writes,
    same reads, same output as the torch path (tests/test_native_kernels.py)."""
    B, _, width = qkv.shape
    out = torch.empty(B, 1, width // 3, dtype=qkv.dtype)
    for gi, (g, m) in enumerate(zip(cache.groups, masks)):
        slot = cache.decode_slot(gi)
        if slot is None:  # nothing kept for this step, nothing to read
            out[g.start : g.stop] = 0
            continue
        native.attend_step(qkv[g.start : g.stop], cache.keys[layer][gi], cache.values[layer][gi],
                           cache.key_scales[layer][gi], cache.value_scales[layer][gi], slot, m.hidden,
                           out[g.start : g.stop])
    return out


class AttentionMask(NamedTuple):
    """A boolean attention mask in the forms the kernels take, computed once per forward."""

    allowed: torch.Tensor  # SDPA's mask; a query without any allowed key may see every key
    empty: torch.Tensor  # queries without any allowed key: their output is 0
    blocked: torch.Tensor  # ~allowed, for matmul_attention
    hidden: torch.Tensor  # the keys each query may not see, before `allowed`'s fix-up (native kernels)


def _attention_mask(allowed: torch.Tensor) -> AttentionMask:
    hidden = ~allowed
    empty = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | empty
    return AttentionMask(allowed, empty, ~allowed, hidden)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor | None = None,
                     key_scale: torch.Tensor | None = None, value_scale: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two batched products and a float32 softmax.

    For one query over a long cache this beats SDPA's CPU kernels on some machines (an AMD EPYC
    without AMX: several times in bf16, where SDPA converts block by block). `blocked` (bool,
    broadcast to the scores) hides keys; every row must keep at least one key. `key_scale` /
    `value_scale` [..., steps, 1] are per-step factors of quantized keys / values
    (`quantized_attention`), applied to the scores and the probabilities.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float()
    if key_scale is not None:
        scores.mul_(key_scale.transpose(-1, -2))
    scores.mul_(q.shape[-1] ** -0.5)
    if blocked is not None:
        scores = scores.masked_fill_(blocked, float("-inf"))
    probs = scores.softmax(dim=-1)
    if value_scale is not None:
        probs.mul_(value_scale.transpose(-1, -2))
    return torch.matmul(probs.to(v.dtype), v)


def _attend(q, k, v, mask: AttentionMask) -> torch.Tensor:
    """Attention with a boolean mask; a query with no allowed key gets 0 instead of NaN.

    Always masked_fill, never `if empty.any()`: a data-dependent branch would be a device sync
    in eager mode and a graph break under torch.compile. One query step (decoding) on the CPU
    takes the kernel chosen for this machine and the cache's dtype (stage_stack.machine).
    """
    if q.shape[2] == 1 and k.device.type == "cpu" and _decode_attention(k.dtype) == "matmul":
        y = matmul_attention(q, k, v, mask.blocked)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed)
    return y.masked_fill(mask.empty, 0.0)


def _attend_group(q, kv: tuple[torch.Tensor, torch.Tensor] | None, mask: AttentionMask) -> torch.Tensor:
    """One row group's attention over its cached keys; None (no step kept yet: every query of
    the group is masked) gives 0, as `_attend` gives a query without any allowed key."""
    if kv is None:
        return torch.zeros_like(q)
    if isinstance(kv, QuantizedKV):
        if q.shape[2] == 1:  # one decode step: the scales fold into the scores and probabilities
            return quantized_attention(q, kv, mask.blocked).masked_fill(mask.empty, 0.0)
        return _attend(q, *kv.dequantize(q.dtype), mask)  # a prefill chunk: a transient float copy
    k, v = kv
    return _attend(q.to(k.dtype), k, v, mask)


_KERNELS = None  # this machine's stage_stack.machine.KernelChoices, read once per process


def _kernels():
    """The per-machine kernel choices (stage_stack.machine), kept here so that the per-layer
    checks of a decode step do not go through kernel_choices()' environment read each time."""
    global _KERNELS
    if _KERNELS is None:
        from ..machine import kernel_choices

        _KERNELS = kernel_choices()
    return _KERNELS


def _decode_attention(dtype: torch.dtype) -> str:
    """"sdpa" or "matmul" for one query over a cache of `dtype` on this machine."""
    k = _kernels()
    return k.decode_attention_half if dtype in (torch.bfloat16, torch.float16) else k.decode_attention_fp32


def _native_bf16_linear() -> bool:
    """Whether this machine runs bf16 products of a few rows in stage_stack.native's kernel."""
    if _kernels().bf16_decode_linear != "native":
        return False
    return native.load().linear_bf16  # the choice is cached per machine; the build may be gone


# Below this many weights in fc1 the product's output stays in the caches and torch's GELU is
# cheaper than a call out (a demo expert's arrangement was ~10 % slower with the native one);
# above it, each GELU after a weight stream cost ~50 us in torch against ~10 us native.
NATIVE_GELU_MIN_WEIGHTS = 1 << 20


def _native_gelu(y: torch.Tensor) -> bool:
    """Whether a decode step's GELU over `y` runs natively: a few bf16 rows on the CPU where this
    machine runs the native bf16 products (the same probe's choice)."""
    return (y.dtype == torch.bfloat16 and y.device.type == "cpu" and y.numel() <= 4 * y.shape[-1] and y.is_contiguous()
            and _native_bf16_linear() and not _needs_autograd(y) and not torch.compiler.is_compiling())


def gelu_of_product(y: torch.Tensor, weights: int) -> torch.Tensor:
    """F.gelu(y) for the output of a product with `weights` weights (FeedForward's fc1: Linear,
    quant.Int8Linear): in place in stage_stack.native where _native_gelu says so and the product
    streamed its weights from memory (NATIVE_GELU_MIN_WEIGHTS)."""
    if weights >= NATIVE_GELU_MIN_WEIGHTS and _native_gelu(y):
        return native.gelu_bf16_(y)
    return F.gelu(y)


def _needs_autograd(*tensors: torch.Tensor) -> bool:  # the native kernels have no backward
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _skinny_w_xt() -> bool:
    """Whether this machine streams skinny float32 products faster as W @ x^T (stage_stack.machine)."""
    return _kernels().skinny_fp32_linear == "w_xt"


class Linear(nn.Linear):
    """nn.Linear with per-machine kernels for the few rows of a decoding step (same parameters
    and keys).

    A decoding step feeds one column for 2-4 rows (the CFG halves) and is bound by reading the
    weights, which torch's kernels do not stream at the memory's speed on every CPU:
    - float32: MKL streams the weight about twice as fast as W @ x^T than as F.linear's x @ W^T
      on some CPUs (an AMD EPYC without AMX) and slower on others (a Xeon with AMX);
    - bf16: stage_stack.native's kernel reads it in one pass (2x F.linear's rate on one core of an
      AMD EPYC with AVX512-BF16; benchmarks/README.md, "Native decode kernels").
    Each choice is made per machine (stage_stack.machine).
    """

    SKINNY_ROWS = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.SKINNY_ROWS or x.device.type != "cpu" or self.bias is not None:
            return super().forward(x)
        if x.dtype is torch.bfloat16:
            if (_native_bf16_linear() and self.weight.dtype is torch.bfloat16 and not _needs_autograd(x, self.weight)
                    and not torch.compiler.is_compiling()):
                return native.linear_bf16(x, self.weight)
            return super().forward(x)
        if x.dtype is not torch.float32 or not _skinny_w_xt():
            return super().forward(x)
        flat = x.reshape(rows, self.in_features).contiguous()
        # contiguous output: a transposed view would send later ops down slower strided paths
        return (self.weight @ flat.t()).t().contiguous().view(*x.shape[:-1], self.out_features)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """F.gelu(self(x)); for a decode step's bf16 rows on the native kernels, the GELU runs in place
        in the product's output (stage_stack.native.gelu_bf16_: the same float math and rounding)."""
        return gelu_of_product(self(x), self.in_features * self.out_features)


class Embedding(nn.Embedding):
    """nn.Embedding that leaves a meta-device table alone at construction (same keys).

    A big expert is built on the meta device and then filled from its file. nn.Embedding's
    normal_ init on a meta tensor runs a Python reference kernel that imports torch._dynamo
    and sympy: ~73 MB of RSS and ~1 s, paid by every int8/bf16 load of a MusicGen-size expert
    for values that are overwritten (benchmarks/README.md). Real tables are initialised as usual.
    """

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        super().reset_parameters()


class SelfAttention(nn.Module):
    def __init__(self, config: StageLMConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = Linear(config.dim, 3 * config.dim, bias=False)
        self.out = Linear(config.dim, config.dim, bias=False)

    def forward(self, x, mask, layer: int, cache: KVCache | None) -> torch.Tensor:
        B, S, D = x.shape
        qkv = self.qkv(x)
        if cache is not None and S == 1 and _native_int8_kv(qkv, cache):
            return self.out(_native_decode_attention(qkv, cache, layer, mask))
        q, k, v = (t.view(B, S, self.n_heads, -1).transpose(1, 2) for t in qkv.split(D, dim=-1))
        if cache is None:
            y = _attend(q, k, v, mask[0])
        else:  # per row group of the cache (KVCache, RowGroup); the cache may be wider than x
            one = len(cache.groups) == 1
            ys = [_attend_group(q if one else q[g.start : g.stop], kv, m).to(x.dtype)
                  for g, kv, m in zip(cache.groups, cache.store(layer, k, v), mask)]
            y = ys[0] if one else torch.cat(ys)
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

    def forward(self, x, memory_kv, mask) -> torch.Tensor:
        B, S, D = x.shape
        q = self.q(x).view(B, S, self.n_heads, -1).transpose(1, 2)
        y = _attend(q, *memory_kv, mask)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class FeedForward(nn.Module):
    def __init__(self, config: StageLMConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.dim, config.ffn_dim, bias=False)
        self.fc2 = Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        fused = getattr(self.fc1, "forward_gelu", None)  # a native GELU after a decode step's product
        return self.fc2(fused(x) if fused is not None else F.gelu(self.fc1(x)))


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

    def forward(self, x, self_mask, query_valid, layer, cache, memory_kv, cross_mask, step=None):
        # `step`: a decode step's fused_step.StepPlan, which runs each half of this block in one
        # native call where the block's weights allow (same math; x is updated in place).
        plan = None if step is None else fused_step.block_plan(self)
        # Upstream (x-transformers) zeroes attention outputs at masked query steps; valid steps
        # never see them, but doing the same keeps masked-step logits comparable too.
        if plan is not None:
            x = step.attention(x, plan, layer)
        else:
            x = x + self.self_attn(self.self_norm(x), self_mask, layer, cache) * query_valid
        if memory_kv is not None:
            x = x + self.cross_attn(self.cross_norm(x), memory_kv, cross_mask) * query_valid
        if plan is not None:
            return step.ffn(x, plan)
        return x + self.ffn(self.ffn_norm(x))


class StageLM(nn.Module):
    def __init__(self, config: StageLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.ModuleList(Embedding(config.embedding_rows, config.dim) for _ in range(config.streams))
        if config.cross_attention:
            self.text_proj = nn.Linear(config.text_dim, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.heads = nn.ModuleList(Linear(config.dim, config.card, bias=False) for _ in range(config.streams))
        # A decode step's blocks in two native calls each where they can run so (models.fused_step);
        # False keeps each block's own ops (the benchmark's "-unfused" rows, the tests' reference).
        self.fused_decode = True

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
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, K, S, card] for `codes` [B, K, S].

        attention_mask marks valid steps (key padding and position origin): [B, past + S] for
        the cached steps and the new ones, or [B, cache.max_steps] (the whole call's mask) with
        a static cache. With a `cache`, only the new S steps are computed and their keys/values
        are stored; a dynamic cache advances itself, a static one is advanced by its owner.
        `positions` [B, S] come from the TokenLayout batch; they default to STAGE's per-sample
        positions from the mask, which only a `positions="stage"` LM without a static cache may
        use. `last_only` computes the heads on the last step only. `return_hidden` also returns the
        final-norm hidden states [B, S, dim] the heads read (for a training-time auxiliary head).
        """
        B, K, S = codes.shape
        past = cache.length if cache is not None and not cache.static else 0
        keys = cache.max_steps if cache is not None and cache.static else past + S
        if attention_mask.shape != (B, keys):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, keys)}")
        attention_mask = attention_mask.to(torch.bool)
        if positions is None:
            if cache is not None and cache.static:
                raise ValueError("a static KV cache needs explicit positions for the new steps")
            if self.config.positions != "stage":
                raise ValueError(f"this LM uses {self.config.positions!r} positions, which depend on the context "
                                 "length: pass positions= from the TokenLayout batch")
            positions = positions_from_mask(attention_mask)[:, past:]
        dtype = self.final_norm.weight.dtype

        x = self.embed(codes)
        x = x + sinusoid(positions, self.config.dim).to(x.dtype)

        # Causal + key padding, as sequence indices: query step i sees key j <= i that is valid.
        query_steps = cache.query_steps(S) if cache is not None else torch.arange(S, device=codes.device)
        read = keys
        if cache is not None and cache.static and S > 1:
            # A prefill chunk (eager) reads the steps written so far, not the whole buffer: the
            # rest is causally masked, and attending to it doubled the prefill's attention work
            # and its score tensors (~100 MB at MusicGen-small size in bf16; benchmarks/README.md).
            read = cache.length + S
        key_steps = torch.arange(read, device=codes.device) if cache is None else cache.key_steps[:read]
        causal = key_steps[None, :] <= query_steps[:, None]  # [S, read]
        allowed = (causal[None] & attention_mask[:, None, :read])[:, None]  # [B, 1, S, read]
        groups = cache.groups if cache is not None else (RowGroup(0, B),)
        self_mask = tuple(_attention_mask(allowed[g.start : g.stop, ..., g.first :]) for g in groups)
        query_valid = attention_mask.index_select(1, query_steps)[..., None].to(x.dtype)

        memory_kv = cross_mask = None
        if self.config.cross_attention:
            if cache is not None and cache.memory_kv is not None:
                memory_kv, mem_mask = cache.memory_kv
            else:
                memory_kv, mem_mask = self.memory_kv(memory, memory_mask, B, codes.device, dtype)
                if cache is not None:
                    cache.memory_kv = (memory_kv, mem_mask)
            cross_mask = _attention_mask(mem_mask[:, None, None, :])

        step = fused_step.step_plan(self, x, cache, self_mask, query_valid) if S == 1 else None
        for i, block in enumerate(self.blocks):
            kv = memory_kv[i] if memory_kv is not None else None
            x = block(x, self_mask, query_valid, i, cache, kv, cross_mask, step)
        if cache is not None and not cache.static:
            cache.advance(S)

        x = self.final_norm(x)
        if last_only:
            x = x[:, -1:]
        return (self.logits(x), x) if return_hidden else self.logits(x)

    # -- embeddings and heads: one op each instead of K -------------------------------------------
    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum over codebooks of table_k(codes[:, k]): [B, K, S] -> [B, S, dim]."""
        fused = self._fused_tables()
        if fused is None:
            return sum(self.embeddings[k](codes[:, k]) for k in range(codes.shape[1]))
        table, offsets = fused  # one gather from the stacked tables, then the sum over K
        return F.embedding(codes + offsets, table).sum(dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The K heads on the final hidden state: [B, S, dim] -> [B, K, S, card]."""
        fused = self._fused_heads()
        if fused is None:
            return torch.stack([head(x) for head in self.heads], dim=1)
        B, S, _ = x.shape
        return F.linear(x, fused).view(B, S, len(self.heads), -1).permute(0, 2, 1, 3)

    def fuse_small_ops(self, enabled: bool = True) -> None:
        """Stack the K embedding tables and the K heads into one tensor each (a copy of them).

        For a small expert a decode step is bound by per-op overhead (about 900 aten ops for
        13.6 MFLOP), and 2K of them are these. The copy is refreshed when a weight changes
        (its version counter) and dropped by `train()`; large models do not need it.
        """
        self._fuse = enabled
        self._fused: dict = {}

    def _fused_tables(self):
        if not getattr(self, "_fuse", False) or torch.compiler.is_compiling():
            return None
        weights = [e.weight for e in self.embeddings]
        key = tuple((id(w), w._version) for w in weights)
        if self._fused.get("tables_key") != key:
            n_q, rows = len(weights), weights[0].shape[0]
            offsets = torch.arange(n_q, device=weights[0].device)[None, :, None] * rows
            self._fused.update(tables_key=key, tables=(torch.cat([w.detach() for w in weights]), offsets))
        return self._fused["tables"]

    def _fused_heads(self):
        if not getattr(self, "_fuse", False) or torch.compiler.is_compiling():
            return None
        weights = [h.weight for h in self.heads]
        if any(not isinstance(w, torch.Tensor) or not w.is_floating_point() for w in weights):
            return None
        key = tuple((id(w), w._version) for w in weights)
        if self._fused.get("heads_key") != key:
            self._fused.update(heads_key=key, heads=torch.cat([w.detach() for w in weights]))
        return self._fused["heads"]

    def train(self, mode: bool = True):
        if mode and getattr(self, "_fuse", False):
            self.fuse_small_ops(False)
        return super().train(mode)

    def new_cache(self, batch: int, max_steps: int, static: bool | None = False,
                  dtype: torch.dtype | None = None, groups: tuple[RowGroup, ...] | None = None) -> KVCache:
        """A KV cache for `batch` rows; `dtype` None = the model's, but see below on the CPU.
        `groups`: KVCache's row groups (rows whose first steps are masked need not keep them).

        `static` None = this model chooses: static for a half-precision cache on the CPU, whose
        one-query attention as two products reads whole buffers at full speed but the dynamic
        cache's growing views ~10x slower (bf16 batched products over a strided batch).
        """
        p = self.final_norm.weight
        if dtype is None:
            dtype = p.dtype
            if p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16):
                # Half the memory of a float32 cache, unless this machine's best half-precision
                # attention of one query is much slower than its best float32 one (probed per
                # machine, stage_stack.machine; benchmarks/README.md).
                if _kernels().half_kv_cache == "float32":
                    dtype = torch.float32
        if static is None:
            static = (p.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
                      and _decode_attention(dtype) == "matmul")
        return KVCache(self.config, batch, max_steps, p.device, dtype, static=static, groups=groups)

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


from . import fused_step  # noqa: E402  (it builds on the classes above)
