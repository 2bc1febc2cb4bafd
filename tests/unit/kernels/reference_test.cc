// The kernels' CPU references (kernels/reference) against hand-computed
// values, double-precision formulas and finite differences: the GPU tests
// compare the kernels with these references, so they must be right.
#include "kernels/reference/reference.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tests/unit/kernels/random_bf16.h"

namespace tune::kernels::ref {
namespace {

using kernels::test_data::RandomBf16;

std::vector<double> ToDouble(const std::vector<uint16_t>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16ToFloat(v[i]);
  return out;
}

TEST(Bf16Test, RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(-2.0f), 0xc000);
  // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even 1.0.
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
  EXPECT_EQ(Bf16ToFloat(0x4049), 3.140625f);
}

TEST(Nf4RefTest, DynamicMapHasBitsandbytesShape) {
  const auto map = Nf4DynamicMap();
  for (int i = 1; i < 256; ++i) EXPECT_LE(map[i - 1], map[i]) << i;
  EXPECT_EQ(map[255], 1.0f);
  EXPECT_EQ(std::count(map.begin(), map.end(), 0.0f), 1);
  // Most negative: -(1 - 0.9 / 128), the last midpoint of linspace(0.1, 1, 65).
  EXPECT_NEAR(map[0], -(1.0 - 0.9 / 128), 1e-6);
  // Smallest magnitude: 10^-6 * (0.1 + 1) / 2.
  EXPECT_NEAR(map[128], 0.55e-6, 1e-12);
}

// A plain-absmax NF4 view of numel values in blocks of 4.
Nf4View PlainBlocksOf4(const uint8_t* packed, int64_t numel, const float* absmax) {
  Nf4View q;
  q.packed = packed;
  q.numel = numel;
  q.block_size = 4;
  q.absmax = absmax;
  return q;
}

TEST(Nf4RefTest, DequantisesHighNibbleFirstWithPartialBlock) {
  // 5 values, block 4: blocks {0..3} and {4} (padded). Byte 0x0F = codes 0 (-1) then 15 (+1).
  const uint8_t packed[4] = {0x0f, 0x78, 0xf0, 0x00};
  const float absmax[2] = {2.0f, 0.5f};
  const Nf4View q = PlainBlocksOf4(packed, 5, absmax);
  std::vector<uint16_t> out(5);
  ASSERT_TRUE(Nf4DequantizeBf16(q, out.data()).ok());
  EXPECT_EQ(Bf16ToFloat(out[0]), -2.0f);
  EXPECT_EQ(Bf16ToFloat(out[1]), 2.0f);
  EXPECT_EQ(Bf16ToFloat(out[2]), 0.0f);  // code 7
  EXPECT_EQ(out[3], FloatToBf16(kNf4CodeTable[8] * 2.0f));
  EXPECT_EQ(Bf16ToFloat(out[4]), 0.5f);  // code 15 of the second block
}

TEST(Nf4RefTest, RowsLandAtTheirStrideAndLeaveTheGapAlone) {
  const uint8_t packed[3] = {0x0f, 0x78, 0xf0};
  const float absmax[2] = {2.0f, 0.5f};
  const Nf4View q = PlainBlocksOf4(packed, 6, absmax);
  std::vector<uint16_t> flat(6), wide(3 * 5, 0xffff);
  ASSERT_TRUE(Nf4DequantizeBf16(q, flat.data()).ok());
  ASSERT_TRUE(Nf4DequantizeBf16Rows(q, 2, wide.data(), 5).ok());  // 3 rows of 2 at stride 5
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 5; ++c) {
      if (c < 2) {
        EXPECT_EQ(wide[r * 5 + c], flat[r * 2 + c]) << r << "," << c;
      } else {
        EXPECT_EQ(wide[r * 5 + c], 0xffff) << r << "," << c;
      }
    }
  }
  Status s = Nf4DequantizeBf16Rows(q, 4, wide.data(), 5);
  EXPECT_EQ(s.code, StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message).find("row_len"), std::string::npos);
  s = Nf4DequantizeBf16Rows(q, 3, wide.data(), 2);
  EXPECT_NE(std::string(s.message).find("out_stride"), std::string::npos);
}

