/* Packed ternary x int8 matmul kernels with a plain C ABI (loaded from Python with ctypes).
 *
 * Packed layout (see tritium/kernels/reference.py): row-major (N, ceil(K/4)) bytes; weight k of a row
 * sits in byte k/4 at bits 2*(k%4), coded w + 1 (0 -> -1, 1 -> 0, 2 -> +1; padding is coded 1).
 *
 * y[m, n] = float(acc[m, n]) * (sx[m] * sw[n]) + bias[n], acc = sum_k x[m, k] * w[n, k] exactly in int32.
 * Build with -ffp-contract=off so that the rescale is never fused: all backends agree bit for bit.
 *
 * The SIMD backends (x86 and NEON) work on the unsigned codes u = w + 1 in {0, 1, 2}: sum_k u*x = acc + sum_k x, so the
 * activation row sum is subtracted at the end. Activations are permuted once per call so that the four
 * 2-bit fields of 64 consecutive packed bytes line up with four contiguous 64-byte activation vectors:
 * within each block of 256 k, xp[i*64 + j] = x[4*j + i].
 *
 * The AMX backend decodes a panel of 16 weight rows once into the tile layout B[p][16 rows][4 codes]
 * (p = packed byte index) and reuses it for up to 512 activation rows (TDPBSUD: signed x unsigned).
 *
 * The activation quantizer (tk_quantize_rows, and fused with the matmul in tk_ternary_linear) reproduces
 * tritium.quant.quantize_act(x, 8) bit for bit on float32 rows, as the same four IEEE float32 operations:
 * a = max(absmax(x), 1e-5f), inv = 127.0f / a (true division), q = round_half_even(x * inv) (a separate
 * multiply, then round to nearest even), s = a / 127.0f (true division). No backend uses a reciprocal
 * estimate or a fused multiply-add here (-ffp-contract=off, no -ffast-math). A row whose absmax is not
 * finite (NaN or inf) gets s = NaN or inf and q = 0 (the token's output is NaN either way).
 */
#define _GNU_SOURCE /* dladdr */
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

#define API __attribute__((visibility("default")))
#define AI static inline __attribute__((always_inline))

enum { BACKEND_GENERIC = 0, BACKEND_AVX2 = 1, BACKEND_AVX512 = 2, BACKEND_AMX = 3, BACKEND_NEON = 4 };

/* ------------------------------------------------------------------------------------------------ */
/* Threads: OpenMP. The library links libgomp.so.1, the soname of the libgomp that torch's wheels ship, so  */
/* in a process that has imported torch the kernels run on torch's own OpenMP runtime and thread team:    */
/* no second pool competes with torch's threads for the cores between ops. Built without OpenMP, the     */
/* kernels run on the calling thread.                                                                   */

typedef void (*task_fn)(const void *ctx, int64_t task);

/* Run fn(ctx, t) for t in [0, ntasks) on up to nthreads threads (the caller included). */
static void parallel_for(task_fn fn, const void *ctx, int64_t ntasks, int nthreads) {
    if (nthreads > ntasks) nthreads = (int)ntasks;
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
#endif
    for (int64_t t = 0; t < ntasks; t++) fn(ctx, t);
}

/* Allocation inside a task; a failure sets the job's error flag (tasks cannot return errors). The test
 * hook tk_test_fail_task_allocs(n) makes the next n such allocations fail. */
static atomic_int fail_task_allocs;

static void *task_alloc(size_t size) {
    if (atomic_load_explicit(&fail_task_allocs, memory_order_relaxed) > 0 && atomic_fetch_sub(&fail_task_allocs, 1) > 0)
        return NULL;
    return aligned_alloc(64, (size + 63) / 64 * 64);
}

/* ------------------------------------------------------------------------------------------------ */
/* Job description and the shared epilogue.                                                        */

typedef struct {
    const int8_t *x;
    const uint8_t *w;
    const float *sx, *sw, *bias;
    float *y;
    int64_t M, N, K;
    int64_t kb;         /* packed bytes per weight row: ceil(K / 4) */
    int64_t kp;         /* K rounded up to 256 (AMX: 64): used row length of xp */
    int64_t xs;         /* row stride of xp (AMX: kp + 64, so that tile rows do not share cache sets) */
    int sw_per_channel; /* sw has N entries (else 1) */
    int8_t *xp;         /* permuted, zero-padded activations (SIMD backends and generic GEMV) */
    int32_t *xsum;      /* activation row sums */
    int64_t bm, bn;     /* task block sizes along M and N */
    int64_t tm;         /* number of task blocks along M */
    const float *xf;    /* fused quantization: float32 input (M, K), quantized into x and sxw; else NULL */
    int8_t *xq;         /* = x, writable (fused quantization) */
    float *sxw;         /* = sx, writable (fused quantization) */
    float (*quant)(const float *x, int8_t *q, int64_t K); /* row quantizer of the backend */
    atomic_int *failed; /* set by a task whose allocation failed */
} job_t;

/* ------------------------------------------------------------------------------------------------ */
/* Per-token int8 activation quantizer, bit-exact with tritium.quant.quantize_act(x, 8):             */
/* a = max(absmax, 1e-5f), inv = 127.0f / a, q = round_half_even(x * inv), s = a / 127.0f, each one    */
/* correctly rounded float32 operation (both quotients are true divisions, as in quant.py). absmax is   */
/* the max of the sign-cleared bit patterns: for finite values that orders like |x|, and NaN patterns  */
/* sort above inf. Every backend's row quantizer uses this function for a, inv and s.                 */

#define FINITE_LIMIT 0x7f800000u /* bits of +inf */

static float row_scale(uint32_t absbits, float *inv) {
    float a;
    if (absbits > FINITE_LIMIT) return *inv = NAN;
    memcpy(&a, &absbits, 4);
    a = a > 1e-5f ? a : 1e-5f;
    *inv = 127.0f / a; /* true division, not 127.0f * (1.0f / a): the two differ in the last bit */
    return a / 127.0f;  /* true division */
}

/* max of the sign-cleared bit patterns of x[k..K), starting from mx */
static uint32_t abs_bits_max(const float *x, int64_t k, int64_t K, uint32_t mx) {
    for (; k < K; k++) {
        uint32_t b;
        memcpy(&b, x + k, 4);
        b &= 0x7fffffffu;
        mx = b > mx ? b : mx;
    }
    return mx;
}

/* A row whose absmax is NaN or inf gets q = 0 (its scale carries the NaN/inf); returns 1 for such rows. */
static int nonfinite_row(uint32_t mx, int8_t *q, int64_t K) {
    if (mx < FINITE_LIMIT) return 0;
    memset(q, 0, (size_t)K);
    return 1;
}

static float quant_row_generic(const float *x, int8_t *q, int64_t K) {
    uint32_t mx = abs_bits_max(x, 0, K, 0);
    float inv, s = row_scale(mx, &inv);
    if (nonfinite_row(mx, q, K)) return s;
    for (int64_t k = 0; k < K; k++) q[k] = (int8_t)(int)nearbyintf(x[k] * inv); /* |x * inv| <= 127 */
    return s;
}

static void quant_task(const void *ctx, int64_t m) {
    const job_t *j = ctx;
    j->sxw[m] = j->quant(j->xf + m * j->K, j->xq + m * j->K, j->K);
}

