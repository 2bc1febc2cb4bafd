// RMSNorm forward and backward on bf16 rows, with Hugging Face LlamaRMSNorm
// numerics (the trainer's ops::RmsNorm):
//   rstd = 1 / sqrt(mean(float(x)^2) + eps)            (fp32)
//   y    = bf16(w * bf16(float(x) * rstd))
// Backward, with n = bf16(x * rstd) and gn = bf16(dy * w):
//   dx = bf16(rstd * gn - x * rstd^3 * sum(gn * x) / hidden)
//   dweight += sum over rows of dy * n                 (optional, fp32)
// Layout: x, y, dy, dx are [rows, hidden] bf16 (uint16_t storage) with a row
// stride in elements (>= hidden) and a contiguous last dimension; weight is
// bf16 [hidden]; rstd is fp32 [rows]. Device pointers. Rows and hidden may be
// any size >= 1; pointers need only 2-byte alignment (16-byte aligned rows
// with hidden % 8 == 0 take the vectorised path).
// In place: y may equal x (same stride); dx may equal dy (same stride).
#ifndef TUNE_KERNELS_INCLUDE_TUNE_KERNELS_RMSNORM_H_
#define TUNE_KERNELS_INCLUDE_TUNE_KERNELS_RMSNORM_H_

#include <cstdint>

#include "tune/kernels/status.h"
#include "tune/kernels/stream.h"

namespace tune::kernels {

struct RmsNormShape {
  int64_t rows = 0;
  int64_t hidden = 0;
  float eps = 1e-5f;
};

// rstd may be null when the caller does not keep it for backward.
Status RmsNormForward(const RmsNormShape& shape, const uint16_t* x, int64_t x_stride, const uint16_t* weight,
                      uint16_t* y, int64_t y_stride, float* rstd, cudaStream_t stream);

// rstd is the forward's. dweight (fp32 [hidden]) is accumulated into, not
// overwritten; pass null to skip it (frozen norm weights, the QLoRA case).
Status RmsNormBackward(const RmsNormShape& shape, const uint16_t* x, int64_t x_stride, const uint16_t* weight,
                       const float* rstd, const uint16_t* dy, int64_t dy_stride, uint16_t* dx, int64_t dx_stride,
                       float* dweight, cudaStream_t stream);

}  // namespace tune::kernels

#endif  // TUNE_KERNELS_INCLUDE_TUNE_KERNELS_RMSNORM_H_
