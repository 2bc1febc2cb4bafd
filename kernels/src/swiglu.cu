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
using detail::RowsAligned16;

// torch's CUDA silu / silu_backward formulas in fp32.
__device__ __forceinline__ float Silu(float g) { return g / (1.0f + expf(-g)); }

__device__ __forceinline__ void FwdElem(uint16_t g, uint16_t u, uint16_t* h) {
  const float a = RoundBf16(Silu(Bf16ToF32(g)));
  *h = F32ToBf16(a * Bf16ToF32(u));
}

// h (when non-null) gets FwdElem's value from the same silu.
__device__ __forceinline__ void BwdElem(uint16_t g16, uint16_t u16, uint16_t d16, uint16_t* dg, uint16_t* du,
                                        uint16_t* h = nullptr) {
  const float g = Bf16ToF32(g16), u = Bf16ToF32(u16), d = Bf16ToF32(d16);
  const float s = 1.0f / (1.0f + expf(-g));
  const float a = RoundBf16(Silu(g));
  const float dsilu = RoundBf16(d * u);
  *du = F32ToBf16(d * a);
  *dg = F32ToBf16(dsilu * s * (1.0f + g * (1.0f - s)));
  if (h != nullptr) *h = F32ToBf16(a * u);
}

// Index: uint32_t when the flat item count allows (32-bit division is several
// times cheaper than 64-bit), else int64_t; offsets are 64-bit.
template <int V, typename Index>
__global__ void SwiGluFwdKernel(Index rows, Index cols, const uint16_t* gate, int64_t gs, const uint16_t* up,
                                int64_t us, uint16_t* h, int64_t hs) {
  const Index per_row = cols / V;
  for (Index it = blockIdx.x * Index{blockDim.x} + threadIdx.x; it < rows * per_row;
       it += Index{gridDim.x} * blockDim.x) {
    const Index r = it / per_row;
    const int64_t j = int64_t{it - r * per_row} * V, rr = r;
    if constexpr (V == 8) {
      const Bf16x8 g = *reinterpret_cast<const Bf16x8*>(gate + rr * gs + j);
      const Bf16x8 u = *reinterpret_cast<const Bf16x8*>(up + rr * us + j);
      Bf16x8 o;
#pragma unroll
      for (int k = 0; k < 8; ++k) FwdElem(g.v[k], u.v[k], &o.v[k]);
      *reinterpret_cast<Bf16x8*>(h + rr * hs + j) = o;
    } else {
      FwdElem(gate[rr * gs + j], up[rr * us + j], &h[rr * hs + j]);
    }
  }
}

// kWithH: also writes the forward's h (the recompute a backward would
// otherwise run first), from the same loads.
template <int V, bool kWithH, typename Index>
__global__ void SwiGluBwdKernel(Index rows, Index cols, const uint16_t* gate, int64_t gs, const uint16_t* up,
                                int64_t us, const uint16_t* dh, int64_t dhs, uint16_t* dgate, int64_t dgs,
                                uint16_t* dup, int64_t dus, uint16_t* h, int64_t hs) {
  const Index per_row = cols / V;
  for (Index it = blockIdx.x * Index{blockDim.x} + threadIdx.x; it < rows * per_row;
       it += Index{gridDim.x} * blockDim.x) {
    const Index r = it / per_row;
    const int64_t j = int64_t{it - r * per_row} * V, rr = r;
    if constexpr (V == 8) {
      const Bf16x8 g = *reinterpret_cast<const Bf16x8*>(gate + rr * gs + j);
      const Bf16x8 u = *reinterpret_cast<const Bf16x8*>(up + rr * us + j);
      const Bf16x8 d = *reinterpret_cast<const Bf16x8*>(dh + rr * dhs + j);
      Bf16x8 og, ou, oh;
#pragma unroll
      for (int k = 0; k < 8; ++k) BwdElem(g.v[k], u.v[k], d.v[k], &og.v[k], &ou.v[k], kWithH ? &oh.v[k] : nullptr);
      *reinterpret_cast<Bf16x8*>(dgate + rr * dgs + j) = og;
      *reinterpret_cast<Bf16x8*>(dup + rr * dus + j) = ou;
      if constexpr (kWithH) *reinterpret_cast<Bf16x8*>(h + rr * hs + j) = oh;
    } else {
      // Read everything before writing: dgate/dup may alias gate/up.
      const uint16_t g = gate[rr * gs + j], u = up[rr * us + j], d = dh[rr * dhs + j];
      uint16_t og, ou, oh;
      BwdElem(g, u, d, &og, &ou, kWithH ? &oh : nullptr);
      if constexpr (kWithH) h[rr * hs + j] = oh;
      dgate[rr * dgs + j] = og;
      dup[rr * dus + j] = ou;
    }
  }
}


constexpr int kThreads = 256;

