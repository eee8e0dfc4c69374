/* Kernels for one decoding step on the CPU, loaded through ctypes by stage_stack/native/__init__.py.
 *
 * Why they exist (benchmarks/README.md, "Native decode kernels"): a decode step multiplies 2 rows
 * (the CFG halves) by every weight matrix, so it is bound by reading the weights. On an AMD EPYC
 * without AMX, torch's bf16 F.linear streams them at ~10 GB/s on one core, where a plain read in C
 * runs at ~21 GB/s; and one query's attention over an int8 KV cache converted the whole cache to
 * float32 every step before two batched products. Both are a single pass over memory here, and
 * the small ops around them (the cache's quantized store, the row scaling around fbgemm's int8
 * product, GELU) are one call each instead of several torch ops. The int8 product with 8-bit
 * activations reads a plain int8 matrix, so a block's two halves (LayerNorm, products, attention,
 * residual) can each be one call too (stage_attention_half, stage_ffn_half; "Native int8
 * products and fused decode blocks" in benchmarks/README.md): the Python and torch ops around
 * the kernels were a sixth of a MusicGen-small step and most of a demo expert's.
 *
 * Built by the loader with the system C compiler (-O3 -fopenmp), once per machine, and chosen per
 * machine by a probe (stage_stack.machine). No torch headers: tensors arrive as pointers and
 * strides. OpenMP threads come from the libgomp that torch has already loaded (same soname), so
 * they are torch's own pool and `threads` is torch.get_num_threads().
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(STAGE_PORTABLE_ONLY)  /* the second: to check the stubs build */
#include <immintrin.h>
#define STAGE_X86 1
#else
#define STAGE_X86 0
#endif

int stage_abi_version(void) { return 2; }

/* What this CPU can run (checked at run time: the library is built for any x86-64 and each kernel
 * carries its own target attributes). AVX512F + BW: the int8-cache attention, GELU, the int8
 * quantizing helpers; with BF16: stage_linear_bf16; with VNNI: stage_linear_int8. */