AI void store(const job_t *j, int64_t m, int64_t n, int32_t acc) {
    float s = j->sx[m] * j->sw[j->sw_per_channel ? n : 0];
    float v = (float)acc * s;
    if (j->bias) v = v + j->bias[n];
    j->y[m * j->N + n] = v;
}

/* Weight streams are prefetched PREFETCH_ROWS rows ahead (the same bytes of the next group of rows): the
 * hardware prefetchers stop at 4 KB page boundaries, and a GEMV that streams its weights from memory runs
 * latency-bound without it. Prefetching past the
 * end of the weights is harmless. */
#define PREFETCH_ROWS 4

/* Activation permutation and row sums, one task per row. */
static void prep_task(const void *ctx, int64_t m) {
    const job_t *j = ctx;
    if (j->xf) quant_task(ctx, m);
    const int8_t *x = j->x + m * j->K;
    int8_t *xp = j->xp + m * j->kp;
    int64_t K = j->K, full = K / 4;
    int32_t sum = 0;
    memset(xp, 0, (size_t)j->kp);
    for (int64_t q = 0; q < full; q++) {
        int8_t *dst = xp + (q / 64) * 256 + (q % 64);
        const int8_t *src = x + 4 * q;
        dst[0] = src[0];
        dst[64] = src[1];
        dst[128] = src[2];
        dst[192] = src[3];
    }
    for (int64_t k = 4 * full; k < K; k++) xp[(k / 256) * 256 + (k % 4) * 64 + (k % 256) / 4] = x[k];
    for (int64_t k = 0; k < K; k++) sum += x[k];
    j->xsum[m] = sum;
}

/* ------------------------------------------------------------------------------------------------ */
/* Portable C: decode a tile of weight rows to int8 once, reuse it for every activation row.        */

#define GEN_TILE 16
#define GEN_DIRECT_M 8 /* below this many rows, work on the packed bytes directly */

/* Few rows: sum_k u*x straight from the packed bytes and the permuted activations (vectorizable). */
static void generic_direct_task(const void *ctx, int64_t t) {
    const job_t *j = ctx;
    int64_t n0 = (t / j->tm) * j->bn, n1 = n0 + j->bn < j->N ? n0 + j->bn : j->N;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = j->w + n * j->kb;
        for (int64_t m = 0; m < j->M; m++) {
            const int8_t *xp = j->xp + m * j->kp;
            int32_t acc = 0;
            for (int64_t c = 0; c < j->kb; c += 64) {
                int64_t len = j->kb - c < 64 ? j->kb - c : 64;
                const uint8_t *wc = w + c;
                const int8_t *xc = xp + c * 4;
                int32_t s = 0;
                for (int64_t b = 0; b < len; b++) { /* int16 products: |sum| <= 4 * 3 * 128 */
                    int16_t v = wc[b];
                    s += (int16_t)((v & 3) * xc[b] + ((v >> 2) & 3) * xc[64 + b] +
                                   ((v >> 4) & 3) * xc[128 + b] + (v >> 6) * xc[192 + b]);
                }
                acc += s;
            }
            store(j, m, n, acc - j->xsum[m]);
        }
    }
}

/* Many rows: decode a tile of weight rows to int8 once and reuse it for every activation row. */
static void generic_task(const void *ctx, int64_t t) {
    static const int8_t dec[4] = {-1, 0, 1, 2};
    const job_t *j = ctx;
    int64_t n0 = (t / j->tm) * j->bn, n1 = n0 + j->bn < j->N ? n0 + j->bn : j->N;
    int64_t m0 = (t % j->tm) * j->bm, m1 = m0 + j->bm < j->M ? m0 + j->bm : j->M;
    int64_t K = j->K, kb = j->kb;
    int8_t *tile = task_alloc((size_t)(GEN_TILE * kb * 4));
    if (!tile) {
        atomic_store(j->failed, 1);
        return;
    }
    for (int64_t nt = n0; nt < n1; nt += GEN_TILE) {
        int64_t rows = n1 - nt < GEN_TILE ? n1 - nt : GEN_TILE;
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t *src = j->w + (nt + r) * kb;
            int8_t *dst = tile + r * kb * 4;
            for (int64_t b = 0; b < kb; b++) {
                uint8_t v = src[b];
                dst[4 * b + 0] = dec[v & 3];
                dst[4 * b + 1] = dec[(v >> 2) & 3];
                dst[4 * b + 2] = dec[(v >> 4) & 3];
                dst[4 * b + 3] = dec[v >> 6];
            }
        }
        for (int64_t m = m0; m < m1; m++) {
            const int8_t *x = j->x + m * K;
            for (int64_t r = 0; r < rows; r++) {
                const int8_t *w = tile + r * kb * 4;
                int32_t acc = 0;
                for (int64_t k = 0; k < K; k++) acc += (int32_t)x[k] * (int32_t)w[k];
                store(j, m, nt + r, acc);
            }
        }
    }
    free(tile);
}

#if defined(__x86_64__)
/* ------------------------------------------------------------------------------------------------ */
/* AVX-512 VNNI.                                                                                   */

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,bmi2")))

/* GEMV rows: four 2-bit fields isolated by masks in place (field i is scaled by 4^i, undone by an
 * exact arithmetic shift of the int32 sums), so each 64-byte load costs four ANDs and four VPDPBUSD. The
 * full 64-byte chunks run unmasked, the last partial one masked. Four rows at a time keep their sixteen
 * accumulators in named registers (an accumulator array makes GCC shuffle and spill them). */
#define GEMV_FIELDS(A, v)                                                \
    A##0 = _mm512_dpbusd_epi32(A##0, _mm512_and_si512(v, m0), x0);   \
    A##1 = _mm512_dpbusd_epi32(A##1, _mm512_and_si512(v, m1), x1);   \
    A##2 = _mm512_dpbusd_epi32(A##2, _mm512_and_si512(v, m2), x2);   \
    A##3 = _mm512_dpbusd_epi32(A##3, _mm512_and_si512(v, m3), x3)
