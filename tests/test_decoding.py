"""Numerical agreement of every decoding path with the float32 eager path (issue 13).

Static vs dynamic KV cache, compiled vs eager, CUDA graphs vs eager (GPU only), bf16 / int8 /
int4 weights vs fp32, a bf16 KV cache, the preallocated sampler vs `sample_next`, and the
per-machine choices (threads, kernels). Tiny configs only; nothing here is timed.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from stage_stack import decoding, machine, native
from stage_stack.errors import DeviceError
from stage_stack.expert import load_expert, resolve_format, save_expert
from stage_stack.generation import Sampler, SamplingParams, cfg_row_groups, generate, sample_next
from stage_stack.layout import TokenLayout
from stage_stack.models import quant
from stage_stack.models.quant import Int4Linear, Int8Linear, quantize_
from stage_stack.models import stage_lm
from stage_stack.models.stage_lm import (KVCache, RowGroup, StageLM, StageLMConfig, init_weights, matmul_attention,
                                         positions_from_mask)
from stage_stack.testing import TINY_CODEC, expert_metadata, make_tiny_expert, tiny_codec

# Widths divisible by 32 so every block linear has an int4 group size.
CONFIG = StageLMConfig(dim=64, n_layers=2, n_heads=2, ffn_dim=128, card=32, n_q=2, cross_attention=True, text_dim=16)
GREEDY = SamplingParams(greedy=True)


def sharp_lm(config: StageLMConfig = CONFIG, seed: int = 0) -> StageLM:
    lm = init_weights(StageLM(config), seed=seed).eval()
    with torch.no_grad():  # well-separated greedy choices, so rounding does not flip them
        for head in lm.heads:
            head.weight.mul_(20)
    return lm


def context(config: StageLMConfig = CONFIG, lengths=(7, 4), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.card, (config.n_q, n), generator=g) for n in lengths]


def text(lm: StageLM, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[True, True, False], [False] * 3])
    return lm.project_text(torch.randn(2, 3, lm.config.text_dim, generator=g), mask), mask


# -- static cache, compile, CUDA graphs -------------------------------------------------------

def test_static_cache_equals_dynamic_cache_and_full_recompute():
    lm = sharp_lm()
    ctx, mem = context(), text(lm)
    dynamic, d_steps = generate(lm, ctx, 9, text_memory=mem, params=GREEDY, return_steps=True)
    static, s_steps = generate(lm, ctx, 9, text_memory=mem, params=GREEDY, return_steps=True, static_cache=True)
    full, f_steps = generate(lm, ctx, 9, text_memory=mem, params=GREEDY, return_steps=True, use_cache=False)
    assert torch.equal(static, dynamic) and torch.equal(static, full)
    assert (s_steps - d_steps).abs().max() < 1e-4 and (s_steps - f_steps).abs().max() < 1e-4


def _caches_made(lm, monkeypatch) -> list:
    """Every KVCache `lm.new_cache` makes from now on, in order."""
    made = []
    real_new_cache = lm.new_cache
    monkeypatch.setattr(lm, "new_cache", lambda *a, **k: made.append(real_new_cache(*a, **k)) or made[-1])
    return made


@pytest.mark.parametrize("static", [False, True])
def test_skipping_the_unconditional_pad_context_changes_nothing_but_the_cache_size(static, monkeypatch):
    lm = sharp_lm()
    ctx, mem = context(lengths=(7, 4)), text(lm)
    kept, k_steps = generate(lm, ctx, 9, text_memory=mem, params=GREEDY, return_steps=True, static_cache=static,
                             skip_pad_context=False)
    sizes = _caches_made(lm, monkeypatch)
    skipped, s_steps = generate(lm, ctx, 9, text_memory=mem, params=GREEDY, return_steps=True, static_cache=static,
                                skip_pad_context=True)
    assert torch.equal(kept, skipped) and (k_steps - s_steps).abs().max() < 1e-5
    cache = sizes[0]
    # step 0 of the delay pattern is masked in every row; the conditional rows keep the rest (the
    # longest context starts at step 1), the unconditional ones start at their SEP, after 7 PAD steps
    assert cache.groups == (RowGroup(0, 2, 1), RowGroup(2, 4, 8))
    S = cache.max_steps
    assert cache.nbytes == 2 * ((S - 1) + (S - 8)) * 2 * CONFIG.n_layers * CONFIG.dim * 4


@pytest.mark.parametrize("small_below, groups", [(10**9, 1), (1, 2)])
def test_the_pad_context_is_skipped_by_default_only_for_big_models(small_below, groups, monkeypatch):
    import stage_stack.generation as generation

    lm = sharp_lm()
    monkeypatch.setattr(generation, "SMALL_MODEL_PARAMS", small_below)  # lm is "small" or "big"
    sizes = _caches_made(lm, monkeypatch)
    generate(lm, context(lengths=(7, 4)), 5, text_memory=text(lm), params=GREEDY)
    assert len(sizes[0].groups) == groups


def test_cfg_row_groups_start_at_each_half_s_first_valid_step():
    layout = TokenLayout.for_config(CONFIG)
    batch = layout.generation_batch(context(lengths=(5, 3)), 4)
    assert cfg_row_groups(batch.attention_mask, 2) == (RowGroup(0, 2, 1), RowGroup(2, 4, 6))


def test_cache_groups_are_validated():
    with pytest.raises(ValueError, match="groups must split rows 0..4 in order"):
        KVCache(CONFIG, 4, 10, "cpu", torch.float32, groups=(RowGroup(0, 2), RowGroup(3, 4)))
    with pytest.raises(ValueError, match="each keeping a step < 10"):
        KVCache(CONFIG, 2, 10, "cpu", torch.float32, groups=(RowGroup(0, 1), RowGroup(1, 2, 10)))


def test_a_write_that_ends_before_a_group_s_first_step_keeps_nothing_for_it():
    cache = KVCache(CONFIG, 2, 10, "cpu", torch.float32, groups=(RowGroup(0, 1), RowGroup(1, 2, 6)))
    k = torch.ones(2, CONFIG.n_heads, 4, CONFIG.head_dim)
    first, second = cache.store(0, k, k)
    assert second is None and first[0].shape[2] == 4 and cache.keys[0][1].abs().sum() == 0
    cache.advance(4)
    first, second = cache.store(0, 2 * k, 2 * k)  # steps 4..7: the group keeps 6 and 7
    assert second[0].shape[2] == 2 and torch.equal(second[0], 2 * k[1:, :, 2:])


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_a_chunked_prefill_gives_the_one_pass_tokens_and_logits(static, chunk):
    # contexts of 7 and 4 steps: chunks of 1, 3 and 5 end before, at and across the unconditional
    # rows' first kept step (their SEP at step 8), and split the conditional rows' context too
    lm = sharp_lm()
    ctx, mem = context(lengths=(7, 4)), text(lm)
    one, one_steps = generate(lm, ctx, 9, text_memory=mem, params=GREEDY, return_steps=True, static_cache=static,
                              prefill_chunk=None)
    chunked, steps = generate(lm, ctx, 9, text_memory=mem, params=GREEDY, return_steps=True, static_cache=static,
                              prefill_chunk=chunk)
    assert torch.equal(one, chunked) and (one_steps - steps).abs().max() < 1e-5


def test_a_static_prefill_chunk_reads_only_the_steps_written_so_far(monkeypatch):
    lm = sharp_lm()
    ctx = context(lengths=(7, 4))
    reads = []
    attend = stage_lm._attend

    def spy(q, k, v, mask):
        reads.append((q.shape[2], k.shape[2]))
        return attend(q, k, v, mask)

    monkeypatch.setattr(stage_lm, "_attend", spy)
    generate(lm, ctx, 9, params=GREEDY, static_cache=True, prefill_chunk=3, skip_pad_context=False)
    reads = [r for r in reads if r[1] > 1]  # not the cross-attention's one-step (null) text memory
    prefill = [r for r in reads if r[0] > 1]
    decode = {k for q, k in reads if q == 1}
    # steps 0-2, 3-5, 6-8 of the 9-step prefix (7 context steps, SEP and the first empty step)
    assert sorted({k for _, k in prefill}) == [3, 6, 9]
    assert len(decode) == 1 and decode.pop() > 9  # a decode step still reads the whole buffer


def test_prefill_chunk_must_be_positive():
    lm = sharp_lm()
    with pytest.raises(ValueError, match="prefill_chunk must be a positive number of steps or None, got 0"):
        generate(lm, context(), 3, params=GREEDY, prefill_chunk=0)


def test_static_cache_with_aligned_positions_equals_dynamic():
    from dataclasses import replace

    lm = sharp_lm(replace(CONFIG, positions="aligned"))
    ctx, mem = context(), text(lm)
    dynamic = generate(lm, ctx, 9, text_memory=mem, params=GREEDY)
    static = generate(lm, ctx, 9, text_memory=mem, params=GREEDY, static_cache=True)
    full = generate(lm, ctx, 9, text_memory=mem, params=GREEDY, use_cache=False)
    assert torch.equal(static, dynamic) and torch.equal(static, full)


def test_static_cache_sampling_draws_the_same_tokens():
    lm = sharp_lm()
    a = generate(lm, context(), 9, seed=3, num_samples=2)
    b = generate(lm, context(), 9, seed=3, num_samples=2, static_cache=True)
    assert torch.equal(a, b)


def test_static_forward_needs_positions_and_the_whole_mask():
    lm = sharp_lm()
    cache = lm.new_cache(1, 6, static=True)
    codes = torch.zeros(1, CONFIG.n_q, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="expected \\(1, 6\\)"):
        lm(codes, torch.ones(1, 1, dtype=torch.bool), cache=cache, positions=torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="explicit positions"):
        lm(codes, torch.ones(1, 6, dtype=torch.bool), cache=cache)


def test_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken():
        def run(*args):
            raise RuntimeError("no working C++ compiler\nmore detail")
        return run

    monkeypatch.setattr(decoding, "_compiled", broken)
    monkeypatch.setattr(decoding, "_compile_failed", None)
    lm = sharp_lm()
    eager = generate(lm, context(), 6, params=GREEDY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(lm, context(), 6, params=GREEDY, compile=True)
        generate(lm, context(), 6, params=GREEDY, compile=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no working C++ compiler" in messages[0] and "eager" in messages[0]
    assert "more detail" not in messages[0]  # one line
    assert torch.equal(out, eager)
    assert decoding.compile_failure().startswith("RuntimeError")


def test_compile_modes_are_validated():
    lm = sharp_lm()
    with pytest.raises(ValueError, match="compile='fast'"):
        generate(lm, context(), 4, compile="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs the model on a CUDA device"):
            generate(lm, context(), 4, compile="cuda-graph")
    assert decoding.resolve_mode("auto", lm) == "eager"  # on the CPU


def _compiler_works() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return True
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _compiler_works(), reason="torch.compile on the CPU needs a C++ compiler (none found)")
def test_compiled_step_equals_eager_without_recompiles():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    monkey_failed = decoding._compile_failed
    lm = sharp_lm(StageLMConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, card=16, n_q=2, cross_attention=False))
    ctx = context(lm.config, (5,))
    eager, e_steps = generate(lm, ctx, 8, params=GREEDY, return_steps=True)
    counters.clear()
    compiled, c_steps = generate(lm, ctx, 8, params=GREEDY, return_steps=True, compile=True)
    assert decoding.compile_failure() is None or monkey_failed is not None
    assert torch.equal(compiled, eager)
    assert (c_steps - e_steps).abs().max() < 1e-4
    assert counters["stats"]["unique_graphs"] == 1  # one graph for all 10 steps: no recompiles
    assert not counters["graph_break"]
    again = generate(lm, ctx, 8, params=GREEDY, compile=True)  # a second call reuses the graph
    assert torch.equal(again, eager) and counters["stats"]["unique_graphs"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU; none is visible here")
def test_cuda_graph_step_equals_eager():
    lm = sharp_lm().cuda()
    ctx = [c.cuda() for c in context()]
    eager, e_steps = generate(lm, ctx, 9, params=GREEDY, return_steps=True)
    graphed, g_steps = generate(lm, ctx, 9, params=GREEDY, return_steps=True, compile="cuda-graph")
    assert torch.equal(graphed, eager)
    assert (g_steps - e_steps).abs().max() < 1e-3


# -- weight formats -----------------------------------------------------------------------------

def teacher_forced_logits(lm: StageLM, ref: StageLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of `lm` and `ref` on the same sequence (ref's greedy output): [B, K, S, card] each."""
    layout = TokenLayout.for_card(CONFIG.card, CONFIG.n_q)
    out = generate(ref, context(), 10, params=GREEDY)
    batch = layout.training_batch(context(), out)
    pos = positions_from_mask(batch.attention_mask)
    with torch.inference_mode():
        return (lm(batch.codes, batch.attention_mask, positions=pos).float(),
                ref(batch.codes, batch.attention_mask, positions=pos).float())