TEST(Nf4RefTest, DoubleQuantAbsmaxIsCodeTimesScalePlusOffset) {
  // 600 blocks of 2 values: three double-quant blocks of 256 (the last partial).
  const int64_t nb = 600;
  std::vector<uint8_t> packed(nb, 0xf7);  // codes 15 (+1) and 7 (0) in every block
  std::vector<uint8_t> aq(nb);
  for (int64_t b = 0; b < nb; ++b) aq[b] = static_cast<uint8_t>((b * 37) % 256);
  const float scale[3] = {0.5f, 0.25f, 2.0f};
  const float offset = 0.125f;
  const auto map = Nf4DynamicMap();
  Nf4View q;
  q.packed = packed.data();
  q.numel = 2 * nb - 1;
  q.block_size = 2;
  q.absmax_q = aq.data();
  q.absmax_scale = scale;
  q.absmax_offset = &offset;
  q.dynamic_map = map.data();
  std::vector<uint16_t> out(q.numel);
  ASSERT_TRUE(Nf4DequantizeBf16(q, out.data()).ok());
  for (int64_t b = 0; b < nb; ++b) {
    const double absmax = static_cast<double>(map[aq[b]]) * scale[b / 256] + offset;
    EXPECT_NEAR(Bf16ToFloat(out[2 * b]), absmax, std::abs(absmax) * 4e-3 + 1e-12) << b;
    if (2 * b + 1 < q.numel) {
      EXPECT_EQ(Bf16ToFloat(out[2 * b + 1]), 0.0f);
    }
  }
}

TEST(Nf4RefTest, RejectsBadArgumentsNamingThem) {
  uint8_t packed[1] = {0};
  uint16_t out[2];
  float absmax = 1.0f;
  Nf4View q;
  q.packed = packed;
  q.numel = 2;
  q.absmax = &absmax;
  q.block_size = 3;
  Status s = Nf4DequantizeBf16(q, out);
  EXPECT_EQ(s.code, StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message).find("block_size"), std::string::npos) << s.message;
  q.block_size = 2;
  float scale = 1.0f;
  q.absmax_scale = &scale;  // both plain and double-quant fields
  s = Nf4DequantizeBf16(q, out);
  EXPECT_EQ(s.code, StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message).find("absmax"), std::string::npos) << s.message;
}

TEST(RmsNormRefTest, MatchesFormulaAndFiniteDifferences) {
  const int64_t rows = 3, H = 37, stride = 40;
  RmsNormShape shape{rows, H, 1e-5f};
  auto x = RandomBf16(rows * stride, 1, 2.0f);
  auto w = RandomBf16(H, 2);
  std::vector<uint16_t> y(rows * stride);
  std::vector<float> rstd(rows);
  ASSERT_TRUE(RmsNormForward(shape, x.data(), stride, w.data(), y.data(), stride, rstd.data()).ok());
  const auto xd = ToDouble(x), wd = ToDouble(w);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < H; ++j) ss += xd[r * stride + j] * xd[r * stride + j];
    const double rs = 1.0 / std::sqrt(ss / H + 1e-5);
    EXPECT_NEAR(rstd[r], rs, rs * 1e-6);
    for (int64_t j = 0; j < H; ++j) {
      const double expect = wd[j] * xd[r * stride + j] * rs;
      EXPECT_NEAR(Bf16ToFloat(y[r * stride + j]), expect, std::abs(expect) * 1.6e-2 + 1e-6);
    }
  }
  // Backward against central differences of L = sum(dy * w * x * rstd(x)) in double.
  auto dy = RandomBf16(rows * stride, 3);
  std::vector<uint16_t> dx(rows * stride);
  std::vector<float> dw(H, 0.0f);
  ASSERT_TRUE(RmsNormBackward(shape, x.data(), stride, w.data(), rstd.data(), dy.data(), stride, dx.data(), stride,
                              dw.data())
                  .ok());
  const auto dyd = ToDouble(dy);
  auto loss_row = [&](std::vector<double> xr, int64_t r) {
    double ss = 0;
    for (double v : xr) ss += v * v;
    const double rs = 1.0 / std::sqrt(ss / H + 1e-5);
    double l = 0;
    for (int64_t j = 0; j < H; ++j) l += dyd[r * stride + j] * wd[j] * xr[j] * rs;
    return l;
  };
  std::vector<double> dw_expect(H, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> xr(xd.begin() + r * stride, xd.begin() + r * stride + H);
    double rs = rstd[r], maxg = 0;
    std::vector<double> g(H);
    for (int64_t j = 0; j < H; ++j) {
      std::vector<double> p = xr, m = xr;
      p[j] += 1e-4;
      m[j] -= 1e-4;
      g[j] = (loss_row(p, r) - loss_row(m, r)) / 2e-4;
      maxg = std::max(maxg, std::abs(g[j]));
      dw_expect[j] += dyd[r * stride + j] * xr[j] * rs;
    }
    for (int64_t j = 0; j < H; ++j) {
      EXPECT_NEAR(Bf16ToFloat(dx[r * stride + j]), g[j], 2e-2 * maxg) << r << "," << j;
    }
  }
  for (int64_t j = 0; j < H; ++j) EXPECT_NEAR(dw[j], dw_expect[j], 2e-2 * (std::abs(dw_expect[j]) + 1)) << j;
}

