/* Stand-alone check of the kernel library's C ABI against a naive reference written here, for machines
 * without Python and torch (tests/test_kernels.py cross-compiles it for aarch64 and runs it under qemu).
 * Exit status 0 when every backend the CPU supports matches the reference bit for bit, and so does the
 * lazy AdamW row update. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int tk_supported(void);
int tk_ternary_matmul(int backend, const int8_t *x, const uint8_t *w, const float *sx, const float *sw,
                      int sw_per_channel, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int nthreads);
int tk_ternary_linear(int backend, const float *x, const uint8_t *w, const float *sw, int sw_per_channel,
                      const float *bias, float *y, int64_t M, int64_t N, int64_t K, int nthreads);
int tk_lazy_adamw(float *p, float *m, float *v, int64_t *last, int64_t nrows_total, int64_t width, const int64_t *rows,
                  int64_t nrows, const float *grad, int64_t step, const float *a, const float *st, const float *ibc,
                  float b1, float b2, float c1, float c2, float eps, int nthreads);

static uint64_t state = 88172645463325252ull;
static uint32_t rnd(void) { /* xorshift64 */
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (uint32_t)(state >> 32);
}
static float rndf(void) { return (float)(rnd() % 2000001) / 1000000.0f - 1.0f; }

/* Packed layout: weight k of a row in byte k / 4 at bits 2 * (k % 4), coded w + 1; padding coded 1. */
static void pack(const int8_t *q, uint8_t *p, int64_t n, int64_t k) {
    int64_t kb = (k + 3) / 4;
    for (int64_t r = 0; r < n; r++)
        for (int64_t b = 0; b < kb; b++) {
            uint8_t v = 0;
            for (int i = 0; i < 4; i++) {
                int64_t c = 4 * b + i;
                v |= (uint8_t)((c < k ? q[r * k + c] + 1 : 1) << (2 * i));
            }
            p[r * kb + b] = v;
        }
}

static void reference(const int8_t *x, const int8_t *q, const float *sx, const float *sw, int per_channel,
                      const float *bias, float *y, int64_t m, int64_t n, int64_t k) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            int64_t acc = 0;
            for (int64_t c = 0; c < k; c++) acc += (int64_t)x[i * k + c] * q[j * k + c];
            float scale = sx[i] * sw[per_channel ? j : 0];
            float v = (float)acc * scale;
            y[i * n + j] = bias ? v + bias[j] : v;
        }
}

/* quantize_act(x, 8): a = max(absmax, 1e-5), s = a / 127, q = round half to even (x * (127 / a)). */
static void quantize(const float *x, int8_t *q, float *s, int64_t m, int64_t k) {
    for (int64_t i = 0; i < m; i++) {
        float a = 0.0f;
        for (int64_t c = 0; c < k; c++) a = fabsf(x[i * k + c]) > a ? fabsf(x[i * k + c]) : a;
        a = a > 1e-5f ? a : 1e-5f;
        float inv = 127.0f / a;
        s[i] = a / 127.0f;
        for (int64_t c = 0; c < k; c++) q[i * k + c] = (int8_t)nearbyintf(x[i * k + c] * inv);
    }
}

/* Lazy AdamW (rows present with probability 1/3 per step, then a final catch-up of every row) against
 * the eager AdamW update of every element at every step, absent rows with a zero gradient. */
