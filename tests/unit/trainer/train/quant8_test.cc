// Block-wise 8-bit quantisation: code tables and round-trip error bounds.
#include "worker/trainer/train/quant8.h"

#include <gtest/gtest.h>

namespace tune::train {
namespace {

double MaxHalfGap(const torch::Tensor& code) {
  return ((code.narrow(0, 1, code.numel() - 1) - code.narrow(0, 0, code.numel() - 1)).max() / 2).item<double>();
}

TEST(Quant8Test, CodeTables) {
  torch::Tensor s = DynamicCodeTable(true), u = DynamicCodeTable(false);
  EXPECT_EQ(s.numel(), 255);
  EXPECT_EQ(u.numel(), 256);
  // Sorted, strictly increasing, hit 0 and the ends exactly, symmetric.
  for (const auto& c : {s, u}) {
    EXPECT_TRUE((c.narrow(0, 1, c.numel() - 1) > c.narrow(0, 0, c.numel() - 1)).all().item<bool>());
    EXPECT_EQ(c.max().item<float>(), 1.0f);
    EXPECT_EQ((c == 0).sum().item<int64_t>(), 1);
  }
  EXPECT_EQ(s.min().item<float>(), -1.0f);
  EXPECT_EQ(u.min().item<float>(), 0.0f);
  EXPECT_TRUE(torch::equal(s, -s.flip({0})));
  // Smallest non-zero magnitude reaches ~1e-6 (dynamic range for Adam's v).
  EXPECT_LT(u.narrow(0, 1, 1).item<float>(), 1e-6f);
  // The top decade is fine-grained: no gap above 0.015 (signed) / 0.008 (unsigned).
  EXPECT_LT(MaxHalfGap(s), 0.0075);
  EXPECT_LT(MaxHalfGap(u), 0.004);
}

TEST(Quant8Test, RoundTripWithinHalfGapTimesAbsmax) {
  torch::manual_seed(1);
  for (bool is_signed : {true, false}) {
    torch::Tensor code = DynamicCodeTable(is_signed);
    torch::Tensor x = torch::randn({1000}) * torch::logspace(-4, 1, 1000);
    if (!is_signed) x = x.abs();
    Quantized8 q = QuantizeBlockwise(x, code);
    EXPECT_EQ(q.codes.numel(), 4 * 256);  // padded to whole blocks
    EXPECT_EQ(q.absmax.numel(), 4);
    torch::Tensor y = DequantizeBlockwise(q, code, x.sizes());
    ASSERT_EQ(y.sizes(), x.sizes());
    const double bound = MaxHalfGap(code) * 1.0001;
    for (int64_t b = 0; b < 4; ++b) {
      const int64_t n = std::min<int64_t>(256, 1000 - b * 256);
      torch::Tensor xb = x.narrow(0, b * 256, n), yb = y.narrow(0, b * 256, n);
      const double absmax = xb.abs().max().item<double>();
      EXPECT_FLOAT_EQ(q.absmax[b].item<float>(), static_cast<float>(absmax));
      EXPECT_LE((xb - yb).abs().max().item<double>(), bound * absmax) << "block " << b;
      // Large values (>= 10% of absmax) keep <= 7.5% relative error.
      torch::Tensor big = xb.abs() >= 0.1 * absmax;
      torch::Tensor rel = ((xb - yb).abs() / xb.abs()).masked_select(big);
      EXPECT_LE(rel.max().item<double>(), 0.075);
    }
    // absmax and zeros survive exactly; signs are kept.
    torch::Tensor at_max = x.abs().eq(x.abs().max());
    EXPECT_TRUE(torch::equal(x.masked_select(at_max), y.masked_select(at_max)));
    EXPECT_TRUE(((x * y) >= 0).all().item<bool>());
  }
}

TEST(Quant8Test, SmallValuesKeepRelativePrecision) {
  // A block whose values span 6 decades, as Adam's second moment does.
  torch::Tensor x = torch::logspace(-6, 0, 256);
  torch::Tensor code = DynamicCodeTable(false);
  torch::Tensor y = DequantizeBlockwise(QuantizeBlockwise(x, code), code, x.sizes());
  torch::Tensor rel = ((x - y).abs() / x).narrow(0, 10, 246);  // >= ~1.7e-6
  EXPECT_LT(rel.max().item<double>(), 0.5);
  EXPECT_TRUE((y > 0).all().item<bool>());
}

TEST(Quant8Test, AllZeroBlockAndShape) {
  torch::Tensor code = DynamicCodeTable(true);
  torch::Tensor x = torch::zeros({3, 100});
  x[2][5] = -0.5;
  torch::Tensor y = DequantizeBlockwise(QuantizeBlockwise(x, code), code, x.sizes());
  EXPECT_TRUE(torch::equal(x, y));
}

}  // namespace
}  // namespace tune::train
