/* Kernels for one decoding step on the CPU, loaded through ctypes by stage_stack/native/__init__.py.
 *
 * Why they exist (benchmarks/README.md, "Native decode kernels"): a decode step multiplies 2 rows
 * (the CFG halves) by every weight matrix, so it is bound by reading the weights. On an AMD EPYC
 * without AMX, torch's bf16 F.linear streams them at ~10 GB/s on one core, where a plain read in C
 * runs at ~21 GB/s; and one query's attention over an int8 KV cache converted the whole cache to
 * float32 every step before two batched products. Both are a single pass over memory here, and
 * the small ops around them (the cache's quantized store, the row scaling around fbgemm's int8
 * product, GELU) are one call each instead of several torch ops.
 *
 * Built by the loader with the system C compiler (-O3 -fopenmp), once per machine, and chosen per
 * machine by a probe (stage_stack.machine). No torch headers: tensors arrive as pointers and
 * strides. OpenMP threads come from the libgomp that torch has already loaded (same soname), so
 * they are torch's own pool and `threads` is torch.get_num_threads().
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(STAGE_PORTABLE_ONLY)  /* the second: to check the stubs build */
#include <immintrin.h>
#define STAGE_X86 1
#else
#define STAGE_X86 0
#endif

int stage_abi_version(void) { return 1; }

/* 1 when this CPU can run stage_linear_bf16 / stage_attend_int8 (checked at run time: the
 * library is built for any x86-64 and each kernel carries its own target attributes). */
int stage_has_linear_bf16(void) {
#if STAGE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

int stage_has_avx512(void) {
#if STAGE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
    return 0;
#endif
}

/* -- portable helpers ------------------------------------------------------------------------- */

/* float -> bf16, round to nearest even (what torch's .to(torch.bfloat16) does); NaN stays NaN */
static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float bf16_to_float(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

static inline float load_any(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Quantize one step's keys or values into slot `at` of an int8 cache, as stage_lm.quantize_kv
 * does: scale = max(max |x|, 1e-12) / 127 per row and head, q = round-half-even(x / scale)
 * clamped to +-127. src element (r, h, d) at r * src_rs + h * D + d; the cache is laid out as in
 * attend_int8. */
static void store_int8(const void *src, int src_bf16, int64_t src_rs, int8_t *dst, float *scale, int64_t kv_rs,
                       int64_t kv_hs, int64_t sc_rs, int64_t sc_hs, int64_t at, int64_t R, int64_t H, int64_t D) {
    for (int64_t r = 0; r < R; r++) {
        for (int64_t h = 0; h < H; h++) {
            float x[256], top = 0.0f;
            for (int64_t d = 0; d < D; d++) {
                x[d] = load_any(src, src_bf16, r * src_rs + h * D + d);
                top = fmaxf(top, fabsf(x[d]));
            }
            const float s = fmaxf(top, 1e-12f) / 127.0f;
            int8_t *o = dst + r * kv_rs + h * kv_hs + at * D;
            for (int64_t d = 0; d < D; d++) {
                const float q = nearbyintf(x[d] / s);
                o[d] = (int8_t)(q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q));
            }
            scale[r * sc_rs + h * sc_hs + at] = s;
        }
    }
}

/* The two ends of an int8 product on fbgemm's kernel (models.quant.Int8Linear), which quantizes
 * its float32 input with one scale per call: each row is first divided by its peak |x| (so the
 * scale is in effect one per row) and the product multiplied back. In torch that is ~8 small ops
 * per product, ~800 per decode step at MusicGen-small size; here two calls.
 * stage_rows_to_unit: out[m][k] = x[m][k] / peak[m], peak[m] = max(max_k |x[m][k]|, 1e-12);
 *   x float32 or bf16 (x_bf16), rows `x_rs` apart; out float32 [M][K].
 * stage_rows_scale: out[m][n] = y[m][n] * peak[m]; y float32 [M][N]; out float32 or bf16 [M][N]. */
void stage_rows_to_unit(const void *x, int x_bf16, int64_t x_rs, int64_t M, int64_t K, float *out, float *peak) {
    for (int64_t m = 0; m < M; m++) {
        float top = 0.0f;
        for (int64_t k = 0; k < K; k++) top = fmaxf(top, fabsf(load_any(x, x_bf16, m * x_rs + k)));
        top = fmaxf(top, 1e-12f);
        peak[m] = top;
        for (int64_t k = 0; k < K; k++) out[m * K + k] = load_any(x, x_bf16, m * x_rs + k) / top;
    }
}

void stage_rows_scale(const float *y, const float *peak, int64_t M, int64_t N, void *out, int out_bf16) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            const float v = y[m * N + n] * peak[m];
            if (out_bf16) ((uint16_t *)out)[m * N + n] = to_bf16(v);
            else ((float *)out)[m * N + n] = v;
        }
}

