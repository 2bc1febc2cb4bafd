// Rotary position embedding (Llama-3 / Hugging Face "rotate half"
// convention), forward and backward, on bf16 [B, T, H, D] tensors, matching
// the trainer's ops::ApplyRope bit for bit. With h = D / 2, c/s the cos/sin
// rows of token (b, t), and every product and sum rounded to bf16 as torch
// does:
//   forward   out[i]   = x[i]   * c[i]   - x[i+h] * s[i]      (i < h)
//             out[i+h] = x[i+h] * c[i+h] + x[i]   * s[i+h]
//   backward  dx[i]    = g[i]   * c[i]   + g[i+h] * s[i+h]
//             dx[i+h]  = g[i+h] * c[i+h] - g[i]   * s[i]
// Layout: x/out (and g/dx) have arbitrary element strides for B, T and H and
// a contiguous head dim D (even). The cos/sin tables are bf16 with a
// contiguous last dim D and
//   * position_ids == null: the row of (b, t) is table + b*table_stride_b +
//     t*table_stride_t (stride_b 0 shares one [T, D] table across the batch);
//   * position_ids (int64 [B, T], contiguous) given: the row is
//     table + position_ids[b*T + t] * table_stride_t over `table_rows` rows;
//     an id outside [0, table_rows) yields NaN outputs for that token.
// In place: out may equal x with identical strides (every element is read and
// written by the same thread). Otherwise out must not overlap x. Device
// pointers, 2-byte alignment suffices (D % 16 == 0 with 16-byte aligned rows
// takes the vectorised path).
#ifndef TUNE_KERNELS_INCLUDE_TUNE_KERNELS_ROPE_H_
#define TUNE_KERNELS_INCLUDE_TUNE_KERNELS_ROPE_H_

#include <cstdint>

#include "tune/kernels/status.h"
#include "tune/kernels/stream.h"

namespace tune::kernels {

struct RopeTensor {
  uint16_t* data = nullptr;
  int64_t stride_b = 0, stride_t = 0, stride_h = 0;  // elements
};

struct RopeTables {
  const uint16_t* cos = nullptr;
  const uint16_t* sin = nullptr;
  int64_t stride_b = 0, stride_t = 0;  // elements, shared by cos and sin
  const int64_t* position_ids = nullptr;
  int64_t table_rows = 0;  // only read with position_ids
};

struct RopeShape {
  int64_t batch = 0, seq = 0, heads = 0, head_dim = 0;
};

Status RopeForward(const RopeShape& shape, const RopeTensor& x, const RopeTensor& out, const RopeTables& tables,
                   cudaStream_t stream);
// g is the gradient of out; dx may equal g (in place).
Status RopeBackward(const RopeShape& shape, const RopeTensor& g, const RopeTensor& dx, const RopeTables& tables,
                    cudaStream_t stream);

}  // namespace tune::kernels

#endif  // TUNE_KERNELS_INCLUDE_TUNE_KERNELS_ROPE_H_
