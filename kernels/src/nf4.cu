// NF4 -> bf16. Each thread expands 8 packed bytes into 16 values (two 16-byte
// stores) on the vectorised path; elements near the end, unaligned buffers and
// block sizes that are not a multiple of 16 take the per-element path.
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

__global__ void Nf4DequantKernel(DeviceNf4 q, uint16_t* __restrict__ out, bool vector_ok) {
  __shared__ float codes[16];
  if (threadIdx.x < 16) codes[threadIdx.x] = kCodes[threadIdx.x];
  __syncthreads();
  const int64_t groups = detail::CeilDiv(q.numel, 16);
  for (int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; g < groups;
       g += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e0 = g * 16;
    if (vector_ok && e0 + 16 <= q.numel) {
      const uint2 bytes = *reinterpret_cast<const uint2*>(q.packed + e0 / 2);
      const float absmax = BlockAbsmax(q, e0 / q.block_size);  // block_size % 16 == 0
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
      reinterpret_cast<detail::Bf16x8*>(out + e0)[0] = lo;
      reinterpret_cast<detail::Bf16x8*>(out + e0)[1] = hi;
      continue;
    }
    const int64_t e1 = min(e0 + 16, q.numel);
    for (int64_t e = e0; e < e1; ++e) {
      const uint8_t byte = q.packed[e / 2];
      out[e] = Decode(codes, (e % 2 == 0) ? (byte >> 4) : (byte & 15), BlockAbsmax(q, e / q.block_size));
    }
  }
}

}  // namespace

Status Nf4DequantizeBf16(const Nf4View& q, uint16_t* out, cudaStream_t stream) {
  Status s = validate::Nf4(q, out);
  if (!s.ok() || q.numel == 0) return s;
  const DeviceNf4 dq{q.packed, q.numel, q.block_size, q.absmax, q.absmax_q, q.absmax_scale, q.absmax_offset,
                     q.dynamic_map};
  const bool vector_ok = q.block_size % 16 == 0 && detail::Aligned16(out) &&
                         (reinterpret_cast<uintptr_t>(q.packed) & 7) == 0;
  constexpr int kThreads = 256;
  Nf4DequantKernel<<<detail::GridFor(detail::CeilDiv(q.numel, 16), kThreads), kThreads, 0, stream>>>(dq, out,
                                                                                                     vector_ok);
  return detail::LaunchStatus();
}

}  // namespace tune::kernels
