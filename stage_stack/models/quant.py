"""Weight-only quantized linears (int8 per output channel, int4 per group) for decoding.

Decoding reads every weight once per step and little else, so fewer weight bytes are fewer
milliseconds. Only the weights are quantized: activations stay bfloat16, and the CFG mixing and
the sampler run in float32 as for every format (stage_stack.generation).

    int8:  w[n, k] ~= q[n, k] * scale[n]                     q in [-127, 127], symmetric
    int4:  w[n, k] ~= (q[n, k] - 8) * scale[n, g] + zero[n, g]   q in [0, 15], group g = k // group

The products are torch's CPU kernels: `aten._weight_int8pack_mm(x, q, scale)` and
`aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_and_zero)` with the weight packed by
`aten._convert_weight_to_int4pack_for_cpu`. Quantization happens at load time from the float
weights of an expert file (stage_stack.expert), one matrix at a time, so a float copy of the
whole model never exists.
"""

from __future__ import annotations

import torch
from torch import nn

INT4_GROUPS = (128, 64, 32)  # group sizes the int4 kernel takes, largest (fewest scales) first


def int4_group_size(in_features: int) -> int | None:
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T with int8 q [out, in] and a scale per output channel."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.bfloat16, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        w = w.to(device=self.weight.device, dtype=torch.float32, copy=True)  # ours: the math below is in place
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.weight = w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.scales = scale.to(self.scales.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    # Above this many rows (a prefill) a dequantized bf16 GEMM is ~2x faster than the int8 kernel,
    # which is built for the few rows of a decode step; the temporary is one matrix.
    GEMM_ROWS = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scales.dtype)
        if flat.shape[0] > self.GEMM_ROWS:
            # The scales are per output channel, so they apply to the product: one bf16 copy of q
            # (exact: |q| <= 127) instead of two temporaries, which left ~50-100 MB of freed heap
            # resident after an int8 prefill at MusicGen-small size (benchmarks/README.md).
            y = torch.nn.functional.linear(flat, self.weight.to(self.scales.dtype)).mul_(self.scales)
            return y.view(*x.shape[:-1], self.out_features)
        y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight, self.scales)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(nn.Module):
    """y = x @ W^T with W in 4 bits per weight and a (scale, zero) pair per group of inputs."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.bfloat16, device=None) -> None:
        super().__init__()
        group = int4_group_size(in_features)
        if group is None:
            raise ValueError(f"int4 needs in_features divisible by one of {INT4_GROUPS}, got {in_features}; "
                             "load this expert as int8 or bf16")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale_zero", torch.empty(in_features // group, out_features, 2, dtype=dtype,
                                                       device=device))

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        N, K = w.shape
        g = w.to(device=self.weight.device, dtype=torch.float32).view(N, K // self.group, self.group)
        low, high = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((high - low) / 15.0).clamp(min=1e-12)
        q = torch.round((g - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).view(N, K)
        zero = low + 8.0 * scale  # the kernel computes (q - 8) * scale + zero
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(self.scale_zero.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scale_zero.dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group, self.scale_zero)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group}"


QUANTIZED = {"int8": Int8Linear, "int4": Int4Linear}


def weight_count(module: nn.Module) -> int:
    """Parameters of `module`, counting each quantized linear's matrix as its float one would be.

    A quantized matrix is a buffer, not a parameter: counted by parameters alone, an int8
    MusicGen-small has 17 M (its embeddings and heads) and passes for a small expert.
    """
    quantized = [m for m in module.modules() if isinstance(m, tuple(QUANTIZED.values()))]
    return sum(p.numel() for p in module.parameters()) + sum(m.in_features * m.out_features for m in quantized)


def quantizable(name: str) -> bool:
    """The matrices a decoding step streams: every block linear. The embeddings (one row read per
    step) and the heads (their logits are what CFG and the sampler see) stay bfloat16."""
    return name.startswith("blocks.")


def replace_linears(lm: nn.Module, fmt: str, device=None) -> list[str]:
    """Swap the block linears of `lm` for empty quantized ones (weights set later); their names."""
    cls = QUANTIZED[fmt]
    replaced = []
    for name, module in list(lm.named_modules()):
        if isinstance(module, nn.Linear) and quantizable(name) and module.bias is None:
            parent_name, _, child = name.rpartition(".")
            parent = lm.get_submodule(parent_name)
            setattr(parent, child, cls(module.in_features, module.out_features, device=device))
            replaced.append(name)
    return replaced


@torch.no_grad()
def quantize_(lm: nn.Module, fmt: str) -> nn.Module:
    """Quantize a loaded (bfloat16 or float32) LM in place: block linears to `fmt`, the rest bf16."""
    weights = {name: m.weight.detach() for name, m in lm.named_modules()
               if isinstance(m, nn.Linear) and quantizable(name) and m.bias is None}
    device = next(iter(weights.values())).device if weights else None
    replace_linears(lm, fmt, device=device)
    lm.to(torch.bfloat16)  # buffers of the quantized modules are not floating-point except their scales
    for name in list(weights):
        lm.get_submodule(name).set_weight(weights.pop(name))
        release_freed_memory()
    release_freed_memory()
    return lm


def release_freed_memory() -> None:
    """Give the float temporaries of quantization back to the OS (glibc keeps freed heap pages).

    Quantizing one matrix after another frees a float copy each time; glibc raises its mmap
    threshold after the first large free, so later copies come from the heap and stay resident:
    an int8 load peaked at 1.8 GB for 321 MB of weights without this. No-op off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