TEST(RopeRefTest, RotatesPairsAndBackwardIsTheAdjoint) {
  const int64_t B = 2, T = 3, Hh = 2, D = 8, half = D / 2;
  // x laid out [B, H, T, D] but addressed as [B, T, H, D] (the trainer's transposed view).
  RopeTensor x{nullptr, Hh * T * D, D, T * D};
  auto xs = RandomBf16(B * T * Hh * D, 4);
  x.data = xs.data();
  // Token t rotates by angle t * (i + 1) * 0.25 on pair i; cos/sin shared over the batch.
  std::vector<uint16_t> c(T * D), s(T * D);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < D; ++i) {
      const double a = t * ((i % half) + 1) * 0.25;
      c[t * D + i] = FloatToBf16(static_cast<float>(std::cos(a)));
      s[t * D + i] = FloatToBf16(static_cast<float>(std::sin(a)));
    }
  }
  RopeTables tables{c.data(), s.data(), 0, D, nullptr, 0};
  RopeShape shape{B, T, Hh, D};
  std::vector<uint16_t> outs(xs.size());
  RopeTensor out{outs.data(), x.stride_b, x.stride_t, x.stride_h};
  ASSERT_TRUE(RopeForward(shape, x, out, tables).ok());
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < Hh; ++h) {
        const int64_t o = b * x.stride_b + t * x.stride_t + h * x.stride_h;
        for (int64_t i = 0; i < half; ++i) {
          const double cc = Bf16ToFloat(c[t * D + i]), ss = Bf16ToFloat(s[t * D + i]);
          const double x1 = Bf16ToFloat(xs[o + i]), x2 = Bf16ToFloat(xs[o + i + half]);
          EXPECT_NEAR(Bf16ToFloat(outs[o + i]), x1 * cc - x2 * ss, 2e-2);
          EXPECT_NEAR(Bf16ToFloat(outs[o + i + half]), x2 * cc + x1 * ss, 2e-2);
          if (t == 0) {  // angle 0: identity, exactly
            EXPECT_EQ(outs[o + i], xs[o + i]);
            EXPECT_EQ(outs[o + i + half], xs[o + i + half]);
          }
        }
      }
    }
  }
  // <g, R x> == <R^T g, x>: backward (in place on g) is the transpose.
  auto gs = RandomBf16(xs.size(), 5);
  double lhs = 0, rhs = 0;
  for (size_t i = 0; i < xs.size(); ++i) lhs += static_cast<double>(Bf16ToFloat(gs[i])) * Bf16ToFloat(outs[i]);
  RopeTensor g{gs.data(), x.stride_b, x.stride_t, x.stride_h};
  ASSERT_TRUE(RopeBackward(shape, g, g, tables).ok());
  for (size_t i = 0; i < xs.size(); ++i) rhs += static_cast<double>(Bf16ToFloat(gs[i])) * Bf16ToFloat(xs[i]);
  EXPECT_NEAR(lhs, rhs, 0.05 * std::sqrt(static_cast<double>(xs.size())));

  // Position ids select table rows; an id out of range gives NaN, not a crash.
  std::vector<int64_t> pos = {2, 0, 1, 0, 0, 7};
  RopeTables by_pos{c.data(), s.data(), 0, D, pos.data(), T};
  ASSERT_TRUE(RopeForward(shape, x, out, by_pos).ok());
  EXPECT_EQ(outs[x.stride_b + 1 * x.stride_t], xs[x.stride_b + 1 * x.stride_t]);  // b=1, t=1 -> position 0
  EXPECT_TRUE(std::isnan(Bf16ToFloat(outs[x.stride_b + 2 * x.stride_t])));      // b=1, t=2 -> 7
  EXPECT_EQ(RopeForward(RopeShape{1, 1, 1, 7}, x, out, tables).code, StatusCode::kInvalidArgument);
}