#define GEMV_FIELDS_SUM(A) \
    _mm512_add_epi32(_mm512_add_epi32(A##0, _mm512_srai_epi32(A##1, 2)), \
                     _mm512_add_epi32(_mm512_srai_epi32(A##2, 4), _mm512_srai_epi32(A##3, 6)))
#define GEMV_SUM(A) _mm512_reduce_add_epi32(GEMV_FIELDS_SUM(A))
#define GEMV_XLOAD(c)                                                               \
    const __m512i x0 = _mm512_load_si512((const void *)(xp + (c) * 256));         \
    const __m512i x1 = _mm512_load_si512((const void *)(xp + (c) * 256 + 64));    \
    const __m512i x2 = _mm512_load_si512((const void *)(xp + (c) * 256 + 128));   \
    const __m512i x3 = _mm512_load_si512((const void *)(xp + (c) * 256 + 192))

/* The lane sums of four vectors, as [sum(a), sum(b), sum(c), sum(d)]: one transpose-and-add tree instead of
 * four horizontal reductions (integer addition, so the order does not matter). */
T512 AI __m128i sum4(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* store() of four consecutive outputs n..n+3 of row m: the same float32 operations, four lanes at a time. */
T512 AI void store4(const job_t *j, int64_t m, int64_t n, __m128i acc) {
    __m128 sw = j->sw_per_channel ? _mm_loadu_ps(j->sw + n) : _mm_set1_ps(j->sw[0]);
    __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(acc), _mm_mul_ps(_mm_set1_ps(j->sx[m]), sw));
    if (j->bias) v = _mm_add_ps(v, _mm_loadu_ps(j->bias + n));
    _mm_storeu_ps(j->y + m * j->N + n, v);
}

T512 static void gemv512_rows4(const job_t *j, int64_t m, int64_t n) {
    const int8_t *xp = j->xp + m * j->kp;
    int64_t kb = j->kb, full = kb / 64, tail = kb % 64;
    const uint8_t *w0 = j->w + n * kb, *w1 = w0 + kb, *w2 = w1 + kb, *w3 = w2 + kb;
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C), m2 = _mm512_set1_epi8(0x30),
                  m3 = _mm512_set1_epi8((char)0xC0);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    __m512i c0 = a0, c1 = a0, c2 = a0, c3 = a0, d0 = a0, d1 = a0, d2 = a0, d3 = a0;
    const int64_t ahead = PREFETCH_ROWS * kb;
    for (int64_t c = 0; c < full; c++) {
        GEMV_XLOAD(c);
        int64_t o = c * 64;
        _mm_prefetch((const char *)(w0 + o + ahead), _MM_HINT_T0);
        _mm_prefetch((const char *)(w1 + o + ahead), _MM_HINT_T0);
        _mm_prefetch((const char *)(w2 + o + ahead), _MM_HINT_T0);
        _mm_prefetch((const char *)(w3 + o + ahead), _MM_HINT_T0);
        __m512i v0 = _mm512_loadu_si512((const void *)(w0 + o)), v1 = _mm512_loadu_si512((const void *)(w1 + o));
        __m512i v2 = _mm512_loadu_si512((const void *)(w2 + o)), v3 = _mm512_loadu_si512((const void *)(w3 + o));
        GEMV_FIELDS(a, v0);
        GEMV_FIELDS(b, v1);
        GEMV_FIELDS(c, v2);
        GEMV_FIELDS(d, v3);
    }
    if (tail) {
        GEMV_XLOAD(full);
        __mmask64 lm = ((__mmask64)1 << tail) - 1;
        int64_t o = full * 64;
        __m512i v0 = _mm512_maskz_loadu_epi8(lm, w0 + o), v1 = _mm512_maskz_loadu_epi8(lm, w1 + o);
        __m512i v2 = _mm512_maskz_loadu_epi8(lm, w2 + o), v3 = _mm512_maskz_loadu_epi8(lm, w3 + o);
        GEMV_FIELDS(a, v0);
        GEMV_FIELDS(b, v1);
        GEMV_FIELDS(c, v2);
        GEMV_FIELDS(d, v3);
    }
    store4(j, m, n, _mm_sub_epi32(sum4(GEMV_FIELDS_SUM(a), GEMV_FIELDS_SUM(b), GEMV_FIELDS_SUM(c), GEMV_FIELDS_SUM(d)),
                                  _mm_set1_epi32(j->xsum[m])));
}

T512 static void gemv512_row(const job_t *j, int64_t m, int64_t n) {
    const int8_t *xp = j->xp + m * j->kp;
    int64_t kb = j->kb, full = kb / 64, tail = kb % 64;
    const uint8_t *w0 = j->w + n * kb;
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C), m2 = _mm512_set1_epi8(0x30),
                  m3 = _mm512_set1_epi8((char)0xC0);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t c = 0; c < full; c++) {
        GEMV_XLOAD(c);
        __m512i v0 = _mm512_loadu_si512((const void *)(w0 + c * 64));
        GEMV_FIELDS(a, v0);
    }
    if (tail) {
        GEMV_XLOAD(full);
        __m512i v0 = _mm512_maskz_loadu_epi8(((__mmask64)1 << tail) - 1, w0 + full * 64);
        GEMV_FIELDS(a, v0);
    }
    store(j, m, n, GEMV_SUM(a) - j->xsum[m]);
}

/* GEMM block of MR activation rows x NR weight rows: each weight vector is decoded once (shift and
 * mask) and used for all MR rows. */
T512 AI void gemm512_block(const job_t *j, int64_t m, int64_t n, const int MR, const int NR) {
    const int8_t *xp = j->xp + m * j->kp;
    const uint8_t *w = j->w + n * j->kb;
    int64_t kb = j->kb, kp = j->kp, full = kb / 64, tail = kb % 64;
    const __m512i m3 = _mm512_set1_epi8(0x03);
    __m512i acc[6][4];
#pragma GCC unroll 6
    for (int a = 0; a < MR; a++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) acc[a][r] = _mm512_setzero_si512();
    for (int64_t c = 0; c <= full; c++) {
        if (c == full && !tail) break;
        __mmask64 lm = c < full ? ~(__mmask64)0 : (((__mmask64)1 << tail) - 1);
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            __m512i v = _mm512_maskz_loadu_epi8(lm, w + r * kb + c * 64);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                __m512i d = _mm512_and_si512(i ? _mm512_srli_epi16(v, 2 * i) : v, m3);
#pragma GCC unroll 6
                for (int a = 0; a < MR; a++) {
                    __m512i xv = _mm512_load_si512((const void *)(xp + a * kp + c * 256 + i * 64));
                    acc[a][r] = _mm512_dpbusd_epi32(acc[a][r], d, xv);
                }
            }
        }
    }
#pragma GCC unroll 6
    for (int a = 0; a < MR; a++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++)
            store(j, m + a, n + r, _mm512_reduce_add_epi32(acc[a][r]) - j->xsum[m + a]);
}

#define MR512 6
#define NR512 4

T512 static void gemm512_rows(const job_t *j, int64_t m, int64_t n, int mr, int nr) {
#define CASE(A, B) \
    case (A) * 8 + (B): gemm512_block(j, m, n, A, B); break;
    switch (mr * 8 + nr) {
        CASE(6, 4) CASE(5, 4) CASE(4, 4) CASE(3, 4) CASE(2, 4) CASE(1, 4)
        CASE(6, 3) CASE(5, 3) CASE(4, 3) CASE(3, 3) CASE(2, 3) CASE(1, 3)
        CASE(6, 2) CASE(5, 2) CASE(4, 2) CASE(3, 2) CASE(2, 2) CASE(1, 2)
        CASE(6, 1) CASE(5, 1) CASE(4, 1) CASE(3, 1) CASE(2, 1) CASE(1, 1)
    }
#undef CASE
}

