"""A decode step's blocks in two native calls each: the self-attention half and the feed-forward half
of stage_lm.Block (stage_stack.native: `stage_attention_half`, `stage_ffn_half`).

Why: once the products and the attention over the int8 cache ran in native kernels, about 5 ms of
a 30-40 ms MusicGen-small step on one core was the Python and the small torch ops around them
(two LayerNorms, the residuals and the query mask, the wrappers' checks: ~12 calls per layer), and
int8 decoding could not reach 1.6x bf16 with them (benchmarks/README.md, "Native int8 products
and fused decode blocks").
Here each half is one call with the same math and the same bf16 rounding points as
Block.forward's torch path (tests/test_native_kernels.py). A cross-attention, where a block has
one, still runs in torch between the two halves.

What runs here: one decode step (one query step, 1-4 rows) of a bf16 or int8 expert on the CPU,
over an int8 KV cache, where this machine runs the native bf16 products (int8 experts: the native
int8 products) and the native int8-cache attention. Anything else (float32 weights, a float
cache, a prefill, training) keeps Block.forward's own path.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from .. import native
from .stage_lm import KVCache, Linear, _native_bf16_linear, _native_int8_kv, native_int8_attention

_c_int64, _c_ptr = ctypes.c_int64, ctypes.c_void_p


class Matrix(ctypes.Structure):  # StageMatrix in decode_kernels.c
    _fields_ = [("w", _c_ptr), ("sums", _c_ptr), ("scales", _c_ptr), ("n", _c_int64), ("k", _c_int64),
                ("int8", _c_int64), ("levels", _c_int64)]


class Half(ctypes.Structure):  # StageHalf
    _fields_ = [("norm_weight", _c_ptr), ("norm_bias", _c_ptr), ("eps", ctypes.c_double), ("first", Matrix),
                ("second", Matrix)]


class CacheGroup(ctypes.Structure):  # StageCacheGroup
    _fields_ = [("keys", _c_ptr), ("values", _c_ptr), ("key_scales", _c_ptr), ("value_scales", _c_ptr),
                ("steps", _c_int64)]


class StepGroup(ctypes.Structure):  # StageStepGroup
    _fields_ = [("start", _c_int64), ("stop", _c_int64), ("skip", _c_int64), ("slot", _c_int64), ("T", _c_int64),
                ("hidden", _c_ptr), ("hidden_rs", _c_int64)]


@dataclass(frozen=True)
class BlockPlan:
    """One block's two halves as the C side reads them, and the tensors whose memory they point to."""

    attention: Half
    ffn: Half
    tensors: tuple[torch.Tensor, ...]


def _matrix(linear: nn.Module) -> tuple[Matrix, tuple[torch.Tensor, ...]] | None:
    if hasattr(linear, "native_operands"):  # quant.Int8Linear (which imports this module's model)
        operands = linear.native_operands()
        if operands is None:  # fbgemm's or aten's kernel was chosen for it
            return None
        sums, scales = operands
        return (Matrix(linear.weight.data_ptr(), sums.data_ptr(), scales.data_ptr(), linear.out_features,
                       linear.in_features, 1, linear.native_levels), (linear.weight, sums, scales))
    w = getattr(linear, "weight", None)
    if (isinstance(linear, Linear) and linear.bias is None and w.dtype is torch.bfloat16 and w.is_contiguous()
            and w.device.type == "cpu" and _native_bf16_linear()):
        return Matrix(w.data_ptr(), None, None, linear.out_features, linear.in_features, 0, 0), (w,)
    return None


def _half(norm: nn.LayerNorm, first: nn.Module, second: nn.Module) -> tuple[Half, tuple] | None:
    if norm.weight is None or norm.bias is None or len(norm.normalized_shape) != 1:
        return None
    if any(t.dtype is not torch.bfloat16 or not t.is_contiguous() or t.device.type != "cpu"
           for t in (norm.weight, norm.bias)):
        return None
    a, b = _matrix(first), _matrix(second)
    if a is None or b is None:
        return None
    half = Half(norm.weight.data_ptr(), norm.bias.data_ptr(), norm.eps, a[0], b[0])
    return half, (norm.weight, norm.bias, *a[1], *b[1])


def _weights(block: nn.Module) -> tuple[torch.Tensor, ...]:
    mods = (block.self_norm, block.self_attn.qkv, block.self_attn.out, block.ffn_norm, block.ffn.fc1, block.ffn.fc2)
    return tuple(t for m in mods for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))