TEST(SwiGluRefTest, KnownValuesAndFiniteDifferences) {
  const std::vector<float> gv = {0.0f, 1.0f, -2.0f, 3.5f};
  std::vector<uint16_t> g(4), u(4, FloatToBf16(2.0f)), h(4);
  for (int i = 0; i < 4; ++i) g[i] = FloatToBf16(gv[i]);
  ASSERT_TRUE(SwiGluForward({1, 4}, g.data(), 4, u.data(), 4, h.data(), 4).ok());
  for (int i = 0; i < 4; ++i) {
    const double silu = gv[i] / (1 + std::exp(-static_cast<double>(gv[i])));
    EXPECT_NEAR(Bf16ToFloat(h[i]), 2 * silu, 2 * std::abs(silu) * 8e-3) << i;
  }
  EXPECT_EQ(Bf16ToFloat(h[0]), 0.0f);
  std::vector<uint16_t> dh(4, FloatToBf16(1.0f)), dg(4), du(4);
  ASSERT_TRUE(SwiGluBackward({1, 4}, g.data(), 4, u.data(), 4, dh.data(), 4, dg.data(), 4, du.data(), 4).ok());
  for (int i = 0; i < 4; ++i) {
    auto f = [](double x) { return x / (1 + std::exp(-x)); };
    const double d = (f(gv[i] + 1e-5) - f(gv[i] - 1e-5)) / 2e-5;
    EXPECT_NEAR(Bf16ToFloat(dg[i]), 2 * d, std::abs(2 * d) * 1.6e-2 + 1e-6) << i;
    EXPECT_NEAR(Bf16ToFloat(du[i]), f(gv[i]), std::abs(f(gv[i])) * 8e-3) << i;
  }
}

