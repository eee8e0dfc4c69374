"""Native CPU kernels for a decoding step: a bf16 product of a few rows, an int8 product with
8-bit activations, one query's attention over an int8 KV cache, and a block's attention and
feed-forward halves in one call each (decode_kernels.c; why, in its header and in
benchmarks/README.md, "Native decode kernels" and "Native int8 products and fused decode
blocks").

The C file is compiled on first use with the system C compiler (`$CC`, else `cc`) into the
stage-stack home (`native/decode_kernels-<hash>.so`, the hash covering the source, the compiler
and its flags), under a lock so that two processes do not build the same file at once, and
loaded with ctypes: no torch headers, no build step at install time, ~0.5 s once per machine.

Nothing here is required. Without a compiler, on a CPU without the instructions (x86-64 with
AVX512-BF16 for the bf16 product, AVX512-VNNI for the int8 one, AVX512BW for the attention) or
with `STAGE_STACK_NATIVE=0`,
`load()` says why and the model keeps torch's kernels. Whether a machine that can run them
uses them is `stage_stack.machine.kernel_choices()`' decision, from a probe.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_kernels.c")
CFLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=gnu11")
ABI_VERSION = 2
LINEAR_MAX_ROWS = 4


@dataclass(frozen=True)
class NativeStatus:
    """What `load()` found: the library (or None) and, when a kernel is unavailable, why."""

    library: ctypes.CDLL | None
    path: Path | None
    linear_bf16: bool
    linear_int8: bool  # int8 products with 8-bit activations (AVX512-VNNI), models.quant.Int8Linear
    avx512: bool  # the int8-cache attention, the row scaling's partner kernels, GELU (AVX512F + BW)
    reason: str  # "" when both kernels can run


def _compiler() -> str | None:
    name = (os.environ.get("CC") or "cc").split()[0]
    return shutil.which(name) or shutil.which("gcc") or shutil.which("clang")


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return ""


def library_path(cc: str) -> Path:
    from ..paths import home

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc, _compiler_version(cc), *CFLAGS)).encode())
    return home() / "native" / f"decode_kernels-{digest.hexdigest()[:16]}.so"


def build(cc: str, target: Path) -> None:
    """Compile decode_kernels.c into `target`, atomically and under a lock (a second process
    waits, then finds the file built)."""
    from ..atomic import atomic_path, stale_temp
    from ..locks import exclusive

    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target.parent / ".build.lock", "the native decode kernels", wait=120):
        for left in target.parent.iterdir():  # half-written outputs of builds that were killed
            if stale_temp(left.name):
                left.unlink(missing_ok=True)
        if target.exists():
            return
        with atomic_path(target, suffix=".tmp.so") as tmp:
            done = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} could not build {SOURCE.name}: {done.stderr.strip()[-500:]}")


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.stage_abi_version.restype = i32
    lib.stage_has_linear_bf16.restype = i32
    lib.stage_has_avx512.restype = i32
    lib.stage_has_int8_vnni.restype = i32
    lib.stage_linear_int8.argtypes = [p, p, p, p, i32, i64, p, i32, i64, i64, i64, i32, i32]
    lib.stage_linear_int8.restype = i32
    lib.stage_int8_row_sums.argtypes = [p, i64, i64, p]
    lib.stage_int8_row_sums.restype = None
    lib.stage_linear_bf16.argtypes = [p, p, p, i64, i64, i64, i32]
    lib.stage_linear_bf16.restype = i32
    lib.stage_attend_int8.argtypes = [p] * 7 + [i64] * 8 + [i32]
    lib.stage_attend_int8.restype = None
    lib.stage_attend_step.argtypes = [p, i32, i64, p, p, p, p, i64, i64, i64, p, i64, p, i64, i64, i64, i64, i32]
    lib.stage_attend_step.restype = None
    lib.stage_rows_to_unit.argtypes = [p, i32, i64, i64, i64, p, p]
    lib.stage_rows_to_unit.restype = None
    lib.stage_rows_scale.argtypes = [p, p, i64, i64, p, i32]
    lib.stage_rows_scale.restype = None
    lib.stage_gelu_bf16.argtypes = [p, i64]
    lib.stage_gelu_bf16.restype = None
    lib.stage_attention_half.argtypes = [p, i64, i64, i64, p, p, p, i64, p, i32]
    lib.stage_attention_half.restype = i32
    lib.stage_ffn_half.argtypes = [p, i64, i64, p, i32]
    lib.stage_ffn_half.restype = i32


@lru_cache(maxsize=1)
def load() -> NativeStatus:
    """Build (once per machine) and load the kernels; never raises."""
    def unavailable(reason: str, lib=None, path=None) -> NativeStatus:
        return NativeStatus(lib, path, False, False, False, reason)

    if os.environ.get("STAGE_STACK_NATIVE", "1").strip() == "0":
        return unavailable("turned off by STAGE_STACK_NATIVE=0")
    from ..locks import LockBusyError  # fcntl: imported only where a build may run

    cc = _compiler()
    if cc is None:
        return unavailable("no C compiler found (set CC, or install gcc): torch's kernels are used")
    path = None
    try:
        path = library_path(cc)  # reads the C source: a broken install lands in the except below
        if not path.exists():
            build(cc, path)
        lib = ctypes.CDLL(str(path))
        _bind(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError, LockBusyError) as exc:
        # LockBusyError: another process has been building for over 2 minutes (a hung compiler)
        return unavailable(f"the native kernels could not be built or loaded: {exc}")
    if lib.stage_abi_version() != ABI_VERSION:
        return unavailable(f"{path} has ABI {lib.stage_abi_version()}, expected {ABI_VERSION}: delete it", lib, path)
    linear, int8, avx512 = (bool(lib.stage_has_linear_bf16()), bool(lib.stage_has_int8_vnni()),
                            bool(lib.stage_has_avx512()))
    missing = [what for what, ok in (("AVX512-BF16 (bf16 products)", linear),
                                     ("AVX512-VNNI (int8 products)", int8),
                                     ("AVX512BW (int8-cache attention, GELU)", avx512))
               if not ok]
    reason = f"this CPU lacks {', '.join(missing)}" if missing else ""
    return NativeStatus(lib, path, linear, int8, avx512, reason)


def _library(kernel: str) -> ctypes.CDLL:
    built = load()
    if not getattr(built, kernel):
        raise RuntimeError(f"the native {kernel} kernel is not available here: {built.reason}")
    return built.library


def linear_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for bf16 `x` [..., K] of at most LINEAR_MAX_ROWS rows and a contiguous bf16
    `weight` [N, K], on the CPU; float32 accumulation, bf16 result (as F.linear's)."""
    lib = _library("linear_bf16")
    N, K = weight.shape
    rows = x.numel() // K
    if not (1 <= rows <= LINEAR_MAX_ROWS) or x.dtype is not torch.bfloat16 or weight.dtype is not torch.bfloat16 \
            or not weight.is_contiguous() or x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"linear_bf16 takes 1-{LINEAR_MAX_ROWS} bf16 rows and a contiguous bf16 weight on the "
                         f"CPU, got {rows} {x.dtype} rows on {x.device} and a {weight.dtype} weight on {weight.device}")
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty((*x.shape[:-1], N), dtype=torch.bfloat16)
    lib.stage_linear_bf16(weight.data_ptr(), x.data_ptr(), out.data_ptr(), rows, N, K, torch.get_num_threads())
    return out