T512 static void avx512_task(const void *ctx, int64_t t) {
    const job_t *j = ctx;
    int64_t n0 = (t / j->tm) * j->bn, n1 = n0 + j->bn < j->N ? n0 + j->bn : j->N;
    int64_t m0 = (t % j->tm) * j->bm, m1 = m0 + j->bm < j->M ? m0 + j->bm : j->M;
    if (j->M == 1) {
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) gemv512_rows4(j, 0, n);
        for (; n < n1; n++) gemv512_row(j, 0, n);
        return;
    }
    for (int64_t m = m0; m < m1; m += MR512) {
        int mr = m1 - m < MR512 ? (int)(m1 - m) : MR512;
        for (int64_t n = n0; n < n1; n += NR512) {
            int nr = n1 - n < NR512 ? (int)(n1 - n) : NR512;
            gemm512_rows(j, m, n, mr, nr);
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* AVX2: VPMADDUBSW on the unsigned codes (|pair sum| <= 512, so four fields add in int16 exactly). */

#define T256 __attribute__((target("avx2,fma,bmi2")))

T256 AI void avx2_block(const job_t *j, int64_t m, int64_t n, const int MR, const int NR) {
    const int8_t *xp = j->xp + m * j->kp;
    const uint8_t *w = j->w + n * j->kb;
    int64_t kb = j->kb, kp = j->kp, full = kb / 32, tail = kb % 32;
    const __m256i m3 = _mm256_set1_epi8(0x03), ones = _mm256_set1_epi16(1);
    __m256i acc[3][4];
#pragma GCC unroll 3
    for (int a = 0; a < MR; a++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) acc[a][r] = _mm256_setzero_si256();
    for (int64_t c = 0; c <= full; c++) {
        if (c == full && !tail) break;
        /* 32 packed bytes: block c/2 of 256 k, half c%2 */
        const int8_t *xc = xp + (c / 2) * 256 + (c % 2) * 32;
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            __m256i v;
            if (MR == 1) _mm_prefetch((const char *)(w + (r + PREFETCH_ROWS) * kb + c * 32), _MM_HINT_T0);
            if (c < full) {
                v = _mm256_loadu_si256((const __m256i *)(w + r * kb + c * 32));
            } else {
                uint8_t buf[32] = {0};
                memcpy(buf, w + r * kb + c * 32, (size_t)tail);
                v = _mm256_loadu_si256((const __m256i *)buf);
            }
            __m256i d[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) d[i] = _mm256_and_si256(i ? _mm256_srli_epi16(v, 2 * i) : v, m3);
#pragma GCC unroll 3
            for (int a = 0; a < MR; a++) {
                const int8_t *xa = xc + a * kp;
                __m256i p = _mm256_maddubs_epi16(d[0], _mm256_load_si256((const __m256i *)xa));
#pragma GCC unroll 3
                for (int i = 1; i < 4; i++)
                    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(d[i], _mm256_load_si256((const __m256i *)(xa + i * 64))));
                acc[a][r] = _mm256_add_epi32(acc[a][r], _mm256_madd_epi16(p, ones));
            }
        }
    }
#pragma GCC unroll 3
    for (int a = 0; a < MR; a++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[a][r]), _mm256_extracti128_si256(acc[a][r], 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
            store(j, m + a, n + r, _mm_cvtsi128_si32(s) - j->xsum[m + a]);
        }
}

#define MR256 3
#define NR256 4

T256 static void avx2_rows(const job_t *j, int64_t m, int64_t n, int mr, int nr) {
#define CASE(A, B) \
    case (A) * 8 + (B): avx2_block(j, m, n, A, B); break;
    switch (mr * 8 + nr) {
        CASE(3, 4) CASE(2, 4) CASE(1, 4)
        CASE(3, 3) CASE(2, 3) CASE(1, 3)
        CASE(3, 2) CASE(2, 2) CASE(1, 2)
        CASE(3, 1) CASE(2, 1) CASE(1, 1)
    }
#undef CASE
}

T256 static void avx2_task(const void *ctx, int64_t t) {
    const job_t *j = ctx;
    int64_t n0 = (t / j->tm) * j->bn, n1 = n0 + j->bn < j->N ? n0 + j->bn : j->N;
    int64_t m0 = (t % j->tm) * j->bm, m1 = m0 + j->bm < j->M ? m0 + j->bm : j->M;
    for (int64_t m = m0; m < m1; m += MR256) {
        int mr = m1 - m < MR256 ? (int)(m1 - m) : MR256;
        for (int64_t n = n0; n < n1; n += NR256) {
            int nr = n1 - n < NR256 ? (int)(n1 - n) : NR256;
            avx2_rows(j, m, n, mr, nr);
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Activation quantizers (see quant_row_generic): fl(x * inv) by a plain vector multiply (no FMA),    */
/* then round half to even (_MM_FROUND_TO_NEAREST_INT, as nearbyintf in the default rounding mode).   */

T512 static float quant_row512(const float *x, int8_t *q, int64_t K) {
    const __m512i absm = _mm512_set1_epi32(0x7fffffff);
    __m512i mx0 = _mm512_setzero_si512(), mx1 = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        mx0 = _mm512_max_epu32(mx0, _mm512_and_si512(_mm512_loadu_si512((const void *)(x + k)), absm));
        mx1 = _mm512_max_epu32(mx1, _mm512_and_si512(_mm512_loadu_si512((const void *)(x + k + 16)), absm));
    }
    for (; k < K; k += 16) {
        __mmask16 lm = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        mx0 = _mm512_max_epu32(mx0, _mm512_and_si512(_mm512_maskz_loadu_epi32(lm, x + k), absm));
    }
    uint32_t mx = (uint32_t)_mm512_reduce_max_epu32(_mm512_max_epu32(mx0, mx1));
    float inv, s = row_scale(mx, &inv);
    if (nonfinite_row(mx, q, K)) return s;
    const __m512 iv = _mm512_set1_ps(inv);
    for (k = 0; k + 16 <= K; k += 16) {
        __m512 d = _mm512_mul_ps(_mm512_loadu_ps(x + k), iv);
        __m512i i = _mm512_cvt_roundps_epi32(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtsepi32_epi8(i));
    }
    if (k < K) {
        __mmask16 lm = (__mmask16)((1u << (K - k)) - 1);
        __m512 d = _mm512_mul_ps(_mm512_maskz_loadu_ps(lm, x + k), iv);
        __m512i i = _mm512_cvt_roundps_epi32(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_mask_cvtsepi32_storeu_epi8(q + k, lm, i);
    }
    return s;
}

T256 static float quant_row256(const float *x, int8_t *q, int64_t K) {
    const __m256i absm = _mm256_set1_epi32(0x7fffffff);
    __m256i mx0 = _mm256_setzero_si256(), mx1 = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        mx0 = _mm256_max_epu32(mx0, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + k)), absm));
        mx1 = _mm256_max_epu32(mx1, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + k + 8)), absm));
    }
    mx0 = _mm256_max_epu32(mx0, mx1);
    __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(mx0), _mm256_extracti128_si256(mx0, 1));
    m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0x4E));
    m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0xB1));
    uint32_t mx = abs_bits_max(x, k, K, (uint32_t)_mm_cvtsi128_si32(m4));
    float inv, s = row_scale(mx, &inv);
    if (nonfinite_row(mx, q, K)) return s;
    const __m256 iv = _mm256_set1_ps(inv);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (k = 0; k + 32 <= K; k += 32) {
        __m256i i[4];
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            __m256 d = _mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * u), iv);
            i[u] = _mm256_cvttps_epi32(_mm256_round_ps(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
        __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permutevar8x32_epi32(b, order));
    }
    for (; k < K; k++) {
        __m128 d = _mm_set_ss(x[k] * inv);
        q[k] = (int8_t)_mm_cvttss_si32(_mm_round_ss(d, d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    return s;
}

/* ------------------------------------------------------------------------------------------------ */
/* AMX (M >= AMX_MIN_M): a panel of 16 weight rows is decoded once to the VNNI tile layout           */
/* B[p][16 rows][4 codes] (p = packed byte index) and multiplied with 16-row activation tiles by      */
/* TDPBSUD (signed activations x unsigned codes).                                                   */

#define TAMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,bmi2,amx-tile,amx-int8")))
#define AMX_MIN_M 16
#define AMX_BN 32  /* weight rows per task: two B tiles */
#define AMX_BM 512 /* activation rows per task */

/* u-codes of rows [n, n + 16) as B[p][16][4] for p < kb; rows past N and p >= kb are zero. */
T512 static void decode_panel16(const job_t *j, int64_t n, uint8_t *B, int64_t prows) {
    int64_t kb = j->kb, rows = j->N - n < 16 ? j->N - n : 16, full = kb / 4;
    const uint8_t *w = j->w + n * kb;
    __mmask16 rm = (__mmask16)((1u << rows) - 1);
    __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_epi32((int)kb));
    const __m512i lo = _mm512_set1_epi32(0xFF), m3 = _mm512_set1_epi32(0x03030303);
    for (int64_t q = 0; q < full; q++) {
        __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rm, idx, w + 4 * q, 1);
#pragma GCC unroll 4
        for (int b = 0; b < 4; b++) {
            __m512i v = b ? _mm512_srli_epi32(g, 8 * b) : g;
            if (b < 3) v = _mm512_and_si512(v, lo);
            __m512i t = _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(v, 6), _mm512_slli_epi32(v, 12), 0xFE);
            t = _mm512_ternarylogic_epi32(t, _mm512_slli_epi32(v, 18), m3, 0xA8); /* (t | s) & m3 */
            _mm512_store_si512((void *)(B + (4 * q + b) * 64), t);
        }
    }
    memset(B + full * 4 * 64, 0, (size_t)((prows - full * 4) * 64));
    for (int64_t p = full * 4; p < kb; p++)
        for (int64_t r = 0; r < rows; r++) {
            uint32_t v = w[r * kb + p];
            uint32_t t = (v | v << 6 | v << 12 | v << 18) & 0x03030303u;
            memcpy(B + p * 64 + r * 4, &t, 4);
        }
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

