"""What this machine is, and the per-machine choices decoding makes from it.

The CPUs this runs on change (an AMD EPYC with AVX512-BF16 but no AMX, an Intel Xeon with
AMX), and the fastest kernel differs between them (benchmarks/README.md, "CPU kernel notes"):
so nothing here is fixed once and for all.

- `cpu_info()`: model name, flags that matter (AMX, AVX512-BF16), torch's capability string.
- `kernel_choices()`: which way a skinny float32 product runs (W @ x^T or F.linear), which
  kernel runs one query's attention over the cache (SDPA or two products, per cache dtype) and
  in which dtype a half-precision model keeps its KV cache, which product an int8 model runs
  (weight-only with bf16 activations, or fbgemm's with 8-bit ones), and whether a decode step's
  bf16 products and its attention over an int8 cache run in stage_stack.native's C kernels.
  Chosen from a quick probe (~2-3 s of matmuls and attention, `probe_kernels`) whose result is
  cached per CPU model and torch version under the stage-stack home (`kernels.json`).
  `STAGE_STACK_KERNELS=probe|flags` forces a fresh probe or flags only (flags never pick the
  native kernels: unmeasured); `STAGE_STACK_NATIVE=0` turns the native kernels off.
- `auto_weight_format()`: the weight format `dtype="auto"` loads an LM in on a device: bf16 on
  a GPU, int8 on a CPU whose bf16 arithmetic is native (AVX512-BF16 or AMX; the parts of an
  int8 model that stay unquantized are bf16), else fp32. At MusicGen-small size on an idle AMD
  EPYC a 10 s stem takes 14-18 s in int8 against 18-19 s in bf16 (both on the native kernels;
  int8 in 70 % of bf16's memory, >= 95 % top-1 agreement with fp32); 2.5x fp32 on an Intel Xeon
  with AMX in the issue's measurement.
- `decode_threads()`: the thread count for decoding. Two OpenMP threads on two busy cores
  spin-wait on each other (a step was 4.7x slower than with one thread), and a small expert is
  bound by per-op overhead that more threads only add to, so the count is chosen at run time
  from how many cores other processes keep busy (/proc/stat over 0.1 s; the load average off
  Linux) and the model size (`models.quant.weight_count`: an int8 matrix counts as
  its float one). `STAGE_STACK_THREADS=N` fixes it; `STAGE_STACK_THREADS=torch`
  leaves torch's own setting alone.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Literal

import torch

# A model below this many parameters is bound by per-op overhead, not by bandwidth: one thread.
SMALL_MODEL_PARAMS = 50_000_000


# -- CPU facts ----------------------------------------------------------------------------------

def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    match = re.search(r"^flags\s*:\s*(.*)$", _cpuinfo(), flags=re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    match = re.search(r"^model name\s*:\s*(.*)$", _cpuinfo(), flags=re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or "unknown")


def cpu_info() -> dict:
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "amx_bf16": "amx_bf16" in flags,
        "amx_int8": "amx_int8" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def auto_weight_format(device: torch.device | str = "cpu") -> str:
    """The `WeightFormat` that `dtype="auto"` means on `device` (benchmarks/README.md, "Default
    format per device", has the numbers behind each branch)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        flags = cpu_flags()
        # Without native bf16 the int8 kernel's bf16 activations are emulated: not measured as a win.
        native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
        if native_bf16 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return "int8"
    return "fp32"


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# -- threads ------------------------------------------------------------------------------------

BUSY_SAMPLE_SECONDS = 0.1


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (None off Linux)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_jiffies() -> int | None:
    """utime + stime of this process, in jiffies."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


def busy_cores(seconds: float = BUSY_SAMPLE_SECONDS, cores: int | None = None) -> float | None:
    """Cores other processes keep busy now: /proc/stat sampled over `seconds`, less this process.

    Not the load average: that is a one-minute mean, and it still counts this process's own
    last decode, so back-to-back calls would each see their predecessor and take one thread.
    """
    cores = cores or os.cpu_count() or 1
    first, own_first = _cpu_jiffies(), _own_jiffies()
    if first is None:
        return None
    time.sleep(seconds)
    second, own_second = _cpu_jiffies(), _own_jiffies()
    total = second[1] - first[1]
    if total <= 0:
        return None
    own = (own_second - own_first) if own_first is not None and own_second is not None else 0
    return max(0.0, min(float(cores), cores * (second[0] - first[0] - own) / total))


def choose_threads(n_params: int | None = None, load: float | None = None, cores: int | None = None) -> int:
    """Threads for decoding a model of `n_params` on this machine now (see the module doc).

    `load` is the number of cores others keep busy (default: `busy_cores()`, else the load average).
    """
    cores = cores or os.cpu_count() or 1
    if n_params is not None and n_params < SMALL_MODEL_PARAMS:
        return 1
    if load is None:
        load = busy_cores(cores=cores)
    if load is None:
        load = load_average()
    free = cores if load is None else cores - load
    return max(1, min(cores, int(free + 0.5)))


def threads_setting() -> int | None:
    """STAGE_STACK_THREADS as a count; None = choose at run time; 0 = leave torch's setting."""
    raw = os.environ.get("STAGE_STACK_THREADS", "").strip().lower()
    if not raw or raw == "auto":
        return None
    if raw == "torch":
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"STAGE_STACK_THREADS={raw!r}: expected a thread count (1, 2, ...), 'auto' or 'torch'")
    return value


