// RMSNorm: one thread block per row (grid-stride over rows). A row is read
// twice (sum of squares, then normalise); the second read hits L1/L2.
// Backward's optional dweight is accumulated per block in shared memory and
// added to global memory once per block.
#include <algorithm>

#include "kernels/reference/validate.h"
#include "kernels/src/common.cuh"
#include "tune/kernels/rmsnorm.h"

namespace tune::kernels {
namespace {

using detail::Bf16ToF32;
using detail::Bf16x8;
using detail::F32ToBf16;
using detail::RoundBf16;

constexpr int kThreads = 256;

template <bool kVec>
__global__ void RmsNormFwdKernel(int64_t rows, int64_t hidden, float eps, const uint16_t* x, int64_t xs,
                                 const uint16_t* __restrict__ w, uint16_t* y, int64_t ys, float* rstd_out) {
  __shared__ float scratch[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint16_t* xr = x + r * xs;
    uint16_t* yr = y + r * ys;
    float ss = 0.0f;
    if constexpr (kVec) {
      for (int64_t j = threadIdx.x * 8; j < hidden; j += blockDim.x * 8) {
        const Bf16x8 v = *reinterpret_cast<const Bf16x8*>(xr + j);
#pragma unroll
        for (int k = 0; k < 8; ++k) ss += Bf16ToF32(v.v[k]) * Bf16ToF32(v.v[k]);
      }
    } else {
      for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) ss += Bf16ToF32(xr[j]) * Bf16ToF32(xr[j]);
    }
    ss = detail::BlockSum(ss, scratch);
    const float rstd = 1.0f / sqrtf(ss / static_cast<float>(hidden) + eps);
    if (rstd_out != nullptr && threadIdx.x == 0) rstd_out[r] = rstd;
    if constexpr (kVec) {
      for (int64_t j = threadIdx.x * 8; j < hidden; j += blockDim.x * 8) {
        const Bf16x8 v = *reinterpret_cast<const Bf16x8*>(xr + j);
        const Bf16x8 wv = *reinterpret_cast<const Bf16x8*>(w + j);
        Bf16x8 o;
#pragma unroll
        for (int k = 0; k < 8; ++k) o.v[k] = F32ToBf16(Bf16ToF32(wv.v[k]) * RoundBf16(Bf16ToF32(v.v[k]) * rstd));
        *reinterpret_cast<Bf16x8*>(yr + j) = o;
      }
    } else {
      for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
        yr[j] = F32ToBf16(Bf16ToF32(w[j]) * RoundBf16(Bf16ToF32(xr[j]) * rstd));
      }
    }
  }
}

// Backward's per-block dweight accumulator: zeroed, then added to global
// memory once per block and column.
__device__ __forceinline__ void ZeroShared(float* acc, int64_t n) {
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) acc[j] = 0.0f;
}
__device__ __forceinline__ void FlushShared(const float* acc, int64_t n, float* out) {
  __syncthreads();
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) atomicAdd(out + j, acc[j]);
}

// Any layout: 2-byte accesses, x and dy read twice (the second time from
// L1/L2). Aligned rows of up to 8192 elements take RmsNormBwdKernelVec.
__global__ void RmsNormBwdKernel(int64_t rows, int64_t hidden, const uint16_t* x, int64_t xs,
                                 const uint16_t* __restrict__ w, const float* __restrict__ rstd, const uint16_t* dy,
                                 int64_t dys, uint16_t* dx, int64_t dxs, float* dweight) {
  __shared__ float scratch[32];
  extern __shared__ float dw_acc[];  // [hidden] when dweight != null
  if (dweight != nullptr) ZeroShared(dw_acc, hidden);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint16_t* xr = x + r * xs;
    const uint16_t* gr = dy + r * dys;
    const float rs = rstd[r];
    float dot = 0.0f;
    for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
      const float gn = RoundBf16(Bf16ToF32(gr[j]) * Bf16ToF32(w[j]));
      dot += gn * Bf16ToF32(xr[j]);
    }
    dot = detail::BlockSum(dot, scratch);
    const float c = rs * rs * rs * dot / static_cast<float>(hidden);
    uint16_t* dxr = dx + r * dxs;
    for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
      const float xv = Bf16ToF32(xr[j]);
      const float g = Bf16ToF32(gr[j]);
      const float gn = RoundBf16(g * Bf16ToF32(w[j]));
      if (dweight != nullptr) dw_acc[j] += g * RoundBf16(xv * rs);
      dxr[j] = F32ToBf16(rs * gn - xv * c);
    }
  }
  if (dweight != nullptr) FlushShared(dw_acc, hidden, dweight);
}

