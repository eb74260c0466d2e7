/* RMSNorm of the CPU path: y = x * rsqrt(mean(x^2) + eps) * weight, row by row, float32.
 *
 * torch's rms_norm runs as five operators on CPU (square, mean, add, rsqrt, two multiplies),
 * each a pass over the rows with its own temporary; a model step runs one norm per layer. Here
 * each row is read twice and written once, rows in parallel when there are enough of them.
 *
 * The reference is `torch.nn.functional.rms_norm`; `kernels/cpu.py` builds and calls this file.
 */

#include <math.h>
#include <stdint.h>

void agentrt_rms_norm_f32(int64_t rows, int64_t dim, const float *x, int64_t ld, const float *weight, float eps,
                          float *y, int nthreads)
{
    #pragma omp parallel for num_threads(nthreads) if(nthreads > 1 && rows * dim >= 65536) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        float *yr = y + r * dim;
        float sum = 0.0f;
        for (int64_t i = 0; i < dim; i++) sum += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) yr[i] = xr[i] * inv * weight[i];
    }
}