@contextmanager
def decode_threads(n_params: int | None = None, device: torch.device | str = "cpu") -> Iterator[int]:
    """Run the block with the decode thread count; torch's previous setting is restored after."""
    previous = torch.get_num_threads()
    setting = threads_setting()
    if torch.device(device).type != "cpu" or setting == 0:
        yield previous
        return
    threads = setting if setting is not None else choose_threads(n_params)
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if threads != previous:
            torch.set_num_threads(previous)


# -- kernel choices -------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelChoices:
    """Per-machine kernel choices for CPU decoding (see the module doc for how they are made)."""

    skinny_fp32_linear: Literal["w_xt", "linear"]  # float32 products of <= 4 rows
    half_kv_cache: Literal["float32", "model"]  # KV cache dtype under a bf16/fp16 model on the CPU
    # attention of one query step over the cache, per cache dtype: SDPA, or two products and a
    # float32 softmax (stage_lm._attend)
    decode_attention_fp32: Literal["sdpa", "matmul"]
    decode_attention_half: Literal["sdpa", "matmul"]
    # int8 block linears in a decode step (models.quant.Int8Linear): aten's weight-only kernel,
    # or fbgemm's or stage_stack.native's with the activations quantized too
    int8_decode: Literal["weight_only", "dynamic", "native"]
    # bf16 products of <= 4 rows (stage_lm.Linear, and with them the GELU after a big fc1), and a
    # decode step's attention over an int8 KV cache with the step's quantized store
    # (stage_lm._native_decode_attention, quantized_attention): torch's kernels, or stage_stack.native's
    bf16_decode_linear: Literal["linear", "native"]
    decode_attention_int8: Literal["matmul", "native"]
    source: str  # "probe", "cache" or "flags"
    probe_ms: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# How much slower a half-precision cache's attention may be and still be chosen for its memory
# (half of a float32 cache). At MusicGen-small size on an AMD EPYC, attention was ~13 % of a
# bf16 decode step (torch.profiler), so 1.25x slower attention costs a few percent of a step.
HALF_KV_SLOWDOWN = 1.25
PROBE_LAYERS = 6
# Part of the cache key: a changed probe measures again instead of trusting an older one's choice.
PROBE_VERSION = 5