/* -- x86-64 kernels ----------------------------------------------------------------------------- */

#if STAGE_X86

/* y[m][n] = sum_k x[m][k] * w[n][k] for M rows (1..4): one sequential pass over w's rows.
 * Reading row after row (one stream) beat interleaving 2-8 rows on an AMD EPYC (21.8 against
 * 12-14 GB/s on one core, benchmarks/README.md): its prefetchers follow one stream best. */
#define LINEAR_BF16(M)                                                                                   \
__attribute__((target("avx512f,avx512bw,avx512bf16")))                                                  \
static void linear_bf16_##M(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t N, int64_t K,     \
                            int threads) {                                                               \
    const int64_t full = K & ~(int64_t)31;                                                               \
    const __mmask32 tail = (__mmask32)((1ull << (K - full)) - 1);                                        \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                    \
    for (int64_t n = 0; n < N; n++) {                                                                    \
        const uint16_t *row = w + n * K;                                                                 \
        __m512 acc[M];                                                                                   \
        for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();                                        \
        for (int64_t k = 0; k < full; k += 32) {                                                         \
            __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k);                                         \
            for (int m = 0; m < M; m++)                                                                  \
                acc[m] = _mm512_dpbf16_ps(acc[m], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k));      \
        }                                                                                                \
        if (tail) {                                                                                      \
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, row + full);                          \
            for (int m = 0; m < M; m++)                                                                  \
                acc[m] = _mm512_dpbf16_ps(acc[m], wv,                                                    \
                                          (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + full));   \
        }                                                                                                \
        for (int m = 0; m < M; m++) y[m * N + n] = to_bf16(_mm512_reduce_add_ps(acc[m]));                \
    }                                                                                                    \
}
LINEAR_BF16(1)
LINEAR_BF16(2)
LINEAR_BF16(3)
LINEAR_BF16(4)

/* exp(x) for x <= 0 (scores minus their max): 2^n * p(r), r = x - n ln 2, |r| <= ln2 / 2,
 * a degree-6 Taylor polynomial (relative error < 2e-7); below -87 it is 0. */
__attribute__((target("avx512f")))
static inline __m512 exp_le0(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(~under, _mm512_scalef_ps(p, n));
}

/* GELU, exact form 0.5 x (1 + erf(x / sqrt 2)) as F.gelu computes it, with erf from Abramowitz
 * and Stegun 7.1.26 (absolute error < 1.5e-7, far below bf16's resolution), 16 at a time. */
__attribute__((target("avx512f")))
static inline __m512 gelu16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    const __m512 a = _mm512_abs_ps(z);
    const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
    __m512 poly = _mm512_set1_ps(1.061405429f);
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
    poly = _mm512_mul_ps(poly, t);
    const __m512 erf_abs = _mm512_fnmadd_ps(poly, exp_le0(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a))), one);
    const __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 erf = _mm512_mask_sub_ps(erf_abs, negative, _mm512_setzero_ps(), erf_abs);
    /* 1 + erf(z) in float32 as torch forms it: in the far negative tail both are 0 or float32 noise */
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(one, erf));
}

/* gelu in place over n bf16 values (a decode step's fc1 output): what F.gelu does to a bf16
 * tensor (float math, rounded back to nearest even), in one call instead of a torch op that
 * costs ~50 us after each weight stream has evicted its code and tables. */
__attribute__((target("avx512f,avx512bw")))
void stage_gelu_bf16(uint16_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(y + i))), 16));
        float out[16];
        _mm512_storeu_ps(out, gelu16(x));
        for (int j = 0; j < 16; j++) y[i + j] = to_bf16(out[j]);
    }
    if (i < n) {
        float in[16] = {0}, out[16];
        for (int64_t j = 0; j < n - i; j++) in[j] = bf16_to_float(y[i + j]);
        _mm512_storeu_ps(out, gelu16(_mm512_loadu_ps(in)));
        for (int64_t j = 0; j < n - i; j++) y[i + j] = to_bf16(out[j]);
    }
}