TEST(GemmResidualRefTest, KnownValuesStridesInPlaceAndBadArguments) {
  // x [2, 3] in rows of 4, w [2, 3] in rows of 5, residual/y [2, 2] in rows of 3.
  auto bf = [](std::vector<float> v) {
    std::vector<uint16_t> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = FloatToBf16(v[i]);
    return out;
  };
  const auto x = bf({1, 2, 3, 99, -1, 0.5f, 4, 99});
  const auto w = bf({1, 0, 2, 99, 99, 0, 1, -1, 99, 99});
  auto r = bf({10, 20, 99, 0.25f, -0.5f, 99});
  std::vector<uint16_t> y(6, FloatToBf16(7));
  GemmResidualArgs a;
  a.x = x.data(), a.x_stride = 4, a.w = w.data(), a.w_stride = 5, a.residual = r.data(), a.y = y.data();
  a.y_stride = 3, a.rows = 2, a.cols = 2, a.k = 3;
  ASSERT_TRUE(GemmResidualBf16(a).ok());
  // Row 0: x.w0 = 1 + 6 = 7, x.w1 = 2 - 3 = -1; row 1: -1 + 8 = 7, 0.5 - 4 = -3.5.
  const std::vector<float> want = {17, 19, 7, 7.25f, -4, 7};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(Bf16ToFloat(y[i]), want[i]) << i;  // the gap column untouched
  // In place: y is the residual.
  a.y = r.data();
  ASSERT_TRUE(GemmResidualBf16(a).ok());
  for (int i : {0, 1, 3, 4}) EXPECT_EQ(Bf16ToFloat(r[i]), want[i]) << i;
  // Bad arguments name what is wrong.
  GemmResidualArgs bad = a;
  bad.k = 0;
  EXPECT_NE(std::string(GemmResidualBf16(bad).message).find("k must be"), std::string::npos);
  bad = a, bad.x_stride = 2;
  EXPECT_NE(std::string(GemmResidualBf16(bad).message).find("x_stride"), std::string::npos);
  bad = a, bad.y_stride = 1;
  EXPECT_NE(std::string(GemmResidualBf16(bad).message).find("y_stride"), std::string::npos);
  bad = a, bad.residual = nullptr;
  EXPECT_EQ(GemmResidualBf16(bad).code, StatusCode::kInvalidArgument);
  bad = a, bad.y = r.data() + 1;  // overlaps the residual without being it
  EXPECT_NE(std::string(GemmResidualBf16(bad).message).find("overlap"), std::string::npos);
  std::vector<uint16_t> xy = x;  // y over x
  bad = a, bad.x = xy.data(), bad.y = xy.data(), bad.residual = r.data();
  EXPECT_NE(std::string(GemmResidualBf16(bad).message).find("not overlap x or w"), std::string::npos);
  bad = a, bad.workspace_bytes = 16;
  EXPECT_NE(std::string(GemmResidualBf16(bad).message).find("workspace"), std::string::npos);
}

// Contiguous rows of hidden [labels.size(), hidden_dim] and weight [vocab, hidden_dim].
LinearCrossEntropyArgs CeArgs(const std::vector<uint16_t>& h, const std::vector<uint16_t>& w,
                              const std::vector<int64_t>& labels, int64_t hidden_dim) {
  LinearCrossEntropyArgs a;
  a.hidden = h.data();
  a.hidden_stride = hidden_dim;
  a.weight = w.data();
  a.weight_stride = hidden_dim;
  a.labels = labels.data();
  a.rows = static_cast<int64_t>(labels.size());
  a.hidden_dim = hidden_dim;
  a.vocab = static_cast<int64_t>(w.size()) / hidden_dim;
  return a;
}

TEST(LinearCrossEntropyRefTest, KnownLossIgnoreIndexAndGradient) {
  // hidden_dim 1: logits of a row are weight * hidden exactly.
  const std::vector<uint16_t> w = {FloatToBf16(0.0f), FloatToBf16(1.0f), FloatToBf16(2.0f)};
  const std::vector<uint16_t> h = {FloatToBf16(1.0f), FloatToBf16(-1.0f), FloatToBf16(0.5f)};
  const std::vector<int64_t> labels = {2, kIgnoreIndex, 0};
  LinearCrossEntropyArgs a = CeArgs(h, w, labels, 1);
  ASSERT_EQ(a.vocab, 3);
  std::vector<float> lse(3), loss(3);
  float sum = 0;
  ASSERT_TRUE(LinearCrossEntropyForward(a, lse.data(), loss.data(), &sum).ok());
  const double lse0 = std::log(1 + std::exp(1.0) + std::exp(2.0));
  const double lse2 = std::log(1 + std::exp(0.5) + std::exp(1.0));
  EXPECT_NEAR(loss[0], lse0 - 2, 1e-6);
  EXPECT_EQ(loss[1], 0.0f);
  EXPECT_NEAR(loss[2], lse2 - 0, 1e-6);
  EXPECT_NEAR(sum, lse0 - 2 + lse2, 1e-6);
  // d loss / d hidden = sum_v (softmax_v - [v == y]) * w_v, times grad_scale.
  const float scale = 0.5f;
  std::vector<uint16_t> dh(3);
  ASSERT_TRUE(LinearCrossEntropyBackward(a, lse.data(), &scale, dh.data(), 1).ok());
  const double p1 = std::exp(1.0 - lse0), p2 = std::exp(2.0 - lse0);
  EXPECT_NEAR(Bf16ToFloat(dh[0]), scale * (p1 * 1 + (p2 - 1) * 2), 4e-3);
  EXPECT_EQ(Bf16ToFloat(dh[1]), 0.0f);
  const double q1 = std::exp(0.5 - lse2), q2 = std::exp(1.0 - lse2);
  EXPECT_NEAR(Bf16ToFloat(dh[2]), scale * (q1 * 1 + q2 * 2), 4e-3);
  // A label outside the vocab (and not -100) is a NaN row loss.
  const std::vector<int64_t> bad = {3, 0, 0};
  a.labels = bad.data();
  ASSERT_TRUE(LinearCrossEntropyForward(a, lse.data(), loss.data(), &sum).ok());
  EXPECT_TRUE(std::isnan(loss[0]));
  a.hidden_dim = 0;
  Status s = LinearCrossEntropyForward(a, lse.data(), loss.data(), &sum);
  EXPECT_EQ(s.code, StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message).find("hidden_dim"), std::string::npos);
}

