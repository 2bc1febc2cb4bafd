// SwiGLU: one thread per 8 columns of a row (16-byte accesses) when rows are
// aligned and cols % 8 == 0, else one thread per element.
#include "kernels/reference/validate.h"
#include "kernels/src/common.cuh"
#include "tune/kernels/swiglu.h"

namespace tune::kernels {
namespace {

using detail::Bf16ToF32;
using detail::Bf16x8;
using detail::F32ToBf16;
using detail::RoundBf16;

// torch's CUDA silu / silu_backward formulas in fp32.
__device__ __forceinline__ float Silu(float g) { return g / (1.0f + expf(-g)); }

__device__ __forceinline__ void FwdElem(uint16_t g, uint16_t u, uint16_t* h) {
  const float a = RoundBf16(Silu(Bf16ToF32(g)));
  *h = F32ToBf16(a * Bf16ToF32(u));
}

__device__ __forceinline__ void BwdElem(uint16_t g16, uint16_t u16, uint16_t d16, uint16_t* dg, uint16_t* du) {
  const float g = Bf16ToF32(g16), u = Bf16ToF32(u16), d = Bf16ToF32(d16);
  const float s = 1.0f / (1.0f + expf(-g));
  const float a = RoundBf16(Silu(g));
  const float dsilu = RoundBf16(d * u);
  *du = F32ToBf16(d * a);
  *dg = F32ToBf16(dsilu * s * (1.0f + g * (1.0f - s)));
}

template <int V>
__global__ void SwiGluFwdKernel(int64_t rows, int64_t cols, const uint16_t* gate, int64_t gs, const uint16_t* up,
                                int64_t us, uint16_t* h, int64_t hs) {
  const int64_t per_row = cols / V;
  for (int64_t it = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; it < rows * per_row;
       it += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = it / per_row, j = (it % per_row) * V;
    if constexpr (V == 8) {
      const Bf16x8 g = *reinterpret_cast<const Bf16x8*>(gate + r * gs + j);
      const Bf16x8 u = *reinterpret_cast<const Bf16x8*>(up + r * us + j);
      Bf16x8 o;
#pragma unroll
      for (int k = 0; k < 8; ++k) FwdElem(g.v[k], u.v[k], &o.v[k]);
      *reinterpret_cast<Bf16x8*>(h + r * hs + j) = o;
    } else {
      FwdElem(gate[r * gs + j], up[r * us + j], &h[r * hs + j]);
    }
  }
}

template <int V>
__global__ void SwiGluBwdKernel(int64_t rows, int64_t cols, const uint16_t* gate, int64_t gs, const uint16_t* up,
                                int64_t us, const uint16_t* dh, int64_t dhs, uint16_t* dgate, int64_t dgs,
                                uint16_t* dup, int64_t dus) {
  const int64_t per_row = cols / V;
  for (int64_t it = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; it < rows * per_row;
       it += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = it / per_row, j = (it % per_row) * V;
    if constexpr (V == 8) {
      const Bf16x8 g = *reinterpret_cast<const Bf16x8*>(gate + r * gs + j);
      const Bf16x8 u = *reinterpret_cast<const Bf16x8*>(up + r * us + j);
      const Bf16x8 d = *reinterpret_cast<const Bf16x8*>(dh + r * dhs + j);
      Bf16x8 og, ou;
#pragma unroll
      for (int k = 0; k < 8; ++k) BwdElem(g.v[k], u.v[k], d.v[k], &og.v[k], &ou.v[k]);
      *reinterpret_cast<Bf16x8*>(dgate + r * dgs + j) = og;
      *reinterpret_cast<Bf16x8*>(dup + r * dus + j) = ou;
    } else {
      // Read everything before writing: dgate/dup may alias gate/up.
      const uint16_t g = gate[r * gs + j], u = up[r * us + j], d = dh[r * dhs + j];
      uint16_t og, ou;
      BwdElem(g, u, d, &og, &ou);
      dgate[r * dgs + j] = og;
      dup[r * dus + j] = ou;
    }
  }
}

bool RowsAligned(const void* p, int64_t stride) { return detail::Aligned16(p) && stride % 8 == 0; }

constexpr int kThreads = 256;

}  // namespace

Status SwiGluForward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                     int64_t up_stride, uint16_t* h, int64_t h_stride, cudaStream_t stream) {
  Status s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, h, h_stride);
  if (!s.ok() || shape.rows == 0 || shape.cols == 0) return s;
  const int64_t n = shape.rows * shape.cols;
  if (shape.cols % 8 == 0 && RowsAligned(gate, gate_stride) && RowsAligned(up, up_stride) &&
      RowsAligned(h, h_stride)) {
    SwiGluFwdKernel<8><<<detail::GridFor(n / 8, kThreads), kThreads, 0, stream>>>(
        shape.rows, shape.cols, gate, gate_stride, up, up_stride, h, h_stride);
  } else {
    SwiGluFwdKernel<1><<<detail::GridFor(n, kThreads), kThreads, 0, stream>>>(shape.rows, shape.cols, gate,
                                                                              gate_stride, up, up_stride, h, h_stride);
  }
  return detail::LaunchStatus();
}

Status SwiGluBackward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                      int64_t up_stride, const uint16_t* dh, int64_t dh_stride, uint16_t* dgate, int64_t dgate_stride,
                      uint16_t* dup, int64_t dup_stride, cudaStream_t stream) {
  Status s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, dh, dh_stride);
  if (s.ok()) s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, dgate, dgate_stride);
  if (s.ok()) s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, dup, dup_stride);
  if (!s.ok() || shape.rows == 0 || shape.cols == 0) return s;
  const int64_t n = shape.rows * shape.cols;
  if (shape.cols % 8 == 0 && RowsAligned(gate, gate_stride) && RowsAligned(up, up_stride) &&
      RowsAligned(dh, dh_stride) && RowsAligned(dgate, dgate_stride) && RowsAligned(dup, dup_stride)) {
    SwiGluBwdKernel<8><<<detail::GridFor(n / 8, kThreads), kThreads, 0, stream>>>(
        shape.rows, shape.cols, gate, gate_stride, up, up_stride, dh, dh_stride, dgate, dgate_stride, dup,
        dup_stride);
  } else {
    SwiGluBwdKernel<1><<<detail::GridFor(n, kThreads), kThreads, 0, stream>>>(
        shape.rows, shape.cols, gate, gate_stride, up, up_stride, dh, dh_stride, dgate, dgate_stride, dup,
        dup_stride);
  }
  return detail::LaunchStatus();
}

}  // namespace tune::kernels
