/* The linear layers of the CPU path: y = x W^T (+ bias), W pre-packed once into column panels.
 *
 * A decode step multiplies 32-odd rows by each weight. At that size a general GEMM spends its time
 * re-packing the weight on every call, and the weight is cold (the whole model went through the
 * caches since its last use): on the embedded model torch's float32 matmul reached ~70 GFLOP/s
 * inside a decode step. Here the weight is packed once, by the caller, into panels of 16 output
 * columns stored k-major (P[p][k][c] = W[16p + c][k], zero past N), so one call streams each
 * panel front to back. The micro-kernel holds a few rows x 32 columns of y in registers (8 rows
 * with AVX-512: per k, two panel vectors and eight broadcasts of x feed sixteen multiply-adds).
 *
 * Work is split into (block of up to 64 rows, pair of panels) items over the caller's OpenMP team;
 * a small product runs on one thread. Each output is one sum over k in order, so the result does
 * not depend on how rows are batched. The reference is torch.nn.functional.linear.
 */

#include <stdint.h>

/* The machine's float vector, as a GCC/Clang vector type: one source for AVX-512, AVX2 and the
 * 128-bit ISAs (SSE, NEON). Rows per tile follow the register file: the accumulators of ROWS rows
 * by two panels, plus one panel pair's vectors, must fit. */
#if defined(__AVX512F__)
#define VL 16
#define ROWS 8
#elif defined(__AVX__)
#define VL 8
#define ROWS 3
#else
#define VL 4
#define ROWS 2
#endif
typedef float fv __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t iv __attribute__((vector_size(VL * sizeof(float))));
typedef float fv_unaligned __attribute__((vector_size(VL * sizeof(float)), aligned(sizeof(float))));

#define PANEL 16              /* output columns per packed panel */
#define NV (PANEL / VL)       /* vectors per panel row */
#define ROW_BLOCK 64          /* rows per work item */
#define SERIAL_MACS (1 << 18) /* below this many multiply-adds, one thread */
#define ACT_RELU2 1           /* act: 0 none, 1 squared ReLU after the bias */

/* relu(v)^2: the comparison sets all bits of the positive lanes, and the mask keeps them */
static inline fv relu2(fv v)
{
    const fv r = (fv)((iv)v & (v > 0.0f));
    return r * r;
}

/* y[0:mb, 0:16 * np] for np = 1 or 2 panels, of which n0 and n1 columns exist */
static inline __attribute__((always_inline)) void tile(
    const int mb, const int np, int64_t K, const float *x, int64_t ldx, const float *p0, const float *p1,
    const float *bias, int act, float *y, int64_t ldy, int64_t n0, int64_t n1)
{
    fv a[ROWS][2 * NV];
    for (int i = 0; i < mb; i++)
        for (int v = 0; v < np * NV; v++) a[i][v] = (fv){0};
    for (int64_t k = 0; k < K; k++) {
        fv w[2 * NV];
        for (int v = 0; v < NV; v++) {
            w[v] = *(const fv_unaligned *)(p0 + k * PANEL + v * VL);
            if (np == 2) w[NV + v] = *(const fv_unaligned *)(p1 + k * PANEL + v * VL);
        }
        for (int i = 0; i < mb; i++) {
            const float xv = x[i * ldx + k];
            for (int v = 0; v < np * NV; v++) a[i][v] += xv * w[v];
        }
    }
    const int64_t n = np == 2 ? PANEL + n1 : n0;
    for (int i = 0; i < mb; i++) {
        float *yr = y + i * ldy;
        for (int v = 0; v < np * NV; v++) {
            if (bias) a[i][v] += *(const fv_unaligned *)(bias + v * VL); /* packed: bias padded to the panels */
            if (act == ACT_RELU2) a[i][v] = relu2(a[i][v]);
        }
        if (n == np * PANEL) {
            for (int v = 0; v < np * NV; v++) *(fv_unaligned *)(yr + v * VL) = a[i][v];
        } else {
            for (int64_t c = 0; c < n; c++) yr[c] = a[i][c / VL][c % VL];
        }
    }
}