def _time_ms(fn, repeats: int = 8) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def probe_kernels() -> KernelChoices:
    """Time the alternatives on decode-shaped work (a 2-row 1024 -> 4096 product over six
    layers' weights, in float32 and in int8; one query over a 1024-slot cache, 16 heads of 64, in
    six layers' buffers): ~1-2 s and ~150 MB, once per machine.

    On one thread (several threads on busy cores time the spin-waits, not the kernels). An
    alternative must win by 10 % to replace the default (F.linear; SDPA), so a noisy probe keeps
    the default. The KV cache of a half-precision model is in the model's dtype (half the memory
    of a float32 one) unless its attention is more than HALF_KV_SLOWDOWN times slower.
    """
    with _one_thread():
        return _probe()


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _probe() -> KernelChoices:
    import torch.nn.functional as F

    from .models.stage_lm import matmul_attention

    gen = torch.Generator().manual_seed(0)
    # Six layers' weights (96 MB), streamed from memory as in a real step. With one 16 MB
    # matrix, which stays in the last-level cache, the choice flipped from run to run on an
    # AMD EPYC (W @ x^T 0.61-0.85x of F.linear's time); over six it was 0.44-0.48x every time.
    weights = [torch.randn(4096, 1024, generator=gen) for _ in range(PROBE_LAYERS)]
    x = torch.randn(2, 1024, generator=gen)
    ms = {
        "fp32_linear": _time_ms(lambda: [F.linear(x, w) for w in weights]) / PROBE_LAYERS,
        "fp32_w_xt": _time_ms(lambda: [(w @ x.t()).t().contiguous() for w in weights]) / PROBE_LAYERS,
    }
    del weights
    ms.update(_probe_int8(gen, x))
    ms.update(_probe_native(gen))
    # One query over a cache as decoding reads it: a float32 cache is dynamic (a view of the
    # written 768 of 1024 slots), a half-precision one static (every slot; StageLM.new_cache).
    # Over six layers' buffers (~100 MB in float32), so that they come from memory as in a real
    # step, not from a cache that one hot buffer stays in.
    q = torch.randn(2, 16, 1, 64, generator=gen)
    blocked = torch.zeros(2, 1, 1, 1024, dtype=torch.bool)
    blocked[..., 768:] = True  # unwritten slots
    blocked[1, ..., :256] = True  # an unconditional row's PAD context
    for name, dtype, n in (("fp32", torch.float32, 768), ("bf16", torch.bfloat16, 1024)):
        caches = [torch.randn(2, 2, 16, 1024, 64, generator=gen).to(dtype) for _ in range(PROBE_LAYERS)]
        qq, bb = q.to(dtype), blocked[..., :n]
        views = [(c[0, :, :, :n], c[1, :, :, :n]) for c in caches]

        def run(kernel):
            def layers() -> None:
                for k, v in views:
                    if kernel == "sdpa":
                        F.scaled_dot_product_attention(qq, k, v, attn_mask=~bb)
                    else:
                        matmul_attention(qq, k, v, bb)
            return layers

        ms[f"attn_{name}"] = _time_ms(run("sdpa"), repeats=4) / PROBE_LAYERS
        ms[f"attn_{name}_matmul"] = _time_ms(run("matmul"), repeats=4) / PROBE_LAYERS
        del caches, views

    def pick(dtype: str) -> str:
        return "matmul" if ms[f"attn_{dtype}_matmul"] < 0.9 * ms[f"attn_{dtype}"] else "sdpa"

    fp32, half = pick("fp32"), pick("bf16")
    best = {d: ms[f"attn_{d}"] if c == "sdpa" else ms[f"attn_{d}_matmul"] for d, c in (("fp32", fp32), ("bf16", half))}
    return KernelChoices(
        skinny_fp32_linear="w_xt" if ms["fp32_w_xt"] < 0.9 * ms["fp32_linear"] else "linear",
        half_kv_cache="float32" if best["bf16"] > HALF_KV_SLOWDOWN * best["fp32"] else "model",
        decode_attention_fp32=fp32, decode_attention_half=half,
        int8_decode=_pick_int8(ms),
        bf16_decode_linear="native" if ms.get("bf16_native", float("inf")) < 0.9 * ms["bf16_linear"] else "linear",
        decode_attention_int8="native" if ms.get("attn_int8_native", float("inf")) < 0.9 * ms["attn_int8"] else "matmul",
        source="probe", probe_ms=ms)


# The native int8 product also lets a decode step's blocks run as two native calls each
# (models.fused_step), which fbgemm's packed matrices cannot: that saved 4-6 ms of a 21-29 ms int8
# step at MusicGen-small size on an AMD EPYC (benchmarks/README.md, "Native int8 products and
# fused decode blocks"), where
# the two products alone timed within 2 % of each other. So it stays the choice unless fbgemm's
# product alone is this much faster.
NATIVE_INT8_MARGIN = 1.1


