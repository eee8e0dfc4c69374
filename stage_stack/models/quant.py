"""Weight-only quantized linears (int8 per output channel, int4 per group) for decoding.

Decoding reads every weight once per step and little else, so fewer weight bytes are fewer
milliseconds. Only the weights are quantized: activations stay bfloat16, and the CFG mixing and
the sampler run in float32 as for every format (stage_stack.generation).

    int8:  w[n, k] ~= q[n, k] * scale[n]                     q in [-127, 127], symmetric
    int4:  w[n, k] ~= (q[n, k] - 8) * scale[n, g] + zero[n, g]   q in [0, 15], group g = k // group

The products are torch's CPU kernels: `aten._weight_int8pack_mm(x, q, scale)` and
`aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_and_zero)` with the weight packed by
`aten._convert_weight_to_int4pack_for_cpu`. On a CPU with int8 dot products (VNNI), an int8
model may instead quantize its activations too, one scale per row, and run fbgemm's packed int8
GEMM (`quantized.linear_dynamic`): at MusicGen-small size on an AMD EPYC that decoded 1.45-2.2x
as fast as `_weight_int8pack_mm` on one thread, for a larger error (benchmarks/README.md, "int8
decode on fbgemm's kernel"). On a CPU with AVX512-VNNI, stage_stack.native's product does the same
(a scale and zero point per row of activations; two 8-bit levels for a small matrix) on the plain
int8 matrix, which a decode step's fused blocks read from C (benchmarks/README.md, "Native int8
products and fused decode blocks"). Which of the three runs is a per-machine choice
(stage_stack.machine, `int8_decode`). Quantization happens at load time from the float weights of
an expert file (stage_stack.expert), one matrix at a time, so a float copy of the whole model
never exists.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

from .. import native
from .stage_lm import _needs_autograd, gelu_of_product

INT4_GROUPS = (128, 64, 32)  # group sizes the int4 kernel takes, largest (fewest scales) first


def int4_group_size(in_features: int) -> int | None:
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


Int8Kernel = Literal["weight_only", "dynamic", "native"]


def dynamic_int8_available() -> bool:
    """Whether this torch has fbgemm's packed int8 linear (deprecated upstream; may go)."""
    try:
        return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized,
                                                                                  "linear_dynamic")
    except (AttributeError, RuntimeError):
        return False


