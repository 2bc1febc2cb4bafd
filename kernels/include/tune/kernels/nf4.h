// NF4 dequantisation into a caller-provided bf16 buffer, in the exact format of
// the trainer's worker/trainer/model/nf4.h (bitsandbytes' layout):
//  * the weight is flattened row-major and cut into blocks of `block_size`
//    values (even, > 0); the last block may be partial (its padding is not
//    written);
//  * `packed` holds two 4-bit codes a byte, the first value of each pair in the
//    HIGH nibble; codes index the NF4 table (tune::kernels::kNf4CodeTable);
//  * plain absmax: `absmax` fp32 [num_blocks];
//    double quant: absmax[b] = dynamic_map[absmax_q[b]] * absmax_scale[b / 256]
//    + absmax_offset[0], each operation rounded to fp32 separately (no FMA),
//    with `dynamic_map` the 256-entry signed dynamic map the quantiser used;
//  * out[i] = bf16_round_nearest_even(code[nibble(i)] * absmax[i / block_size])
//    with the product rounded to fp32 first.
// The result is bit-identical to nf4::Dequantize(q, torch::kBFloat16).
// All pointers are device pointers; any alignment works (16-byte aligned
// `out` and 8-byte aligned `packed` with block_size % 16 == 0 take the
// vectorised path). `out` must not overlap the inputs.
#ifndef TUNE_KERNELS_INCLUDE_TUNE_KERNELS_NF4_H_
#define TUNE_KERNELS_INCLUDE_TUNE_KERNELS_NF4_H_

#include <cstdint>

#include "tune/kernels/status.h"
#include "tune/kernels/stream.h"

namespace tune::kernels {

// The 16 NF4 values, ascending (the QLoRA / bitsandbytes table; the same
// literals as nf4::CodeTable()).
inline constexpr float kNf4CodeTable[16] = {
    -1.0f,           -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f,  0.16093020141124725f,  0.24611230194568634f,  0.33791524171829224f,
    0.44070982933044434f,  0.5626170039176941f,   0.7229568362236023f,   1.0f};
constexpr int64_t kNf4DoubleQuantBlock = 256;

struct Nf4View {
  const uint8_t* packed = nullptr;  // [num_blocks * block_size / 2]
  int64_t numel = 0;
  int64_t block_size = 64;
  // Plain absmax (set this, leave the double-quant fields null) ...
  const float* absmax = nullptr;  // [num_blocks]
  // ... or double quantisation (all four set, absmax null).
  const uint8_t* absmax_q = nullptr;      // [num_blocks]
  const float* absmax_scale = nullptr;    // [ceil(num_blocks / 256)]
  const float* absmax_offset = nullptr;   // [1]
  const float* dynamic_map = nullptr;     // [256]
  int64_t num_blocks() const { return (numel + block_size - 1) / block_size; }
};

// Writes numel bf16 values (uint16_t storage) to out. numel == 0 is a no-op.
Status Nf4DequantizeBf16(const Nf4View& q, uint16_t* out, cudaStream_t stream);

// The same as rows of row_len values (numel a multiple of row_len), row r at
// out + r * out_stride (out_stride >= row_len): a weight written into the
// first columns of a wider buffer (the trainer puts LoRA B in the rest).
Status Nf4DequantizeBf16Rows(const Nf4View& q, int64_t row_len, uint16_t* out, int64_t out_stride,
                             cudaStream_t stream);

}  // namespace tune::kernels

#endif  // TUNE_KERNELS_INCLUDE_TUNE_KERNELS_NF4_H_
