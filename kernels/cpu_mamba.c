/* The Mamba-2 mixer of the CPU path, from the in-projection's output to the gated RMSNorm's,
 * over a varlen batch whose conv windows and SSM states live in pool slots (updated in place).
 *
 * The engine's torch path needs some thirty operators per Mamba layer and step, and copies every
 * sequence's SSM state out of its pool slot and back; for a decode step of 32 sequences of the
 * embedded model that is about three quarters of a millisecond per layer, almost none of it
 * arithmetic. Here each state is read and written once, in place.
 *
 * Three phases, each parallel over independent work (OpenMP, on the caller's thread team):
 *   1. conv: every token's depthwise causal conv + SiLU (taps before a sequence's first token come
 *      from its conv window in the pool); then each window is shifted by the sequence's tokens;
 *   2. scan: per (sequence, head), the recurrence over the sequence's tokens in order:
 *      s = exp(dt * A) * s + dt * x B^T, y = s C + D x (dt = softplus(dt + bias), clamped below);
 *   3. norm: per token, y * silu(gate), RMS-normalised per group of channels, times the weight.
 *
 * The reference is `mamba_mix_varlen_ref` (kernels/mamba_varlen.py); `kernels/cpu.py` builds
 * this file with the system C compiler and calls it through ctypes. float32 only.
 */

#include <math.h>
#include <stdint.h>

static inline float silu(float x) { return x / (1.0f + expf(-x)); }
static inline float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); } /* torch's threshold */

void agentrt_mamba_mix_f32(
    int64_t nseq, const int64_t *cu_seqlens, const int64_t *slots,
    int64_t heads, int64_t head_dim, int64_t state_size, int64_t groups, int64_t kernel, int64_t inner,
    const float *zxbcdt, int64_t ld,        /* [T, ld] rows: gate [inner] | xBC [conv_dim] | dt [heads] */
    const float *dt_bias, const float *A_log, const float *D,  /* [heads] each */
    const float *conv_wt, const float *conv_b,                 /* [kernel, conv_dim] (tap-major), [conv_dim] or NULL */
    const float *norm_w, float dt_min, float eps, int64_t group_size,
    float *conv_pool,                       /* [slots, conv_dim, kernel - 1] */
    float *ssm_pool,                        /* [slots, heads, head_dim, state_size] */
    float *work,                            /* [T, conv_dim + inner] scratch */
    float *out,                             /* [T, inner] */
    int nthreads)
{
    const int64_t H = heads, P = head_dim, N = state_size, G = groups, K = kernel, W = kernel - 1;
    const int64_t C = inner + 2 * G * N, R = H / G;
    const int64_t T = cu_seqlens[nseq];
    const int64_t stride = C + inner;       /* a token's row of `work`: conv output | y */
    if (T == 0) return;
    const int par = nthreads > 1 && T * C >= 4096;

    /* 1. conv + SiLU of every token, reading (not yet shifting) the windows */
    #pragma omp parallel for num_threads(nthreads) if(par) schedule(static)
    for (int64_t b = 0; b < nseq; b++) {
        const float *win = conv_pool + slots[b] * C * W;
        for (int64_t t = cu_seqlens[b]; t < cu_seqlens[b + 1]; t++) {
            const int64_t i = t - cu_seqlens[b];  /* position within the new tokens */
            float *h = work + t * stride;
            for (int64_t c = 0; c < C; c++) h[c] = conv_b ? conv_b[c] : 0.0f;
            for (int64_t k = 0; k < K; k++) {
                const int64_t pos = i - W + k;    /* input position of tap k; < 0: in the window */
                const float *wk = conv_wt + k * C;
                if (pos >= 0) {
                    const float *x = zxbcdt + (cu_seqlens[b] + pos) * ld + inner;
                    for (int64_t c = 0; c < C; c++) h[c] += wk[c] * x[c];
                } else {
                    const float *x = win + (pos + W);
                    for (int64_t c = 0; c < C; c++) h[c] += wk[c] * x[c * W];
                }
            }
            for (int64_t c = 0; c < C; c++) h[c] = silu(h[c]);
        }
    }
    /* ... then shift each window by its sequence's inputs */
    #pragma omp parallel for num_threads(nthreads) if(par) schedule(static)
    for (int64_t b = 0; b < nseq; b++) {
        float *win = conv_pool + slots[b] * C * W;
        const int64_t n = cu_seqlens[b + 1] - cu_seqlens[b];
        for (int64_t c = 0; c < C; c++) {
            float *w = win + c * W;
            for (int64_t j = 0; j < W; j++) {  /* new window entry j holds input position n - W + j */
                const int64_t pos = n - W + j;
                w[j] = pos >= 0 ? zxbcdt[(cu_seqlens[b] + pos) * ld + inner + c] : w[j + n];
            }
        }
    }

    /* 2. the recurrence, per (sequence, head) */
    #pragma omp parallel for num_threads(nthreads) if(nthreads > 1) schedule(static) collapse(2)
    for (int64_t b = 0; b < nseq; b++) {
        for (int64_t hh = 0; hh < H; hh++) {
            float *s = ssm_pool + (slots[b] * H + hh) * P * N;
            const float A = -expf(A_log[hh]), skip = D[hh];
            const int64_t g = hh / R;
            for (int64_t t = cu_seqlens[b]; t < cu_seqlens[b + 1]; t++) {
                const float *h = work + t * stride;
                float dt = softplus(zxbcdt[t * ld + inner + C + hh] + dt_bias[hh]);
                if (dt < dt_min) dt = dt_min;
                const float decay = expf(dt * A);
                const float *x = h + hh * P, *Bg = h + inner + g * N, *Cg = h + inner + G * N + g * N;
                float *y = work + t * stride + C + hh * P;
                for (int64_t p = 0; p < P; p++) {
                    const float dx = dt * x[p];
                    float *sp = s + p * N, acc = 0.0f;
                    for (int64_t n = 0; n < N; n++) {
                        const float v = sp[n] * decay + dx * Bg[n];
                        sp[n] = v;
                        acc += v * Cg[n];
                    }
                    y[p] = acc + skip * x[p];
                }
            }
        }
    }

    /* 3. gated RMSNorm per token and group */
    #pragma omp parallel for num_threads(nthreads) if(par) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *y = work + t * stride + C;
        const float *gate = zxbcdt + t * ld;
        float *o = out + t * inner;
        for (int64_t g0 = 0; g0 < inner; g0 += group_size) {
            float sq = 0.0f;
            for (int64_t i = g0; i < g0 + group_size; i++) {
                const float v = y[i] * silu(gate[i]);
                y[i] = v;
                sq += v * v;
            }
            const float r = 1.0f / sqrtf(sq / (float)group_size + eps);
            for (int64_t i = g0; i < g0 + group_size; i++) o[i] = y[i] * r * norm_w[i];
        }
    }
}
