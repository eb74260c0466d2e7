/* Routed experts of the CPU path: for each token, the sum over its k chosen experts of
 * weight * down(relu(up(x))^2), with non-gated squared-ReLU experts, for any batch size.
 *
 * The torch path sorts the (token, choice) pairs by expert, pads the groups, runs two batched
 * matmuls and unsorts; at decode sizes every expert gets a handful of rows and arranging them
 * costs more than multiplying. Here the pairs are grouped by expert with a counting sort and
 * their inputs gathered into one block per expert; each expert's two products run on the linear
 * layers' micro-kernel (cpu_linear.c) over weights the caller packed once into column panels.
 * Work items are (expert, block of up to 64 of its rows, pair of panels), first for up (with the
 * squared ReLU as the kernel's epilogue), then for down, over the caller's OpenMP team; each token
 * then sums its k results in choice order.
 *
 * The reference is `moe_experts_ref` (kernels/moe.py); float32 only.
 */

#include <stdint.h>
#include <stdlib.h>

void agentrt_linear_block_f32(int64_t rows, int64_t N, int64_t K, const float *x, int64_t ldx, const float *packed,
                              const float *bias, int act, int64_t pair, float *y, int64_t ldy);

#define PANEL 16     /* cpu_linear.c's panel width: the experts' weights are packed as its weights are */
#define ROW_BLOCK 64 /* rows of one expert per work item, as cpu_linear.c splits rows */

typedef struct {
    int64_t expert, row, rows; /* rows [row, row + rows) of the sorted pairs */
} block_t;

int agentrt_moe_packed_f32(
    int64_t T, int64_t k, int64_t E, int64_t I, int64_t Din,
    const float *x,          /* [T, Din] */
    const float *up,         /* [E, ceil(I / 16), Din, 16]: each expert's up projection, packed */
    const float *down,       /* [E, ceil(Din / 16), I, 16]: each expert's down projection, packed */
    const int64_t *ids,      /* [T, k], each in [0, E) */
    const float *weights,    /* [T, k] */
    float *work,             /* [T * k, 2 * Din + I] scratch */
    float *out,              /* [T, Din] */
    int nthreads)
{
    const int64_t pairs = T * k;
    const int64_t up_panels = (I + PANEL - 1) / PANEL, down_panels = (Din + PANEL - 1) / PANEL;
    const int64_t up_pairs = (up_panels + 1) / 2, down_pairs = (down_panels + 1) / 2;
    int64_t *start = calloc((size_t)(E + 1), sizeof(int64_t));
    int64_t *order = malloc((size_t)(pairs > 0 ? pairs : 1) * sizeof(int64_t));
    int64_t *where = malloc((size_t)(pairs > 0 ? pairs : 1) * sizeof(int64_t));
    block_t *blocks = malloc((size_t)(pairs + E > 0 ? pairs + E : 1) * sizeof(block_t));
    if (!start || !order || !where || !blocks) {
        free(start);
        free(order);
        free(where);
        free(blocks);
        return -1;
    }
    for (int64_t p = 0; p < pairs; p++) start[ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    int64_t nblocks = 0;
    for (int64_t e = 0; e < E; e++)
        for (int64_t r = start[e]; r < start[e + 1]; r += ROW_BLOCK)
            blocks[nblocks++] = (block_t){e, r, start[e + 1] - r < ROW_BLOCK ? start[e + 1] - r : ROW_BLOCK};
    for (int64_t p = 0; p < pairs; p++) { /* counting sort; `start` ends one expert on */
        where[p] = start[ids[p]]++;
        order[where[p]] = p;
    }
    float *xs = work, *h = work + pairs * Din, *ys = h + pairs * I;
    const int parallel = nthreads > 1 && pairs * I * Din >= (1 << 18);

#pragma omp parallel num_threads(nthreads) if(parallel)
    {
#pragma omp for schedule(static)
        for (int64_t q = 0; q < pairs; q++) {
            const float *src = x + (order[q] / k) * Din;
            for (int64_t j = 0; j < Din; j++) xs[q * Din + j] = src[j];
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < nblocks * up_pairs; item++) {
            const block_t b = blocks[item / up_pairs];
            agentrt_linear_block_f32(b.rows, I, Din, xs + b.row * Din, Din, up + b.expert * up_panels * Din * PANEL,
                                     0, 1 /* relu^2 */, item % up_pairs, h + b.row * I, I);
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < nblocks * down_pairs; item++) {
            const block_t b = blocks[item / down_pairs];
            agentrt_linear_block_f32(b.rows, Din, I, h + b.row * I, I, down + b.expert * down_panels * I * PANEL,
                                     0, 0, item % down_pairs, ys + b.row * Din, Din);
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            float *o = out + t * Din;
            for (int64_t j = 0; j < Din; j++) o[j] = 0.0f;
            for (int64_t c = 0; c < k; c++) {
                const float w = weights[t * k + c], *y = ys + where[t * k + c] * Din;
                for (int64_t j = 0; j < Din; j++) o[j] += w * y[j];
            }
        }
    }
    free(start);
    free(order);
    free(where);
    free(blocks);
    return 0;
}