@pytest.mark.parametrize("fmt,tol,min_agree", [("bf16", 0.5, 0.95), ("int8", 1.0, 0.95), ("int4", 6.0, 0.7)])
def test_weight_formats_agree_with_fp32(tmp_path, fmt, tol, min_agree):
    cfg = StageLMConfig(dim=64, n_layers=2, n_heads=2, ffn_dim=128, card=32, n_q=2, cross_attention=False)
    path = make_tiny_expert(tmp_path / "e.safetensors", lm_config=cfg)
    ref = load_expert(path).lm
    with torch.no_grad():
        for head in ref.heads:
            head.weight.mul_(20)
    lm = load_expert(path, dtype=fmt).lm
    with torch.no_grad():
        for head in lm.heads:
            head.weight.mul_(20)
    got, want = teacher_forced_logits(lm, ref)
    scale = want.abs().max()
    assert (got - want).abs().max() <= tol / 100 * scale * 10, (got - want).abs().max()  # tol % of the range x 10
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree >= min_agree
    if fmt != "bf16":
        kinds = {type(m) for m in lm.modules()}
        assert (Int8Linear if fmt == "int8" else Int4Linear) in kinds
        assert lm.heads[0].weight.dtype == torch.bfloat16  # heads and embeddings stay bf16