/* Rescale 16 int32 sums of row m, columns [n, n + 16) (masked to N), and store. */
T512 AI void store16(const job_t *j, int64_t m, int64_t n, __m512i acc) {
    int64_t cols = j->N - n < 16 ? j->N - n : 16;
    __mmask16 cm = (__mmask16)((1u << cols) - 1);
    __m512 sw = j->sw_per_channel ? _mm512_maskz_loadu_ps(cm, j->sw + n) : _mm512_set1_ps(j->sw[0]);
    __m512 s = _mm512_mul_ps(_mm512_set1_ps(j->sx[m]), sw);
    acc = _mm512_sub_epi32(acc, _mm512_set1_epi32(j->xsum[m]));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), s);
    if (j->bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(cm, j->bias + n));
    _mm512_mask_storeu_ps(j->y + m * j->N + n, cm, v);
}

TAMX static void amx_task(const void *ctx, int64_t t) {
    const job_t *j = ctx;
    int64_t n0 = (t / j->tm) * j->bn;
    int64_t m0 = (t % j->tm) * j->bm, m1 = m0 + j->bm < j->M ? m0 + j->bm : j->M;
    int64_t prows = j->kp / 4, kt = j->kp / 64; /* B rows per panel, k tiles */
    uint8_t *B = task_alloc((size_t)(2 * prows * 64));
    int32_t *C = B ? task_alloc(32 * 32 * sizeof(int32_t)) : NULL;
    if (!B || !C) {
        free(B);
        atomic_store(j->failed, 1);
        return;
    }
    int two = n0 + 16 < j->N;
    decode_panel16(j, n0, B, prows);
    if (two) decode_panel16(j, n0 + 16, B + prows * 64, prows);
    tilecfg_t cfg = {0};
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
    const uint8_t *B1 = B + prows * 64;
    for (int64_t m = m0; m < m1; m += 32) {
        const int8_t *A = j->xp + m * j->xs;
        const int8_t *A1 = A + 16 * j->xs;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < kt; k++) {
            _tile_loadd(4, A + k * 64, j->xs);
            _tile_loadd(5, A1 + k * 64, j->xs);
            _tile_loadd(6, B + k * 16 * 64, 64);
            _tile_loadd(7, B1 + k * 16 * 64, 64);
            _tile_dpbsud(0, 4, 6);
            _tile_dpbsud(1, 4, 7);
            _tile_dpbsud(2, 5, 6);
            _tile_dpbsud(3, 5, 7);
        }
        _tile_stored(0, C, 128);
        _tile_stored(1, C + 16, 128);
        _tile_stored(2, C + 16 * 32, 128);
        _tile_stored(3, C + 16 * 32 + 16, 128);
        int64_t rows = m1 - m < 32 ? m1 - m : 32;
        for (int64_t r = 0; r < rows; r++) {
            store16(j, m + r, n0, _mm512_load_si512((const void *)(C + r * 32)));
            if (two) store16(j, m + r, n0 + 16, _mm512_load_si512((const void *)(C + r * 32 + 16)));
        }
    }
    _tile_release();
    free(B);
    free(C);
}

/* Natural-order activations zero-padded to kp columns and to a multiple of 32 rows, and row sums. */
static void prep_plain_task(const void *ctx, int64_t m) {
    const job_t *j = ctx;
    int8_t *dst = j->xp + m * j->xs;
    if (m >= j->M) {
        memset(dst, 0, (size_t)j->xs);
        return;
    }
    memset(dst + j->K, 0, (size_t)(j->xs - j->K));
    if (j->xf)
        j->sxw[m] = j->quant(j->xf + m * j->K, dst, j->K);
    else
        memcpy(dst, j->x + m * j->K, (size_t)j->K);
    int32_t sum = 0;
    for (int64_t k = 0; k < j->K; k++) sum += dst[k];
    j->xsum[m] = sum;
}
#endif /* __x86_64__ */

#if defined(__aarch64__)
/* ------------------------------------------------------------------------------------------------ */
/* NEON with the dot-product extension (SDOT, Armv8.2-A+): the unsigned codes {0, 1, 2} are valid      */
/* signed bytes, so SDOT sums u*x in int32 and the activation row sum is subtracted as on x86. Each 16   */
/* packed bytes hold four fields that line up with four 16-byte slices of the permuted activations.    */

#define TNEON __attribute__((target("arch=armv8.2-a+dotprod")))
#define MRNEON 4
#define NRNEON 4

TNEON AI void neon_block(const job_t *j, int64_t m, int64_t n, const int MR, const int NR) {
    const int8_t *xp = j->xp + m * j->kp;
    const uint8_t *w = j->w + n * j->kb;
    int64_t kb = j->kb, kp = j->kp, full = kb / 64, tail = kb % 64;
    const uint8x16_t m3 = vdupq_n_u8(3);
    int32x4_t acc[MRNEON][NRNEON];
    for (int a = 0; a < MR; a++)
        for (int r = 0; r < NR; r++) acc[a][r] = vdupq_n_s32(0);
    uint8_t buf[NRNEON][64];
    for (int64_t c = 0; c <= full; c++) {
        if (c == full && !tail) break;
        const uint8_t *rows[NRNEON];
        for (int r = 0; r < NR; r++) {
            rows[r] = w + r * kb + c * 64;
            if (c == full) { /* the last, partial 64 bytes: zero codes beyond the row */
                memset(buf[r], 0, 64);
                memcpy(buf[r], rows[r], (size_t)tail);
                rows[r] = buf[r];
            } else if (MR == 1) {
                __builtin_prefetch(rows[r] + PREFETCH_ROWS * kb);
            }
        }
        for (int q = 0; q < 4; q++) {
            for (int r = 0; r < NR; r++) {
                uint8x16_t v = vld1q_u8(rows[r] + 16 * q);
                int8x16_t d[4] = {vreinterpretq_s8_u8(vandq_u8(v, m3)),
                                  vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), m3)),
                                  vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), m3)),
                                  vreinterpretq_s8_u8(vshrq_n_u8(v, 6))};
                for (int a = 0; a < MR; a++) {
                    const int8_t *xa = xp + a * kp + c * 256 + 16 * q;
                    for (int i = 0; i < 4; i++) acc[a][r] = vdotq_s32(acc[a][r], d[i], vld1q_s8(xa + 64 * i));
                }
            }
        }
    }
    for (int a = 0; a < MR; a++)
        for (int r = 0; r < NR; r++) store(j, m + a, n + r, vaddvq_s32(acc[a][r]) - j->xsum[m + a]);
}