TEST(LinearCrossEntropyRefTest, ForwardWithGradIsForwardPlusUnitBackwardAndScalesAfter) {
  const std::vector<uint16_t> w = {FloatToBf16(0.0f), FloatToBf16(1.0f), FloatToBf16(2.0f),
                                   FloatToBf16(-1.0f), FloatToBf16(0.5f), FloatToBf16(0.25f)};
  const std::vector<uint16_t> h = {FloatToBf16(1.0f), FloatToBf16(-1.0f), FloatToBf16(0.5f), FloatToBf16(2.0f)};
  const std::vector<int64_t> labels = {2, kIgnoreIndex};
  const LinearCrossEntropyArgs a = CeArgs(h, w, labels, 2);
  ASSERT_EQ(a.vocab, 3);
  std::vector<float> lse(2), loss(2), lse2(2), loss2(2);
  float sum = 0, sum2 = 0;
  std::vector<uint16_t> unit(4), unit_bwd(4), scaled(4);
  ASSERT_TRUE(LinearCrossEntropyForwardWithGrad(a, lse.data(), loss.data(), &sum, unit.data(), 2).ok());
  ASSERT_TRUE(LinearCrossEntropyForward(a, lse2.data(), loss2.data(), &sum2).ok());
  EXPECT_EQ(loss, loss2);
  EXPECT_EQ(sum, sum2);
  const float one = 1.0f, g = 0.37f;
  ASSERT_TRUE(LinearCrossEntropyBackward(a, lse2.data(), &one, unit_bwd.data(), 2).ok());
  EXPECT_EQ(unit, unit_bwd);
  EXPECT_NE(Bf16ToFloat(unit[0]), 0.0f);
  EXPECT_EQ(Bf16ToFloat(unit[2]), 0.0f);  // the ignored row
  ASSERT_TRUE(ScaleBf16Rows(unit.data(), 2, scaled.data(), 2, 2, 2, &g).ok());
  for (int i = 0; i < 4; ++i) EXPECT_EQ(scaled[i], FloatToBf16(Bf16ToFloat(unit[i]) * g)) << i;
  // In place, and strided rows (only the first `cols` of each row are written).
  std::vector<uint16_t> wide = {FloatToBf16(1.5f), FloatToBf16(-3.0f), 7, FloatToBf16(0.25f), FloatToBf16(8.0f), 9};
  ASSERT_TRUE(ScaleBf16Rows(wide.data(), 3, wide.data(), 3, 2, 2, &g).ok());
  EXPECT_EQ(wide[0], FloatToBf16(1.5f * g));
  EXPECT_EQ(wide[4], FloatToBf16(8.0f * g));
  EXPECT_EQ(wide[2], 7);
  EXPECT_EQ(wide[5], 9);
  Status s = ScaleBf16Rows(wide.data(), 3, wide.data(), 2, 2, 2, &g);
  EXPECT_EQ(s.code, StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message).find("same row stride"), std::string::npos);
  s = ScaleBf16Rows(wide.data(), 1, scaled.data(), 2, 2, 2, &g);
  EXPECT_NE(std::string(s.message).find("row strides"), std::string::npos);
}

}  // namespace
}  // namespace tune::kernels::ref
