// SwiGLU: h = silu(gate) * up, and its backward, on bf16 [rows, cols] with
// row strides (elements) and a contiguous last dim, so gate and up can be the
// two halves of one fused gate/up projection. Numerics follow torch's bf16
// ops (math in fp32, each op's result rounded to bf16):
//   forward   a = bf16(silu(gate)), h = bf16(a * up)
//   backward  dup = bf16(dh * a), dsilu = bf16(dh * up),
//             dgate = bf16(dsilu * s * (1 + gate * (1 - s))), s = sigmoid(gate)
// silu uses expf, so results can differ from torch's by at most one bf16 ulp.
// In place: h may equal gate or up (same stride); dgate may equal gate and
// dup may equal up (same strides): each element is read and written by one
// thread. Device pointers; 2-byte alignment suffices (16-byte aligned rows
// with cols % 8 == 0 take the vectorised path).
#ifndef TUNE_KERNELS_INCLUDE_TUNE_KERNELS_SWIGLU_H_
#define TUNE_KERNELS_INCLUDE_TUNE_KERNELS_SWIGLU_H_

#include <cstdint>

#include "tune/kernels/status.h"
#include "tune/kernels/stream.h"

namespace tune::kernels {

struct SwiGluShape {
  int64_t rows = 0, cols = 0;
};

Status SwiGluForward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                     int64_t up_stride, uint16_t* h, int64_t h_stride, cudaStream_t stream);

Status SwiGluBackward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                      int64_t up_stride, const uint16_t* dh, int64_t dh_stride, uint16_t* dgate,
                      int64_t dgate_stride, uint16_t* dup, int64_t dup_stride, cudaStream_t stream);

// SwiGluBackward that also writes the forward's h (bit-identical to
// SwiGluForward) from the gate/up values it reads anyway: for a backward that
// needs h (a LoRA on the next projection) after the gradient it feeds, this
// replaces a recompute pass. h must not alias any other argument.
Status SwiGluBackwardWithForward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride,
                                 const uint16_t* up, int64_t up_stride, const uint16_t* dh, int64_t dh_stride,
                                 uint16_t* dgate, int64_t dgate_stride, uint16_t* dup, int64_t dup_stride, uint16_t* h,
                                 int64_t h_stride, cudaStream_t stream);

}  // namespace tune::kernels

#endif  // TUNE_KERNELS_INCLUDE_TUNE_KERNELS_SWIGLU_H_