#if STAGE_X86
int stage_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
int stage_has_linear_bf16(void) { return stage_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
int stage_has_int8_vnni(void) { return stage_has_avx512() && __builtin_cpu_supports("avx512vnni"); }
#else
int stage_has_avx512(void) { return 0; }
int stage_has_linear_bf16(void) { return 0; }
int stage_has_int8_vnni(void) { return 0; }
#endif

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

/* -- a decode step's block in two calls (models.fused_step) -------------------------------------
 * The descriptors below are filled once per model (weights, cache buffers) and once per step
 * (slots, masks) by models/fused_step.py; the layouts are mirrored there as ctypes Structures. */
typedef struct {
    const void *w;          /* bf16 [n][k], or int8 [n][k] when int8 */
    const int32_t *sums;    /* int8: sum_k w[n][k] */
    const float *scales;    /* int8: float32 per output channel */
    int64_t n, k;
    int64_t int8;
    int64_t levels;         /* int8: 8-bit levels per activation row (stage_linear_int8) */
} StageMatrix;

typedef struct {
    const uint16_t *norm_weight, *norm_bias;  /* bf16 LayerNorm before the half */
    double eps;
    StageMatrix first, second;                /* attention: qkv, out; feed-forward: fc1, fc2 */
} StageHalf;

typedef struct {            /* one layer's buffers of one KV-cache row group */
    int8_t *keys, *values;
    float *key_scales, *value_scales;
    int64_t steps;
} StageCacheGroup;

typedef struct {            /* one step's view of one row group, the same in every layer */
    int64_t start, stop;    /* its rows */
    int64_t skip;           /* 1: nothing kept or read for this step (its rows' attention is 0) */
    int64_t slot, T;        /* where the step's keys go; how many slots attention reads */
    const uint8_t *hidden;  /* [rows][T] with rows hidden_rs apart: 1 hides a key */
    int64_t hidden_rs;
} StageStepGroup;

/* sums[n] = sum_k w[n][k] of an int8 matrix [N][K] (stage_linear_int8's correction): in torch,
 * a sum to int32 made an int32 copy of each matrix, and the freed copies stayed resident. */
void stage_int8_row_sums(const int8_t *w, int64_t N, int64_t K, int32_t *sums) {
    for (int64_t n = 0; n < N; n++) {
        int32_t total = 0;
        for (int64_t k = 0; k < K; k++) total += w[n * K + k];
        sums[n] = total;
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


/* -- int8 products (models.quant.Int8Linear, kernel "native") ---------------------------------
 * y[m][n] = xs[m] * ws[n] * sum_k (xq[m][k] - xz[m]) * w[n][k], with w int8 [N][K] (one scale
 * ws[n] per output channel, as Int8Linear quantizes it) and each row of x quantized to 8 bits
 * with its own scale and zero point over [min(x, 0), max(x, 0)], as fbgemm's dynamic product
 * quantizes (once per call there, once per row here): xs = (max - min) / 255, xq in [0, 255].
 * Asymmetric, not +-127: the input of fc2 is a GELU's output, nearly all >= -0.17, and a
 * symmetric range spent half its levels on values that do not occur (top-1 agreement with fp32
 * 0.948 against 0.964 for fbgemm's; benchmarks/README.md, "Native int8 products and fused decode
 * blocks").
 * vpdpbusd multiplies unsigned by signed bytes, and the zero point comes back out through
 * xz[m] * wsum[n], wsum[n] = sum_k w[n][k] computed once per matrix.
 * levels = 2 adds a second 8-bit level for what the first leaves, (x - x1) to +-127 with a scale
 * 254 times finer: ~15 bits, finer than the bf16 activations themselves. It doubles the integer
 * work per weight, which a big matrix streamed from memory cannot afford on one core (its decode
 * product fell from 17-20 to 10-13 GB/s) and a small one, whose step is bound by overhead, can:
 * the demo experts' top-1 agreement with fp32 fell from 0.94-0.98 to 0.93-0.97 with one level.
 * The levels are "virtual rows" (level l of row m is row 2 m + l), summed in the epilogue. */

/* The lanes of a block of 16 that hold one of the `left` values still to go (0..16 of them). */
static inline __mmask16 first_lanes(int64_t left) {
    return left <= 0 ? (__mmask16)0 : left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

/* 16 values of a float32 or bf16 row from `at` (masked to `mask`; the rest read as 0) */
__attribute__((target("avx512f,avx512bw")))
static inline __m512 load16(const void *x, int x_bf16, int64_t at, __mmask16 mask) {
    if (x_bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16((__mmask32)mask, (const uint16_t *)x + at))),
            16));
    return _mm512_maskz_loadu_ps(mask, (const float *)x + at);
}

/* x rows (float32 or bf16, `x_rs` apart) -> u8 rows [levels * M][Kp] (round(x / xs) + xz, halves to
 * even, clamped to [0, 255]; the padding past K is multiplied by masked-out weights), their scales
 * xs and zero points xz (fbgemm's choice: xz = round(-min / xs), clamped to [0, 255]); with two
 * levels, row 2 m + 1 holds x - xs (u - xz) at a scale xs / 254, zero point 128. */
__attribute__((target("avx512f,avx512bw")))
static void quantize_rows_u8(const void *x, int x_bf16, int64_t x_rs, int64_t M, int64_t K, int64_t Kp, int levels,
                             uint8_t *xq, float *xs, int32_t *xz) {
    const __m512 zero = _mm512_setzero_ps(), top = _mm512_set1_ps(255.0f);
    const __m512 lo2 = _mm512_set1_ps(-127.0f), hi2 = _mm512_set1_ps(127.0f), mid = _mm512_set1_ps(128.0f);
    for (int64_t m = 0; m < M; m++) {
        __m512 lo = zero, hi = zero;
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 v = load16(x, x_bf16, m * x_rs + k, first_lanes(K - k));  /* masked lanes read 0: inside the range */
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
        }
        const float x_lo = _mm512_reduce_min_ps(lo), x_hi = _mm512_reduce_max_ps(hi);
        const float s = fmaxf(x_hi - x_lo, 1e-12f) / 255.0f, s2 = s / 254.0f;
        const float z = fminf(fmaxf(nearbyintf(-x_lo / s), 0.0f), 255.0f);
        const int64_t row = levels * m;
        xs[row] = s;
        xz[row] = (int32_t)z;
        if (levels == 2) xs[row + 1] = s2, xz[row + 1] = 128;
        const __m512 inv = _mm512_set1_ps(1.0f / s), inv2 = _mm512_set1_ps(1.0f / s2), zv = _mm512_set1_ps(z);
        const __m512 sv = _mm512_set1_ps(s);
        uint8_t *o = xq + row * Kp;
        for (int64_t k = 0; k < Kp; k += 16) {
            const __m512 v = load16(x, x_bf16, m * x_rs + k, first_lanes(K - k));
            const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512 u = _mm512_min_ps(top, _mm512_max_ps(zero, _mm512_add_ps(q, zv)));
            _mm_storeu_si128((__m128i *)(o + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(u)));
            if (levels == 2) {
                const __m512 rest = _mm512_fnmadd_ps(_mm512_sub_ps(u, zv), sv, v);  /* x - s (u - z), one rounding */
                const __m512 q2 = _mm512_roundscale_ps(_mm512_min_ps(hi2, _mm512_max_ps(lo2, _mm512_mul_ps(rest, inv2))),
                                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                _mm_storeu_si128((__m128i *)(o + Kp + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_add_ps(q2, mid))));
            }
        }
    }
}

