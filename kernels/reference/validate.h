// Argument checks shared by the CUDA kernels and their CPU references, so both
// reject the same inputs with the same message (naming the argument). Pure
// host code: pointers are only compared with null.
#ifndef TUNE_KERNELS_REFERENCE_VALIDATE_H_
#define TUNE_KERNELS_REFERENCE_VALIDATE_H_

#include <cstdint>

#include "tune/kernels/gemm.h"
#include "tune/kernels/linear_cross_entropy.h"
#include "tune/kernels/nf4.h"
#include "tune/kernels/rmsnorm.h"
#include "tune/kernels/rope.h"
#include "tune/kernels/swiglu.h"

namespace tune::kernels::validate {

Status Nf4(const Nf4View& q, const uint16_t* out);
Status Nf4Rows(const Nf4View& q, int64_t row_len, const uint16_t* out, int64_t out_stride);
Status RmsNorm(const RmsNormShape& shape, const void* x, int64_t x_stride, const void* weight, const void* out,
               int64_t out_stride);
Status RmsNormBackward(const RmsNormShape& shape, const void* x, int64_t x_stride, const void* weight,
                       const float* rstd, const void* dy, int64_t dy_stride, const void* dx, int64_t dx_stride);
Status Rope(const RopeShape& shape, const RopeTensor& in, const RopeTensor& out, const RopeTables& tables);
Status SwiGlu(const SwiGluShape& shape, const void* a, int64_t a_stride, const void* b, int64_t b_stride,
              const void* out, int64_t out_stride);
// Scratch (logits_chunk, chunk_rows) is checked only when need_scratch.
Status LinearCrossEntropy(const LinearCrossEntropyArgs& args, bool need_scratch);
Status ScaleBf16Rows(const void* src, int64_t src_stride, const void* dst, int64_t dst_stride, int64_t rows,
                     int64_t cols, const float* scale);
Status GemmResidual(const GemmResidualArgs& args);

}  // namespace tune::kernels::validate

#endif  // TUNE_KERNELS_REFERENCE_VALIDATE_H_
