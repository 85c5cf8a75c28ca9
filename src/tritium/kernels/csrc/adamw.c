/* Lazy AdamW: the AdamW steps of the rows of a parameter, applied when the row is next used.
 *
 * Step j of AdamW (decoupled weight decay) on one float32 element, with the per-step constants
 * a[j] = 1 - lr_j * wd, st[j] = lr_j / (1 - b1^j), ibc[j] = 1 / sqrt(1 - b2^j) and c1 = 1 - b1, c2 = 1 - b2
 * (all computed in double from the exact hyperparameters, then rounded to float32):
 *
 *     p = p * a[j];  m = m * b1 + c1 * g;  v = v * b2 + (c2 * g) * g;  p = p - (st[j] * m) / (sqrt(v) * ibc[j] + eps)
 *
 * each operation rounded to float32 (build with -ffp-contract=off: no fused multiply-add). With g = 0 the
 * step reduces to p = p * a[j], m = m * b1, v = v * b2 and the same last line, exactly: that is what a row
 * absent from a sparse gradient gets, and it depends on nothing but the row's own state, so it can wait
 * until the row is needed. tk_lazy_adamw catches a row up on those skipped steps in registers, block by
 * block, then applies the current step, instead of streaming the whole parameter through memory at every
 * step. The result is the same float32 arithmetic, in the same order, as updating every row every step.
 * The code is plain C; target clones compile it for AVX-512, AVX2 and the baseline ISA, which agree bit
 * for bit (IEEE multiply, add, divide and square root are correctly rounded).
 *
 * Subnormal numbers are flushed to zero (x86 FTZ/DAZ, ARM FZ) while the kernel runs: a row that goes
 * unused for hundreds of steps has m decaying by b1 at every step into the subnormal range, where each
 * x86 operation takes a microcode assist (~100x slower). The flushed values are below 1.2e-38 and change
 * no weight, but they do differ from the subnormal results of an update without the flush.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define API __attribute__((visibility("default")))
#define BLOCK 64 /* elements of a row kept in registers while its skipped steps are applied */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

typedef struct {
    const float *a, *st, *ibc;
    float b1, b2, c1, c2, eps;
} adamw_consts;

/* Elements [0, n) of one row block: zero-gradient steps [from, to), then step `to` with gradient g
 * (g == NULL: a zero-gradient step `to` as well). */
CLONES static void block_steps(float *restrict p, float *restrict m, float *restrict v, const float *restrict g,
                               int64_t n, int64_t from, int64_t to, const adamw_consts *c) {
    float pp[BLOCK], mm[BLOCK], vv[BLOCK];
    const float b1 = c->b1, b2 = c->b2, eps = c->eps;
    for (int64_t i = 0; i < n; i++) pp[i] = p[i], mm[i] = m[i], vv[i] = v[i];
    for (int64_t j = from; j < to; j++) {
        const float a = c->a[j], st = c->st[j], ibc = c->ibc[j];
        for (int64_t i = 0; i < n; i++) {
            pp[i] = pp[i] * a;
            mm[i] = mm[i] * b1;
            vv[i] = vv[i] * b2;
            pp[i] = pp[i] - (st * mm[i]) / (sqrtf(vv[i]) * ibc + eps);
        }
    }
    const float a = c->a[to], st = c->st[to], ibc = c->ibc[to], c1 = c->c1, c2 = c->c2;
    if (g) {
        for (int64_t i = 0; i < n; i++) {
            pp[i] = pp[i] * a;
            mm[i] = mm[i] * b1 + c1 * g[i];
            vv[i] = vv[i] * b2 + (c2 * g[i]) * g[i];
            pp[i] = pp[i] - (st * mm[i]) / (sqrtf(vv[i]) * ibc + eps);
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            pp[i] = pp[i] * a;
            mm[i] = mm[i] * b1;
            vv[i] = vv[i] * b2;
            pp[i] = pp[i] - (st * mm[i]) / (sqrtf(vv[i]) * ibc + eps);
        }
    }
    for (int64_t i = 0; i < n; i++) p[i] = pp[i], m[i] = mm[i], v[i] = vv[i];
}

/* Flush subnormals to zero on this thread; returns the previous control word for flush_restore. */
static uint64_t flush_on(void) {
#if defined(__x86_64__)
    unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040); /* FTZ (bit 15) and DAZ (bit 6) */
    return csr;
#elif defined(__aarch64__)
    uint64_t fpcr;
    __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
    __asm__ volatile("msr fpcr, %0" : : "r"(fpcr | (1ull << 24))); /* FZ */
    return fpcr;
#else
    return 0;
#endif
}

static void flush_restore(uint64_t word) {
#if defined(__x86_64__)
    _mm_setcsr((unsigned)word);
#elif defined(__aarch64__)
    __asm__ volatile("msr fpcr, %0" : : "r"(word));
#else
    (void)word;
#endif
}

/* A parameter of shape (nrows_total, width) with AdamW state m, v and last[r], the last step applied to
 * row r. For each of the nrows distinct rows r = rows[i]: apply steps last[r] + 1 .. step, the last one
 * with gradient row i of grad (nrows, width) or, when grad is NULL, with a zero gradient (rows already at
 * `step` are then left alone); set last[r] = step. a, st, ibc hold the constants of steps 0 .. step.
 * Returns 0, or -3 (and changes nothing) when a row is out of range, repeated, or already at `step`
 * with a gradient given. */
API int tk_lazy_adamw(float *p, float *m, float *v, int64_t *last, int64_t nrows_total, int64_t width,
                      const int64_t *rows, int64_t nrows, const float *grad, int64_t step, const float *a,
                      const float *st, const float *ibc, float b1, float b2, float c1, float c2, float eps,
                      int nthreads) {
    if (nrows_total < 0 || width < 0 || nrows < 0 || step < 1) return -3;
    for (int64_t i = 0; i < nrows; i++) {
        int64_t r = rows[i];
        if (r < 0 || r >= nrows_total || last[r] < 0 || last[r] > step || (grad && last[r] == step)) return -3;
        if (i > 0 && r <= rows[i - 1]) return -3; /* rows must be sorted and distinct */
    }
    const adamw_consts c = {a, st, ibc, b1, b2, c1, c2, eps};
    const int64_t nblocks = (width + BLOCK - 1) / BLOCK, ntasks = nrows * nblocks;
    (void)nthreads;
#pragma omp parallel num_threads(nthreads) if (ntasks * BLOCK >= (1 << 15))
    {
        const uint64_t word = flush_on();
#pragma omp for schedule(static)
        for (int64_t t = 0; t < ntasks; t++) {
            const int64_t i = t / nblocks, k0 = t % nblocks * BLOCK, r = rows[i];
            const int64_t n = width - k0 < BLOCK ? width - k0 : BLOCK, off = r * width + k0;
            if (!grad && last[r] == step) continue;
            block_steps(p + off, m + off, v + off, grad ? grad + i * width + k0 : NULL, n, last[r] + 1, step, &c);
        }
        flush_restore(word);
    }
    for (int64_t i = 0; i < nrows; i++) last[rows[i]] = step;
    return 0;
}