/* v[i] -> lane i of the result: the 16 horizontal sums in one vector (~3 instructions per sum
 * instead of ~8 for a reduction each). Per 128-bit lane: pairs, then quads, then across lanes. */
__attribute__((target("avx512f")))
static inline __m512i sum16_epi32(const __m512i v[16]) {
    __m512i two[8], four[4];
    for (int i = 0; i < 8; i++)  /* lane j: [a0+a2, b0+b2, a1+a3, b1+b3] */
        two[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                  _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* lane j: the sums over its 4 elements of v[4i..4i+3] */
        four[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(two[2 * i], two[2 * i + 1]),
                                   _mm512_unpackhi_epi64(two[2 * i], two[2 * i + 1]));
    const __m512i a = _mm512_add_epi32(_mm512_shuffle_i32x4(four[0], four[1], 0x88),
                                       _mm512_shuffle_i32x4(four[0], four[1], 0xdd));
    const __m512i b = _mm512_add_epi32(_mm512_shuffle_i32x4(four[2], four[3], 0x88),
                                       _mm512_shuffle_i32x4(four[2], four[3], 0xdd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xdd));
}

/* The 4 x R dot products of 4 weight rows from `w` (read one after another: one stream, as the
 * bf16 product found fastest) and R rows of xq, summed into lanes 4 m + j. R is a constant in
 * each copy, so the accumulators stay in registers. */
#define INT8_TILE(R)                                                                                     \
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline))                                  \
static inline __m512i int8_tile_##R(const int8_t *w, const uint8_t *xq, int64_t Kp, int64_t K, int64_t full, \
                                    __mmask64 tail) {                                                    \
    __m512i acc[16];                                                                                     \
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();                                        \
    for (int j = 0; j < 4; j++) {                                                                        \
        const int8_t *row = w + j * K;                                                                   \
        for (int64_t k = 0; k < full; k += 64) {                                                         \
            const __m512i wv = _mm512_loadu_si512(row + k);                                              \
            for (int m = 0; m < R; m++)                                                                  \
                acc[4 * m + j] = _mm512_dpbusd_epi32(acc[4 * m + j], _mm512_loadu_si512(xq + m * Kp + k), wv); \
        }                                                                                                \
        if (tail) {                                                                                      \
            const __m512i wv = _mm512_maskz_loadu_epi8(tail, row + full);                                \
            for (int m = 0; m < R; m++)                                                                  \
                acc[4 * m + j] = _mm512_dpbusd_epi32(acc[4 * m + j], _mm512_loadu_si512(xq + m * Kp + full), wv); \
        }                                                                                                \
    }                                                                                                    \
    return sum16_epi32(acc);                                                                             \
}
INT8_TILE(1)
INT8_TILE(2)
INT8_TILE(3)
INT8_TILE(4)