def pack_dynamic(q: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of int8 q [out, in] with a float scale per output channel."""
    with warnings.catch_warnings():  # the quantized-tensor API warns that it is deprecated
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qt, None)


def unpack_dynamic(packed) -> torch.Tensor:
    """The int8 matrix back from `pack_dynamic`'s form."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


def linear_dynamic(x: torch.Tensor, packed) -> torch.Tensor:
    """float32 x [rows, in] @ W^T with x quantized to 8 bits on the fly (one scale per call)."""
    return torch.ops.quantized.linear_dynamic(x, packed)


def _native_rows() -> bool:
    return native.load().library is not None


# Up to this many rows (a decode step) the row scaling around fbgemm's product runs in
# stage_stack.native where it is built: the same values in 3 calls instead of 8 torch ops.
NATIVE_ROWS = 4


def linear_dynamic_rows(flat: torch.Tensor, packed, dtype: torch.dtype) -> torch.Tensor:
    """fbgemm's product of rows `flat` [M, K] with one 8-bit scale per row, in `dtype`.

    fbgemm quantizes its input with one scale per call. Scaling each row to a peak of 1 first (and
    the product back) makes that one scale per row: over a ~1000-row prefill the relative error
    fell from 7 % to 2.9 % (2.9 % on 2 rows; weight-only: 0.8 %). Prefills run here too: unpacking
    the matrix for a bf16 GEMM cost 40 ms per matrix."""
    if flat.shape[0] <= NATIVE_ROWS and _native_rows():  # a decode step: 3 calls instead of 8
        unit, peak = native.rows_to_unit(flat)
        return native.rows_scale(linear_dynamic(unit, packed), peak, dtype)
    flat = flat.float()
    peak = flat.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
    return linear_dynamic((flat / peak).contiguous(), packed).mul_(peak).to(dtype)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T with int8 q [out, in] and a scale per output channel.

    `kernel` picks the product: "weight_only" (bf16 activations), "dynamic" (8-bit activations,
    fbgemm; for matrices of DYNAMIC_MIN_WEIGHTS or more) or "native" (8-bit activations,
    stage_stack.native, on the plain matrix; any size), on the CPU. None: this machine's choice
    (stage_stack.machine) when the weight is set. A "dynamic" module keeps its matrix only in
    fbgemm's packed form (one copy in memory); `state_dict()` unpacks it, so the saved state is
    the same under every kernel.
    """

    # At 256 x 256 the dynamic kernel's casts cost more than it saves (22 against 16 us per 2-row
    # product on an AMD EPYC); from 256 x 1024 the two are even and at 1024 x 4096 it is 4.8x
    # faster: the demo experts' matrices stay on the weight-only kernel.
    DYNAMIC_MIN_WEIGHTS = 1 << 20

    def __init__(self, in_features: int, out_features: int, dtype=torch.bfloat16, device=None,
                 kernel: Int8Kernel | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self._packed = None
        self._native = None  # (key, row sums, float32 scales) of the "native" kernel, see native_operands

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        w = w.to(device=self.weight.device, dtype=torch.float32, copy=True)  # ours: the math below is in place
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.scales = scale.to(self.scales.dtype)
        self._packed = self._native = None
        if self._decode_kernel(q.device) == "dynamic":
            self._packed = pack_dynamic(q, scale)
            del q
            self.weight = torch.empty(0, dtype=torch.int8)  # the packed copy is the weight
        else:
            self.weight = q
            self.native_operands()  # now, while the load trims the heap after each matrix

    def _decode_kernel(self, device: torch.device) -> str:
        """The kernel this module's products run on: "weight_only" off the CPU, where the chosen
        8-bit kernel is missing here, or for fbgemm's below DYNAMIC_MIN_WEIGHTS. The native kernel
        takes every size: a small expert's step runs its blocks fused (models.fused_step), where a
        product is a C call, not the torch op whose overhead the threshold is about."""
        if device.type != "cpu":
            return "weight_only"
        kernel = self.kernel
        if kernel is None:
            from ..machine import kernel_choices

            kernel = kernel_choices().int8_decode
        if kernel == "native" and native.load().linear_int8:
            return "native"
        if (kernel == "dynamic" and dynamic_int8_available()
                and self.in_features * self.out_features >= self.DYNAMIC_MIN_WEIGHTS):
            return "dynamic"
        return "weight_only"

    @property
    def native_levels(self) -> int:
        """8-bit levels per activation row in the native product: 2 (~15 bits, twice the integer
        work) for a matrix under DYNAMIC_MIN_WEIGHTS, which stays in the caches and whose product is
        cheap beside a small expert's per-step overhead; 1 for one streamed from memory, where the
        second level would cost 35-40 % of the product's speed (benchmarks/README.md)."""
        return 2 if self.in_features * self.out_features < self.DYNAMIC_MIN_WEIGHTS else 1

    def native_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(row sums, float32 scales) for stage_stack.native.linear_int8, or None where this module
        does not run it. Derived from the weight and kept while it is unchanged (an expert file's
        int8 matrix may also arrive through load_state_dict, not set_weight)."""
        if self._packed is not None or self.weight.device.type != "cpu" or self.weight.dim() != 2 \
                or self._decode_kernel(self.weight.device) != "native":
            return None
        key = (id(self.weight), self.weight._version, id(self.scales), self.scales._version)
        if self._native is None or self._native[0] != key:
            self._native = (key, native.int8_row_sums(self.weight), self.scales.float())
        return self._native[1:]

    def int8_weight(self) -> torch.Tensor:
        """The int8 matrix [out, in] (unpacked from fbgemm's form for a "dynamic" module)."""
        return self.weight if self._packed is None else unpack_dynamic(self._packed)

    def dequantized(self) -> torch.Tensor:
        return self.int8_weight().float() * self.scales.float()[:, None]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            destination[prefix + "weight"] = self.int8_weight()

    # Above this many rows (a prefill) a dequantized bf16 GEMM is ~2x faster than the weight-only
    # kernel, which is built for the few rows of a decode step; the temporary is one matrix.
    GEMM_ROWS = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        dtype = self.scales.dtype
        operands = self.native_operands() if not _needs_autograd(x) else None
        if operands is not None:  # one call: the rows' 8-bit quantization, the product and the scales
            y = native.linear_int8(flat, self.weight, *operands, dtype, self.native_levels)
        elif self._packed is not None:
            y = linear_dynamic_rows(flat, self._packed, dtype)
        elif flat.shape[0] > self.GEMM_ROWS:
            # The scales are per output channel, so they apply to the product: one bf16 copy of q
            # (exact: |q| <= 127) instead of two temporaries, which left ~50-100 MB of freed heap
            # resident after an int8 prefill at MusicGen-small size (benchmarks/README.md).
            y = torch.nn.functional.linear(flat.to(dtype), self.weight.to(dtype)).mul_(self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat.to(dtype).contiguous(), self.weight, self.scales)
        return y.view(*x.shape[:-1], self.out_features)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """F.gelu(self(x)), the GELU in place natively for a decode step's rows (StageLM's FeedForward)."""
        return gelu_of_product(self(x), self.in_features * self.out_features)

    def extra_repr(self) -> str:
        kernel = ("dynamic" if self._packed is not None
                  else "native" if self.native_operands() is not None else "weight-only")
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel, {kernel}"


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


def is_quantized(module: nn.Module) -> bool:
    """Whether any linear of `module` was quantized (int8 or int4)."""
    return any(isinstance(m, tuple(QUANTIZED.values())) for m in module.modules())


def weight_count(module: nn.Module) -> int:
    """Parameters of `module`, counting each quantized linear's matrix as its float one would be.

    A quantized matrix is a buffer, not a parameter: counted by parameters alone, an int8
    MusicGen-small has 17 M (its embeddings and heads) and passes for a small expert.
    """
    quantized = [m for m in module.modules() if isinstance(m, tuple(QUANTIZED.values()))]
    return sum(p.numel() for p in module.parameters()) + sum(m.in_features * m.out_features for m in quantized)


def named_weight_bytes(module: nn.Module) -> list[tuple[str, int]]:
    """(name, bytes) of every parameter and buffer of `module`, with each packed int8 matrix (a
    "dynamic" Int8Linear's, which is neither) counted as its int8 bytes under `<name>.weight`."""
    out = [(n, t.numel() * t.element_size()) for n, t in (*module.named_parameters(), *module.named_buffers())]
    out += [(f"{n}.weight" if n else "weight", m.in_features * m.out_features) for n, m in module.named_modules()
            if isinstance(m, Int8Linear) and m._packed is not None]
    return out


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