def test_int8_and_int4_dequantize_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    eye = torch.eye(64)
    q8 = Int8Linear(64, 48)
    q8.set_weight(w)
    deq8 = q8(eye).float().t()  # x = I gives the dequantized weight back
    step8 = w.abs().amax(1, keepdim=True) / 127
    assert ((deq8 - w).abs() <= step8 / 2 + 0.01 * w.abs()).all()  # half a step + bf16 rounding
    q4 = Int4Linear(64, 48)
    q4.set_weight(w)
    deq4 = q4(eye).float().t()
    groups = w.view(48, 64 // q4.group, q4.group)
    step4 = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(q4.group, dim=1)
    assert ((deq4 - w).abs() <= step4 / 2 + 0.01 * w.abs() + 1e-2).all()
    assert (deq4 - w).abs().max() > 1e-3  # it is 4 bits: not the float weight


def test_int8_prefill_gemm_equals_the_int8_kernel():
    g = torch.Generator().manual_seed(1)
    q8 = Int8Linear(64, 48)
    q8.set_weight(torch.randn(48, 64, generator=g))
    x = torch.randn(2 * Int8Linear.GEMM_ROWS, 64, generator=g)
    many = q8(x).float()  # > GEMM_ROWS rows: dequantized bf16 GEMM
    few = torch.cat([q8(chunk).float() for chunk in x.split(Int8Linear.GEMM_ROWS // 2)])  # the int8 kernel
    assert (many - few).abs().max() <= 0.02 * few.abs().max()


@pytest.mark.skipif(not quant.dynamic_int8_available(), reason="this torch has no fbgemm int8 linear")
def test_int8_dynamic_kernel_agrees_with_weight_only_and_saves_the_same_state():
    g = torch.Generator().manual_seed(2)
    n = 1024  # DYNAMIC_MIN_WEIGHTS: smaller matrices keep the weight-only kernel
    w = torch.randn(n, n, generator=g) / 32
    modules = {k: Int8Linear(n, n, kernel=k) for k in ("weight_only", "dynamic")}
    for m in modules.values():
        m.set_weight(w)
    dyn, wo = modules["dynamic"], modules["weight_only"]
    assert dyn._packed is not None and dyn.weight.numel() == 0  # one copy: the packed one
    assert "dynamic" in repr(dyn) and "weight-only" in repr(wo)
    assert dyn.state_dict().keys() == wo.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(dyn.state_dict().values(), wo.state_dict().values()))
    x = torch.randn(2, n, generator=g)
    want = x @ w.t()
    rel = lambda y: ((y.float() - want).norm() / want.norm()).item()  # noqa: E731
    assert rel(wo(x)) < 0.02
    assert 0 < rel(dyn(x)) < 0.06  # 8-bit activations: a few times the weight-only error, not more
    # a prefill: rows of very different sizes, each quantized with its own scale
    many = torch.randn(4 * Int8Linear.GEMM_ROWS, n, generator=g) * torch.logspace(-2, 2, 4 * Int8Linear.GEMM_ROWS)[:, None]
    want = many @ w.t()
    per_row = ((dyn(many).float() - want).norm(dim=1) / want.norm(dim=1)).max()
    assert per_row < 0.06, per_row  # one scale per call would leave the small rows to rounding noise
    small = Int8Linear(64, 48, kernel="dynamic")
    small.set_weight(torch.randn(48, 64, generator=g))
    assert small._packed is None  # below DYNAMIC_MIN_WEIGHTS


def test_quantize_in_place_matches_loading_quantized(tmp_path):
    cfg = StageLMConfig(dim=64, n_layers=1, n_heads=2, ffn_dim=128, card=32, n_q=2, cross_attention=False)
    path = make_tiny_expert(tmp_path / "e.safetensors", lm_config=cfg)
    loaded = load_expert(path, dtype="int8").lm
    quantized = quantize_(load_expert(path).lm, "int8")
    for (na, a), (nb, b) in zip(loaded.state_dict().items(), quantized.state_dict().items()):
        assert na == nb and torch.equal(a, b), na


def test_format_names_and_errors(tmp_path):
    assert resolve_format("float32") == "fp32" and resolve_format(torch.bfloat16) == "bf16"
    with pytest.raises(DeviceError, match="int8"):
        resolve_format("int2")
    cfg = StageLMConfig(dim=64, n_layers=1, n_heads=2, ffn_dim=128, card=32, n_q=2, cross_attention=False)
    path = make_tiny_expert(tmp_path / "e.safetensors", lm_config=cfg)
    expert = load_expert(path, dtype="int4")
    with pytest.raises(ValueError, match="save the float LM"):
        save_expert(tmp_path / "q.safetensors", expert_metadata("drums", cfg, TINY_CODEC), expert.lm, tiny_codec())
    assert not (tmp_path / "q.safetensors").exists()
    with pytest.raises(ValueError, match="int4 needs in_features divisible"):
        Int4Linear(40, 8)


def test_arranger_and_cli_take_the_same_formats():
    from click.testing import CliRunner

    from stage_stack import Arranger
    from stage_stack.cli import arrange as _registers_arrange  # noqa: F401
    from stage_stack.cli import cli

    assert Arranger(dtype="bfloat16").dtype == "bf16"
    with pytest.raises(DeviceError, match="int8"):
        Arranger(dtype="int3")
    result = CliRunner().invoke(cli, ["arrange", "--add", "drums", "-o", "x", "--dtype", "int3"])
    assert result.exit_code != 0 and "int8" in result.output and "int4" in result.output


@pytest.mark.parametrize("flags,device,want", [
    ({"avx512_bf16", "avx512f"}, "cpu", "int8"),   # the AMD EPYC of benchmarks/README.md
    ({"amx_bf16", "amx_int8"}, "cpu", "int8"),     # an Intel Xeon with AMX
    ({"avx2", "fma"}, "cpu", "fp32"),              # bf16 emulated: int8's bf16 activations not measured as a win
    (set(), "meta", "fp32"),
])
def test_auto_format_follows_the_device_and_cpu_features(monkeypatch, flags, device, want):
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset(flags))
    assert machine.auto_weight_format(device) == want
    assert resolve_format("auto") == "auto"  # without a device it stays a choice
    assert resolve_format("auto", device) == want


def test_auto_is_the_arranger_default_and_recorded_as_the_format_it_chose(tmp_path, monkeypatch):
    from stage_stack import Arranger

    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    path = make_tiny_expert(tmp_path / "drums.safetensors", instrument="drums")
    assert load_expert(path).weight_format == "fp32"  # the low-level default: parity and training need fp32
    assert load_expert(path, dtype="auto").weight_format == "int8"
    arranger = Arranger({"drums": path}, device_map="cpu")
    assert arranger.dtype == "auto"
    song = arranger.arrange(["drums"], duration=1.0, out=tmp_path / "song")
    record = song.manifest.layer("drums").expert
    assert record.weight_format == "int8" and record.dtype == "torch.bfloat16"
    assert any(isinstance(m, Int8Linear) for m in arranger.expert("drums").lm.modules())
    # reproducing with other weights says so, and how to get the recorded ones
    with pytest.warns(UserWarning, match=r"made with int8 weights and reproduced with fp32.*dtype='int8'"):
        Arranger({}, dtype="fp32").reproduce(tmp_path / "song" / "manifest.json", out=tmp_path / "again")


def test_bf16_kv_cache_agrees_with_float32_cache():
    lm = sharp_lm()
    f32, f_steps = generate(lm, context(), 9, params=GREEDY, return_steps=True, kv_dtype=torch.float32)
    b16, b_steps = generate(lm, context(), 9, params=GREEDY, return_steps=True, kv_dtype=torch.bfloat16,
                            static_cache=True)
    assert torch.equal(f32, b16)
    assert (f_steps - b_steps).abs().max() < 0.05 * f_steps.abs().max()


@pytest.mark.parametrize("static", [False, True])
def test_int8_kv_cache_agrees_with_float32_cache(static):
    lm = sharp_lm()
    f32, f_steps = generate(lm, context(), 9, params=GREEDY, return_steps=True, kv_dtype=torch.float32)
    i8, i_steps = generate(lm, context(), 9, params=GREEDY, return_steps=True, kv_dtype=torch.int8,
                           static_cache=static, prefill_chunk=4)
    assert torch.equal(f32, i8)
    assert (f_steps - i_steps).abs().max() < 0.05 * f_steps.abs().max()


def test_int8_kv_cache_skipping_the_pad_context_agrees_too():
    lm = sharp_lm()
    ref, r_steps = generate(lm, context(), 9, params=GREEDY, return_steps=True, kv_dtype=torch.float32,
                            skip_pad_context=True)
    i8, i_steps = generate(lm, context(), 9, params=GREEDY, return_steps=True, kv_dtype=torch.int8,
                           skip_pad_context=True, static_cache=True)
    assert torch.equal(ref, i8)
    assert (r_steps - i_steps).abs().max() < 0.05 * r_steps.abs().max()


def test_int8_kv_cache_holds_half_a_bf16_cache_and_reads_back_each_step():
    from stage_stack.models.stage_lm import KVCache, QuantizedKV, StageLMConfig

    config = StageLMConfig(card=16, n_q=2, dim=64, n_heads=4, n_layers=2, ffn_dim=128)
    bf16 = KVCache(config, 2, 100, "cpu", torch.bfloat16)
    int8 = KVCache(config, 2, 100, "cpu", torch.int8)
    scales = 2 * config.n_layers * 2 * config.n_heads * 100 * 4  # float32, one per (row, head, step)
    assert int8.nbytes == bf16.nbytes // 2 + scales
    k = torch.randn(2, config.n_heads, 5, config.head_dim) * 3
    (read,) = int8.store(0, k, -k)
    assert isinstance(read, QuantizedKV) and read.keys.dtype == torch.int8 and read.keys.shape[2] == 5
    keys, values = read.dequantize(torch.float32)
    # symmetric int8 per step and head: within half a step of 127 of the row's largest value
    assert (keys - k).abs().max() <= k.abs().amax(dim=-1, keepdim=True).max() / 254 + 1e-6
    assert torch.equal(values, -keys)
    with pytest.raises(ValueError, match="float dtype or torch.int8"):
        KVCache(config, 2, 100, "cpu", torch.int16)


@pytest.mark.parametrize("small_below, fmt, want", [(1, "int8", torch.int8), (1, "int4", torch.int8),
                                                    (1, None, torch.int8), (10**9, "int8", torch.float32),
                                                    (10**9, "bf16", torch.float32), (10**9, None, None)])
def test_the_int8_cache_is_the_default_only_for_big_models(small_below, fmt, want, monkeypatch):
    import stage_stack.generation as generation

    # torch's kernels (where the native ones run, a small model's blocks may run fused and take an
    # int8 cache: the next test); a small model keeps a float32 cache under half-precision
    # weights, whatever the probe says of half-precision attention at MusicGen size
    # (stage_stack.machine.half_kv_cache)
    torch_kernels = dataclasses.replace(machine.kernel_choices(), half_kv_cache="model", int8_decode="weight_only",
                                        bf16_decode_linear="linear", decode_attention_int8="matmul")
    monkeypatch.setattr(stage_lm, "_KERNELS", torch_kernels)
    monkeypatch.setattr(machine, "kernel_choices", lambda: torch_kernels)
    lm = sharp_lm()
    if fmt == "bf16":
        lm = lm.to(torch.bfloat16)
    elif fmt is not None:
        quantize_(lm, fmt)
    monkeypatch.setattr(generation, "SMALL_MODEL_PARAMS", small_below)  # lm is "small" or "big"
    assert generation.default_kv_dtype(lm) == want
    # a compiled float step keeps the float cache (int8 with compile is not measured)
    assert generation.default_kv_dtype(lm, mode="compile") == (want if fmt not in (None, "bf16") or small_below > 1
                                                               else None)
    caches = _caches_made(lm, monkeypatch)
    generate(lm, context(), 3, params=GREEDY)
    assert caches[0].quantized == (want == torch.int8)
    assert caches[0].keys[0][0].dtype == (want or torch.float32)


@pytest.mark.skipif(not (native.load().linear_bf16 and native.load().linear_int8 and native.load().avx512),
                    reason=f"native kernels: {native.load().reason}")
@pytest.mark.parametrize("fmt", ["int8", "bf16", "fp32"])
def test_a_small_model_whose_blocks_run_fused_takes_an_int8_cache(fmt, monkeypatch):
    import stage_stack.generation as generation

    native_kernels = dataclasses.replace(machine.kernel_choices(), int8_decode="native", bf16_decode_linear="native",
                                         decode_attention_int8="native")
    monkeypatch.setattr(stage_lm, "_KERNELS", native_kernels)
    monkeypatch.setattr(machine, "kernel_choices", lambda: native_kernels)
    lm = sharp_lm()
    if fmt == "bf16":
        lm = lm.to(torch.bfloat16)
    elif fmt == "int8":
        quantize_(lm, fmt)
    want = None if fmt == "fp32" else torch.int8  # float32 weights do not run fused: no int8 cache for them
    assert generation.default_kv_dtype(lm) == want
    assert generation.default_kv_dtype(lm, mode="compile") in (None, torch.float32)  # a compiled step is not fused
    lm.fused_decode = False
    assert generation.default_kv_dtype(lm) in (None, torch.float32)


@pytest.mark.parametrize("small_below, fmt, chunk", [(1, "int8", 32), (1, "int4", 32), (1, None, 128),
                                                     (10**9, "int8", 128), (10**9, None, 128)])
def test_a_big_quantized_model_prefills_in_small_chunks_and_trims_the_heap_between_them(small_below, fmt, chunk,
                                                                                          monkeypatch):
    import stage_stack.generation as generation

    lm = sharp_lm()
    if fmt is not None:
        quantize_(lm, fmt)
    monkeypatch.setattr(generation, "SMALL_MODEL_PARAMS", small_below)  # lm is "small" or "big"
    assert generation.default_prefill_chunk(lm) == chunk
    assert generation.QUANTIZED_PREFILL_CHUNK == 32 and generation.PREFILL_CHUNK == 128
    trims, chunks = [], []
    monkeypatch.setattr(generation, "release_freed_memory", lambda: trims.append(len(chunks)))
    forward = type(lm).forward

    def spy(self, codes, *args, **kwargs):
        chunks.append(codes.shape[-1])
        return forward(self, codes, *args, **kwargs)

    monkeypatch.setattr(type(lm), "forward", spy)
    monkeypatch.setattr(generation, "QUANTIZED_PREFILL_CHUNK", 4)  # a 9-step prefix: chunks of 4, 4, 1
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 4)
    auto = generate(lm, context(), 3, params=GREEDY)
    prefill = [n for n in chunks if n > 1]
    assert prefill == [4, 4]  # and a last chunk of one step
    # only a big model on the CPU gives the heap back, before every chunk but the first
    assert trims == ([1, 2] if small_below == 1 else [])
    monkeypatch.setattr(type(lm), "forward", forward)
    assert torch.equal(auto, generate(lm, context(), 3, params=GREEDY, prefill_chunk=None))


# -- sampler and per-machine choices -----------------------------------------------------------

@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(top_k=3, temperature=0.7),
                                    SamplingParams(top_k=0), SamplingParams(greedy=True)])