/* The same 4 x 4 sums for a prefill chunk's full blocks of 4 rows: the 4 weight rows are read
 * side by side so that each weight load feeds 4 dot products (they come from the cache, where
 * the one-stream order of int8_tile_R no longer matters). */
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline))
static inline __m512i int8_tile_4x4(const int8_t *w, const uint8_t *xq, int64_t Kp, int64_t K, int64_t full,
                                    __mmask64 tail) {
    __m512i acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
        __m512i wv[4];
        for (int j = 0; j < 4; j++)
            wv[j] = k < full ? _mm512_loadu_si512(w + j * K + k) : _mm512_maskz_loadu_epi8(tail, w + j * K + k);
        for (int m = 0; m < 4; m++) {
            const __m512i xv = _mm512_loadu_si512(xq + m * Kp + k);
            for (int j = 0; j < 4; j++) acc[4 * m + j] = _mm512_dpbusd_epi32(acc[4 * m + j], xv, wv[j]);
        }
    }
    return sum16_epi32(acc);
}

/* Lanes 4 (step r) + j of `v` to y[r][n0 + j] for r < rows, rounded to bf16 (nearest even, as
 * to_bf16) or as float32 (step 2: each row's sum sits in the first of its two levels' lanes). */
__attribute__((target("avx512f,avx512bw")))
static inline void store_tile(__m512 v, void *y, int y_bf16, int64_t y_rs, int64_t n0, int rows, int step) {
    if (y_bf16) {
        const __m512i u = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
        uint64_t packed[4];
        _mm256_storeu_si256((__m256i *)packed, _mm512_cvtepi32_epi16(rounded));
        for (int r = 0; r < rows; r++) memcpy((uint16_t *)y + r * y_rs + n0, &packed[step * r], 8);
    } else {
        float out[16];
        _mm512_storeu_ps(out, v);
        for (int r = 0; r < rows; r++) memcpy((float *)y + r * y_rs + n0, out + 4 * step * r, 16);
    }
}

