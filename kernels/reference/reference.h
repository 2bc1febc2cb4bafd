// CPU references for every kernel in kernels/include/tune/kernels/: plain C++
// (float/double math, no torch, no CUDA), same argument structs and layouts,
// host pointers instead of device pointers. They round to bf16 at the same
// points as the kernels (and as torch's bf16 ops), so the GPU tests compare
// with tight, per-kernel tolerances. They also validate arguments exactly like
// the kernels (see validate.h) and return the same Status.
#ifndef TUNE_KERNELS_REFERENCE_REFERENCE_H_
#define TUNE_KERNELS_REFERENCE_REFERENCE_H_

#include <array>
#include <cstdint>

#include "tune/kernels/gemm.h"
#include "tune/kernels/linear_cross_entropy.h"
#include "tune/kernels/nf4.h"
#include "tune/kernels/rmsnorm.h"
#include "tune/kernels/rope.h"
#include "tune/kernels/swiglu.h"

namespace tune::kernels::ref {

// bf16 <-> fp32. FloatToBf16 rounds to nearest even (NaN stays a quiet NaN),
// the rounding of __float2bfloat16_rn and of torch's .to(kBFloat16).
float Bf16ToFloat(uint16_t v);
uint16_t FloatToBf16(float v);
inline float RoundBf16(float v) { return Bf16ToFloat(FloatToBf16(v)); }

// bitsandbytes' signed dynamic map (create_dynamic_map(signed=True)) computed
// in fp32: 256 ascending values with 0 and 1 (used by the tests; the trainer
// passes its own nf4::DynamicMap(), so the kernels never depend on this copy).
std::array<float, 256> Nf4DynamicMap();

Status Nf4DequantizeBf16(const Nf4View& q, uint16_t* out);
Status Nf4DequantizeBf16Rows(const Nf4View& q, int64_t row_len, uint16_t* out, int64_t out_stride);

Status RmsNormForward(const RmsNormShape& shape, const uint16_t* x, int64_t x_stride, const uint16_t* weight,
                      uint16_t* y, int64_t y_stride, float* rstd);
Status RmsNormBackward(const RmsNormShape& shape, const uint16_t* x, int64_t x_stride, const uint16_t* weight,
                       const float* rstd, const uint16_t* dy, int64_t dy_stride, uint16_t* dx, int64_t dx_stride,
                       float* dweight);

Status RopeForward(const RopeShape& shape, const RopeTensor& x, const RopeTensor& out, const RopeTables& tables);
Status RopeBackward(const RopeShape& shape, const RopeTensor& g, const RopeTensor& dx, const RopeTables& tables);

Status SwiGluForward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                     int64_t up_stride, uint16_t* h, int64_t h_stride);
Status SwiGluBackward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                      int64_t up_stride, const uint16_t* dh, int64_t dh_stride, uint16_t* dgate, int64_t dgate_stride,
                      uint16_t* dup, int64_t dup_stride);

// Logits are dot products in double rounded to bf16 (what a bf16-output GEMM
// with a wide accumulator gives); logits_chunk and chunk_rows are ignored.
// grad_scale is a host pointer here.
Status LinearCrossEntropyForward(const LinearCrossEntropyArgs& args, float* lse, float* row_loss, float* loss_sum);
Status LinearCrossEntropyBackward(const LinearCrossEntropyArgs& args, const float* lse, const float* grad_scale,
                                  uint16_t* dhidden, int64_t dhidden_stride);
Status LinearCrossEntropyForwardWithGrad(const LinearCrossEntropyArgs& args, float* lse, float* row_loss,
                                         float* loss_sum, uint16_t* dhidden, int64_t dhidden_stride);
// scale is a host pointer here.
Status ScaleBf16Rows(const uint16_t* src, int64_t src_stride, uint16_t* dst, int64_t dst_stride, int64_t rows,
                     int64_t cols, const float* scale);

// Dot products in double, rounded to fp32 (what an fp32 accumulator holds,
// give or take its summation order), plus the residual, rounded to bf16;
// workspace is ignored.
Status GemmResidualBf16(const GemmResidualArgs& args);

}  // namespace tune::kernels::ref

#endif  // TUNE_KERNELS_REFERENCE_REFERENCE_H_
