// RoPE: one thread per (token, head, group of V rotation pairs); V = 8 (16-byte
// accesses) when the head dim and every row start allow it, else 1. Index
// arithmetic is 32-bit whenever the sizes allow.
#include "kernels/reference/validate.h"
#include "kernels/src/common.cuh"
#include "tune/kernels/rope.h"

namespace tune::kernels {
namespace {

using detail::Bf16ToF32;
using detail::F32ToBf16;
using detail::RoundBf16;

template <int V>
struct Vec {
  uint16_t v[V];
};

template <int V>
__device__ __forceinline__ Vec<V> Load(const uint16_t* p) {
  if constexpr (V == 8) {
    const detail::Bf16x8 t = *reinterpret_cast<const detail::Bf16x8*>(p);
    Vec<V> r;
#pragma unroll
    for (int k = 0; k < 8; ++k) r.v[k] = t.v[k];
    return r;
  } else {
    Vec<V> r;
#pragma unroll
    for (int k = 0; k < V; ++k) r.v[k] = p[k];
    return r;
  }
}

template <int V>
__device__ __forceinline__ void Store(uint16_t* p, const Vec<V>& r) {
  if constexpr (V == 8) {
    detail::Bf16x8 t;
#pragma unroll
    for (int k = 0; k < 8; ++k) t.v[k] = r.v[k];
    *reinterpret_cast<detail::Bf16x8*>(p) = t;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = r.v[k];
  }
}

// torch's bf16 product: computed in fp32, stored as bf16.
__device__ __forceinline__ float MulB(float a, float b) { return RoundBf16(a * b); }

// Index: uint32_t when every item index fits (the usual case: 32-bit
// division is several times cheaper than 64-bit, which dominated this
// memory-bound kernel), else int64_t. Offsets are always 64-bit.
template <int V, bool kBackward, typename Index>
__global__ void RopeKernel(RopeShape shape, RopeTensor in, RopeTensor out, RopeTables t) {
  const Index half = static_cast<Index>(shape.head_dim / 2);
  const Index groups = half / V;
  const Index heads = static_cast<Index>(shape.heads), seq = static_cast<Index>(shape.seq);
  const Index items = static_cast<Index>(shape.batch) * seq * heads * groups;
  for (Index it = blockIdx.x * Index{blockDim.x} + threadIdx.x; it < items; it += Index{gridDim.x} * blockDim.x) {
    const Index pair = it / groups;  // (b, t, head)
    const Index i = (it - pair * groups) * V;
    const Index bt = pair / heads;
    const Index hd = pair - bt * heads;
    const Index b = bt / seq;
    const Index tt = bt - b * seq;
    const uint16_t* xr = in.data + int64_t{b} * in.stride_b + int64_t{tt} * in.stride_t + int64_t{hd} * in.stride_h;
    uint16_t* orow = out.data + int64_t{b} * out.stride_b + int64_t{tt} * out.stride_t + int64_t{hd} * out.stride_h;
    int64_t table_off;
    if (t.position_ids != nullptr) {
      const int64_t p = t.position_ids[int64_t{bt}];
      if (p < 0 || p >= t.table_rows) {
        Vec<V> nan;
#pragma unroll
        for (int k = 0; k < V; ++k) nan.v[k] = 0x7fc0;
        Store<V>(orow + i, nan);
        Store<V>(orow + i + half, nan);
        continue;
      }
      table_off = p * t.stride_t;
    } else {
      table_off = int64_t{b} * t.stride_b + int64_t{tt} * t.stride_t;
    }
    const Vec<V> x1 = Load<V>(xr + i), x2 = Load<V>(xr + i + half);
    const Vec<V> c1 = Load<V>(t.cos + table_off + i), c2 = Load<V>(t.cos + table_off + i + half);
    const Vec<V> s1 = Load<V>(t.sin + table_off + i), s2 = Load<V>(t.sin + table_off + i + half);
    Vec<V> o1, o2;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float a = Bf16ToF32(x1.v[k]), bb = Bf16ToF32(x2.v[k]);
      const float cc1 = Bf16ToF32(c1.v[k]), cc2 = Bf16ToF32(c2.v[k]);
      const float ss1 = Bf16ToF32(s1.v[k]), ss2 = Bf16ToF32(s2.v[k]);
      if constexpr (!kBackward) {
        o1.v[k] = F32ToBf16(MulB(a, cc1) + MulB(-bb, ss1));
        o2.v[k] = F32ToBf16(MulB(bb, cc2) + MulB(a, ss2));
      } else {
        o1.v[k] = F32ToBf16(MulB(a, cc1) + MulB(bb, ss2));
        o2.v[k] = F32ToBf16(MulB(bb, cc2) - MulB(a, ss1));
      }
    }
    Store<V>(orow + i, o1);
    Store<V>(orow + i + half, o2);
  }
}

bool CanVectorize(const RopeShape& s, const RopeTensor& a, const RopeTensor& b, const RopeTables& t) {
  auto ok = [](int64_t stride) { return stride % 8 == 0; };
  return (s.head_dim / 2) % 8 == 0 && detail::Aligned16(a.data) && detail::Aligned16(b.data) &&
         detail::Aligned16(t.cos) && detail::Aligned16(t.sin) && ok(a.stride_b) && ok(a.stride_t) &&
         ok(a.stride_h) && ok(b.stride_b) && ok(b.stride_t) && ok(b.stride_h) && ok(t.stride_b) && ok(t.stride_t);
}

template <bool kBackward>
Status Launch(const RopeShape& shape, const RopeTensor& in, const RopeTensor& out, const RopeTables& tables,
              cudaStream_t stream) {
  Status s = validate::Rope(shape, in, out, tables);
  if (!s.ok() || shape.batch == 0 || shape.seq == 0 || shape.heads == 0) return s;
  constexpr int kThreads = 256;
  const int64_t tokens_heads = shape.batch * shape.seq * shape.heads;
  const int v = CanVectorize(shape, in, out, tables) ? 8 : 1;
  const int64_t items = tokens_heads * (shape.head_dim / 2 / v);
  const int grid = detail::GridFor(items, kThreads);
  // 32-bit indices when the loop's last increment cannot wrap.
  const bool narrow = detail::FitsIn32(items, grid, kThreads);
  if (v == 8 && narrow) {
    RopeKernel<8, kBackward, uint32_t><<<grid, kThreads, 0, stream>>>(shape, in, out, tables);
  } else if (v == 8) {
    RopeKernel<8, kBackward, int64_t><<<grid, kThreads, 0, stream>>>(shape, in, out, tables);
  } else if (narrow) {
    RopeKernel<1, kBackward, uint32_t><<<grid, kThreads, 0, stream>>>(shape, in, out, tables);
  } else {
    RopeKernel<1, kBackward, int64_t><<<grid, kThreads, 0, stream>>>(shape, in, out, tables);
  }
  return detail::LaunchStatus();
}

}  // namespace

Status RopeForward(const RopeShape& shape, const RopeTensor& x, const RopeTensor& out, const RopeTables& tables,
                   cudaStream_t stream) {
  return Launch<false>(shape, x, out, tables, stream);
}

Status RopeBackward(const RopeShape& shape, const RopeTensor& g, const RopeTensor& dx, const RopeTables& tables,
                    cudaStream_t stream) {
  return Launch<true>(shape, g, dx, tables, stream);
}

}  // namespace tune::kernels