/* The rows [0, V) of xq (V = levels x the real rows) against weight rows [0, N4) (a multiple of 4), in
 * tiles of 4 weight rows: a decode step's rows, or a prefill chunk's 4 rows of xq at a time (each
 * thread then keeps its 4 weight rows in cache for every block of rows: the matrix is read from
 * memory once). */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void linear_int8_tiles(const int8_t *w, const int32_t *wsum, const float *ws, const uint8_t *xq,
                              const float *xs, const int32_t *xz, int64_t Kp, void *y, int y_bf16, int64_t y_rs,
                              int64_t V, int levels, int64_t N4, int64_t K, int threads) {
    const int64_t full = K & ~(int64_t)63;
    const __mmask64 tail = (__mmask64)((K - full) ? ((1ull << (K - full)) - 1) : 0);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const size_t elem = y_bf16 ? 2 : 4;
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t n0 = 0; n0 < N4; n0 += 4) {
        const __m512i sums = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(wsum + n0)));
        const __m512 wscale = _mm512_broadcast_f32x4(_mm_loadu_ps(ws + n0));
        const int8_t *tile = w + n0 * K;
        for (int64_t v0 = 0; v0 < V; v0 += 4) {
            const int rows = V - v0 < 4 ? (int)(V - v0) : 4;  /* rows of xq in this block */
            const uint8_t *xr = xq + v0 * Kp;
            __m512i dots;
            if (V > 4 && rows == 4) dots = int8_tile_4x4(tile, xr, Kp, K, full, tail);
            else switch (rows) {
                case 1: dots = int8_tile_1(tile, xr, Kp, K, full, tail); break;
                case 2: dots = int8_tile_2(tile, xr, Kp, K, full, tail); break;
                case 3: dots = int8_tile_3(tile, xr, Kp, K, full, tail); break;
                default: dots = int8_tile_4(tile, xr, Kp, K, full, tail); break;
            }
            float scale4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            int32_t zero4[4] = {0, 0, 0, 0};
            for (int m = 0; m < rows; m++) scale4[m] = xs[v0 + m], zero4[m] = xz[v0 + m];
            const __m512 xscale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(scale4)));
            const __m512i bias = _mm512_mullo_epi32(sums, _mm512_permutexvar_epi32(
                spread, _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)zero4))));
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dots, bias)), wscale), xscale);
            if (levels == 2)  /* each row's two levels: lanes 0-3 += 4-7, 8-11 += 12-15 */
                v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xb1));
            store_tile(v, (char *)y + (size_t)(v0 / levels * y_rs) * elem, y_bf16, y_rs, n0, rows / levels, levels);
        }
    }
}

/* The weight rows [N4, N) past the last whole tile (at most 3), in plain C: the same integer sums
 * and the same float operations, in the same order, as the tiles. */
static void linear_int8_rest(const int8_t *w, const int32_t *wsum, const float *ws, const uint8_t *xq, const float *xs,
                             const int32_t *xz, int64_t Kp, void *y, int y_bf16, int64_t y_rs, int64_t M, int levels,
                             int64_t N4, int64_t N, int64_t K) {
    for (int64_t n = N4; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            float v = 0.0f;
            for (int l = 0; l < levels; l++) {
                const int64_t row = levels * m + l;
                int32_t dot = 0;
                for (int64_t k = 0; k < K; k++) dot += (int32_t)xq[row * Kp + k] * w[n * K + k];
                v += (float)(dot - xz[row] * wsum[n]) * ws[n] * xs[row];
            }
            if (y_bf16) ((uint16_t *)y)[m * y_rs + n] = to_bf16(v);
            else ((float *)y)[m * y_rs + n] = v;
        }
}

/* Quantize one step's keys or values into slot `at` of an int8 cache, as stage_lm.quantize_kv
 * does: scale = max(max |x|, 1e-12) / 127 per row and head, q = round-half-even(x / scale)
 * clamped to +-127 (the same float division, so the same bytes). src element (r, h, d) at
 * r * src_rs + h * D + d; the cache is laid out as in attend_int8; D a multiple of 16. */
__attribute__((target("avx512f,avx512bw")))
static void store_int8(const void *src, int src_bf16, int64_t src_rs, int8_t *dst, float *scale, int64_t kv_rs,
                       int64_t kv_hs, int64_t sc_rs, int64_t sc_hs, int64_t at, int64_t R, int64_t H, int64_t D) {
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (int64_t r = 0; r < R; r++) {
        for (int64_t h = 0; h < H; h++) {
            __m512 x[16], top = _mm512_setzero_ps();
            for (int64_t c = 0; c < D / 16; c++) {
                x[c] = load16(src, src_bf16, r * src_rs + h * D + 16 * c, (__mmask16)0xffff);
                top = _mm512_max_ps(top, _mm512_abs_ps(x[c]));
            }
            const float s = fmaxf(_mm512_reduce_max_ps(top), 1e-12f) / 127.0f;
            const __m512 sv = _mm512_set1_ps(s);
            int8_t *o = dst + r * kv_rs + h * kv_hs + at * D;
            for (int64_t c = 0; c < D / 16; c++) {
                const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(x[c], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                _mm_storeu_si128((__m128i *)(o + 16 * c), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, q)))));
            }
            scale[r * sc_rs + h * sc_hs + at] = s;
        }
    }
}

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
                    const __mmask16 m = first_lanes(T - t);
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