def test_preallocated_sampler_draws_what_sample_next_draws(params):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    a_gen, b_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sampler = Sampler(params, 6, 40, "cpu", a_gen)
    for _ in range(5):
        assert torch.equal(sampler(logits), sample_next(logits, params, b_gen))


def test_thread_choice_follows_load_size_and_override(monkeypatch):
    assert machine.choose_threads(n_params=1_000_000, load=0.0, cores=8) == 1  # overhead-bound: one thread
    assert machine.choose_threads(n_params=400_000_000, load=0.0, cores=2) == 2
    assert machine.choose_threads(n_params=400_000_000, load=5.0, cores=2) == 1  # busy cores: no spin-wait
    assert machine.choose_threads(n_params=400_000_000, load=1.2, cores=4) == 3
    before = torch.get_num_threads()
    monkeypatch.setenv("STAGE_STACK_THREADS", "3")
    with machine.decode_threads(10) as n:
        assert n == 3 and torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
    monkeypatch.setenv("STAGE_STACK_THREADS", "torch")
    with machine.decode_threads(10) as n:
        assert n == before
    monkeypatch.setenv("STAGE_STACK_THREADS", "many")
    with pytest.raises(ValueError, match="STAGE_STACK_THREADS='many'"):
        machine.threads_setting()