// The backward launch, with or without h.
template <bool kWithH>
Status LaunchBackward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                      int64_t up_stride, const uint16_t* dh, int64_t dh_stride, uint16_t* dgate, int64_t dgate_stride,
                      uint16_t* dup, int64_t dup_stride, uint16_t* h, int64_t h_stride, cudaStream_t stream) {
  const bool vec = shape.cols % 8 == 0 && RowsAligned16(gate, gate_stride) && RowsAligned16(up, up_stride) &&
                   RowsAligned16(dh, dh_stride) && RowsAligned16(dgate, dgate_stride) &&
                   RowsAligned16(dup, dup_stride) && (!kWithH || RowsAligned16(h, h_stride));
  const int64_t items = shape.rows * shape.cols / (vec ? 8 : 1);
  const int grid = detail::GridFor(items, kThreads);
  auto run = [&](auto kernel, auto index) {
    using Index = decltype(index);
    kernel<<<grid, kThreads, 0, stream>>>(static_cast<Index>(shape.rows), static_cast<Index>(shape.cols), gate,
                                          gate_stride, up, up_stride, dh, dh_stride, dgate, dgate_stride, dup,
                                          dup_stride, h, h_stride);
  };
  if (vec && detail::FitsIn32(items, grid, kThreads)) {
    run(SwiGluBwdKernel<8, kWithH, uint32_t>, uint32_t{});
  } else if (vec) {
    run(SwiGluBwdKernel<8, kWithH, int64_t>, int64_t{});
  } else if (detail::FitsIn32(items, grid, kThreads)) {
    run(SwiGluBwdKernel<1, kWithH, uint32_t>, uint32_t{});
  } else {
    run(SwiGluBwdKernel<1, kWithH, int64_t>, int64_t{});
  }
  return detail::LaunchStatus();
}

Status ValidateBackward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                        int64_t up_stride, const uint16_t* dh, int64_t dh_stride, const uint16_t* dgate,
                        int64_t dgate_stride, const uint16_t* dup, int64_t dup_stride) {
  Status s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, dh, dh_stride);
  if (s.ok()) s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, dgate, dgate_stride);
  if (s.ok()) s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, dup, dup_stride);
  return s;
}

}  // namespace

Status SwiGluForward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                     int64_t up_stride, uint16_t* h, int64_t h_stride, cudaStream_t stream) {
  Status s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, h, h_stride);
  if (!s.ok() || shape.rows == 0 || shape.cols == 0) return s;
  const bool vec = shape.cols % 8 == 0 && RowsAligned16(gate, gate_stride) && RowsAligned16(up, up_stride) &&
                   RowsAligned16(h, h_stride);
  const int64_t items = shape.rows * shape.cols / (vec ? 8 : 1);
  const int grid = detail::GridFor(items, kThreads);
  auto run = [&](auto kernel, auto index) {
    using Index = decltype(index);
    kernel<<<grid, kThreads, 0, stream>>>(static_cast<Index>(shape.rows), static_cast<Index>(shape.cols), gate,
                                          gate_stride, up, up_stride, h, h_stride);
  };
  if (vec && detail::FitsIn32(items, grid, kThreads)) {
    run(SwiGluFwdKernel<8, uint32_t>, uint32_t{});
  } else if (vec) {
    run(SwiGluFwdKernel<8, int64_t>, int64_t{});
  } else if (detail::FitsIn32(items, grid, kThreads)) {
    run(SwiGluFwdKernel<1, uint32_t>, uint32_t{});
  } else {
    run(SwiGluFwdKernel<1, int64_t>, int64_t{});
  }
  return detail::LaunchStatus();
}

Status SwiGluBackward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                      int64_t up_stride, const uint16_t* dh, int64_t dh_stride, uint16_t* dgate, int64_t dgate_stride,
                      uint16_t* dup, int64_t dup_stride, cudaStream_t stream) {
  Status s = ValidateBackward(shape, gate, gate_stride, up, up_stride, dh, dh_stride, dgate, dgate_stride, dup,
                              dup_stride);
  if (!s.ok() || shape.rows == 0 || shape.cols == 0) return s;
  return LaunchBackward<false>(shape, gate, gate_stride, up, up_stride, dh, dh_stride, dgate, dgate_stride, dup,
                               dup_stride, nullptr, 0, stream);
}

Status SwiGluBackwardWithForward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride,
                                 const uint16_t* up, int64_t up_stride, const uint16_t* dh, int64_t dh_stride,
                                 uint16_t* dgate, int64_t dgate_stride, uint16_t* dup, int64_t dup_stride, uint16_t* h,
                                 int64_t h_stride, cudaStream_t stream) {
  Status s = ValidateBackward(shape, gate, gate_stride, up, up_stride, dh, dh_stride, dgate, dgate_stride, dup,
                              dup_stride);
  if (s.ok()) s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, h, h_stride);
  if (s.ok() && shape.rows > 0 && shape.cols > 0 &&
      (h == gate || h == up || h == dgate || h == dup || h == dh)) {
    return InvalidArgument("swiglu backward with forward: h must not alias gate, up, dh, dgate or dup");
  }
  if (!s.ok() || shape.rows == 0 || shape.cols == 0) return s;
  return LaunchBackward<true>(shape, gate, gate_stride, up, up_stride, dh, dh_stride, dgate, dgate_stride, dup,
                              dup_stride, h, h_stride, stream);
}

}  // namespace tune::kernels
