/* Stand-alone check of the kernel library's C ABI against a naive reference written here, for machines
 * without Python and torch (tests/test_kernels.py cross-compiles it for aarch64 and runs it under qemu).
 * Exit status 0 when every backend the CPU supports matches the reference bit for bit. */
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
    printf("%d cases, %d failures, backends mask %d\n", cases, failures, mask);
    return failures != 0 || cases == 0;
}