static inline int64_t columns(int64_t n) { return n >= PANEL ? PANEL : n; }

/* one tile call per count of rows (and of panels), each a constant, so the tiles unroll; the
 * counts above ROWS never occur (clamped only to keep the compiler's bounds checks quiet) */
#define TILE(mb, np) tile((mb) < ROWS ? (mb) : ROWS, np, K, xr, ldx, p0, p1, b, act, yr, ldy, m0, m1)
#define TILES(np)                        \
    switch (rows) {                      \
    case 8: TILE(8, np); break;          \
    case 7: TILE(7, np); break;          \
    case 6: TILE(6, np); break;          \
    case 5: TILE(5, np); break;          \
    case 4: TILE(4, np); break;          \
    case 3: TILE(3, np); break;          \
    case 2: TILE(2, np); break;          \
    default: TILE(1, np); break;         \
    }

/* y[0:rows, columns of panel pair `pair`] = x[0:rows] W^T (+ bias, act) on the calling thread */
static inline void linear_block(int64_t rows_total, int64_t N, int64_t K, const float *x, int64_t ldx,
                                const float *packed, const float *bias, int act, int64_t pair, float *y, int64_t ldy)
{
    const int64_t panels = (N + PANEL - 1) / PANEL;
    const int64_t c0 = pair * 2 * PANEL; /* first output column */
    const int np = 2 * pair + 1 < panels ? 2 : 1;
    const float *p0 = packed + 2 * pair * K * PANEL, *p1 = p0 + K * PANEL;
    const float *b = bias ? bias + c0 : 0;
    const int64_t left = N - c0;
    const int64_t m0 = columns(left), m1 = np == 2 ? columns(left - PANEL) : 0;
    for (int64_t i = 0; i < rows_total; i += ROWS) {
        const float *xr = x + i * ldx;
        float *yr = y + i * ldy + c0;
        const int64_t rows = rows_total - i < ROWS ? rows_total - i : ROWS;
        if (np == 2)
            TILES(2)
        else
            TILES(1)
    }
}

/* linear_block for other kernels' own work splits (the MoE experts) */
void agentrt_linear_block_f32(int64_t rows, int64_t N, int64_t K, const float *x, int64_t ldx, const float *packed,
                              const float *bias, int act, int64_t pair, float *y, int64_t ldy)
{
    linear_block(rows, N, K, x, ldx, packed, bias, act, pair, y, ldy);
}

void agentrt_linear_f32(
    int64_t M, int64_t N, int64_t K,
    const float *x,      /* [M, K], rows ldx apart */
    int64_t ldx,
    const float *packed, /* [ceil(N / 16), K, 16]: the weight in panels (see above) */
    const float *bias,   /* [ceil(N / 16) * 16] (zero past N) or NULL */
    int act,             /* ACT_RELU2: y = relu(x W^T + bias)^2 */
    float *y,            /* [M, N], rows ldy apart */
    int64_t ldy,
    int nthreads)
{
    const int64_t panels = (N + PANEL - 1) / PANEL, pairs = (panels + 1) / 2;
    const int64_t blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
    const int parallel = nthreads > 1 && blocks * pairs > 1 && M * N * K >= SERIAL_MACS;
#pragma omp parallel for num_threads(nthreads) if(parallel) schedule(static)
    for (int64_t item = 0; item < blocks * pairs; item++) {
        const int64_t block = item / pairs, i = block * ROW_BLOCK;
        linear_block(M - i < ROW_BLOCK ? M - i : ROW_BLOCK, N, K, x + i * ldx, ldx, packed, bias, act,
                     item % pairs, y + i * ldy, ldy);
    }
}

/* floats per vector this build uses (16 with AVX-512, 8 with AVX, 4 below) */
int agentrt_linear_vector_width(void) { return VL; }
