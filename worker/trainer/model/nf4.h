// NF4 (4-bit NormalFloat) block quantisation, as in QLoRA / bitsandbytes.
//
// A weight is flattened row-major and split into blocks of `block_size`
// values (64 by default). Each block stores absmax = max|w| and every value as
// the 4-bit index of the nearest entry of the NF4 code table applied to
// w / absmax. Two codes share a byte, the first value in the high nibble (the
// bitsandbytes packing). The last block may be partial; it is padded with
// zeros that dequantisation drops.
//
// Double quantisation (bitsandbytes' "nested" quantisation of the absmax
// vector): offset = mean(absmax); absmax - offset is block-quantised in blocks
// of 256 to 8-bit indices into bitsandbytes' signed dynamic (tree) map, with an
// fp32 scale (the block's max |absmax - offset|) per block. Dequantised
// absmax = code[q] * scale + offset.
#ifndef TUNE_WORKER_TRAINER_MODEL_NF4_H_
#define TUNE_WORKER_TRAINER_MODEL_NF4_H_

#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <vector>

namespace tune::model::nf4 {

// The 16 NF4 values (bitsandbytes' table: quantiles of N(0,1) scaled so the
// extremes are -1 and 1, with an exact 0), ascending.
const std::array<float, 16>& CodeTable();
// bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)):
// 256 ascending values in [-1, 1] including 0 and 1.
const std::array<float, 256>& DynamicMap();

constexpr int kDoubleQuantBlock = 256;

struct Nf4Tensor {
  std::vector<int64_t> shape;  // original shape
  int64_t numel = 0;
  int64_t block_size = 64;
  torch::Tensor packed;        // uint8 [ceil(numel_padded / 2)]
  // Plain: absmax fp32 [num_blocks]. Double quant: absmax undefined and
  // absmax_q uint8 [num_blocks], absmax_scale fp32 [ceil(num_blocks/256)],
  // absmax_offset fp32 [1].
  torch::Tensor absmax;
  torch::Tensor absmax_q, absmax_scale, absmax_offset;
  bool double_quant() const { return absmax_q.defined(); }
  int64_t num_blocks() const { return (numel + block_size - 1) / block_size; }
  torch::Device device() const { return packed.device(); }
  // Bytes held (packed codes + absmax storage).
  int64_t StorageBytes() const;
};

// Quantises `w` (any float dtype, any device; computed on w's device in
// chunks so transient memory stays a small multiple of the chunk).
// block_size must be even and > 0. Throws std::invalid_argument.
Nf4Tensor Quantize(const torch::Tensor& w, int64_t block_size = 64, bool double_quant = true);

// Dequantised absmax (fp32, [num_blocks]).
torch::Tensor Absmax(const Nf4Tensor& q);

// Full dequantisation to `dtype` with q.shape, on q's device. Values are
// computed in fp32 (code * absmax) and then cast.
torch::Tensor Dequantize(const Nf4Tensor& q, torch::ScalarType dtype = torch::kFloat32);

}  // namespace tune::model::nf4

#endif  // TUNE_WORKER_TRAINER_MODEL_NF4_H_