def linear_int8(x: torch.Tensor, weight: torch.Tensor, weight_sums: torch.Tensor, scales: torch.Tensor,
                dtype: torch.dtype, levels: int = 1) -> torch.Tensor:
    """x @ (weight * scales[:, None])^T in `dtype` (float32 or bf16) for float32 or bf16 `x`
    [..., K] (any number of rows), a contiguous int8 `weight` [N, K], its row sums
    (`int8_row_sums`) and float32 `scales` [N], on the CPU. Each row of x is quantized to 8 bits
    with its own scale and zero point (fbgemm's rule), in `levels` levels: 1, or 2 (the second
    for what the first leaves, ~15 bits in all, twice the integer work); the products accumulate
    exactly in int32."""
    lib = _library("linear_int8")
    N, K = weight.shape
    if (x.shape[-1] != K or x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype is not torch.int8
            or not weight.is_contiguous() or weight_sums.dtype is not torch.int32 or weight_sums.shape != (N,)
            or scales.dtype is not torch.float32 or scales.shape != (N,) or dtype not in (torch.float32, torch.bfloat16)
            or levels not in (1, 2) or not (x.device.type == weight.device.type == "cpu")):
        raise ValueError(f"linear_int8 takes float32 or bf16 rows of {K} on the CPU, a contiguous int8 weight [N, K], "
                         f"int32 row sums [N], float32 scales [N] and 1 or 2 levels; got x {tuple(x.shape)} {x.dtype}, "
                         f"weight {tuple(weight.shape)} {weight.dtype}, sums {weight_sums.dtype}, scales "
                         f"{scales.dtype}, levels {levels}")
    flat = x.reshape(-1, K)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty((*x.shape[:-1], N), dtype=dtype)
    if lib.stage_linear_int8(weight.data_ptr(), weight_sums.contiguous().data_ptr(), scales.contiguous().data_ptr(),
                             flat.data_ptr(), int(flat.dtype is torch.bfloat16), flat.stride(0), out.data_ptr(),
                             int(dtype is torch.bfloat16), flat.shape[0], N, K, levels, torch.get_num_threads()) != 0:
        raise MemoryError(f"linear_int8: no memory for {flat.shape[0]} quantized rows of {K}")
    return out