// The same in 16-byte accesses, each thread holding its kVecs 8-element
// pieces of x and dy in registers between the two passes (rows of up to
// kVecs * blockDim * 8 elements; hidden, strides and pointers 16-byte aligned).
template <int kVecs>
__global__ void RmsNormBwdKernelVec(int64_t rows, int64_t hidden, const uint16_t* x, int64_t xs,
                                    const uint16_t* __restrict__ w, const float* __restrict__ rstd, const uint16_t* dy,
                                    int64_t dys, uint16_t* dx, int64_t dxs, float* dweight) {
  __shared__ float scratch[32];
  extern __shared__ float dw_acc[];  // [hidden] when dweight != null
  if (dweight != nullptr) ZeroShared(dw_acc, hidden);
  Bf16x8 wv[kVecs];
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int64_t j = (threadIdx.x + int64_t{v} * blockDim.x) * 8;
    if (j < hidden) wv[v] = *reinterpret_cast<const Bf16x8*>(w + j);
  }
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint16_t* xr = x + r * xs;
    const uint16_t* gr = dy + r * dys;
    const float rs = rstd[r];
    Bf16x8 xv[kVecs], gv[kVecs];
    float dot = 0.0f;
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const int64_t j = (threadIdx.x + int64_t{v} * blockDim.x) * 8;
      if (j >= hidden) continue;
      xv[v] = *reinterpret_cast<const Bf16x8*>(xr + j);
      gv[v] = *reinterpret_cast<const Bf16x8*>(gr + j);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float gn = RoundBf16(Bf16ToF32(gv[v].v[k]) * Bf16ToF32(wv[v].v[k]));
        dot += gn * Bf16ToF32(xv[v].v[k]);
      }
    }
    dot = detail::BlockSum(dot, scratch);
    const float c = rs * rs * rs * dot / static_cast<float>(hidden);
    uint16_t* dxr = dx + r * dxs;
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const int64_t j = (threadIdx.x + int64_t{v} * blockDim.x) * 8;
      if (j >= hidden) continue;
      Bf16x8 o;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float xv_k = Bf16ToF32(xv[v].v[k]);
        const float g = Bf16ToF32(gv[v].v[k]);
        const float gn = RoundBf16(g * Bf16ToF32(wv[v].v[k]));
        if (dweight != nullptr) dw_acc[j + k] += g * RoundBf16(xv_k * rs);
        o.v[k] = F32ToBf16(rs * gn - xv_k * c);
      }
      *reinterpret_cast<Bf16x8*>(dxr + j) = o;
    }
  }
  if (dweight != nullptr) FlushShared(dw_acc, hidden, dweight);
}

}  // namespace

Status RmsNormForward(const RmsNormShape& shape, const uint16_t* x, int64_t x_stride, const uint16_t* weight,
                      uint16_t* y, int64_t y_stride, float* rstd, cudaStream_t stream) {
  Status s = validate::RmsNorm(shape, x, x_stride, weight, y, y_stride);
  if (!s.ok() || shape.rows == 0) return s;
  const bool vec = shape.hidden % 8 == 0 && detail::RowsAligned16(x, x_stride) &&
                   detail::RowsAligned16(y, y_stride) && detail::Aligned16(weight);
  const int grid = static_cast<int>(std::min<int64_t>(shape.rows, 65535));
  if (vec) {
    RmsNormFwdKernel<true><<<grid, kThreads, 0, stream>>>(shape.rows, shape.hidden, shape.eps, x, x_stride, weight,
                                                          y, y_stride, rstd);
  } else {
    RmsNormFwdKernel<false><<<grid, kThreads, 0, stream>>>(shape.rows, shape.hidden, shape.eps, x, x_stride,
                                                           weight, y, y_stride, rstd);
  }
  return detail::LaunchStatus();
}

Status RmsNormBackward(const RmsNormShape& shape, const uint16_t* x, int64_t x_stride, const uint16_t* weight,
                       const float* rstd, const uint16_t* dy, int64_t dy_stride, uint16_t* dx, int64_t dx_stride,
                       float* dweight, cudaStream_t stream) {
  Status s = validate::RmsNormBackward(shape, x, x_stride, weight, rstd, dy, dy_stride, dx, dx_stride);
  if (!s.ok() || shape.rows == 0) return s;
  int grid = static_cast<int>(std::min<int64_t>(shape.rows, 65535));
  size_t smem = 0;
  if (dweight != nullptr) {
    // Fewer blocks, each owning a [hidden] fp32 accumulator: one global
    // atomicAdd per block and column instead of per row and column.
    grid = std::min(grid, 2 * detail::SmCount());
    smem = static_cast<size_t>(shape.hidden) * sizeof(float);
    int device = 0, max_smem = 0;
    Status a = detail::CudaStatus(cudaGetDevice(&device));
    if (a.ok()) a = detail::CudaStatus(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (!a.ok()) return a;
    if (smem + 32 * sizeof(float) > static_cast<size_t>(max_smem)) {
      return InvalidArgument("rmsnorm backward: hidden too large for the dweight accumulator in shared memory");
    }
  }
  const bool vec = shape.hidden % 8 == 0 && detail::RowsAligned16(x, x_stride) &&
                   detail::RowsAligned16(dy, dy_stride) && detail::RowsAligned16(dx, dx_stride) &&
                   detail::Aligned16(weight);
  const int64_t per_pass = int64_t{kThreads} * 8;
  // Distinct kernels with their own dynamic shared memory limits.
  auto launch = [&](auto kernel) -> Status {
    if (smem > 48 * 1024) {
      Status a = detail::CudaStatus(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      if (!a.ok()) return a;
    }
    kernel<<<grid, kThreads, smem, stream>>>(shape.rows, shape.hidden, x, x_stride, weight, rstd, dy, dy_stride, dx,
                                             dx_stride, dweight);
    return detail::LaunchStatus();
  };
  if (vec && shape.hidden <= per_pass) return launch(RmsNormBwdKernelVec<1>);
  if (vec && shape.hidden <= 2 * per_pass) return launch(RmsNormBwdKernelVec<2>);
  if (vec && shape.hidden <= 4 * per_pass) return launch(RmsNormBwdKernelVec<4>);
  return launch(RmsNormBwdKernel);
}

}  // namespace tune::kernels