TNEON static void neon_rows(const job_t *j, int64_t m, int64_t n, int mr, int nr) {
#define CASE(A, B) \
    case (A) * 8 + (B): neon_block(j, m, n, A, B); break;
    switch (mr * 8 + nr) {
        CASE(4, 4) CASE(3, 4) CASE(2, 4) CASE(1, 4)
        CASE(4, 3) CASE(3, 3) CASE(2, 3) CASE(1, 3)
        CASE(4, 2) CASE(3, 2) CASE(2, 2) CASE(1, 2)
        CASE(4, 1) CASE(3, 1) CASE(2, 1) CASE(1, 1)
    }
#undef CASE
}

static void neon_task(const void *ctx, int64_t t) {
    const job_t *j = ctx;
    int64_t n0 = (t / j->tm) * j->bn, n1 = n0 + j->bn < j->N ? n0 + j->bn : j->N;
    int64_t m0 = (t % j->tm) * j->bm, m1 = m0 + j->bm < j->M ? m0 + j->bm : j->M;
    for (int64_t m = m0; m < m1; m += MRNEON) {
        int mr = m1 - m < MRNEON ? (int)(m1 - m) : MRNEON;
        for (int64_t n = n0; n < n1; n += NRNEON) neon_rows(j, m, n, mr, n1 - n < NRNEON ? (int)(n1 - n) : NRNEON);
    }
}
#endif /* __aarch64__ */

/* ------------------------------------------------------------------------------------------------ */
/* Packing, bit for bit tritium.kernels.reference.pack for any int8 input: byte b of a row is          */
/* c0 | c1 << 2 | c2 << 4 | c3 << 6 truncated to 8 bits, c_i = (uint8)(q[4b + i] + 1), padding code 1.  */
/* The fused ternary weight quantizer is tritium.quant.quantize_weight for 1.58 bits with a per-tensor   */
/* or per-row scale s: v = w / s (a true float32 division), q = clamp(round_half_even(v), -1, 1), which  */
/* is +1 for v > 0.5, -1 for v < -0.5 and 0 otherwise. A row in which some v is NaN gets q = 0 there and */
/* the output scale NaN, so that its outputs are NaN as those of the float product of the NaN weight.  */

typedef struct {
    const int8_t *q;      /* pack: int8 input (N, K) */
    const float *w, *s;   /* ternary quantizer: float32 weight (N, K) and scale (N,) or (1,) */
    int s_per_row;
    int8_t *qo;           /* ternary quantizer: int8 output (N, K) */
    uint8_t *packed;      /* (N, kb) */
    float *so;            /* ternary quantizer: output scale (N,) */
    int64_t N, K, kb, rows; /* rows: weight rows per task */
} pack_job_t;

AI void pack_row(const int8_t *restrict q, uint8_t *restrict out, int64_t K) {
    int64_t full = K / 4;
    for (int64_t b = 0; b < full; b++) {
        uint32_t v;
        memcpy(&v, q + 4 * b, 4);
        v = ((v & 0x7f7f7f7fu) + 0x01010101u) ^ (v & 0x80808080u); /* bytewise q + 1, modulo 256 */
        out[b] = (uint8_t)((v & 0xffu) | ((v >> 6) & 0xfcu) | ((v >> 12) & 0xf0u) | ((v >> 18) & 0xc0u));
    }
    if (K % 4) {
        unsigned v = 0;
        for (int i = 0; i < 4; i++) v |= (unsigned)(4 * full + i < K ? (uint8_t)(q[4 * full + i] + 1) : 1) << (2 * i);
        out[full] = (uint8_t)v;
    }
}

AI void pack_rows(const pack_job_t *j, int64_t t) {
    int64_t n1 = (t + 1) * j->rows < j->N ? (t + 1) * j->rows : j->N, K = j->K, kb = j->kb;
    for (int64_t n = t * j->rows; n < n1; n++) pack_row(j->q + n * K, j->packed + n * kb, K);
}

AI void quantize_ternary_rows(const pack_job_t *j, int64_t t) {
    int64_t n1 = (t + 1) * j->rows < j->N ? (t + 1) * j->rows : j->N;
    int64_t K = j->K, kb = j->kb;
    for (int64_t n = t * j->rows; n < n1; n++) {
        const float *restrict w = j->w + n * K;
        int8_t *restrict q = j->qo + n * K;
        float s = j->s[j->s_per_row ? n : 0];
        int bad = 0;
        for (int64_t k = 0; k < K; k++) {
            float v = w[k] / s; /* true division, as torch's w / s */
            q[k] = (int8_t)((v > 0.5f) - (v < -0.5f));
            bad |= v != v;
        }
        pack_row(q, j->packed + n * kb, K);
        j->so[n] = bad ? NAN : s;
    }
}

static void pack_task(const void *ctx, int64_t t) { pack_rows(ctx, t); }
static void quantize_ternary_task(const void *ctx, int64_t t) { quantize_ternary_rows(ctx, t); }
#if defined(__x86_64__)
T512 static void pack_task512(const void *ctx, int64_t t) { pack_rows(ctx, t); }
T512 static void quantize_ternary_task512(const void *ctx, int64_t t) { quantize_ternary_rows(ctx, t); }
T256 static void pack_task256(const void *ctx, int64_t t) { pack_rows(ctx, t); }
T256 static void quantize_ternary_task256(const void *ctx, int64_t t) { quantize_ternary_rows(ctx, t); }
#endif

/* Run a packing pass of N rows of K on the backend's instruction set. */
static void run_pack(task_fn generic, task_fn avx2, task_fn avx512, pack_job_t *j, int backend, int nthreads) {
    int64_t tasks = (int64_t)nthreads * 8;
    j->kb = (j->K + 3) / 4;
    j->rows = (j->N + tasks - 1) / tasks;
    if (j->rows < 1) j->rows = 1;
    task_fn fn = generic;
#if defined(__x86_64__)
    if (backend == BACKEND_AVX512 || backend == BACKEND_AMX) fn = avx512;
    else if (backend == BACKEND_AVX2) fn = avx2;
#else
    (void)avx2;
    (void)avx512;
    (void)backend;
#endif
    int threads = j->N * j->K >= (1 << 16) ? nthreads : 1;
    parallel_for(fn, j, (j->N + j->rows - 1) / j->rows, threads < 1 ? 1 : threads);
}

