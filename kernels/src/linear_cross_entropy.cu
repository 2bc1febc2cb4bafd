// Linear + cross-entropy, chunked over tokens. Per chunk: cuBLAS writes bf16
// logits into the caller's scratch; one block per row then reduces the row
// online (running max and sum of exponentials, fp32) to lse and the row loss
// (forward) or overwrites it with bf16 dlogits (backward), which a second
// GEMM turns into dhidden. fp32 logits exist only in registers.
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>

#include "kernels/reference/validate.h"
#include "kernels/src/common.cuh"
#include "tune/kernels/linear_cross_entropy.h"

namespace tune::kernels {
namespace {

using detail::Bf16ToF32;
using detail::Bf16x8;
using detail::F32ToBf16;

constexpr int kThreads = 512;
using detail::CublasStatus;

// The thread's cuBLAS handle for the current device, bound to `stream`.
Status HandleFor(cudaStream_t stream, cublasHandle_t* out) {
  Status s = detail::ThreadDeviceHandle([](cublasHandle_t* h) { return CublasStatus(cublasCreate(h)); }, out);
  if (!s.ok()) return s;
  return CublasStatus(cublasSetStream(*out, stream));
}

// Running (max, sum of exp(x - max)) pairs and their merge.
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum Merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum BlockMerge(MaxSum v, MaxSum* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = Merge(v, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : MaxSum{-INFINITY, 0.0f};
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = Merge(v, other);
  }
  return v;
}

__device__ __forceinline__ void Accumulate(MaxSum* acc, const float* x, int n) {
  float m = acc->m;
  for (int k = 0; k < n; ++k) m = fmaxf(m, x[k]);
  if (m == -INFINITY) return;
  float s = acc->s * expf(acc->m - m);  // acc->m == -inf gives exp(-inf) = 0
  for (int k = 0; k < n; ++k) s += expf(x[k] - m);
  *acc = {m, s};
}

// Forward: lse and loss of each chunk row. `row0` is the chunk's first row.
template <bool kVec>
__global__ void CeForwardRows(const uint16_t* __restrict__ logits, int64_t vocab, const int64_t* __restrict__ labels,
                              int64_t row0, float* __restrict__ lse, float* __restrict__ row_loss) {
  __shared__ MaxSum scratch[32];
  const int64_t r = blockIdx.x;
  const uint16_t* row = logits + r * vocab;
  MaxSum acc{-INFINITY, 0.0f};
  if constexpr (kVec) {
    for (int64_t j = threadIdx.x * 8; j < vocab; j += int64_t{blockDim.x} * 8) {
      const Bf16x8 v = *reinterpret_cast<const Bf16x8*>(row + j);
      float x[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) x[k] = Bf16ToF32(v.v[k]);
      Accumulate(&acc, x, 8);
    }
  } else {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      const float x = Bf16ToF32(row[j]);
      Accumulate(&acc, &x, 1);
    }
  }
  acc = BlockMerge(acc, scratch);
  if (threadIdx.x == 0) {
    const float l = acc.m + logf(acc.s);
    const int64_t y = labels[row0 + r];
    float loss = 0.0f;
    if (y != kIgnoreIndex) loss = (y >= 0 && y < vocab) ? l - Bf16ToF32(row[y]) : NAN;
    lse[row0 + r] = l;
    row_loss[row0 + r] = loss;
  }
}

// Backward: logits -> dlogits = bf16((exp(x - lse) - onehot) * grad_scale), in place
// (grad_scale null: 1, multiplied all the same so the result is the same bits).
template <bool kVec>
__global__ void CeBackwardRows(uint16_t* logits, int64_t vocab, const int64_t* __restrict__ labels, int64_t row0,
                               const float* __restrict__ lse, const float* __restrict__ grad_scale) {
  const int64_t r = blockIdx.x;
  uint16_t* row = logits + r * vocab;
  const int64_t y = labels[row0 + r];
  const bool ignore = y == kIgnoreIndex;
  const float l = lse[row0 + r];
  const float g = grad_scale != nullptr ? *grad_scale : 1.0f;
  auto grad = [&](float x, int64_t j) -> uint16_t {
    if (ignore) return 0;
    const float p = expf(x - l) - (j == y ? 1.0f : 0.0f);
    return F32ToBf16(p * g);
  };
  if constexpr (kVec) {
    for (int64_t j = threadIdx.x * 8; j < vocab; j += int64_t{blockDim.x} * 8) {
      Bf16x8 v = *reinterpret_cast<const Bf16x8*>(row + j);
#pragma unroll
      for (int k = 0; k < 8; ++k) v.v[k] = grad(Bf16ToF32(v.v[k]), j + k);
      *reinterpret_cast<Bf16x8*>(row + j) = v;
    }
  } else {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) row[j] = grad(Bf16ToF32(row[j]), j);
  }
}