/* One query per (row, head) over an int8 cache: softmax(q . (k * ks) / sqrt(D)) . (v * vs).
 *   q      float32 or bf16 (q_bf16), element (r, h, d) at r * q_rs + h * D + d
 *   k, v   int8, element (r, h, t, d) at r * kv_rs + h * kv_hs + t * D + d
 *   ks, vs float32 scales, element (r, h, t) at r * sc_rs + h * sc_hs + t
 *   hidden uint8, element (r, t) at r * hidden_rs + t: 1 hides key t from row r
 *   out    float32 or bf16 (out_bf16), element (r, h, d) at r * out_rs + h * D + d; a row with
 *          every key hidden gets 0 (stage_lm._attend's convention)
 * D a multiple of 16, at most 256. Scores and probabilities in float32, as
 * stage_lm.matmul_attention computes them. */
__attribute__((target("avx512f,avx512bw")))
static void attend_int8(const void *q, int q_bf16, int64_t q_rs, const int8_t *k, const int8_t *v, const float *ks,
                        const float *vs, int64_t kv_rs, int64_t kv_hs, int64_t sc_rs, int64_t sc_hs,
                        const uint8_t *hidden, int64_t hidden_rs, void *out, int out_bf16, int64_t out_rs, int64_t R,
                        int64_t H, int64_t T, int64_t D, int threads) {
    const int64_t chunks = D / 16;
    const float scale = 1.0f / sqrtf((float)D);
    _Pragma("omp parallel num_threads(threads)")
    {
        float *p = (float *)malloc(sizeof(float) * (size_t)(T + 16));
        _Pragma("omp for schedule(static)")
        for (int64_t rh = 0; rh < R * H; rh++) {
            const int64_t r = rh / H, h = rh % H;
            const int8_t *kr = k + r * kv_rs + h * kv_hs, *vr = v + r * kv_rs + h * kv_hs;
            const float *ksr = ks + r * sc_rs + h * sc_hs, *vsr = vs + r * sc_rs + h * sc_hs;
            const uint8_t *hide = hidden + r * hidden_rs;
            float qs[256], o[256];
            for (int64_t d = 0; d < D; d++) qs[d] = load_any(q, q_bf16, r * q_rs + h * D + d) * scale;
            __m512 qv[16];
            for (int64_t c = 0; c < chunks; c++) qv[c] = _mm512_loadu_ps(qs + 16 * c);
            float top = -INFINITY;
            for (int64_t t = 0; t < T; t++) {
                if (hide[t]) { p[t] = -INFINITY; continue; }
                const int8_t *kt = kr + t * D;
                __m512 acc = _mm512_setzero_ps();
                for (int64_t c = 0; c < chunks; c++) {
                    __m512 kf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(kt + 16 * c))));
                    acc = _mm512_fmadd_ps(kf, qv[c], acc);
                }
                float s = _mm512_reduce_add_ps(acc) * ksr[t];
                p[t] = s;
                if (s > top) top = s;
            }
            if (top == -INFINITY) {
                for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            } else {
                __m512 sum = _mm512_setzero_ps();
                const __m512 topv = _mm512_set1_ps(top);
                int64_t t = 0;
                for (; t + 16 <= T; t += 16) {
                    __m512 e = exp_le0(_mm512_sub_ps(_mm512_loadu_ps(p + t), topv));
                    _mm512_storeu_ps(p + t, e);
                    sum = _mm512_add_ps(sum, e);
                }
                if (t < T) {
                    __mmask16 m = (__mmask16)((1u << (T - t)) - 1);
                    __m512 e = _mm512_maskz_mov_ps(m, exp_le0(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + t), topv)));
                    _mm512_mask_storeu_ps(p + t, m, e);
                    sum = _mm512_add_ps(sum, e);
                }
                const float inv = 1.0f / _mm512_reduce_add_ps(sum);
                __m512 acc[16];
                for (int64_t c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
                for (t = 0; t < T; t++) {
                    if (p[t] == 0.0f) continue;  /* hidden keys, and ones too far below the max */
                    const __m512 w = _mm512_set1_ps(p[t] * inv * vsr[t]);
                    const int8_t *vt = vr + t * D;
                    for (int64_t c = 0; c < chunks; c++) {
                        __m512 vf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(vt + 16 * c))));
                        acc[c] = _mm512_fmadd_ps(vf, w, acc[c]);
                    }
                }
                for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(o + 16 * c, acc[c]);
            }
            for (int64_t d = 0; d < D; d++) {
                if (out_bf16) ((uint16_t *)out)[r * out_rs + h * D + d] = to_bf16(o[d]);
                else ((float *)out)[r * out_rs + h * D + d] = o[d];
            }
        }
        free(p);
    }
}

