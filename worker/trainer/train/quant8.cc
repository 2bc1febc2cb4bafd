#include "worker/trainer/train/quant8.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace tune::train {

torch::Tensor DynamicCodeTable(bool is_signed) {
  // Decade d (0..6) covers [0.1, 1] * 10^(d-6); its levels are the midpoints
  // of `count` equal sub-intervals, so larger decades get finer steps.
  std::vector<float> magnitudes;
  for (int d = 0; d <= 6; ++d) {
    int count = 1 << d;                   // unsigned uses one more bit: x2 below
    if (!is_signed) count *= 2;
    if (is_signed && d == 6) count -= 1;  // leaves room for +-1 exactly (255 codes)
    const double scale = std::pow(10.0, d - 6);
    for (int i = 0; i < count; ++i) {
      const double lo = 0.1 + 0.9 * i / count;
      const double hi = 0.1 + 0.9 * (i + 1) / count;
      magnitudes.push_back(static_cast<float>(scale * 0.5 * (lo + hi)));
    }
  }
  std::vector<float> table;
  table.push_back(0.0f);
  table.push_back(1.0f);
  for (float m : magnitudes) table.push_back(m);
  if (is_signed) {
    table.push_back(-1.0f);
    for (float m : magnitudes) table.push_back(-m);
  }
  std::sort(table.begin(), table.end());
  return torch::tensor(table, torch::kFloat32);
}

Quantized8 QuantizeBlockwise(const torch::Tensor& x, const torch::Tensor& code, int64_t block) {
  torch::NoGradGuard no_grad;
  Quantized8 q;
  q.numel = x.numel();
  const int64_t nblocks = (q.numel + block - 1) / block;
  torch::Tensor flat = x.detach().to(torch::kFloat32).reshape({-1});
  if (nblocks * block != q.numel) flat = torch::constant_pad_nd(flat, {0, nblocks * block - q.numel}, 0);
  torch::Tensor blocks = flat.view({nblocks, block});
  q.absmax = blocks.abs().amax({1});
  // Empty blocks (all zero) divide by 1 and quantise to the code of 0.
  torch::Tensor scale = torch::where(q.absmax > 0, q.absmax, torch::ones_like(q.absmax));
  torch::Tensor normed = (blocks / scale.unsqueeze(1)).clamp(-1.0, 1.0).reshape({-1}).contiguous();
  const int64_t n = code.numel();
  torch::Tensor hi = torch::searchsorted(code, normed).clamp(0, n - 1);
  torch::Tensor lo = (hi - 1).clamp(0, n - 1);
  torch::Tensor d_hi = (code.index_select(0, hi) - normed).abs();
  torch::Tensor d_lo = (normed - code.index_select(0, lo)).abs();
  q.codes = torch::where(d_lo <= d_hi, lo, hi).to(torch::kUInt8);
  return q;
}

torch::Tensor DequantizeBlockwise(const Quantized8& q, const torch::Tensor& code, at::IntArrayRef shape,
                                  int64_t block) {
  torch::NoGradGuard no_grad;
  const int64_t nblocks = q.absmax.numel();
  torch::Tensor values = code.index_select(0, q.codes.to(torch::kLong)).view({nblocks, block});
  values = (values * q.absmax.unsqueeze(1)).reshape({-1});
  return values.narrow(0, 0, q.numel).view(shape);
}

}  // namespace tune::train
