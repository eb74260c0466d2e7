/* Routed experts of the CPU path for decode-sized batches: for each token, the sum over its k
 * chosen experts of weight * down(relu(up(x))^2), with non-gated squared-ReLU experts.
 *
 * With a few dozen tokens every expert gets a handful of rows, and the torch path (sort by
 * expert, pad, two batched matmuls, unsort) spends more time arranging rows than multiplying.
 * Here the (token, choice) pairs are grouped by expert with a counting sort; each expert then
 * multiplies its rows against its weights as they lie ([I, Din] and [Din, I], row-major: every
 * output is a dot product over a contiguous row), experts in parallel (OpenMP); a last pass sums
 * each token's k results in choice order.
 *
 * The reference is `moe_experts_ref` (kernels/moe.py); float32 only.
 */

#include <stdint.h>
#include <stdlib.h>

#define ROWS 4  /* rows of one expert multiplied together: each weight row is read once per block */

/* out[r][i] = dot(a[r], w[i]) for r < ROWS and i < m; a: ROWS row pointers of length n; w: [m, n] */
static void dots(const float *const a[ROWS], const float *w, int64_t m, int64_t n, float *const out[ROWS]) {
    for (int64_t i = 0; i < m; i++) {
        const float *wi = w + i * n;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        for (int64_t c = 0; c < n; c++) {
            const float v = wi[c];
            s0 += a[0][c] * v;
            s1 += a[1][c] * v;
            s2 += a[2][c] * v;
            s3 += a[3][c] * v;
        }
        out[0][i] = s0;
        out[1][i] = s1;
        out[2][i] = s2;
        out[3][i] = s3;
    }
}

int agentrt_moe_experts_f32(
    int64_t T, int64_t k, int64_t E, int64_t I, int64_t Din,
    const float *x,            /* [T, Din] */
    const float *up,           /* [E, I, Din] */
    const float *down,         /* [E, Din, I] */
    const int64_t *ids,        /* [T, k], each in [0, E) */
    const float *weights,      /* [T, k] */
    float *work,               /* [T * k, Din + I] scratch */
    float *out,                /* [T, Din] */
    int nthreads)
{
    const int64_t pairs = T * k;
    int64_t *start = calloc((size_t)(E + 1), sizeof(int64_t));
    int64_t *order = malloc((size_t)(pairs > 0 ? pairs : 1) * sizeof(int64_t));
    if (!start || !order) {
        free(start);
        free(order);
        return -1;
    }
    for (int64_t p = 0; p < pairs; p++) start[ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    {
        int64_t *fill = malloc((size_t)(E > 0 ? E : 1) * sizeof(int64_t));
        if (!fill) {
            free(start);
            free(order);
            return -1;
        }
        for (int64_t e = 0; e < E; e++) fill[e] = start[e];
        for (int64_t p = 0; p < pairs; p++) order[fill[ids[p]]++] = p;
        free(fill);
    }
    const int64_t stride = Din + I;  /* a pair's row of `work`: result [Din] | hidden [I] */

    #pragma omp parallel for num_threads(nthreads) if(nthreads > 1 && pairs > 1) schedule(dynamic, 1)
    for (int64_t e = 0; e < E; e++) {
        const float *u = up + e * I * Din, *d = down + e * Din * I;
        for (int64_t q = start[e]; q < start[e + 1]; q += ROWS) {
            /* a block of up to ROWS pairs; a short block repeats its last pair (computed twice, same result) */
            const float *xr[ROWS], *hr[ROWS];
            float *h[ROWS], *res[ROWS];
            for (int r = 0; r < ROWS; r++) {
                const int64_t p = order[q + r < start[e + 1] ? q + r : start[e + 1] - 1];
                xr[r] = x + (p / k) * Din;
                res[r] = work + p * stride;
                h[r] = res[r] + Din;
                hr[r] = h[r];
            }
            dots(xr, u, I, Din, h);
            for (int r = 0; r < ROWS && q + r < start[e + 1]; r++)  /* once per distinct pair */
                for (int64_t i = 0; i < I; i++) h[r][i] = h[r][i] > 0.0f ? h[r][i] * h[r][i] : 0.0f;
            dots(hr, d, Din, I, res);
            for (int r = 0; r < ROWS && q + r < start[e + 1]; r++) {
                const float w = weights[order[q + r]];
                for (int64_t j = 0; j < Din; j++) res[r][j] *= w;
            }
        }
    }

    #pragma omp parallel for num_threads(nthreads) if(nthreads > 1 && T > 1) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *o = out + t * Din;
        for (int64_t j = 0; j < Din; j++) o[j] = 0.0f;
        for (int64_t c = 0; c < k; c++) {
            const float *res = work + (t * k + c) * stride;
            for (int64_t j = 0; j < Din; j++) o[j] += res[j];
        }
    }
    free(start);
    free(order);
    return 0;
}