/* The standalone attention (stage_stack.native.attend_int8): q and out float32 [R][H][D]. */
void stage_attend_int8(const float *q, const int8_t *k, const int8_t *v, const float *ks, const float *vs,
                       const uint8_t *hidden, float *out, int64_t R, int64_t H, int64_t T, int64_t D,
                       int64_t kv_rs, int64_t kv_hs, int64_t sc_rs, int64_t sc_hs, int threads) {
    attend_int8(q, 0, H * D, k, v, ks, vs, kv_rs, kv_hs, sc_rs, sc_hs, hidden, T, out, 0, H * D, R, H, T, D, threads);
}

/* One decode step's self-attention for the rows of one KV-cache row group, between the qkv
 * product and the output product: store the step's keys and values at `slot` (skipped when
 * slot < 0), then attend over the group's first T slots.
 *   qkv    float32 or bf16 [R][3 * H * D] with row stride qkv_rs: q, k, v one after the other
 *   cache  the group's buffers: int8 [R][H][steps][D], float32 scales [R][H][steps]
 *   out    float32 or bf16 (same dtype as qkv) [R][H * D] with row stride out_rs */
void stage_attend_step(const void *qkv, int bf16, int64_t qkv_rs, int8_t *kc, int8_t *vc, float *ksc, float *vsc,
                       int64_t steps, int64_t slot, int64_t T, const uint8_t *hidden, int64_t hidden_rs, void *out,
                       int64_t out_rs, int64_t R, int64_t H, int64_t D, int threads) {
    const int64_t width = H * D, kv_rs = H * steps * D, kv_hs = steps * D, sc_rs = H * steps, sc_hs = steps;
    const size_t elem = bf16 ? 2 : 4;
    if (slot >= 0) {
        store_int8((const char *)qkv + width * elem, bf16, qkv_rs, kc, ksc, kv_rs, kv_hs, sc_rs, sc_hs, slot, R, H, D);
        store_int8((const char *)qkv + 2 * width * elem, bf16, qkv_rs, vc, vsc, kv_rs, kv_hs, sc_rs, sc_hs, slot, R, H,
                   D);
    }
    attend_int8(qkv, bf16, qkv_rs, kc, vc, ksc, vsc, kv_rs, kv_hs, sc_rs, sc_hs, hidden, hidden_rs, out, bf16, out_rs,
                R, H, T, D, threads);
}

/* Returns 0 on success, -1 for a row count this kernel does not take. */
int stage_linear_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K,
                      int threads) {
    switch (M) {
        case 1: linear_bf16_1(w, x, y, N, K, threads); return 0;
        case 2: linear_bf16_2(w, x, y, N, K, threads); return 0;
        case 3: linear_bf16_3(w, x, y, N, K, threads); return 0;
        case 4: linear_bf16_4(w, x, y, N, K, threads); return 0;
        default: return -1;
    }
}

#else  /* not x86-64: the loader sees stage_has_* return 0 and keeps torch's kernels */

int stage_linear_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K,
                      int threads) {
    (void)w; (void)x; (void)y; (void)M; (void)N; (void)K; (void)threads;
    return -1;
}

void stage_attend_int8(const float *q, const int8_t *k, const int8_t *v, const float *ks, const float *vs,
                       const uint8_t *hidden, float *out, int64_t R, int64_t H, int64_t T, int64_t D,
                       int64_t kv_rs, int64_t kv_hs, int64_t sc_rs, int64_t sc_hs, int threads) {
    (void)q; (void)k; (void)v; (void)ks; (void)vs; (void)hidden; (void)out; (void)R; (void)H; (void)T;
    (void)D; (void)kv_rs; (void)kv_hs; (void)sc_rs; (void)sc_hs; (void)threads;
}

void stage_gelu_bf16(uint16_t *y, int64_t n) { (void)y; (void)n; }

void stage_attend_step(const void *qkv, int bf16, int64_t qkv_rs, int8_t *kc, int8_t *vc, float *ksc, float *vsc,
                       int64_t steps, int64_t slot, int64_t T, const uint8_t *hidden, int64_t hidden_rs, void *out,
                       int64_t out_rs, int64_t R, int64_t H, int64_t D, int threads) {
    (void)qkv; (void)bf16; (void)qkv_rs; (void)kc; (void)vc; (void)ksc; (void)vsc; (void)steps; (void)slot; (void)T;
    (void)hidden; (void)hidden_rs; (void)out; (void)out_rs; (void)R; (void)H; (void)D; (void)threads;
}

#endif
