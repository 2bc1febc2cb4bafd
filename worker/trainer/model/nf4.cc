#include "worker/trainer/model/nf4.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace tune::model::nf4 {
namespace {

// Values are processed in chunks of this many elements so the transient
// fp32/int64 copies made while quantising an 8B-model weight stay bounded.
constexpr int64_t kChunkElems = int64_t{1} << 24;

torch::Tensor TableTensor(torch::Device device) {
  const auto& t = CodeTable();
  return torch::tensor(std::vector<float>(t.begin(), t.end()), torch::dtype(torch::kFloat32)).to(device);
}

torch::Tensor Midpoints(const torch::Tensor& sorted_codes) {
  const int64_t n = sorted_codes.numel();
  return ((sorted_codes.slice(0, 0, n - 1) + sorted_codes.slice(0, 1, n)) / 2).contiguous();
}

// Block-wise quantisation of a [nb, block] fp32 matrix (rows = blocks) onto a
// sorted code book: returns codes (int64) and per-row absmax (fp32). Nearest
// code, ties going to the lower code (bitsandbytes compares with strict >).
std::pair<torch::Tensor, torch::Tensor> QuantizeRows(const torch::Tensor& rows, const torch::Tensor& codes,
                                                     const torch::Tensor& midpoints) {
  torch::Tensor absmax = std::get<0>(rows.abs().max(1));
  // An all-zero block has absmax 0: normalise by 1 so its codes are the 0 code.
  torch::Tensor denom = torch::where(absmax > 0, absmax, torch::ones_like(absmax));
  torch::Tensor normalized = (rows / denom.unsqueeze(1)).clamp(-1, 1);
  torch::Tensor idx = torch::bucketize(normalized, midpoints, /*out_int32=*/false, /*right=*/false);
  return {idx, absmax};
}

}  // namespace

const std::array<float, 16>& CodeTable() {
  // bitsandbytes' NF4 table (QLoRA, Dettmers et al. 2023, appendix E).
  static const std::array<float, 16> kTable = {
      -1.0f,
      -0.6961928009986877f,
      -0.5250730514526367f,
      -0.39491748809814453f,
      -0.28444138169288635f,
      -0.18477343022823334f,
      -0.09105003625154495f,
      0.0f,
      0.07958029955625534f,
      0.16093020141124725f,
      0.24611230194568634f,
      0.33791524171829224f,
      0.44070982933044434f,
      0.5626170039176941f,
      0.7229568362236023f,
      1.0f,
  };
  return kTable;
}

const std::array<float, 256>& DynamicMap() {
  // bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7,
  // total_bits=8): for exponent i in 0..6, 2^i fractions (midpoints of
  // linspace(0.1, 1, 2^i + 1)) scaled by 10^(i-6), both signs; then 0 and 1.
  // Computed in fp32 like the reference.
  static const std::array<float, 256> kMap = [] {
    std::vector<float> data;
    for (int i = 0; i < 7; ++i) {
      const int64_t items = (int64_t{1} << i) + 1;
      torch::Tensor b = torch::linspace(0.1, 1.0, items, torch::dtype(torch::kFloat32));
      torch::Tensor means = (b.slice(0, 0, items - 1) + b.slice(0, 1, items)) / 2.0;
      const double scale = std::pow(10.0, -6 + i);
      torch::Tensor pos = means * scale;
      torch::Tensor neg = means * (-scale);
      for (int64_t k = 0; k < pos.numel(); ++k) data.push_back(pos[k].item<float>());
      for (int64_t k = 0; k < neg.numel(); ++k) data.push_back(neg[k].item<float>());
    }
    data.push_back(0.0f);
    data.push_back(1.0f);
    std::sort(data.begin(), data.end());
    std::array<float, 256> out{};
    if (data.size() != 256) throw std::logic_error("dynamic map must have 256 entries");
    std::copy(data.begin(), data.end(), out.begin());
    return out;
  }();
  return kMap;
}

int64_t Nf4Tensor::StorageBytes() const {
  int64_t b = packed.defined() ? packed.numel() : 0;
  if (absmax.defined()) b += absmax.numel() * 4;
  if (absmax_q.defined()) b += absmax_q.numel() + absmax_scale.numel() * 4 + absmax_offset.numel() * 4;
  return b;
}