def _pick_int8(ms: dict) -> str:
    """The int8 product for decode steps: the fastest that beats aten's weight-only kernel (the
    default) by 10 %, the native one unless fbgemm's is NATIVE_INT8_MARGIN times faster."""
    timed = {k: ms[f"int8_{k}"] for k in ("dynamic", "native") if f"int8_{k}" in ms}
    if "native" in timed and timed["native"] <= NATIVE_INT8_MARGIN * timed.get("dynamic", float("inf")):
        best = "native"
    else:
        best = min(timed, key=timed.get, default=None)
    return best if best is not None and timed[best] < 0.9 * ms["int8_weight_only"] else "weight_only"


# int8 matrices the probe streams: 24 x 4 MB, more than the last-level cache of the CPUs seen
# (with six, 25 MB, the int8 products could run from an AMD EPYC's 32 MB L3).
PROBE_INT8_MATRICES = 24


def _probe_int8(gen: torch.Generator, x: torch.Tensor) -> dict:
    """ms per 2-row 1024 -> 4096 int8 product: aten's weight-only kernel (bf16 activations) and,
    where they run here, fbgemm's and stage_stack.native's with 8-bit activations (models.quant);
    each with its own row scaling, as Int8Linear calls it."""
    from . import native
    from .models.quant import dynamic_int8_available, linear_dynamic_rows, pack_dynamic

    qs = [torch.randint(-127, 128, (4096, 1024), dtype=torch.int8, generator=gen) for _ in range(PROBE_INT8_MATRICES)]
    scale = torch.full((4096,), 1e-3)
    xb, scale_b = x.to(torch.bfloat16), scale.to(torch.bfloat16)
    ms = {"int8_weight_only": _time_ms(lambda: [torch.ops.aten._weight_int8pack_mm(xb, q, scale_b) for q in qs],
                                       repeats=4) / len(qs)}
    if native.load().linear_int8:
        sums = [native.int8_row_sums(q) for q in qs]
        ms["int8_native"] = _time_ms(lambda: [native.linear_int8(xb, q, s, scale, torch.bfloat16)  # one level: 4 MB
                                              for q, s in zip(qs, sums)], repeats=4) / len(qs)
        del sums
    if dynamic_int8_available():
        try:
            packed = [pack_dynamic(qs.pop(), scale) for _ in range(len(qs))]
            ms["int8_dynamic"] = _time_ms(lambda: [linear_dynamic_rows(xb, p, torch.bfloat16) for p in packed],
                                          repeats=4) / len(packed)
        except RuntimeError:
            pass  # listed but not usable here: the weight-only kernel
    return ms


def _probe_native(gen: torch.Generator) -> dict:
    """ms per 2-row 1024 -> 4096 bf16 product (F.linear, and stage_stack.native's where it runs
    here) over 12 matrices (96 MB), and per layer of one query's attention over an int8 cache of
    1024 slots, 16 heads of 64 (the scales folded in: torch's two products, and native's)."""
    import torch.nn.functional as F

    from . import native
    from .models.stage_lm import QuantizedKV, quantize_kv, quantized_attention

    built = native.load()
    ws = [torch.randn(4096, 1024, generator=gen).to(torch.bfloat16) for _ in range(12)]
    x = torch.randn(2, 1024, generator=gen).to(torch.bfloat16)
    ms = {"bf16_linear": _time_ms(lambda: [F.linear(x, w) for w in ws], repeats=4) / len(ws)}
    if built.linear_bf16:
        ms["bf16_native"] = _time_ms(lambda: [native.linear_bf16(x, w) for w in ws], repeats=4) / len(ws)
    del ws
    q = torch.randn(2, 16, 1, 64, generator=gen)
    blocked = torch.zeros(2, 1, 1, 1024, dtype=torch.bool)
    blocked[1, ..., :256] = True  # an unconditional row's PAD context
    layers = []
    for _ in range(PROBE_LAYERS):
        (k, ks), (v, vs) = (quantize_kv(torch.randn(2, 16, 1024, 64, generator=gen)) for _ in range(2))
        layers.append(QuantizedKV(k, v, ks, vs))
    ms["attn_int8"] = _time_ms(lambda: [quantized_attention(q, kv, blocked, kernel="matmul") for kv in layers],
                               repeats=4) / PROBE_LAYERS
    if built.avx512:
        ms["attn_int8_native"] = _time_ms(lambda: [quantized_attention(q, kv, blocked, kernel="native")
                                                   for kv in layers], repeats=4) / PROBE_LAYERS
    return ms