def int8_row_sums(weight: torch.Tensor) -> torch.Tensor:
    """sum_k weight[n, k] as int32 [N] for a contiguous int8 CPU matrix: the correction linear_int8
    needs for its unsigned inputs. In C where built (torch's sum to int32 copies the matrix to
    int32 first, and those freed copies stayed resident: +126 MB at MusicGen-small size)."""
    N, K = weight.shape
    lib = load().library
    if lib is None or weight.dtype is not torch.int8 or not weight.is_contiguous() or weight.device.type != "cpu":
        return torch.cat([rows.sum(dim=1, dtype=torch.int32) for rows in weight.split(256)]) if N else \
            torch.zeros(0, dtype=torch.int32)
    sums = torch.empty(N, dtype=torch.int32)
    lib.stage_int8_row_sums(weight.data_ptr(), N, K, sums.data_ptr())
    return sums


def attend_int8_takes(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_scale: torch.Tensor,
                      value_scale: torch.Tensor) -> bool:
    """Whether attend_int8 takes these tensors: on the CPU, a head size that is a multiple of 16 up
    to 256, each step's channels contiguous, keys and values laid out alike, and float32 scales."""
    R, H, T, D = keys.shape
    return (q.device.type == keys.device.type == "cpu" and q.shape == (R, H, 1, D) and D % 16 == 0 and 0 < D <= 256
            and keys.dtype == values.dtype == torch.int8 and keys.stride()[2:] == (D, 1)
            and values.shape == keys.shape and values.stride() == keys.stride()
            and key_scale.dtype == value_scale.dtype == torch.float32 and key_scale.shape == (R, H, T, 1)
            and value_scale.shape == key_scale.shape and key_scale.stride() == value_scale.stride()
            and key_scale.stride()[2] == 1)