def block_plan(block: nn.Module) -> BlockPlan | None:
    """The block's plan, kept on it while its weights are the same tensors at the same versions."""
    key = tuple((id(t), t._version, t.data_ptr()) for t in _weights(block))
    kept = block.__dict__.get("_fused_plan")
    if kept is not None and kept[0] == key:
        return kept[1]
    attention = _half(block.self_norm, block.self_attn.qkv, block.self_attn.out)
    ffn = _half(block.ffn_norm, block.ffn.fc1, block.ffn.fc2)
    plan = None if attention is None or ffn is None else BlockPlan(attention[0], ffn[0], attention[1] + ffn[1])
    block.__dict__["_fused_plan"] = (key, plan)
    return plan


def _cache_layers(cache: KVCache) -> list:
    """Per layer, its row groups' buffers as CacheGroup arrays: built once per cache (the buffers
    are allocated with it and written in place)."""
    layers = cache.__dict__.get("_native_layers")
    if layers is None:
        layers = [(CacheGroup * len(cache.groups))(*(
            CacheGroup(k.data_ptr(), v.data_ptr(), ks.data_ptr(), vs.data_ptr(), k.shape[2])
            for k, v, ks, vs in zip(cache.keys[i], cache.values[i], cache.key_scales[i], cache.value_scales[i])))
            for i in range(len(cache.keys))]
        cache.__dict__["_native_layers"] = layers
    return layers


class StepPlan:
    """One decode step's per-step arguments (row groups' slots and masks, the query mask), built once
    per forward and shared by every block."""

    def __init__(self, x: torch.Tensor, cache: KVCache, masks, query_valid: torch.Tensor, heads: int) -> None:
        self.lib = native.load().library
        self.rows, _, self.dim = x.shape
        self.heads = heads
        self.threads = torch.get_num_threads()
        self.layers = _cache_layers(cache)
        self.valid = query_valid.reshape(self.rows).float().contiguous()
        groups, self._keep = [], [self.valid]
        for gi, (g, m) in enumerate(zip(cache.groups, masks)):
            steps = cache.keys[0][gi].shape[2]
            hidden = native.hidden_rows(m.hidden)
            self._keep.append(hidden)
            T = hidden.shape[1]
            slot = cache.decode_slot(gi)
            skip, slot = (1, 0) if slot is None else (0, slot)
            if not skip and not (0 <= slot < steps and 0 < T <= steps):
                raise ValueError(f"fused decode step: slot {slot} or {T} keys outside a cache of {steps} steps")
            groups.append(StepGroup(g.start, g.stop, skip, slot, T, hidden.data_ptr(), hidden.stride(0)))
        self.groups = (StepGroup * len(groups))(*groups)

    def attention(self, x: torch.Tensor, plan: BlockPlan, layer: int) -> torch.Tensor:
        """x += self-attention half, in place (x: this forward's own [rows, 1, dim] bf16 tensor)."""
        rc = self.lib.stage_attention_half(x.data_ptr(), self.rows, self.dim, self.heads, ctypes.byref(plan.attention),
                                           self.layers[layer], self.groups, len(self.groups), self.valid.data_ptr(),
                                           self.threads)
        if rc:
            raise RuntimeError("stage_attention_half failed (out of memory?)")
        return x

    def ffn(self, x: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
        """x += feed-forward half, in place."""
        if not x.is_contiguous():
            x = x.contiguous()
        if self.lib.stage_ffn_half(x.data_ptr(), self.rows, self.dim, ctypes.byref(plan.ffn), self.threads):
            raise RuntimeError("stage_ffn_half failed (out of memory?)")
        return x


def fusable(lm: nn.Module) -> bool:
    """Whether this model's decode steps can run fused on this machine, given an int8 KV cache:
    bf16 activations on the CPU, every block with a plan, the native int8-cache attention chosen
    (generation.default_kv_dtype gives such a model an int8 cache, small models included)."""
    p = lm.final_norm.weight
    return (lm.fused_decode and p.device.type == "cpu" and p.dtype is torch.bfloat16
            and native_int8_attention(lm.config.head_dim) and all(block_plan(b) is not None for b in lm.blocks))


def step_plan(lm: nn.Module, x: torch.Tensor, cache: KVCache | None, masks, query_valid: torch.Tensor) -> StepPlan | None:
    """A StepPlan where this forward is a decode step the fused halves take (one query step of 1-4
    bf16 rows whose attention runs natively over an int8 cache); else None."""
    if (not lm.fused_decode or cache is None or x.shape[1] != 1
            or not 1 <= x.shape[0] <= native.LINEAR_MAX_ROWS or x.dtype is not torch.bfloat16
            or not _native_int8_kv(x, cache)):
        return None
    return StepPlan(x, cache, masks, query_valid, lm.config.n_heads)