def test_a_quantized_model_counts_its_matrices_for_the_thread_choice(monkeypatch):
    from contextlib import contextmanager

    from stage_stack import generation
    from stage_stack.expert import build_empty
    from stage_stack.models.quant import replace_linears, weight_count

    # MusicGen-small size on the meta device: by parameters alone, int8 leaves 17.7 M of 420 M
    big = build_empty(lambda: StageLM(StageLMConfig()))
    floats = weight_count(big)
    replace_linears(big, "int8", device="meta")
    assert sum(p.numel() for p in big.parameters()) < machine.SMALL_MODEL_PARAMS < floats == weight_count(big)
    assert machine.choose_threads(weight_count(big), load=0.0, cores=2) == 2  # was 1: taken for a small expert

    seen = []

    @contextmanager
    def spy(n_params, device):
        seen.append(n_params)
        yield 1

    monkeypatch.setattr(generation, "decode_threads", spy)
    lm = sharp_lm()
    n_float = weight_count(lm)
    quantize_(lm, "int8")
    generate(lm, context(), 3, params=GREEDY)
    assert seen == [n_float] and sum(p.numel() for p in lm.parameters()) < n_float


def test_busy_cores_counts_other_processes_now_not_this_one(monkeypatch):
    # (busy, total) jiffies of all CPUs, and this process's own, at the two reads
    cpu = iter([(1000, 4000), (1150, 4200)])  # 150 of 200 jiffies busy on 2 cores: 1.5 cores
    own = iter([500, 550])  # 50 of them were this process
    monkeypatch.setattr(machine, "_cpu_jiffies", lambda: next(cpu))
    monkeypatch.setattr(machine, "_own_jiffies", lambda: next(own))
    assert machine.busy_cores(0.0, cores=2) == pytest.approx(1.0)
    monkeypatch.setattr(machine, "busy_cores", lambda cores=None: 1.0)
    assert machine.choose_threads(400_000_000, cores=2) == 1  # one core taken by someone else
    monkeypatch.setattr(machine, "busy_cores", lambda cores=None: 0.1)
    monkeypatch.setattr(machine, "load_average", lambda: 1.9)  # this process's last minute: not counted
    assert machine.choose_threads(400_000_000, cores=2) == 2
    monkeypatch.setattr(machine, "busy_cores", lambda cores=None: None)  # no /proc/stat: the load average
    assert machine.choose_threads(400_000_000, cores=2) == 1


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matmul_attention_equals_sdpa_with_masked_keys(dtype, tol):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1, 16, generator=g).to(dtype),
               *(torch.randn(2, 4, 40, 16, generator=g).to(dtype) for _ in range(2)))
    blocked = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
    blocked[1, ..., :25] = True  # an unconditional row: its PAD context is hidden
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=~blocked)
    got = matmul_attention(q, k, v, blocked)
    assert got.dtype == dtype and (got.float() - want).abs().max() < tol
    # the hidden keys carry no weight: changing them changes nothing
    k2 = k.clone()
    k2[1, :, :25] = 100
    assert torch.equal(matmul_attention(q, k2, v, blocked)[1], got[1])


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_kernels_give_the_same_tokens(monkeypatch, kv_dtype):
    lm = sharp_lm()
    ctx, mem = context(), text(lm)
    runs = {}
    for kernel in ("sdpa", "matmul"):
        monkeypatch.setattr(stage_lm, "_KERNELS", dataclasses.replace(
            machine.kernel_choices(), decode_attention_fp32=kernel, decode_attention_half=kernel))
        runs[kernel] = generate(lm, ctx, 9, text_memory=mem, params=GREEDY, return_steps=True, kv_dtype=kv_dtype,
                                static_cache=True)
    (sdpa, s_steps), (mm, m_steps) = runs["sdpa"], runs["matmul"]
    assert torch.equal(sdpa, mm)
    assert (s_steps - m_steps).abs().max() < (1e-4 if kv_dtype == torch.float32 else 0.1)


