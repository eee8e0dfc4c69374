"""stage_stack.native: the C decode kernels agree with torch's, the model gives the same tokens
with them, and building them is safe (a lock, an atomic file, a clear fallback).

The kernel tests need this machine to run them (x86-64 with AVX512-BF16 / AVX512BW and a C
compiler); the fallback and build tests run everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from plugin_helpers import isolated  # noqa: F401
from stage_stack import machine, native
from stage_stack.generation import SamplingParams, generate
from stage_stack.models import quant, stage_lm
from stage_stack.models.stage_lm import QuantizedKV, StageLM, StageLMConfig, init_weights, quantize_kv, quantized_attention

BUILT = native.load()
needs_linear = pytest.mark.skipif(not BUILT.linear_bf16, reason=f"native bf16 product: {BUILT.reason}")
needs_attend = pytest.mark.skipif(not BUILT.avx512, reason=f"native int8 attention: {BUILT.reason}")
needs_int8 = pytest.mark.skipif(not BUILT.linear_int8, reason=f"native int8 product: {BUILT.reason}")
GREEDY = SamplingParams(greedy=True)


@needs_linear
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(96, 64), (40, 70), (300, 1000)])  # 70, 1000: a partial last block of 32
def test_bf16_product_equals_torch(rows, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 1, k, generator=g).to(torch.bfloat16)
    got = native.linear_bf16(x, w)
    want = F.linear(x, w)
    exact = F.linear(x.float(), w.float())
    assert got.shape == want.shape == (rows, 1, n) and got.dtype == torch.bfloat16
    # both sum in float32 and round once to bf16; the order of the sums may move the last bit
    assert (got.float() - exact).abs().max() <= (want.float() - exact).abs().max() + 1e-6 + exact.abs().max() / 128
    assert (got == want).float().mean() > 0.97


@needs_linear
def test_bf16_product_refuses_what_it_does_not_take():
    w = torch.randn(8, 32).to(torch.bfloat16)
    with pytest.raises(ValueError, match="1-4 bf16 rows"):
        native.linear_bf16(torch.randn(5, 32).to(torch.bfloat16), w)
    with pytest.raises(ValueError, match="contiguous bf16 weight"):
        native.linear_bf16(torch.randn(2, 32).to(torch.bfloat16), w.t().contiguous().t())
    with pytest.raises(ValueError, match="float32 rows"):
        native.linear_bf16(torch.randn(2, 32), w)


def int8_cache(rows=2, heads=4, steps=90, dim=64, spare=30, seed=0):
    """An int8 cache as KVCache hands out a dynamic one: views of the first `steps` of longer buffers."""
    g = torch.Generator().manual_seed(seed)
    (k, ks), (v, vs) = (quantize_kv(torch.randn(rows, heads, steps + spare, dim, generator=g) * 2) for _ in range(2))
    return QuantizedKV(k[:, :, :steps], v[:, :, :steps], ks[:, :, :steps], vs[:, :, :steps])


@needs_attend
@pytest.mark.parametrize("dim", [16, 64, 128])
def test_int8_attention_equals_the_two_products(dim):
    kv = int8_cache(dim=dim)
    q = torch.randn(2, 4, 1, dim, generator=torch.Generator().manual_seed(1))
    blocked = torch.zeros(2, 1, 1, 90, dtype=torch.bool)
    blocked[1, ..., :40] = True  # an unconditional row's PAD context
    blocked[..., 85:] = True  # unwritten slots
    want = quantized_attention(q, kv, blocked, kernel="matmul")
    got = quantized_attention(q, kv, blocked, kernel="native")
    assert got.shape == want.shape and got.dtype == q.dtype
    assert (got - want).abs().max() < 1e-5 * want.abs().max().clamp_min(1)
    # hidden keys carry no weight: changing them changes nothing
    kv.keys[1, :, :40] = 127
    kv.values[:, :, 85:] = -127
    assert torch.equal(quantized_attention(q, kv, blocked, kernel="native"), got)


@needs_attend
def test_int8_attention_gives_zero_where_every_key_is_hidden_and_takes_bf16_queries():
    kv = int8_cache()
    q = torch.randn(2, 4, 1, 64).to(torch.bfloat16)
    blocked = torch.zeros(2, 1, 1, 90, dtype=torch.bool)
    blocked[0] = True
    out = native.attend_int8(q, *kv, blocked)
    assert out.dtype == torch.float32 and torch.equal(out[0], torch.zeros_like(out[0]))
    want = quantized_attention(q, kv, blocked, kernel="matmul")
    assert (out[1] - want[1].float()).abs().max() < 0.02


def test_int8_attention_keeps_torch_for_a_head_size_it_does_not_take(monkeypatch):
    kv = int8_cache(dim=24)  # not a multiple of 16
    q = torch.randn(2, 4, 1, 24)
    assert not native.attend_int8_takes(q, *kv)
    called = []
    monkeypatch.setattr(native, "attend_int8", lambda *a: called.append(a))
    out = quantized_attention(q, kv, None, kernel="native")
    assert not called and out.shape == (2, 4, 1, 24)
    with pytest.raises(ValueError, match="attend_int8_takes"):
        monkeypatch.undo()
        native.attend_int8(q, *kv, None)


CONFIG = StageLMConfig(dim=128, n_layers=2, n_heads=4, ffn_dim=256, card=48, n_q=2)


def sharp_bf16_lm() -> StageLM:
    lm = init_weights(StageLM(CONFIG), seed=0).eval()
    with torch.no_grad():
        for head in lm.heads:
            head.weight.mul_(20)  # well-separated greedy choices
    return lm.to(torch.bfloat16)


def context(lengths=(9, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CONFIG.card, (CONFIG.n_q, n), generator=g) for n in lengths]


@needs_linear
@needs_attend
@pytest.mark.parametrize("static", [False, True])
def test_a_bf16_model_decodes_the_same_tokens_with_the_native_kernels(monkeypatch, static):
    lm = sharp_bf16_lm()
    lm.fused_decode = False  # each kernel called on its own (the fused blocks: test_fused_blocks_...)
    runs = {}
    for kernels in ("torch", "native"):
        monkeypatch.setattr(stage_lm, "_KERNELS", dataclasses.replace(
            machine.kernel_choices(), bf16_decode_linear="native" if kernels == "native" else "linear",
            decode_attention_int8="native" if kernels == "native" else "matmul"))
        calls = {"linear": 0, "attend": 0}
        for name, key in (("linear_bf16", "linear"), ("attend_step", "attend")):
            real = getattr(native, name)
            monkeypatch.setattr(native, name, lambda *a, _real=real, _key=key: calls.__setitem__(_key, calls[_key] + 1)
                                or _real(*a))
        runs[kernels] = generate(lm, context(), 12, params=GREEDY, return_steps=True, kv_dtype=torch.int8,
                                 static_cache=static)
        if kernels == "native":  # every decode step: 2 layers x 4 products + heads, an attention per layer
            assert calls["linear"] >= 11 * 2 * 4 and calls["attend"] >= 11 * 2
        else:
            assert calls == {"linear": 0, "attend": 0}
        monkeypatch.undo()
    (t_codes, t_steps), (n_codes, n_steps) = runs["torch"], runs["native"]
    assert torch.equal(t_codes, n_codes)
    assert (t_steps.float() - n_steps.float()).abs().max() < 0.05 * t_steps.float().abs().max()


@needs_attend
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_writes_and_reads_the_cache_as_torch_does(monkeypatch, static, dtype):
    # two row groups, the second skipping a PAD context (generate's CFG layout), a prefill, then
    # decode steps through both paths: the same int8 buffers, scales and outputs
    lm = init_weights(StageLM(CONFIG), seed=3).eval().to(dtype)
    groups = (stage_lm.RowGroup(0, 1, 0), stage_lm.RowGroup(1, 2, 6))
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, CONFIG.card, (2, CONFIG.n_q, 14), generator=g)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :6] = False  # the unconditional row's context
    positions = torch.arange(20).expand(2, 20)
    results = {}
    for kernels in ("matmul", "native"):
        monkeypatch.setattr(stage_lm, "_KERNELS", dataclasses.replace(machine.kernel_choices(),
                                                                      decode_attention_int8=kernels))
        cache = lm.new_cache(2, 20, static=static, dtype=torch.int8, groups=groups)
        outs = []
        with torch.inference_mode():
            for step in range(14):  # one column at a time: every call is a decode step
                m = mask if static else mask[:, : step + 1]
                outs.append(lm(codes[..., step : step + 1], m, cache=cache, positions=positions[:, step : step + 1]))
                if static:
                    cache.advance(1)
        results[kernels] = (torch.cat(outs, dim=2), cache)
        monkeypatch.undo()
    (want, ref), (got, new) = results["matmul"], results["native"]
    for gi in range(2):  # layer 0 stores the same inputs: the same bytes; later layers' inputs differ by rounding
        for a, b in ((ref.keys, new.keys), (ref.values, new.values), (ref.key_scales, new.key_scales),
                     (ref.value_scales, new.value_scales)):
            assert torch.equal(a[0][gi], b[0][gi])
        assert (ref.keys[1][gi].int() - new.keys[1][gi].int()).abs().max() <= 1
    assert not new.keys[0][1][:, :, 14 - 6 :].any()  # the second group keeps steps 6..19: 8 written, the rest 0
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert (got.float() - want.float()).abs().max() < tol * want.float().abs().max()


@pytest.mark.skipif(not BUILT.library, reason=f"no native build here: {BUILT.reason}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_row_scaling_gives_torchs_values(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 100, generator=g) * torch.tensor([[1e-3], [1.0], [50.0]])).to(dtype)
    x[2] = 0  # a silent row: its peak is the floor, 1e-12
    unit, peak = native.rows_to_unit(x)
    flat = x.float()
    want_peak = flat.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
    assert torch.equal(peak, want_peak) and torch.equal(unit, flat / want_peak)
    y = torch.randn(3, 40, generator=g)
    assert torch.equal(native.rows_scale(y, peak, dtype), (y * peak).to(dtype))


@pytest.mark.skipif(not (BUILT.library and quant.dynamic_int8_available()), reason="no native build or no fbgemm")
def test_an_int8_decode_product_is_the_same_with_native_row_scaling(monkeypatch):
    layer = quant.Int8Linear(1024, 1024, kernel="dynamic")
    layer.set_weight(torch.randn(1024, 1024, generator=torch.Generator().manual_seed(6)) * 0.02)
    x = torch.randn(2, 1, 1024).to(torch.bfloat16)
    got = layer(x)
    monkeypatch.setattr(quant, "_native_rows", lambda: False)
    assert torch.equal(got, layer(x))


@pytest.mark.skipif(not BUILT.avx512, reason=f"native GELU: {BUILT.reason}")
def test_native_gelu_is_torchs_within_float32_noise():
    x = torch.cat([torch.linspace(-12, 12, 20001), torch.randn(4096) * 3]).to(torch.bfloat16)
    want = F.gelu(x)
    got = native.gelu_bf16_(x.clone())
    # the same float math and rounding; erf within 1.5e-7, so a last-bit flip at a rounding boundary
    # or float32 noise in the far negative tail (where torch's 1 + erf is 0 or noise too)
    assert ((got.float() - want.float()).abs() <= 4e-6 + want.float().abs() / 128).all()
    assert (got == want).float().mean() > 0.95
    with pytest.raises(ValueError, match="contiguous bf16"):
        native.gelu_bf16_(torch.randn(4))


@needs_linear
@pytest.mark.skipif(not BUILT.avx512, reason=f"native GELU: {BUILT.reason}")
def test_a_feed_forward_step_runs_its_gelu_natively_only_for_decode_rows(monkeypatch):
    monkeypatch.setattr(stage_lm, "_KERNELS", dataclasses.replace(machine.kernel_choices(), bf16_decode_linear="native"))
    ffn = stage_lm.FeedForward(CONFIG).to(torch.bfloat16).eval()
    calls = []
    real = native.gelu_bf16_
    monkeypatch.setattr(native, "gelu_bf16_", lambda y: calls.append(y.shape) or real(y))
    with torch.inference_mode():
        step = torch.randn(2, 1, CONFIG.dim).to(torch.bfloat16)
        ffn(step)
        assert calls == []  # a small fc1 (under NATIVE_GELU_MIN_WEIGHTS): its output stays cached, torch's GELU
        monkeypatch.setattr(stage_lm, "NATIVE_GELU_MIN_WEIGHTS", CONFIG.dim * CONFIG.ffn_dim)
        got = ffn(step)
        assert calls == [(2, 1, CONFIG.ffn_dim)]
        want = ffn.fc2(F.gelu(F.linear(step, ffn.fc1.weight)))
        assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
        ffn(torch.randn(2, 9, CONFIG.dim).to(torch.bfloat16))  # a prefill chunk: torch's GELU
        assert len(calls) == 1


@needs_linear
def test_training_keeps_torch_products(monkeypatch):
    monkeypatch.setattr(stage_lm, "_KERNELS", dataclasses.replace(machine.kernel_choices(), bf16_decode_linear="native"))
    layer = stage_lm.Linear(64, 32, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 64).to(torch.bfloat16)
    layer(x).float().sum().backward()  # native has no backward: autograd needs torch's product
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


# -- int8 products ----------------------------------------------------------------------------------

def int8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """What stage_linear_int8 computes, in torch: each row of x to 8 bits over [min(x, 0), max(x, 0)]
    with its own scale and zero point (fbgemm's rule; halves to even), with two levels also what
    the first leaves at a scale 254 times finer; exact integer products, then the scales."""
    flat = x.reshape(-1, x.shape[-1]).float()
    lo = flat.amin(dim=1, keepdim=True).clamp_max(0)
    hi = flat.amax(dim=1, keepdim=True).clamp_min(0)
    xs = (hi - lo).clamp_min(1e-12) / 255
    xz = (-lo / xs).round().clamp(0, 255)
    xq = ((flat * (1 / xs)).round() + xz).clamp(0, 255)
    parts = [(xq - xz, xs)]
    if levels == 2:
        s2 = xs / 254
        rest = (flat.double() - (xq - xz).double() * xs.double()).float()  # one rounding, as the kernel's fnmadd
        parts.append(((rest * (1 / s2)).clamp(-127, 127).round(), s2))
    out = sum((qi.double() @ q.double().t()).float() * scale * si for qi, si in parts)  # exact: |dot| < 2^53
    return out.reshape(*x.shape[:-1], q.shape[0])


@needs_int8
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 32])  # 5, 32: a prefill chunk's 4 x 4 tiles and its last rows
@pytest.mark.parametrize("n,k", [(96, 64), (42, 70), (300, 1000)])  # 42: a partial last tile; 70, 1000: a partial block
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("levels", [1, 2])
def test_int8_product_equals_its_integer_reference(rows, n, k, dtype, levels):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    w = torch.randn(n, k, generator=g)
    scale = w.abs().amax(dim=1) / 127
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    x = (torch.randn(rows, 1, k, generator=g) * torch.logspace(-3, 2, rows)[:, None, None]).to(dtype)
    x[0, 0, : k // 3] = 0  # zeros and a wide range of row scales
    if rows > 1:
        x[1] = F.gelu(x[1].float()).to(dtype)  # a GELU's output: nearly all >= -0.17, what the zero point is for
    sums = native.int8_row_sums(q)
    got = native.linear_int8(x, q, sums, scale, torch.float32, levels)
    want = int8_reference(x, q, scale, levels)
    assert got.shape == (rows, 1, n)
    assert ((got - want).abs() <= 1e-5 * want.abs().amax(dim=-1, keepdim=True)).all()  # float rounding only
    as_bf16 = native.linear_int8(x, q, sums, scale, torch.bfloat16, levels)
    assert as_bf16.dtype == torch.bfloat16 and ((as_bf16.float() - want).abs() <= want.abs() / 128 + 1e-30).all()
    # against the float product of the same int8 matrix: 8-bit rows err by ~1 % of the largest
    # output, two levels by ~1e-4
    exact = x.double() @ (q.double() * scale[:, None].double()).t()
    bound = 0.03 if levels == 1 else 3e-4
    assert ((got - exact).abs().amax(dim=-1) <= bound * exact.abs().amax(dim=-1)).all()


@needs_int8
def test_int8_product_rejects_what_it_cannot_take():
    q = torch.zeros(8, 16, dtype=torch.int8)
    sums, scale = native.int8_row_sums(q), torch.ones(8)
    with pytest.raises(ValueError, match="contiguous int8 weight"):
        native.linear_int8(torch.randn(2, 16), q.t().contiguous().t(), sums, scale, torch.float32)
    with pytest.raises(ValueError, match="rows of 16"):
        native.linear_int8(torch.randn(2, 15), q, sums, scale, torch.float32)
    with pytest.raises(ValueError, match="float32 scales"):
        native.linear_int8(torch.randn(2, 16), q, sums, scale.to(torch.bfloat16), torch.float32)
    with pytest.raises(ValueError, match="1 or 2 levels"):
        native.linear_int8(torch.randn(2, 16), q, sums, scale, torch.float32, levels=3)


@needs_int8
def test_an_int8_linear_on_the_native_kernel_agrees_with_the_others_and_saves_the_same_state(monkeypatch):
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(7)) * 0.02
    layers = {}
    for kernel in ("native", "weight_only") + (("dynamic",) if quant.dynamic_int8_available() else ()):
        layers[kernel] = quant.Int8Linear(1024, 1024, kernel=kernel)
        layers[kernel].set_weight(w)
    assert "native" in repr(layers["native"]) and layers["native"].native_operands() is not None
    x = torch.randn(2, 1, 1024, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    exact = x.float() @ w.t()
    with torch.inference_mode():
        outs = {k: m(x).float() for k, m in layers.items()}
        prefill = layers["native"](x.expand(2, 40, 1024)).float()
    for k, y in outs.items():
        assert ((y - exact).abs().max() <= 0.03 * exact.abs().max()), k
    assert torch.equal(prefill[:, :1], outs["native"])  # a prefill chunk's rows get the decode step's values
    state = layers["native"].state_dict()
    assert state.keys() == layers["weight_only"].state_dict().keys()
    assert torch.equal(state["weight"], layers["weight_only"].weight)
    # a matrix loaded as state (an expert file's int8 weights): the row sums follow it
    other = quant.Int8Linear(1024, 1024, kernel="native")
    other.set_weight(torch.randn(1024, 1024) * 0.02)
    before = other.native_operands()[0].clone()
    other.load_state_dict(state)
    assert not torch.equal(other.native_operands()[0], before)
    with torch.inference_mode():
        assert torch.equal(other(x), layers["native"](x))
    # the native product takes small matrices too (a small expert's blocks then run fused); fbgemm's
    # below DYNAMIC_MIN_WEIGHTS gives way to aten's weight-only kernel
    small = quant.Int8Linear(256, 256, kernel="native")
    small.set_weight(torch.randn(256, 256))
    assert small.native_operands() is not None and "native" in repr(small) and small.native_levels == 2
    assert layers["native"].native_levels == 1  # 1 M weights: streamed from memory, one level
    if quant.dynamic_int8_available():
        small_dynamic = quant.Int8Linear(256, 256, kernel="dynamic")
        small_dynamic.set_weight(torch.randn(256, 256))
        assert small_dynamic.native_operands() is None and "weight-only" in repr(small_dynamic)


# -- fused decode blocks ----------------------------------------------------------------------------

def fused_lm(fmt: str, cross: bool = False) -> StageLM:
    config = dataclasses.replace(CONFIG, cross_attention=cross, text_dim=32)
    lm = init_weights(StageLM(config), seed=0).eval()
    with torch.no_grad():
        for head in lm.heads:
            head.weight.mul_(20)  # well-separated greedy choices
    if fmt == "int8":
        return quant.quantize_(lm, "int8")
    return lm.to(torch.bfloat16)


@needs_linear
@needs_attend
@needs_int8
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_fused_blocks_decode_the_same_tokens_as_the_blocks_own_ops(monkeypatch, fmt, static, cross):
    # every native kernel chosen; small matrices take the native int8 product too
    monkeypatch.setattr(stage_lm, "_KERNELS", dataclasses.replace(
        machine.kernel_choices(), bf16_decode_linear="native", decode_attention_int8="native", int8_decode="native"))
    monkeypatch.setattr(quant.Int8Linear, "DYNAMIC_MIN_WEIGHTS", 0)
    monkeypatch.setattr(machine, "kernel_choices", lambda: stage_lm._KERNELS)
    lm = fused_lm(fmt, cross)
    text = None
    if cross:
        g = torch.Generator().manual_seed(2)
        mask = torch.tensor([[True, True, False]])
        text = (lm.project_text(torch.randn(1, 3, 32, generator=g).to(torch.bfloat16), mask), mask)
    from stage_stack.models import fused_step

    halves = []
    real = fused_step.StepPlan.attention
    monkeypatch.setattr(fused_step.StepPlan, "attention", lambda self, *a: halves.append(1) or real(self, *a))
    runs = {}
    for fused in (False, True):
        lm.fused_decode = fused
        halves.clear()
        runs[fused] = generate(lm, context(lengths=(9,)), 12, params=GREEDY, return_steps=True, kv_dtype=torch.int8,
                               static_cache=static, num_samples=2, text_memory=text)  # 2 samples x 2 CFG halves
        # every step after the prefill (12 frames + n_q - 1 delay steps in all): one fused attention
        # half per layer, none unfused
        assert len(halves) == ((12 + CONFIG.n_q - 2) * CONFIG.n_layers if fused else 0)
    (u_codes, u_steps), (f_codes, f_steps) = runs[False], runs[True]
    assert torch.equal(u_codes, f_codes)
    # the same ops in the same order; LayerNorm's float sums may differ in their last bits
    assert (u_steps.float() - f_steps.float()).abs().max() < 0.02 * u_steps.float().abs().max()


@needs_linear
@needs_attend
def test_fused_blocks_run_only_where_a_decode_step_can_use_them(monkeypatch):
    from stage_stack.models import fused_step

    monkeypatch.setattr(stage_lm, "_KERNELS", dataclasses.replace(
        machine.kernel_choices(), bf16_decode_linear="native", decode_attention_int8="native"))
    lm = fused_lm("bf16")
    x = torch.zeros(2, 1, CONFIG.dim, dtype=torch.bfloat16)
    valid = torch.ones(2, 1, 1, dtype=torch.bfloat16)

    def plan(model=lm, x=x, dtype=torch.int8, static=False):
        cache = model.new_cache(2, 16, dtype=dtype, static=static)
        allowed = torch.ones(2, 1, 1, 1, dtype=torch.bool)
        return fused_step.step_plan(model, x, cache, (stage_lm._attention_mask(allowed),), valid)

    assert plan() is not None and fused_step.block_plan(lm.blocks[0]) is not None
    assert plan(dtype=torch.bfloat16) is None  # a float cache: the blocks' own attention
    assert plan(x=torch.zeros(2, 3, CONFIG.dim, dtype=torch.bfloat16)) is None  # a prefill chunk
    assert plan(x=torch.zeros(5, 1, CONFIG.dim, dtype=torch.bfloat16)) is None  # more rows than the products take
    fp32 = init_weights(StageLM(CONFIG), seed=0).eval()
    assert plan(model=fp32, x=x.float()) is None  # float32 weights
    lm.fused_decode = False
    assert plan() is None
    lm.fused_decode = True
    # the block's plan follows its weights: changed in place, it is rebuilt
    first = fused_step.block_plan(lm.blocks[0])
    assert fused_step.block_plan(lm.blocks[0]) is first
    with torch.no_grad():
        lm.blocks[0].ffn_norm.weight.mul_(2)
    assert fused_step.block_plan(lm.blocks[0]) is not first
    monkeypatch.setattr(stage_lm, "_KERNELS", dataclasses.replace(stage_lm._KERNELS, bf16_decode_linear="linear"))
    assert fused_step.block_plan(lm.blocks[1]) is None  # torch's bf16 products chosen: no native matrix


# -- building: fallback, lock, a build killed half-way ---------------------------------------------

def _load_in_subprocess(env: dict, code: str = "") -> subprocess.CompletedProcess:
    script = ("from stage_stack import native\n"
              "s = native.load()\n"
              "print(repr(s.reason), s.linear_bf16, s.avx512, s.path)\n" + code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_turned_off_or_without_a_compiler_it_says_why_and_torch_kernels_run(tmp_path):
    off = _load_in_subprocess({"STAGE_STACK_NATIVE": "0", "STAGE_STACK_HOME": str(tmp_path)})
    assert "STAGE_STACK_NATIVE=0" in off.stdout and "False False None" in off.stdout
    no_cc = _load_in_subprocess({"CC": "no-such-compiler-xyz", "PATH": str(tmp_path), "STAGE_STACK_HOME": str(tmp_path)})
    assert no_cc.returncode == 0, no_cc.stderr
    assert "no C compiler found" in no_cc.stdout and "False False" in no_cc.stdout
    assert not (tmp_path / "native").exists() or not list((tmp_path / "native").glob("*.so"))


def test_a_compiler_error_is_reported_not_raised(tmp_path):
    cc = tmp_path / "badcc"
    cc.write_text("#!/bin/sh\necho 'fatal: this compiler is broken' >&2\nexit 1\n")
    cc.chmod(0o755)
    done = _load_in_subprocess({"CC": str(cc), "STAGE_STACK_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    assert "could not build decode_kernels.c" in done.stdout and "this compiler is broken" in done.stdout


@pytest.mark.skipif(not BUILT.library, reason=f"no native build here: {BUILT.reason}")
def test_a_build_killed_half_way_leaves_nothing_half_written_and_the_next_one_builds(tmp_path):
    # a compiler that writes part of its output, then hangs: kill -9 it (and its caller) mid-build
    real = native._compiler()
    slow = tmp_path / "slowcc"
    slow.write_text(f'#!/bin/sh\nfor a; do case "$prev" in -o) out="$a";; esac; prev="$a"; '
                    f'done\nprintf half > "$out"\nsleep 60\nexec {real} "$@"\n')
    slow.chmod(0o755)
    home = tmp_path / "home"
    proc = subprocess.Popen([sys.executable, "-c", "from stage_stack import native; native.load()"],
                            env={**os.environ, "CC": str(slow), "STAGE_STACK_HOME": str(home)}, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list((home / "native").glob(".decode_kernels-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((home / "native").glob("decode_kernels-*.so"))  # only a temp file, never the target
    # the next process (a working compiler) takes the lock the dead one held, and builds
    done = _load_in_subprocess({"CC": real, "STAGE_STACK_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert "'' True True" in done.stdout or "lacks" in done.stdout
    assert len(list((home / "native").glob("decode_kernels-*.so"))) == 1
    assert not list((home / "native").glob(".decode_kernels-*"))  # the dead build's temp file is gone


@pytest.mark.skipif(not BUILT.library, reason=f"no native build here: {BUILT.reason}")
def test_two_processes_building_at_once_both_load_one_library(tmp_path):
    env = {**os.environ, "STAGE_STACK_HOME": str(tmp_path)}
    script = "from stage_stack import native; s = native.load(); print(s.path, s.linear_bf16)"
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0][0] == outs[1][0] and len(list((tmp_path / "native").glob("decode_kernels-*.so"))) == 1
    assert not [p for p in (tmp_path / "native").iterdir() if p.name.startswith(".decode_kernels")]


def test_doctor_says_whether_the_native_kernels_run_here(isolated, monkeypatch):
    from click.testing import CliRunner

    import stage_stack.cli.registry  # noqa: F401  (registers the commands)
    from stage_stack.cli import cli

    result = CliRunner().invoke(cli, ["doctor"], catch_exceptions=False)
    if BUILT.linear_bf16 and BUILT.avx512:
        assert "[ ok ] native kernels" in result.stdout and "chosen here: bf16 products" in result.stdout
    monkeypatch.setattr(native, "load", lambda: native.NativeStatus(None, None, False, False, False,
                                                                    "no C compiler found"))
    result = CliRunner().invoke(cli, ["doctor"], catch_exceptions=False)
    assert "[warn] native kernels" in result.stdout and "no C compiler found; decoding uses torch's kernels" in result.stdout
    assert result.exit_code == 0, result.output  # a warning: decoding still works