Nf4Tensor Quantize(const torch::Tensor& w, int64_t block_size, bool double_quant) {
  if (block_size <= 0 || block_size % 2 != 0) {
    throw std::invalid_argument("nf4: block_size must be a positive even number (got " +
                                std::to_string(block_size) + ")");
  }
  if (!w.is_floating_point()) throw std::invalid_argument("nf4: weight must be a floating-point tensor");
  torch::NoGradGuard no_grad;
  Nf4Tensor q;
  q.shape = w.sizes().vec();
  q.numel = w.numel();
  q.block_size = block_size;
  const torch::Device device = w.device();
  const int64_t nb = q.num_blocks();
  const torch::Tensor codes = TableTensor(device);
  const torch::Tensor mids = Midpoints(codes);
  torch::Tensor flat = w.detach().reshape({-1});
  q.packed = torch::empty({nb * block_size / 2}, torch::dtype(torch::kUInt8).device(device));
  torch::Tensor absmax = torch::empty({nb}, torch::dtype(torch::kFloat32).device(device));
  const int64_t blocks_per_chunk = std::max<int64_t>(1, kChunkElems / block_size);
  for (int64_t b0 = 0; b0 < nb; b0 += blocks_per_chunk) {
    const int64_t b1 = std::min(nb, b0 + blocks_per_chunk);
    const int64_t e0 = b0 * block_size, e1 = std::min(q.numel, b1 * block_size);
    torch::Tensor part = flat.slice(0, e0, e1).to(torch::kFloat32);
    const int64_t padded = (b1 - b0) * block_size;
    if (part.numel() < padded) part = torch::cat({part, torch::zeros({padded - part.numel()}, part.options())});
    auto [idx, amax] = QuantizeRows(part.view({b1 - b0, block_size}), codes, mids);
    torch::Tensor pairs = idx.to(torch::kUInt8).view({-1, 2});
    // First value of each pair in the high nibble (bitsandbytes).
    torch::Tensor packed = torch::bitwise_or(pairs.select(1, 0) * 16, pairs.select(1, 1));
    q.packed.slice(0, e0 / 2, e0 / 2 + packed.numel()).copy_(packed);
    absmax.slice(0, b0, b1).copy_(amax);
  }
  if (!double_quant) {
    q.absmax = absmax;
    return q;
  }
  // Nested quantisation of absmax (bitsandbytes compress_statistics).
  q.absmax_offset = absmax.mean().reshape({1});
  torch::Tensor centered = absmax - q.absmax_offset;
  const int64_t nb2 = (nb + kDoubleQuantBlock - 1) / kDoubleQuantBlock;
  if (centered.numel() < nb2 * kDoubleQuantBlock) {
    centered = torch::cat({centered, torch::zeros({nb2 * kDoubleQuantBlock - centered.numel()}, centered.options())});
  }
  const auto& dm = DynamicMap();
  torch::Tensor dmap = torch::tensor(std::vector<float>(dm.begin(), dm.end()), torch::dtype(torch::kFloat32)).to(device);
  auto [idx2, scale] = QuantizeRows(centered.view({nb2, kDoubleQuantBlock}), dmap, Midpoints(dmap));
  q.absmax_q = idx2.reshape({-1}).slice(0, 0, nb).to(torch::kUInt8).contiguous();
  q.absmax_scale = scale.contiguous();
  return q;
}

torch::Tensor Absmax(const Nf4Tensor& q) {
  if (!q.double_quant()) return q.absmax;
  const auto& dm = DynamicMap();
  torch::Tensor dmap = torch::tensor(std::vector<float>(dm.begin(), dm.end()), torch::dtype(torch::kFloat32)).to(q.device());
  torch::Tensor vals = dmap.index_select(0, q.absmax_q.to(torch::kInt64));
  torch::Tensor scale = q.absmax_scale.repeat_interleave(kDoubleQuantBlock).slice(0, 0, q.num_blocks());
  return vals * scale + q.absmax_offset;
}

torch::Tensor Dequantize(const Nf4Tensor& q, torch::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  // Look up whole bytes in a [256, 2] table of (high, low) code values: one
  // int64 index per two values instead of per value.
  static const std::vector<float> kPairs = [] {
    std::vector<float> v(512);
    const auto& t = CodeTable();
    for (int b = 0; b < 256; ++b) {
      v[2 * b] = t[b >> 4];
      v[2 * b + 1] = t[b & 15];
    }
    return v;
  }();
  torch::Tensor pairs = torch::tensor(kPairs, torch::dtype(torch::kFloat32)).view({256, 2}).to(q.device());
  torch::Tensor vals = pairs.index_select(0, q.packed.to(torch::kInt64)).view({q.num_blocks(), q.block_size});
  vals.mul_(Absmax(q).unsqueeze(1));
  torch::Tensor flat = vals.view({-1});
  if (flat.numel() != q.numel) flat = flat.slice(0, 0, q.numel);
  return flat.to(dtype).reshape(q.shape);
}

}  // namespace tune::model::nf4