static int check_lazy_adamw(int threads) {
    enum { R = 9, W = 150, T = 40 };
    static float p[R * W], m[R * W], v[R * W], pe[R * W], me[R * W], ve[R * W], g[R * W], gl[R * W];
    float a[T + 1], st[T + 1], ibc[T + 1];
    const float b1 = 0.9f, b2 = 0.999f, c1 = 0.1f, c2 = 0.001f, eps = 1e-8f;
    int64_t last[R] = {0}, rows[R], all[R];
    for (int i = 0; i < R * W; i++) p[i] = pe[i] = rndf(), m[i] = v[i] = me[i] = ve[i] = 0.0f;
    for (int r = 0; r < R; r++) all[r] = r;
    int rc = 0;
    for (int t = 1; t <= T; t++) {
        double lr = 0.01 * (1.0 - t / 50.0);
        a[t] = (float)(1.0 - lr * 0.1), st[t] = (float)(lr / (1.0 - pow(0.9, t)));
        ibc[t] = (float)(1.0 / sqrt(1.0 - pow(0.999, t)));
        int64_t n = 0;
        memset(g, 0, sizeof g);
        for (int r = 0; r < R; r++)
            if (rnd() % 3 == 0) {
                for (int k = 0; k < W; k++) g[r * W + k] = gl[n * W + k] = rndf();
                rows[n++] = r;
            }
        for (int i = 0; i < R * W; i++) {
            pe[i] = pe[i] * a[t];
            me[i] = me[i] * b1 + c1 * g[i];
            ve[i] = ve[i] * b2 + (c2 * g[i]) * g[i];
            pe[i] = pe[i] - (st[t] * me[i]) / (sqrtf(ve[i]) * ibc[t] + eps);
        }
        rc |= tk_lazy_adamw(p, m, v, last, R, W, rows, n, gl, t, a, st, ibc, b1, b2, c1, c2, eps, threads);
    }
    rc |= tk_lazy_adamw(p, m, v, last, R, W, all, R, NULL, T, a, st, ibc, b1, b2, c1, c2, eps, threads);
    int bad = rc != 0;
    for (int i = 0; i < R * W; i++) bad |= p[i] != pe[i] || m[i] != me[i] || v[i] != ve[i];
    if (bad) printf("MISMATCH lazy adamw threads %d\n", threads);
    return bad;
}

int main(void) {
    const int64_t shapes[][3] = {{1, 1, 1}, {1, 5, 3}, {1, 33, 255}, {1, 64, 4096}, {7, 17, 129},
                                 {7, 64, 512}, {33, 100, 65}, {20, 48, 1030}, {0, 8, 64}, {3, 0, 64}};
    int mask = tk_supported(), cases = 0, failures = 0;
    for (int backend = 0; backend < 5; backend++) {
        if (!(mask >> backend & 1)) continue;
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            int64_t m = shapes[s][0], n = shapes[s][1], k = shapes[s][2], kb = (k + 3) / 4;
            int8_t *q = malloc((size_t)(n * k + 1)), *x = malloc((size_t)(m * k + 1));
            uint8_t *p = malloc((size_t)(n * kb + 1));
            float *xf = malloc(sizeof(float) * (size_t)(m * k + 1)), *sx = malloc(sizeof(float) * (size_t)(m + 1));
            float *sw = malloc(sizeof(float) * (size_t)(n + 1)), *bias = malloc(sizeof(float) * (size_t)(n + 1));
            float *want = malloc(sizeof(float) * (size_t)(m * n + 1)), *got = malloc(sizeof(float) * (size_t)(m * n + 1));
            for (int64_t i = 0; i < n * k; i++) q[i] = (int8_t)(rnd() % 3) - 1;
            for (int64_t i = 0; i < m * k; i++) x[i] = (int8_t)(rnd() % 256 - 128);
            for (int64_t i = 0; i < m * k; i++) xf[i] = rndf() * 10.0f;
            for (int64_t i = 0; i < m; i++) sx[i] = rndf() * 0.1f + 0.2f;
            for (int64_t i = 0; i < n; i++) sw[i] = rndf() + 1.5f, bias[i] = rndf();
            pack(q, p, n, k);
            int per_channel = (int)(s % 2);
            for (int threads = 1; threads <= 2; threads++) {
                reference(x, q, sx, sw, per_channel, s % 3 ? bias : NULL, want, m, n, k);
                int rc = tk_ternary_matmul(backend, x, p, sx, sw, per_channel, s % 3 ? bias : NULL, got, m, n, k, threads);
                int bad = rc != 0 || memcmp(want, got, sizeof(float) * (size_t)(m * n)) != 0;
                quantize(xf, x, sx, m, k);
                reference(x, q, sx, sw, per_channel, bias, want, m, n, k);
                rc = tk_ternary_linear(backend, xf, p, sw, per_channel, bias, got, m, n, k, threads);
                bad |= rc != 0 || memcmp(want, got, sizeof(float) * (size_t)(m * n)) != 0;
                if (bad) printf("MISMATCH backend %d shape %lld x %lld x %lld threads %d\n", backend, (long long)m,
                                (long long)n, (long long)k, threads);
                failures += bad;
                cases += 2;
            }
            free(q), free(x), free(p), free(xf), free(sx), free(sw), free(bias), free(want), free(got);
        }
    }
    for (int threads = 1; threads <= 2; threads++, cases++) failures += check_lazy_adamw(threads);
    printf("%d cases, %d failures, backends mask %d\n", cases, failures, mask);
    return failures != 0 || cases == 0;
}
