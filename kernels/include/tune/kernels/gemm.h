// y = residual + x w^T on bf16 row-major matrices (a decoder projection with
// its residual connection), fp32 accumulation and one rounding to bf16:
//   y[i, j] = bf16(float(sum_k x[i, k] w[j, k]) + float(residual[i, j]))
// The residual is read by the GEMM's epilogue (cuBLASLt, D = A B + C with
// D != C), so it is never copied into the output first as torch::addmm does
// for a [rows, cols] bias.
// Layout: x [rows, k], w [cols, k], residual and y [rows, cols], each with a
// row stride (elements) and a contiguous last dim; residual and y share one
// row stride (cuBLASLt's C and D layouts). y may be residual itself (in
// place); it must not overlap x or w. Device pointers, 2-byte alignment
// suffices (cuBLASLt is asked only for algorithms that take the alignment
// the pointers and strides have). `workspace` (device, may be null when
// workspace_bytes is 0) is the caller's, used only on `stream`; 32 MiB lets
// cuBLASLt pick any algorithm on Hopper. Split-K partial sums stay in fp32.
// Returns kUnsupported (nothing ran) when cuBLASLt has no algorithm for the
// arguments. A cuBLASLt handle is created per host thread and device on first
// use; the chosen algorithm is remembered per shape, strides and alignment.
#ifndef TUNE_KERNELS_INCLUDE_TUNE_KERNELS_GEMM_H_
#define TUNE_KERNELS_INCLUDE_TUNE_KERNELS_GEMM_H_

#include <cstddef>
#include <cstdint>

#include "tune/kernels/status.h"
#include "tune/kernels/stream.h"

namespace tune::kernels {

constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;

struct GemmResidualArgs {
  const uint16_t* x = nullptr;
  int64_t x_stride = 0;
  const uint16_t* w = nullptr;
  int64_t w_stride = 0;
  const uint16_t* residual = nullptr;
  uint16_t* y = nullptr;
  int64_t y_stride = 0;  // residual's too
  int64_t rows = 0, cols = 0, k = 0;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

Status GemmResidualBf16(const GemmResidualArgs& args, cudaStream_t stream);

}  // namespace tune::kernels

#endif  // TUNE_KERNELS_INCLUDE_TUNE_KERNELS_GEMM_H_