def attend_int8(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_scale: torch.Tensor,
                value_scale: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
    """One query per row and head over an int8 cache: q [R, H, 1, D] (any float dtype), keys /
    values int8 [R, H, T, D] (views whose last two dims are contiguous, as KVCache hands them
    out), scales float32 [R, H, T, 1], blocked bool broadcastable to [R, 1, 1, T]. Returns float32
    [R, H, 1, D], as stage_lm.matmul_attention with the scales folded in."""
    if not attend_int8_takes(q, keys, values, key_scale, value_scale):
        raise ValueError(f"attend_int8: unsupported shapes or strides (q {tuple(q.shape)}, keys {tuple(keys.shape)} "
                         f"{keys.stride()}, scales {tuple(key_scale.shape)} {key_scale.stride()}); see "
                         "attend_int8_takes")
    lib = _library("avx512")
    R, H, T, D = keys.shape
    qf = q.to(torch.float32).contiguous()
    # a bool tensor is one byte of 0 or 1 per element: the C side reads it as uint8, and the
    # mask a forward pass builds once is already [R, 1, 1, T] and contiguous (no copy per layer)
    hide = (torch.zeros(R, T, dtype=torch.bool) if blocked is None
            else blocked.to(torch.bool).expand(R, 1, 1, T).reshape(R, T).contiguous())
    out = torch.empty(R, H, 1, D, dtype=torch.float32)
    lib.stage_attend_int8(qf.data_ptr(), keys.data_ptr(), values.data_ptr(), key_scale.data_ptr(),
                          value_scale.data_ptr(), hide.data_ptr(), out.data_ptr(), R, H, T, D,
                          keys.stride(0), keys.stride(1), key_scale.stride(0), key_scale.stride(1),
                          torch.get_num_threads())
    return out


def attend_step(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_scales: torch.Tensor,
                value_scales: torch.Tensor, slot: int, hidden: torch.Tensor, out: torch.Tensor) -> None:
    """One decode step's self-attention for the rows of one int8 KV-cache row group: quantize the
    step's keys and values from `qkv` into `slot` of the group's buffers (as
    stage_lm.quantize_kv), then attend over the first T slots, T = hidden.shape[-1].

    qkv [R, 1, 3 * H * D] float32 or bf16, rows contiguous (q, k, v one after the other); keys /
    values int8 [R, H, steps, D] and scales float32 [R, H, steps, 1], whole buffers (contiguous);
    hidden bool [R, 1, 1, T], True where a key is hidden (a row with every key hidden gets 0);
    out [R, 1, H * D] in qkv's dtype, rows contiguous, written in place.
    """
    lib = _library("avx512")
    R, H, steps, D = keys.shape
    T = hidden.shape[-1]
    if (qkv.shape != (R, 1, 3 * H * D) or qkv.dtype not in (torch.float32, torch.bfloat16) or qkv.stride()[-1] != 1
            or out.shape != (R, 1, H * D) or out.dtype != qkv.dtype or out.stride()[-1] != 1
            or not all(t.is_contiguous() for t in (keys, values, key_scales, value_scales))
            or key_scales.shape != (R, H, steps, 1) or D % 16 or D > 256 or not 0 <= slot < steps or not 0 < T <= steps
            or hidden.shape != (R, 1, 1, T)):
        raise ValueError(f"attend_step: unsupported shapes (qkv {tuple(qkv.shape)} {qkv.dtype}, keys "
                         f"{tuple(keys.shape)}, slot {slot}, hidden {tuple(hidden.shape)}, out {tuple(out.shape)})")
    hide = hidden_rows(hidden)
    lib.stage_attend_step(qkv.data_ptr(), int(qkv.dtype == torch.bfloat16), qkv.stride(0), keys.data_ptr(),
                          values.data_ptr(), key_scales.data_ptr(), value_scales.data_ptr(), steps, slot, T,
                          hide.data_ptr(), hide.stride(0), out.data_ptr(), out.stride(0), R, H, D,
                          torch.get_num_threads())


def hidden_rows(hidden: torch.Tensor) -> torch.Tensor:
    """A row group's key mask [R, 1, 1, T] as the [R, T] bytes the C side reads (1 hides a key): a
    view where it can be (a group's mask is a slice of the forward's, rows apart by its width)."""
    hide = hidden.reshape(hidden.shape[0], hidden.shape[-1])
    if hide.stride(1) != 1 or hide.dtype != torch.bool:
        hide = hide.to(torch.bool).contiguous()
    return hide


def rows_to_unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / peak, peak) for float32 or bf16 rows x [M, K] (last dim contiguous), peak [M, 1] =
    max(max |x[m]|, 1e-12): what models.quant.Int8Linear feeds fbgemm's product, in one call
    instead of five torch ops; the same float32 values."""
    lib = load().library
    M, K = x.shape
    if lib is None or x.dtype not in (torch.float32, torch.bfloat16) or x.stride(1) != 1 or x.device.type != "cpu":
        raise ValueError(f"rows_to_unit takes float32 or bf16 rows on the CPU with a native build ({load().reason})")
    unit, peak = torch.empty(M, K), torch.empty(M, 1)
    lib.stage_rows_to_unit(x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), M, K, unit.data_ptr(),
                           peak.data_ptr())
    return unit, peak


def rows_scale(y: torch.Tensor, peak: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y * peak in `dtype` (float32 or bf16, rounded to nearest even) for a contiguous float32 y
    [M, N] and peak [M, 1]: the other end of rows_to_unit."""
    lib = load().library
    M, N = y.shape
    if lib is None or y.dtype != torch.float32 or not y.is_contiguous() or peak.shape != (M, 1) \
            or dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"rows_scale takes contiguous float32 rows, a peak per row and a float32 or bf16 result "
                         f"({load().reason})")
    out = torch.empty(M, N, dtype=dtype)
    lib.stage_rows_scale(y.data_ptr(), peak.contiguous().data_ptr(), M, N, out.data_ptr(), int(dtype == torch.bfloat16))
    return out


def gelu_bf16_(y: torch.Tensor) -> torch.Tensor:
    """F.gelu in place on a contiguous bf16 CPU tensor (exact form; float math, rounded to nearest
    even): one call after a decode step's fc1 product instead of a torch op."""
    lib = _library("avx512")
    if y.dtype != torch.bfloat16 or not y.is_contiguous() or y.device.type != "cpu":
        raise ValueError(f"gelu_bf16_ takes a contiguous bf16 CPU tensor, got {y.dtype} on {y.device}")
    lib.stage_gelu_bf16(y.data_ptr(), y.numel())
    return y