// Deterministic sum of row losses: one block, fixed assignment and tree.
__global__ void SumRows(const float* __restrict__ row_loss, int64_t rows, float* __restrict__ out) {
  __shared__ float scratch[32];
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) s += row_loss[i];
  s = detail::BlockSum(s, scratch);
  if (threadIdx.x == 0) *out = s;
}

// logits[0:n, :] = hidden[c0:c0+n, :] @ weight^T (column-major view: the
// [vocab, n] product weight(T) x hidden_chunk).
Status ChunkLogits(cublasHandle_t handle, const LinearCrossEntropyArgs& a, int64_t c0, int64_t n) {
  const float alpha = 1.0f, beta = 0.0f;
  return CublasStatus(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(a.vocab), static_cast<int>(n),
                                   static_cast<int>(a.hidden_dim), &alpha, a.weight, CUDA_R_16BF,
                                   static_cast<int>(a.weight_stride), a.hidden + c0 * a.hidden_stride, CUDA_R_16BF,
                                   static_cast<int>(a.hidden_stride), &beta, a.logits_chunk, CUDA_R_16BF,
                                   static_cast<int>(a.vocab), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

bool VocabRowsAligned(const LinearCrossEntropyArgs& a) {
  return a.vocab % 8 == 0 && detail::Aligned16(a.logits_chunk);
}

// The row reductions of one chunk of n rows starting at c0 (logits in scratch).
Status ChunkRows(const LinearCrossEntropyArgs& a, int64_t c0, int64_t n, float* lse, float* row_loss,
                 cudaStream_t stream) {
  // n <= 2^31 - 1 (validated chunk_rows), within the grid's x limit.
  if (VocabRowsAligned(a)) {
    CeForwardRows<true><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(a.logits_chunk, a.vocab, a.labels, c0,
                                                                          lse, row_loss);
  } else {
    CeForwardRows<false><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(a.logits_chunk, a.vocab, a.labels, c0,
                                                                           lse, row_loss);
  }
  return detail::LaunchStatus();
}

// dhidden rows c0..c0+n from the chunk's logits: dlogits in place, then
// dhidden_chunk = dlogits @ weight (column-major: weight x dlogits).
Status ChunkGrad(cublasHandle_t handle, const LinearCrossEntropyArgs& a, int64_t c0, int64_t n, const float* lse,
                 const float* grad_scale, uint16_t* dhidden, int64_t dhidden_stride, cudaStream_t stream) {
  if (VocabRowsAligned(a)) {
    CeBackwardRows<true><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(a.logits_chunk, a.vocab, a.labels, c0,
                                                                           lse, grad_scale);
  } else {
    CeBackwardRows<false><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(a.logits_chunk, a.vocab, a.labels, c0,
                                                                            lse, grad_scale);
  }
  Status s = detail::LaunchStatus();
  if (!s.ok()) return s;
  const float alpha = 1.0f, beta = 0.0f;
  return CublasStatus(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(a.hidden_dim),
                                   static_cast<int>(n), static_cast<int>(a.vocab), &alpha, a.weight, CUDA_R_16BF,
                                   static_cast<int>(a.weight_stride), a.logits_chunk, CUDA_R_16BF,
                                   static_cast<int>(a.vocab), &beta, dhidden + c0 * dhidden_stride, CUDA_R_16BF,
                                   static_cast<int>(dhidden_stride), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

Status CheckDhidden(const LinearCrossEntropyArgs& a, const uint16_t* dhidden, int64_t dhidden_stride) {
  if (dhidden == nullptr) return InvalidArgument("linear_cross_entropy: dhidden must be non-null");
  if (dhidden_stride < a.hidden_dim || dhidden_stride > INT32_MAX) {
    return InvalidArgument("linear_cross_entropy: dhidden_stride must be in [hidden_dim, 2^31)");
  }
  return OkStatus();
}

// y = bf16(float(x) * *scale), one thread per element (grid-stride).
__global__ void ScaleRowsKernel(const uint16_t* x, int64_t xs, uint16_t* y, int64_t ys, int64_t rows, int64_t cols,
                                const float* __restrict__ scale) {
  const float g = *scale;
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    y[r * ys + c] = F32ToBf16(Bf16ToF32(x[r * xs + c]) * g);
  }
}

// The same with 8 elements per thread (cols, strides and pointers 16-byte aligned).
__global__ void ScaleRowsKernel8(const uint16_t* x, int64_t xs, uint16_t* y, int64_t ys, int64_t rows, int64_t cols,
                                 const float* __restrict__ scale) {
  const float g = *scale;
  const int64_t per_row = cols / 8, n = rows * per_row;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / per_row, c = (i - r * per_row) * 8;
    Bf16x8 v = *reinterpret_cast<const Bf16x8*>(x + r * xs + c);
#pragma unroll
    for (int k = 0; k < 8; ++k) v.v[k] = F32ToBf16(Bf16ToF32(v.v[k]) * g);
    *reinterpret_cast<Bf16x8*>(y + r * ys + c) = v;
  }
}

// Forward, with dhidden (unit grad scale) when it is non-null.
Status Forward(const LinearCrossEntropyArgs& args, float* lse, float* row_loss, float* loss_sum, uint16_t* dhidden,
               int64_t dhidden_stride, cudaStream_t stream) {
  Status s = validate::LinearCrossEntropy(args, /*need_scratch=*/true);
  if (!s.ok()) return s;
  if (loss_sum == nullptr) return InvalidArgument("linear_cross_entropy forward: loss_sum is null");
  if (args.rows > 0 && (lse == nullptr || row_loss == nullptr)) {
    return InvalidArgument("linear_cross_entropy forward: lse and row_loss ([rows] fp32) must be non-null");
  }
  if (args.rows == 0) return detail::CudaStatus(cudaMemsetAsync(loss_sum, 0, sizeof(float), stream));
  cublasHandle_t handle;
  s = HandleFor(stream, &handle);
  if (!s.ok()) return s;
  for (int64_t c0 = 0; c0 < args.rows; c0 += args.chunk_rows) {
    const int64_t n = std::min(args.chunk_rows, args.rows - c0);
    s = ChunkLogits(handle, args, c0, n);
    if (s.ok()) s = ChunkRows(args, c0, n, lse, row_loss, stream);
    if (s.ok() && dhidden != nullptr) s = ChunkGrad(handle, args, c0, n, lse, nullptr, dhidden, dhidden_stride, stream);
    if (!s.ok()) return s;
  }
  SumRows<<<1, 1024, 0, stream>>>(row_loss, args.rows, loss_sum);
  return detail::LaunchStatus();
}

}  // namespace

Status LinearCrossEntropyForward(const LinearCrossEntropyArgs& args, float* lse, float* row_loss, float* loss_sum,
                                 cudaStream_t stream) {
  return Forward(args, lse, row_loss, loss_sum, nullptr, 0, stream);
}

Status LinearCrossEntropyForwardWithGrad(const LinearCrossEntropyArgs& args, float* lse, float* row_loss,
                                         float* loss_sum, uint16_t* dhidden, int64_t dhidden_stride,
                                         cudaStream_t stream) {
  Status s = CheckDhidden(args, dhidden, dhidden_stride);
  if (!s.ok()) return s;
  return Forward(args, lse, row_loss, loss_sum, dhidden, dhidden_stride, stream);
}

Status LinearCrossEntropyBackward(const LinearCrossEntropyArgs& args, const float* lse, const float* grad_scale,
                                  uint16_t* dhidden, int64_t dhidden_stride, cudaStream_t stream) {
  Status s = validate::LinearCrossEntropy(args, /*need_scratch=*/true);
  if (!s.ok() || args.rows == 0) return s;
  if (lse == nullptr || grad_scale == nullptr) {
    return InvalidArgument("linear_cross_entropy backward: lse and grad_scale must be non-null");
  }
  s = CheckDhidden(args, dhidden, dhidden_stride);
  if (!s.ok()) return s;
  cublasHandle_t handle;
  s = HandleFor(stream, &handle);
  if (!s.ok()) return s;
  for (int64_t c0 = 0; c0 < args.rows; c0 += args.chunk_rows) {
    const int64_t n = std::min(args.chunk_rows, args.rows - c0);
    s = ChunkLogits(handle, args, c0, n);
    if (s.ok()) s = ChunkGrad(handle, args, c0, n, lse, grad_scale, dhidden, dhidden_stride, stream);
    if (!s.ok()) return s;
  }
  return OkStatus();
}

Status ScaleBf16Rows(const uint16_t* src, int64_t src_stride, uint16_t* dst, int64_t dst_stride, int64_t rows,
                     int64_t cols, const float* scale, cudaStream_t stream) {
  Status s = validate::ScaleBf16Rows(src, src_stride, dst, dst_stride, rows, cols, scale);
  if (!s.ok() || rows == 0 || cols == 0) return s;
  constexpr int kScaleThreads = 256;
  if (cols % 8 == 0 && detail::RowsAligned16(src, src_stride) && detail::RowsAligned16(dst, dst_stride)) {
    ScaleRowsKernel8<<<detail::GridFor(rows * (cols / 8), kScaleThreads), kScaleThreads, 0, stream>>>(
        src, src_stride, dst, dst_stride, rows, cols, scale);
  } else {
    ScaleRowsKernel<<<detail::GridFor(rows * cols, kScaleThreads), kScaleThreads, 0, stream>>>(
        src, src_stride, dst, dst_stride, rows, cols, scale);
  }
  return detail::LaunchStatus();
}

}  // namespace tune::kernels
