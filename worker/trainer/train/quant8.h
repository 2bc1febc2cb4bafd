// Block-wise 8-bit quantisation of optimizer states (the "8-bit Adam" idea).
//
// A tensor is flattened and cut into blocks of `block` values (256). Each block
// is scaled by its absolute maximum (kept in fp32) and every scaled value in
// [-1, 1] is stored as the uint8 index of the nearest entry of a fixed,
// non-linear code table. The tables put their levels on a decimal-exponent
// grid (decades 1e-6 .. 1 with 2^d linearly spaced levels in decade d), so
// small values keep relative precision: Adam's second moment spans many
// orders of magnitude inside one block, and a linear code would round most of
// it to zero. The first moment uses the signed table (symmetric, 255 codes:
// 0, +-1 and 126 levels each side), the second moment the unsigned table
// (256 codes in [0, 1]). Every table contains 0 and 1 exactly, so zeros and
// each block's absmax survive a round trip exactly.
#ifndef TUNE_WORKER_TRAINER_TRAIN_QUANT8_H_
#define TUNE_WORKER_TRAINER_TRAIN_QUANT8_H_

#include <cstdint>

#include <torch/torch.h>

namespace tune::train {

// Sorted ascending fp32 code table on CPU. Signed: 255 entries in [-1, 1];
// unsigned: 256 entries in [0, 1].
torch::Tensor DynamicCodeTable(bool is_signed);

struct Quantized8 {
  torch::Tensor codes;   // uint8 [num_blocks * block]
  torch::Tensor absmax;  // fp32 [num_blocks]
  int64_t numel = 0;
};

// Quantises fp32 `x` (any shape; device kept). `code` is a table from
// DynamicCodeTable on x's device. With the unsigned table x must be >= 0.
Quantized8 QuantizeBlockwise(const torch::Tensor& x, const torch::Tensor& code, int64_t block = 256);

// Inverse of QuantizeBlockwise: fp32 tensor of `shape`.
torch::Tensor DequantizeBlockwise(const Quantized8& q, const torch::Tensor& code, at::IntArrayRef shape,
                                  int64_t block = 256);

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_TRAIN_QUANT8_H_