def test_probe_keeps_a_half_precision_cache_unless_much_slower(monkeypatch):
    monkeypatch.setattr(quant, "dynamic_int8_available", lambda: True)
    monkeypatch.setattr(native, "load", lambda: native.NativeStatus(None, None, True, True, True, ""))
    # in the order _probe times them; each int8 time is per matrix (the probe divides a pass by 24),
    # each native one per matrix (/ 12) or per layer (/ 6)
    times = {"fp32_linear": 1.0, "fp32_w_xt": 1.0, "int8_weight_only": 24.0, "int8_native": 15.0, "int8_dynamic": 12.0,
             "bf16_linear": 12.0, "bf16_native": 6.0, "attn_int8": 6.0, "attn_int8_native": 5.8,
             "attn_fp32": 1.0, "attn_fp32_matmul": 0.5, "attn_bf16": 5.0, "attn_bf16_matmul": 0.6}
    monkeypatch.setattr(machine, "_time_ms", lambda fn, repeats=8: times[next(order)])
    order = iter(times)
    choices = machine._probe()
    # bf16 via two products is 1.2x the float32 best: under HALF_KV_SLOWDOWN, so the cache stays bf16
    assert (choices.decode_attention_fp32, choices.decode_attention_half, choices.half_kv_cache) == (
        "matmul", "matmul", "model")
    assert choices.int8_decode == "dynamic" and choices.probe_ms["int8_dynamic"] == 0.5  # the fastest of three
    # native's product wins by 2x, its attention by 3 %: under the 10 % an alternative needs
    assert (choices.bf16_decode_linear, choices.decode_attention_int8) == ("native", "matmul")
    times.update(attn_bf16_matmul=0.9, int8_native=10.0, int8_dynamic=23.0, bf16_native=11.5, attn_int8_native=2.0)
    order = iter(times)
    again = machine._probe()
    assert again.half_kv_cache == "float32" and again.int8_decode == "native"
    assert (again.bf16_decode_linear, again.decode_attention_int8) == ("linear", "native")
    # a machine where the kernels cannot run never times them, and keeps torch's
    monkeypatch.setattr(native, "load", lambda: native.NativeStatus(None, None, False, False, False, "no compiler"))
    times = {k: v for k, v in times.items() if "native" not in k}
    order = iter(times)
    without = machine._probe()
    assert (without.bf16_decode_linear, without.decode_attention_int8) == ("linear", "matmul")
    assert without.int8_decode == "weight_only"  # fbgemm's 23 of 24: under the 10 % it needs
    assert not {"bf16_native", "int8_native", "attn_int8_native"} & set(without.probe_ms)


def test_kernel_probe_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGE_STACK_HOME", str(tmp_path))
    monkeypatch.delenv("STAGE_STACK_KERNELS", raising=False)
    machine._kernel_choices.cache_clear()
    first = machine.kernel_choices()
    assert first.source == "probe" and set(first.probe_ms) >= {"fp32_linear", "fp32_w_xt", "attn_fp32", "attn_bf16",
                                                           "attn_fp32_matmul", "attn_bf16_matmul", "int8_weight_only"}
    assert first.int8_decode in ("weight_only", "dynamic", "native")
    stored = json.loads((tmp_path / "kernels.json").read_text())
    assert machine.cpu_model() in next(iter(stored))
    machine._kernel_choices.cache_clear()
    again = machine.kernel_choices()
    assert again.source == "cache" and again.skinny_fp32_linear == first.skinny_fp32_linear
    monkeypatch.setenv("STAGE_STACK_KERNELS", "flags")
    assert machine.kernel_choices().source == "flags"
    report = machine.runtime_report(10)
    assert {"cpu", "amx_bf16", "avx512_bf16", "torch_cpu_capability", "chosen_threads", "kernels"} <= set(report)
    machine._kernel_choices.cache_clear()