/* y [M][N] = x [M][K] @ (w * ws)^T for any M (a decode step's rows, or a prefill chunk) with each row
 * of x in `levels` (1 or 2) 8-bit levels; x and y float32 or bf16, rows x_rs / N apart. Returns 0,
 * or -1 when out of memory or for another number of levels. */
int stage_linear_int8(const int8_t *w, const int32_t *wsum, const float *ws, const void *x, int x_bf16, int64_t x_rs,
                      void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int levels, int threads) {
    if (levels != 1 && levels != 2) return -1;
    const int64_t Kp = (K + 63) & ~(int64_t)63, N4 = N & ~(int64_t)3, V = levels * M;
    uint8_t *xq = (uint8_t *)malloc((size_t)(V * Kp) + 64);
    float *xs = (float *)malloc(sizeof(float) * (size_t)V);
    int32_t *xz = (int32_t *)malloc(sizeof(int32_t) * (size_t)V);
    if (!xq || !xs || !xz) { free(xq); free(xs); free(xz); return -1; }
    quantize_rows_u8(x, x_bf16, x_rs, M, K, Kp, levels, xq, xs, xz);
    linear_int8_tiles(w, wsum, ws, xq, xs, xz, Kp, y, y_bf16, N, V, levels, N4, K, threads);
    linear_int8_rest(w, wsum, ws, xq, xs, xz, Kp, y, y_bf16, N, M, levels, N4, N, K);
    free(xq);
    free(xs);
    free(xz);
    return 0;
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

/* LayerNorm of bf16 rows in float32 (mean, then the mean square of the deviations), rounded to
 * bf16 as torch's bf16 layer_norm rounds its float result. */
static void layer_norm_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *b, double eps, uint16_t *y,
                            int64_t R, int64_t D) {
    for (int64_t r = 0; r < R; r++) {
        const uint16_t *xr = x + r * D;
        float sum = 0.0f, sq = 0.0f;
        for (int64_t d = 0; d < D; d++) sum += bf16_to_float(xr[d]);
        const float mean = sum / (float)D;
        for (int64_t d = 0; d < D; d++) {
            const float c = bf16_to_float(xr[d]) - mean;
            sq += c * c;
        }
        const float rstd = 1.0f / sqrtf(sq / (float)D + (float)eps);
        for (int64_t d = 0; d < D; d++)
            y[r * D + d] = to_bf16((bf16_to_float(xr[d]) - mean) * rstd * bf16_to_float(w[d]) + bf16_to_float(b[d]));
    }
}

static int product(const StageMatrix *m, const uint16_t *x, uint16_t *y, int64_t R, int threads) {
    if (m->int8)
        return stage_linear_int8((const int8_t *)m->w, m->sums, m->scales, x, 1, m->k, y, 1, R, m->n, m->k,
                                 (int)m->levels, threads);
    return stage_linear_bf16((const uint16_t *)m->w, x, y, R, m->n, m->k, threads);
}

/* x [R][D] (bf16, in place) += (self-attention of LayerNorm(x) over the int8 cache) * valid[r],
 * as stage_lm.Block does for one decode step: LayerNorm, the qkv product, each row group's
 * store + attention (stage_attend_step), the out product, the query mask and the residual, each
 * result rounded to bf16 where torch's bf16 ops round it. Returns 0, or -1 (R > 4, no memory). */
