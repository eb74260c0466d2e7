/* Decode attention of the CPU path: one new query token per sequence, grouped-query heads, over
 * keys and values read in place from the paged pools.
 *
 * The torch path gathers every sequence's own K/V rows out of the pool, pads them to one width,
 * runs the fused flash kernel twice (the shared prefix for all sequences, then each sequence's own
 * rows) and merges the halves; at decode sizes its time goes to copies and to matrix calls on four
 * query rows. Here each (sequence, KV head) pair walks its keys once, the shared prefix's slots
 * and then its own: the G query heads that share the KV head are scored together against each key
 * row, with an online softmax (running max and sum, rescaled once per block of keys), and the
 * values are accumulated in the same pass. Pairs run in parallel (OpenMP, on the caller's thread
 * team), KV-head major, so one head's rows of the shared prefix stay in cache from one sequence
 * to the next.
 *
 * The reference is `decode_attention_ref` (kernels/attention.py); float32 only.
 */

#include <math.h>
#include <stdint.h>

#define BLOCK 64 /* keys scored between two rescales of the running sums */

/* One (sequence, KV head) pair. Inlined into callers with constant G and D, so the loops over
 * them unroll and vectorize; the generic caller passes them at run time. */
static inline __attribute__((always_inline)) void attend_pair(
    int64_t G, int64_t D, int64_t row, float scale, const float *qb, const float *k_pool, const float *v_pool,
    const int64_t *shared, int64_t n_shared, const int64_t *own, int64_t n_own, int64_t h, float *ob, float *lb)
{
    float qs[G * D], acc[G * D], s[G * BLOCK], m[G], l[G];
    for (int64_t i = 0; i < G * D; i++) {
        qs[i] = qb[i] * scale;
        acc[i] = 0.0f;
    }
    for (int64_t g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    const int64_t n = n_shared + n_own;
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
        const int64_t nb = n - j0 < BLOCK ? n - j0 : BLOCK;
        for (int64_t j = 0; j < nb; j++) {
            const int64_t key = j0 + j;
            const int64_t slot = key < n_shared ? shared[key] : own[key - n_shared];
            const float *kr = k_pool + slot * row + h * D;
            for (int64_t g = 0; g < G; g++) {
                float dot = 0.0f;
                for (int64_t d = 0; d < D; d++) dot += qs[g * D + d] * kr[d];
                s[g * BLOCK + j] = dot;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *sg = s + g * BLOCK;
            float mx = m[g];
            for (int64_t j = 0; j < nb; j++) mx = sg[j] > mx ? sg[j] : mx;
            const float corr = expf(m[g] - mx); /* 0 on the first block (m = -inf) */
            float sum = 0.0f;
            for (int64_t j = 0; j < nb; j++) {
                sg[j] = expf(sg[j] - mx);
                sum += sg[j];
            }
            l[g] = l[g] * corr + sum;
            m[g] = mx;
            for (int64_t d = 0; d < D; d++) acc[g * D + d] *= corr;
        }
        for (int64_t j = 0; j < nb; j++) {
            const int64_t key = j0 + j;
            const int64_t slot = key < n_shared ? shared[key] : own[key - n_shared];
            const float *vr = v_pool + slot * row + h * D;
            for (int64_t g = 0; g < G; g++) {
                const float p = s[g * BLOCK + j];
                for (int64_t d = 0; d < D; d++) acc[g * D + d] += p * vr[d];
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const float inv = 1.0f / l[g];
        for (int64_t d = 0; d < D; d++) ob[g * D + d] = acc[g * D + d] * inv;
        lb[g] = m[g] + logf(l[g]);
    }
}

#define ATTEND_ALL(G, D)                                                                                       \
    do {                                                                                                       \
        const int64_t row = Hkv * (D);                                                                         \
        _Pragma("omp parallel for num_threads(nthreads) if(nthreads > 1 && B * Hkv > 1) schedule(static)")   \
        for (int64_t pair = 0; pair < Hkv * B; pair++) {                                                       \
            const int64_t h = pair / B, b = pair % B, first = (b * Hkv + h) * (G);                            \
            attend_pair((G), (D), row, scale, q + first * (D), k_pool, v_pool, shared, n_shared,               \
                        own + own_start[b], own_start[b + 1] - own_start[b], h, out + first * (D), lse + first); \
        }                                                                                                      \
    } while (0)

void agentrt_decode_attention_f32(
    int64_t B, int64_t Hkv, int64_t G, int64_t D,
    const float *q,          /* [B, Hkv * G, D], contiguous */
    const float *k_pool,     /* [S, Hkv, D], contiguous */
    const float *v_pool,     /* [S, Hkv, D], contiguous */
    const int64_t *shared,   /* [n_shared]: slots every sequence attends first (a common prefix) */
    int64_t n_shared,
    const int64_t *own,       /* every sequence's own slots, end to end */
    const int64_t *own_start, /* [B + 1]: sequence b then attends own[own_start[b]:own_start[b + 1]] */
    float scale,
    float *out,              /* [B, Hkv * G, D] */
    float *lse,              /* [B, Hkv * G]: natural log of each query's sum of exp(scale * q.k) */
    int nthreads)
{
    /* the shapes of the models this runs most (embedded: 4 x 32; Nemotron 3 Nano: 16 x 128) */
    if (G == 4 && D == 32)
        ATTEND_ALL(4, 32);
    else if (G == 16 && D == 128)
        ATTEND_ALL(16, 128);
    else
        ATTEND_ALL(G, D);
}
