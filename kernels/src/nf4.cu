// NF4 -> bf16. Each thread expands 8 packed bytes into 16 values (two 16-byte
// stores) on the vectorised path; elements near the end, unaligned buffers and
// block sizes that are not a multiple of 16 take the per-element path.
#include <algorithm>

#include "kernels/src/common.cuh"
#include "kernels/reference/validate.h"
#include "tune/kernels/nf4.h"

namespace tune::kernels {
namespace {

using detail::F32ToBf16;

__constant__ float kCodes[16] = {
    kNf4CodeTable[0],  kNf4CodeTable[1],  kNf4CodeTable[2],  kNf4CodeTable[3],
    kNf4CodeTable[4],  kNf4CodeTable[5],  kNf4CodeTable[6],  kNf4CodeTable[7],
    kNf4CodeTable[8],  kNf4CodeTable[9],  kNf4CodeTable[10], kNf4CodeTable[11],
    kNf4CodeTable[12], kNf4CodeTable[13], kNf4CodeTable[14], kNf4CodeTable[15]};

struct DeviceNf4 {
  const uint8_t* packed;
  int64_t numel, block_size;
  const float* absmax;
  const uint8_t* absmax_q;
  const float* absmax_scale;
  const float* absmax_offset;
  const float* dynamic_map;
};

__device__ __forceinline__ float BlockAbsmax(const DeviceNf4& q, int64_t block) {
  if (q.absmax != nullptr) return __ldg(q.absmax + block);
  // __fmul_rn / __fadd_rn: two roundings, never contracted into an FMA, as the
  // trainer's separate tensor ops compute it.
  const float code = __ldg(q.dynamic_map + __ldg(q.absmax_q + block));
  return __fadd_rn(__fmul_rn(code, __ldg(q.absmax_scale + block / kNf4DoubleQuantBlock)), __ldg(q.absmax_offset));
}

// `codes` is the block's shared copy of kCodes: a warp's 32 lanes look up
// different codes at once, which __constant__ memory serialises (one address
// per cycle) and shared memory serves in one pass (16 entries, 16 banks).
__device__ __forceinline__ uint16_t Decode(const float* codes, int code, float absmax) {
  return F32ToBf16(__fmul_rn(codes[code], absmax));
}

// Index: uint32_t when numel allows (32-bit divisions are several times
// cheaper than 64-bit ones, a visible cost in this memory-bound kernel), else
// int64_t. Row r of row_len values is written at out + r * out_stride.
template <typename Index>
__global__ void Nf4DequantKernel(DeviceNf4 q, Index row_len, int64_t out_stride, uint16_t* __restrict__ out,
                                 bool vector_ok) {
  __shared__ float codes[16];
  if (threadIdx.x < 16) codes[threadIdx.x] = kCodes[threadIdx.x];
  __syncthreads();
  const Index numel = static_cast<Index>(q.numel), block = static_cast<Index>(q.block_size);
  const Index groups = (numel + 15) / 16;
  for (Index g = blockIdx.x * Index{blockDim.x} + threadIdx.x; g < groups; g += Index{gridDim.x} * blockDim.x) {
    const Index e0 = g * 16;
    if (vector_ok && e0 + 16 <= numel) {
      const uint2 bytes = *reinterpret_cast<const uint2*>(q.packed + e0 / 2);
      const float absmax = BlockAbsmax(q, e0 / block);  // block_size % 16 == 0
      detail::Bf16x8 lo, hi;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t bx = (bytes.x >> (8 * k)) & 0xffu;
        const uint32_t by = (bytes.y >> (8 * k)) & 0xffu;
        lo.v[2 * k] = Decode(codes, bx >> 4, absmax);
        lo.v[2 * k + 1] = Decode(codes, bx & 15, absmax);
        hi.v[2 * k] = Decode(codes, by >> 4, absmax);
        hi.v[2 * k + 1] = Decode(codes, by & 15, absmax);
      }
      const Index r = e0 / row_len;  // row_len % 16 == 0: the 16 values share a row
      uint16_t* o = out + int64_t{r} * out_stride + (e0 - r * row_len);
      reinterpret_cast<detail::Bf16x8*>(o)[0] = lo;
      reinterpret_cast<detail::Bf16x8*>(o)[1] = hi;
      continue;
    }
    const Index e1 = min(e0 + 16, numel);
    for (Index e = e0; e < e1; ++e) {
      const uint8_t byte = q.packed[e / 2];
      const Index r = e / row_len;
      out[int64_t{r} * out_stride + (e - r * row_len)] =
          Decode(codes, (e % 2 == 0) ? (byte >> 4) : (byte & 15), BlockAbsmax(q, e / block));
    }
  }
}

}  // namespace

Status Nf4DequantizeBf16Rows(const Nf4View& q, int64_t row_len, uint16_t* out, int64_t out_stride,
                             cudaStream_t stream) {
  Status s = validate::Nf4Rows(q, row_len, out, out_stride);
  if (!s.ok() || q.numel == 0) return s;
  const DeviceNf4 dq{q.packed, q.numel, q.block_size, q.absmax, q.absmax_q, q.absmax_scale, q.absmax_offset,
                     q.dynamic_map};
  const bool vector_ok = q.block_size % 16 == 0 && row_len % 16 == 0 && detail::RowsAligned16(out, out_stride) &&
                         (reinterpret_cast<uintptr_t>(q.packed) & 7) == 0;
  constexpr int kThreads = 256;
  const int grid = detail::GridFor(detail::CeilDiv(q.numel, 16), kThreads);
  if (q.numel < (int64_t{1} << 31)) {
    Nf4DequantKernel<uint32_t><<<grid, kThreads, 0, stream>>>(dq, static_cast<uint32_t>(row_len), out_stride, out,
                                                              vector_ok);
  } else {
    Nf4DequantKernel<int64_t><<<grid, kThreads, 0, stream>>>(dq, row_len, out_stride, out, vector_ok);
  }
  return detail::LaunchStatus();
}

Status Nf4DequantizeBf16(const Nf4View& q, uint16_t* out, cudaStream_t stream) {
  return Nf4DequantizeBf16Rows(q, std::max<int64_t>(q.numel, 1), out, std::max<int64_t>(q.numel, 1), stream);
}

}  // namespace tune::kernels