def choices_from_flags() -> KernelChoices:
    """Without a probe: AMX machines run SDPA and F.linear well; others run skinny float32
    products as W @ x^T and one-query attention as two products; CPUs with int8 dot products
    (VNNI, AMX-INT8) run int8 decode steps on fbgemm's kernel (benchmarks/README.md)."""
    from .models.quant import dynamic_int8_available

    flags = cpu_flags()
    amx = "amx_bf16" in flags
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return KernelChoices(skinny_fp32_linear="linear" if amx else "w_xt", half_kv_cache="model",
                         decode_attention_fp32="sdpa" if amx else "matmul",
                         decode_attention_half="sdpa" if amx else "matmul",
                         int8_decode="dynamic" if vnni and dynamic_int8_available() else "weight_only",
                         bf16_decode_linear="linear", decode_attention_int8="matmul", source="flags")


@lru_cache(maxsize=8)
def bf16_training_ratio(width: int = 256, rows: int = 1024) -> float:
    """Time of a bf16-autocast forward+backward of a width -> 4 x width linear layer over `rows`
    rows, divided by the float32 time (one thread, best of 3; ~0.1-1 s, once per process).

    Why: on a 2-core AMD EPYC with AVX512-BF16 and no AMX (torch 2.13), bf16 autocast made a
    demo-expert training step 13x slower than float32 (10.4 vs 0.77 CPU-s; the linear layer
    alone: forward 5x, forward+backward 18x), while on Intel AMX machines it is the faster one.
    Decode-shaped products (2 rows) behave differently again (`probe_kernels`).
    """
    with _one_thread():
        generator = torch.Generator().manual_seed(0)
        layer = torch.nn.Linear(width, 4 * width)
        x = torch.randn(rows, width, generator=generator, requires_grad=True)

        def step(enabled: bool):
            def run() -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                    y = layer(x)
                y.float().sum().backward()
            return run

        fp32 = _time_ms(step(False), repeats=3)
        return _time_ms(step(True), repeats=3) / fp32


def _cache_key() -> str:
    # Not the thread count: the choice is made on one thread, and a key per count made a model's
    # KV dtype depend on whether it was asked before or inside decode_threads.
    return f"{cpu_model()}|torch {torch.__version__}|probe {PROBE_VERSION}"


def _cache_file() -> Path:
    from .paths import home

    return home() / "kernels.json"


@lru_cache(maxsize=8)
def _kernel_choices(key: str, mode: str) -> KernelChoices:
    if mode == "flags":
        return choices_from_flags()
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key) if mode != "probe" and isinstance(cached, dict) else None
    if isinstance(entry, dict):
        try:
            return KernelChoices(**{**entry, "source": "cache"})
        except TypeError:
            pass  # an older layout: probe again
    choices = probe_kernels()
    try:
        from .atomic import atomic_write_text

        cached = cached if isinstance(cached, dict) else {}
        cached[key] = choices.to_dict()
        atomic_write_text(path, json.dumps(cached, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only home only costs a probe per process
    return choices


def kernel_choices() -> KernelChoices:
    mode = os.environ.get("STAGE_STACK_KERNELS", "cached").strip().lower()
    if mode not in ("cached", "probe", "flags"):
        raise ValueError(f"STAGE_STACK_KERNELS={mode!r}: expected 'cached' (default), 'probe' or 'flags'")
    return _kernel_choices(_cache_key(), mode)


def runtime_report(n_params: int | None = None) -> dict:
    """Everything a benchmark JSON records about the machine and the choices made on it."""
    return {**cpu_info(), "load_average_1min": load_average(), "torch_threads": torch.get_num_threads(),
            "STAGE_STACK_THREADS": os.environ.get("STAGE_STACK_THREADS"),
            "chosen_threads": choose_threads(n_params) if threads_setting() is None else threads_setting(),
            "kernels": kernel_choices().to_dict()}