/* ------------------------------------------------------------------------------------------------ */
/* Public C ABI.                                                                                   */

#if defined(__x86_64__)
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static int amx_ok;
/* Linux hands out the AMX tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). */
static void request_amx(void) { amx_ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0; }
#endif

/* Bit mask of the backends this CPU supports: 1 << BACKEND_*. */
API int tk_supported(void) {
    int mask = 1 << BACKEND_GENERIC;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) mask |= 1 << BACKEND_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        mask |= 1 << BACKEND_AVX512;
    if ((mask >> BACKEND_AVX512 & 1) && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8")) {
        pthread_once(&amx_once, request_amx);
        if (amx_ok) mask |= 1 << BACKEND_AMX;
    }
#elif defined(__aarch64__)
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) mask |= 1 << BACKEND_NEON;
#endif
    return mask;
}

API int tk_abi_version(void) { return 7; }

/* The file of the OpenMP runtime the kernels run on (with torch imported first: torch's libgomp), or ""
 * for a build without OpenMP (the kernels then run on the calling thread). */
API const char *tk_openmp_runtime(void) {
#ifdef _OPENMP
    Dl_info info;
    if (dladdr((void *)&omp_get_max_threads, &info) && info.dli_fname) return info.dli_fname;
    return "unknown";
#else
    return "";
#endif
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

typedef float (*quant_fn)(const float *x, int8_t *q, int64_t K);

static quant_fn quantizer(int backend) {
#if defined(__x86_64__)
    if (backend == BACKEND_AVX512 || backend == BACKEND_AMX) return quant_row512;
    if (backend == BACKEND_AVX2) return quant_row256;
#endif
    (void)backend;
    return quant_row_generic;
}

/* Threads for a pass over M rows of K: small inputs stay on the calling thread. */
static int row_threads(int64_t M, int64_t K, int nthreads) { return M * K >= (1 << 16) ? nthreads : 1; }

/* Matmuls of several weight matrices on the same activations (jobs[0..count): the same x or xf, M and K;
 * their own w, N, sw, bias and y): the activations are quantized and laid out once, and the tasks of all
 * the matrices run in one parallel region. Each output element is computed exactly as by a single call. */
#define MAX_MULTI 8

typedef struct {
    job_t *jobs;
    int count;
    task_fn fn;
    int64_t first[MAX_MULTI + 1]; /* first task of each job; first[count] = total */
} multi_t;

static void multi_task(const void *ctx, int64_t t) {
    const multi_t *mt = ctx;
    int i = 0;
    while (t >= mt->first[i + 1]) i++;
    mt->fn(&mt->jobs[i], t - mt->first[i]);
}

/* Run fn over the tasks of every job (ceil(N / bn) * tm each) in one parallel region. */
static void run_jobs(task_fn fn, job_t *js, int count, int nthreads) {
    multi_t mt = {js, count, fn, {0}};
    for (int i = 0; i < count; i++) mt.first[i + 1] = mt.first[i] + ceil_div(js[i].N, js[i].bn) * js[i].tm;
    if (count == 1)
        parallel_for(fn, js, mt.first[1], nthreads);
    else
        parallel_for(multi_task, &mt, mt.first[count], nthreads);
}

/* Copy the shared activation state of js[0] into the other jobs. */
static void share_activations(job_t *js, int count) {
    for (int i = 1; i < count; i++) {
        js[i].x = js[0].x;
        js[i].sx = js[0].sx;
        js[i].kp = js[0].kp;
        js[i].xs = js[0].xs;
        js[i].xp = js[0].xp;
        js[i].xsum = js[0].xsum;
        js[i].bm = js[0].bm;
        js[i].tm = js[0].tm;
        js[i].bn = js[0].bn;
        js[i].xf = js[0].xf;
        js[i].xq = js[0].xq;
        js[i].sxw = js[0].sxw;
        js[i].quant = js[0].quant;
        js[i].failed = js[0].failed;
    }
}

/* The matmuls of prepared jobs (js[0].x, js[0].sx set, or js[0].xf for fused quantization into js[0].xq /
 * js[0].sxw; see run_jobs for what the jobs share). */
static int run_matmul(job_t *js, int count, int backend, int nthreads) {
    job_t *j = js;
    int64_t M = j->M, K = j->K, N = 0;
    for (int i = 0; i < count; i++) N += js[i].N;
    atomic_int failed = 0;
    j->failed = &failed;
    j->quant = quantizer(backend);
    /* Blocks: a weight panel of bn rows (kept in L2) is reused by bm activation rows. */
    j->bm = M == 1 ? 1 : (M + 95) / 96 > 1 ? 96 : M;
    j->tm = ceil_div(M, j->bm);
    /* Tasks per thread: eight balance noisy cores in a GEMM; a GEMV takes two, longer sequential weight
     * streams, which run about 10% faster from L3 than eight shorter ones. */
    int64_t want = (int64_t)nthreads * (M == 1 ? 2 : 8);
    int64_t bn = ceil_div(N, ceil_div(want, j->tm));
    bn = ceil_div(bn, 16) * 16;
    if (M > 1 && bn > 64) bn = 64;
    j->bn = bn;
#if defined(__x86_64__)
    if (!(backend == BACKEND_AMX && M >= AMX_MIN_M))
#endif
    if (j->xf) { /* fused quantization into natural int8 rows (AMX quantizes straight into its layout) */
        j->xq = aligned_alloc(64, (size_t)ceil_div(M * K, 64) * 64);
        if (!j->xq) return -2;
        j->x = j->xq;
    }
    if (backend == BACKEND_GENERIC && M >= GEN_DIRECT_M) {
        if (j->xf) parallel_for(quant_task, j, M, row_threads(M, K, nthreads));
        share_activations(js, count);
        run_jobs(generic_task, js, count, nthreads);
        free(j->xq);
        return atomic_load(&failed) ? -2 : 0;
    }
#if defined(__x86_64__)
    if (backend == BACKEND_AMX && M >= AMX_MIN_M) {
        j->kp = ceil_div(K, 64) * 64;
        j->xs = j->kp + 64;
        j->bm = AMX_BM;
        j->tm = ceil_div(M, j->bm);
        j->bn = AMX_BN;
        int64_t mp = ceil_div(M, 32) * 32;
        j->xp = aligned_alloc(64, (size_t)(mp * j->xs));
        j->xsum = malloc((size_t)M * sizeof(int32_t));
        if (!j->xp || !j->xsum) {
            free(j->xp);
            free(j->xsum);
            return -2;
        }
        parallel_for(prep_plain_task, j, mp, row_threads(M, K, nthreads));
        share_activations(js, count);
        run_jobs(amx_task, js, count, nthreads);
        free(j->xp);
        free(j->xsum);
        return atomic_load(&failed) ? -2 : 0;
    }
    if (backend == BACKEND_AMX) backend = BACKEND_AVX512;
#endif
    j->xp = aligned_alloc(64, (size_t)(M * j->kp));
    j->xsum = malloc((size_t)M * sizeof(int32_t));
    if (!j->xp || !j->xsum) {
        free(j->xp);
        free(j->xsum);
        free(j->xq);
        return -2;
    }
    parallel_for(prep_task, j, M, row_threads(M, K, nthreads));
    share_activations(js, count);
#if defined(__x86_64__)
    if (backend != BACKEND_GENERIC)
        run_jobs(backend == BACKEND_AVX512 ? avx512_task : avx2_task, js, count, nthreads);
    else
#elif defined(__aarch64__)
    if (backend == BACKEND_NEON)
        run_jobs(neon_task, js, count, nthreads);
    else
#endif
        run_jobs(generic_direct_task, js, count, nthreads);
    free(j->xp);
    free(j->xsum);
    free(j->xq);
    return atomic_load(&failed) ? -2 : 0;
}

static int check_args(int backend, int64_t M, int64_t N, int64_t K) {
    if (backend < 0 || backend > BACKEND_NEON || !(tk_supported() & (1 << backend))) return -1;
    if (M < 0 || N < 0 || K < 0 || K > (1 << 17)) return -3;
    return 0;
}

/* y (M, N) = ternary_matmul(x (M, K) int8, w packed (N, ceil(K/4)), sx (M,), sw (N,) or (1,), bias).
 * Returns 0 on success, -1 for an unsupported backend, -2 when out of memory (then y is incomplete),
 * -3 for bad sizes. */
API int tk_ternary_matmul(int backend, const int8_t *x, const uint8_t *w, const float *sx, const float *sw,
                          int sw_per_channel, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                          int nthreads) {
    int rc = check_args(backend, M, N, K);
    if (rc || M == 0 || N == 0) return rc;
    job_t j = {x, w, sx, sw, bias, y, M, N, K, ceil_div(K, 4), ceil_div(K, 256) * 256, 0, sw_per_channel};
    return run_matmul(&j, 1, backend, nthreads < 1 ? 1 : nthreads);
}

/* q (M, K) int8 and s (M,) float32 = quantize_act(x (M, K) float32, 8), bit-exact (q = 0 where s is not
 * finite). Returns 0, or -1 / -3 as tk_ternary_matmul. */
API int tk_quantize_rows(int backend, const float *x, int8_t *q, float *s, int64_t M, int64_t K, int nthreads) {
    int rc = check_args(backend, M, 0, K);
    if (rc || M == 0) return rc;
    job_t j = {0};
    j.K = K;
    j.xf = x;
    j.xq = q;
    j.sxw = s;
    j.quant = quantizer(backend);
    parallel_for(quant_task, &j, M, row_threads(M, K, nthreads < 1 ? 1 : nthreads));
    return 0;
}

/* y (M, N) = ternary_matmul(quantize_rows(x (M, K) float32), w, sw, bias): the quantizer fused with the
 * matmul (the int8 rows go straight into the kernel's activation layout). Return codes as
 * tk_ternary_matmul. */
API int tk_ternary_linear(int backend, const float *x, const uint8_t *w, const float *sw, int sw_per_channel,
                          const float *bias, float *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    int rc = check_args(backend, M, N, K);
    if (rc || M == 0 || N == 0) return rc;
    float *sx = malloc((size_t)M * sizeof(float));
    if (!sx) return -2;
    job_t j = {NULL, w, sx, sw, bias, y, M, N, K, ceil_div(K, 4), ceil_div(K, 256) * 256, 0, sw_per_channel};
    j.xf = x;
    j.sxw = sx;
    rc = run_matmul(&j, 1, backend, nthreads < 1 ? 1 : nthreads);
    free(sx);
    return rc;
}

/* y[i] (M, N_i) = ternary_linear(x (M, K) float32, w_i, sw_i, bias_i) for i < count (1 to 8), weight i described
 * by desc[5i .. 5i + 4] = {w_i, N_i, sw_i, sw_per_channel_i, bias_i (0: none)} (pointers as integers): the
 * activations are quantized and laid out once for all the weights, whose tasks share one parallel region.
 * Each y[i] is bit-identical to its own tk_ternary_linear call. Return codes as tk_ternary_matmul (-3 also
 * for count outside 1..8). */
API int tk_ternary_linear_multi(int backend, const float *x, int count, const int64_t *desc, float *const *y,
                                int64_t M, int64_t K, int nthreads) {
    if (count < 1 || count > MAX_MULTI) return -3;
    int64_t total = 0;
    for (int i = 0; i < count; i++) {
        int rc = check_args(backend, M, desc[5 * i + 1], K);
        if (rc) return rc;
        total += desc[5 * i + 1];
    }
    if (M == 0 || total == 0) return 0;
    float *sx = malloc((size_t)M * sizeof(float));
    if (!sx) return -2;
    job_t js[MAX_MULTI];
    int used = 0;
    for (int i = 0; i < count; i++) {
        const int64_t *d = desc + 5 * i;
        if (d[1] == 0) continue;
        job_t j = {NULL, (const uint8_t *)(intptr_t)d[0], sx, (const float *)(intptr_t)d[2], (const float *)(intptr_t)d[4],
                   y[i], M, d[1], K, ceil_div(K, 4), ceil_div(K, 256) * 256, 0, (int)d[3]};
        j.xf = x;
        j.sxw = sx;
        js[used++] = j;
    }
    int rc = run_matmul(js, used, backend, nthreads < 1 ? 1 : nthreads);
    free(sx);
    return rc;
}

/* packed (N, ceil(K/4)) = pack(q (N, K) int8), bit for bit reference.pack. Returns 0, or -1 for an
 * unsupported backend, -3 for bad sizes. */
API int tk_pack(int backend, const int8_t *q, uint8_t *packed, int64_t N, int64_t K, int nthreads) {
    int rc = check_args(backend, N, 0, 0);
    if (rc || K < 0) return rc ? rc : -3;
    if (N == 0 || K == 0) return 0;
    pack_job_t j = {0};
    j.q = q;
    j.packed = packed;
    j.N = N;
    j.K = K;
#if defined(__x86_64__)
    run_pack(pack_task, pack_task256, pack_task512, &j, backend, nthreads < 1 ? 1 : nthreads);
#else
    run_pack(pack_task, pack_task, pack_task, &j, backend, nthreads < 1 ? 1 : nthreads);
#endif
    return 0;
}

/* q (N, K) int8, packed = pack(q) and so (N,) from a float32 weight w (N, K) and its ternary scale s ((N,)
 * with s_per_row, else (1,)): q = clamp(round_half_even(w / s), -1, 1), so = s, or NaN for a row in which
 * some w / s is NaN (q = 0 there). Return codes as tk_pack. */
API int tk_quantize_ternary(int backend, const float *w, const float *s, int s_per_row, int8_t *q, uint8_t *packed,
                            float *so, int64_t N, int64_t K, int nthreads) {
    int rc = check_args(backend, N, 0, 0);
    if (rc || K < 0) return rc ? rc : -3;
    if (N == 0) return 0;
    pack_job_t j = {0};
    j.w = w;
    j.s = s;
    j.s_per_row = s_per_row;
    j.qo = q;
    j.packed = packed;
    j.so = so;
    j.N = N;
    j.K = K;
#if defined(__x86_64__)
    run_pack(quantize_ternary_task, quantize_ternary_task256, quantize_ternary_task512, &j, backend,
             nthreads < 1 ? 1 : nthreads);
#else
    run_pack(quantize_ternary_task, quantize_ternary_task, quantize_ternary_task, &j, backend, nthreads < 1 ? 1 : nthreads);
#endif
    return 0;
}

/* Test hook: the next n allocations inside worker tasks fail (n = 0 turns failures off). */
API void tk_test_fail_task_allocs(int n) { atomic_store(&fail_task_allocs, n); }