int stage_attention_half(uint16_t *x, int64_t R, int64_t D, int64_t H, const StageHalf *half,
                         const StageCacheGroup *cache, const StageStepGroup *step, int64_t G, const float *valid,
                         int threads) {
    if (R < 1 || R > 4) return -1;
    uint16_t *ln = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(R * D * 6));
    if (!ln) return -1;
    uint16_t *qkv = ln + R * D, *att = qkv + 3 * R * D, *y = att + R * D;
    int rc = 0;
    layer_norm_bf16(x, half->norm_weight, half->norm_bias, half->eps, ln, R, D);
    rc |= product(&half->first, ln, qkv, R, threads);
    for (int64_t g = 0; g < G; g++) {
        const StageStepGroup *s = step + g;
        const StageCacheGroup *c = cache + g;
        if (s->skip) {
            memset(att + s->start * D, 0, sizeof(uint16_t) * (size_t)((s->stop - s->start) * D));
            continue;
        }
        stage_attend_step(qkv + s->start * 3 * D, 1, 3 * D, c->keys, c->values, c->key_scales, c->value_scales,
                          c->steps, s->slot, s->T, s->hidden, s->hidden_rs, att + s->start * D, D, s->stop - s->start,
                          H, D / H, threads);
    }
    rc |= product(&half->second, att, y, R, threads);
    for (int64_t r = 0; r < R; r++)
        for (int64_t d = 0; d < D; d++)
            x[r * D + d] = to_bf16(bf16_to_float(x[r * D + d]) + bf16_to_float(to_bf16(bf16_to_float(y[r * D + d]) * valid[r])));
    free(ln);
    return rc ? -1 : 0;
}

/* x [R][D] (bf16, in place) += fc2(GELU(fc1(LayerNorm(x)))), as stage_lm.Block's feed-forward half. */
int stage_ffn_half(uint16_t *x, int64_t R, int64_t D, const StageHalf *half, int threads) {
    if (R < 1 || R > 4) return -1;
    const int64_t F = half->first.n;
    uint16_t *ln = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(R * (2 * D + F)));
    if (!ln) return -1;
    uint16_t *h = ln + R * D, *y = h + R * F;
    int rc = 0;
    layer_norm_bf16(x, half->norm_weight, half->norm_bias, half->eps, ln, R, D);
    rc |= product(&half->first, ln, h, R, threads);
    stage_gelu_bf16(h, R * F);
    rc |= product(&half->second, h, y, R, threads);
    for (int64_t i = 0; i < R * D; i++) x[i] = to_bf16(bf16_to_float(x[i]) + bf16_to_float(y[i]));
    free(ln);
    return rc ? -1 : 0;
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

int stage_linear_int8(const int8_t *w, const int32_t *wsum, const float *ws, const void *x, int x_bf16, int64_t x_rs,
                      void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int levels, int threads) {
    (void)w; (void)wsum; (void)ws; (void)x; (void)x_bf16; (void)x_rs; (void)y; (void)y_bf16; (void)M; (void)N;
    (void)K; (void)levels; (void)threads;
    return -1;
}


void stage_attend_step(const void *qkv, int bf16, int64_t qkv_rs, int8_t *kc, int8_t *vc, float *ksc, float *vsc,
                       int64_t steps, int64_t slot, int64_t T, const uint8_t *hidden, int64_t hidden_rs, void *out,
                       int64_t out_rs, int64_t R, int64_t H, int64_t D, int threads) {
    (void)qkv; (void)bf16; (void)qkv_rs; (void)kc; (void)vc; (void)ksc; (void)vsc; (void)steps; (void)slot; (void)T;
    (void)hidden; (void)hidden_rs; (void)out; (void)out_rs; (void)R; (void)H; (void)D; (void)threads;
}

int stage_attention_half(uint16_t *x, int64_t R, int64_t D, int64_t H, const StageHalf *half,
                         const StageCacheGroup *cache, const StageStepGroup *step, int64_t G, const float *valid,
                         int threads) {
    (void)x; (void)R; (void)D; (void)H; (void)half; (void)cache; (void)step; (void)G; (void)valid; (void)threads;
    return -1;
}

int stage_ffn_half(uint16_t *x, int64_t R, int64_t D, const StageHalf *half, int threads) {
    (void)x; (void)R; (void)D; (void)half; (void)threads;
    return -1;
}

#endif
