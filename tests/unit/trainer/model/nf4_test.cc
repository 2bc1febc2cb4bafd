// NF4 quantisation: code table, packing, exact dequantisation of known
// blocks, round-trip error bounds, double quantisation.
#include "worker/trainer/model/nf4.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace tune::model::nf4 {
namespace {

TEST(Nf4, CodeTableIsBitsandbytesNf4) {
  // bitsandbytes functional.py get_4bit_type("nf4") / QLoRA appendix E.
  const float expected[16] = {-1.0f,
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
                              1.0f};
  const auto& t = CodeTable();
  for (int i = 0; i < 16; ++i) EXPECT_EQ(t[i], expected[i]) << "code " << i;
}

TEST(Nf4, DynamicMapMatchesBitsandbytesConstruction) {
  const auto& m = DynamicMap();
  for (int i = 1; i < 256; ++i) EXPECT_LT(m[i - 1], m[i]) << i;
  EXPECT_EQ(m[255], 1.0f);
  EXPECT_NE(std::find(m.begin(), m.end(), 0.0f), m.end());
  // Largest negative: -(1 - 0.9/128/2*...) = -mean of the last two points of
  // linspace(0.1, 1, 65) = -(0.9859375 + 1) / 2.
  EXPECT_NEAR(m[0], -(0.9859375 + 1.0) / 2, 1e-6);
  // Smallest positive magnitude: 1e-6 * (0.1 + 1) / 2.
  float smallest = 1;
  for (float v : m) {
    if (v > 0) smallest = std::min(smallest, v);
  }
  EXPECT_NEAR(smallest, 0.55e-6, 1e-12);
}

TEST(Nf4, ExactDequantOfKnownBlock) {
  // One block of 64 whose values are absmax * code[i % 16]: every value is
  // representable, so dequantisation must reproduce it exactly.
  const auto& t = CodeTable();
  const float absmax = 2.5f;
  std::vector<float> vals(64);
  for (int i = 0; i < 64; ++i) vals[i] = t[i % 16] * absmax;
  torch::Tensor w = torch::tensor(vals).view({4, 16});
  Nf4Tensor q = Quantize(w, 64, /*double_quant=*/false);
  ASSERT_EQ(q.packed.numel(), 32);
  ASSERT_EQ(q.absmax.numel(), 1);
  EXPECT_EQ(q.absmax[0].item<float>(), absmax);
  // Packing: first value in the high nibble.
  EXPECT_EQ(q.packed[0].item<uint8_t>(), 0x01);
  EXPECT_EQ(q.packed[1].item<uint8_t>(), 0x23);
  EXPECT_EQ(q.packed[7].item<uint8_t>(), 0xEF);
  torch::Tensor d = Dequantize(q);
  EXPECT_EQ(d.sizes(), w.sizes());
  EXPECT_TRUE(torch::equal(d, w));
}

TEST(Nf4, HandPackedBytesDequantise) {
  // Build the quantised form by hand and check the decoder.
  Nf4Tensor q;
  q.shape = {2, 4};
  q.numel = 8;
  q.block_size = 4;
  q.packed = torch::tensor({0x0F, 0x78, 0xE0, 0x77}, torch::kUInt8);
  q.absmax = torch::tensor({2.0f, 0.5f});
  torch::Tensor d = Dequantize(q);
  const auto& t = CodeTable();
  torch::Tensor want = torch::tensor({t[0] * 2.0f, t[15] * 2.0f, t[7] * 2.0f, t[8] * 2.0f, t[14] * 0.5f, t[0] * 0.5f,
                                      t[7] * 0.5f, t[7] * 0.5f})
                           .view({2, 4});
  EXPECT_TRUE(torch::equal(d, want)) << d << want;
}

TEST(Nf4, NearestCodeAndTiesGoLow) {
  const auto& t = CodeTable();
  // Values just either side of the midpoint between codes 14 and 15 (block
  // absmax fixed at 1 by a leading 1.0).
  const float mid = (t[14] + t[15]) / 2;
  torch::Tensor w = torch::tensor({1.0f, mid, std::nextafter(mid, 2.0f), -1.0f, 0.01f, -0.01f});
  Nf4Tensor q = Quantize(w, 6, false);
  torch::Tensor d = Dequantize(q);
  EXPECT_EQ(d[1].item<float>(), t[14]);  // tie -> lower code (bitsandbytes uses x > threshold)
  EXPECT_EQ(d[2].item<float>(), t[15]);
  EXPECT_EQ(d[3].item<float>(), -1.0f);
  EXPECT_EQ(d[4].item<float>(), 0.0f);
  EXPECT_EQ(d[5].item<float>(), 0.0f);
}

TEST(Nf4, RoundTripErrorBound) {
  torch::manual_seed(0);
  torch::Tensor w = torch::randn({37, 96}) * 0.05;  // 3552 values: 55.5 blocks -> partial last block
  Nf4Tensor q = Quantize(w, 64, false);
  EXPECT_EQ(q.num_blocks(), 56);
  torch::Tensor d = Dequantize(q);
  ASSERT_EQ(d.sizes(), w.sizes());
  // Per value: at most half the widest gap between neighbouring codes
  // (between 0.7229568 and 1.0) times the block's absmax.
  const auto& t = CodeTable();
  float max_half_gap = 0;
  for (int i = 1; i < 16; ++i) max_half_gap = std::max(max_half_gap, (t[i] - t[i - 1]) / 2);
  torch::Tensor flat = w.reshape({-1});
  torch::Tensor padded = torch::cat({flat, torch::zeros({56 * 64 - flat.numel()})}).view({56, 64});
  torch::Tensor bound = std::get<0>(padded.abs().max(1)).repeat_interleave(64).slice(0, 0, flat.numel()) * max_half_gap;
  torch::Tensor err = (d.reshape({-1}) - flat).abs();
  EXPECT_TRUE((err <= bound * (1 + 1e-6) + 1e-9).all().item<bool>());
  // And on average far below the worst case: NF4 on normal data has a
  // relative RMS error around 10%.
  const double rel_rms = (err.pow(2).mean().sqrt() / flat.pow(2).mean().sqrt()).item<double>();
  EXPECT_LT(rel_rms, 0.12);
  EXPECT_GT(rel_rms, 0.01);  // it is a 4-bit format: not lossless
  // The block maxima are exact.
  torch::Tensor idx = std::get<1>(padded.abs().max(1));
  for (int b = 0; b < 55; ++b) {
    const int64_t i = b * 64 + idx[b].item<int64_t>();
    EXPECT_FLOAT_EQ(d.reshape({-1})[i].item<float>(), flat[i].item<float>());
  }
}

TEST(Nf4, ZeroBlockAndBf16Input) {
  torch::Tensor w = torch::zeros({128}, torch::kBFloat16);
  w.slice(0, 64, 128).fill_(-0.5);
  Nf4Tensor q = Quantize(w, 64, false);
  torch::Tensor d = Dequantize(q, torch::kBFloat16);
  EXPECT_EQ(d.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(d, w));
}

TEST(Nf4, DoubleQuantAbsmax) {
  torch::manual_seed(1);
  // 300 blocks of 64 -> 2 double-quant blocks of 256 (second partial).
  torch::Tensor w = torch::randn({300, 64}) * (torch::rand({300, 1}) + 0.1);
  Nf4Tensor plain = Quantize(w, 64, false);
  Nf4Tensor dq = Quantize(w, 64, true);
  ASSERT_TRUE(dq.double_quant());
  EXPECT_EQ(dq.absmax_q.numel(), 300);
  EXPECT_EQ(dq.absmax_q.scalar_type(), torch::kUInt8);
  EXPECT_EQ(dq.absmax_scale.numel(), 2);
  EXPECT_EQ(dq.absmax_offset.numel(), 1);
  EXPECT_TRUE(torch::equal(plain.packed, dq.packed));  // codes do not depend on absmax storage
  EXPECT_NEAR(dq.absmax_offset.item<float>(), plain.absmax.mean().item<float>(), 1e-6);
  // Dequantised absmax: code[q] * scale + offset; error at most half the
  // largest gap of the dynamic map times the block scale.
  torch::Tensor a = Absmax(dq);
  const auto& m = DynamicMap();
  float max_half_gap = 0;
  for (int i = 1; i < 256; ++i) max_half_gap = std::max(max_half_gap, (m[i] - m[i - 1]) / 2);
  torch::Tensor centered = plain.absmax - dq.absmax_offset;
  for (int b = 0; b < 2; ++b) {
    torch::Tensor part = centered.slice(0, b * 256, std::min<int64_t>(300, (b + 1) * 256));
    const float scale = dq.absmax_scale[b].item<float>();
    EXPECT_FLOAT_EQ(scale, part.abs().max().item<float>());
    torch::Tensor err = (a.slice(0, b * 256, b * 256 + part.numel()) - plain.absmax.slice(0, b * 256, b * 256 + part.numel())).abs();
    EXPECT_LE(err.max().item<float>(), scale * max_half_gap * 1.0001 + 1e-7);
  }
  // Hand check of one entry.
  const int64_t k = 5;
  const float want = m[dq.absmax_q[k].item<uint8_t>()] * dq.absmax_scale[0].item<float>() + dq.absmax_offset.item<float>();
  EXPECT_FLOAT_EQ(a[k].item<float>(), want);
  // Full dequantisation stays close to single quantisation.
  torch::Tensor d1 = Dequantize(plain), d2 = Dequantize(dq);
  EXPECT_LT((d1 - d2).abs().max().item<float>(), 0.02 * w.abs().max().item<float>());
  EXPECT_LT(dq.StorageBytes(), plain.StorageBytes());
}

TEST(Nf4, RejectsBadBlockSize) {
  EXPECT_THROW(Quantize(torch::randn({8}), 3, false), std::invalid_argument);
  EXPECT_THROW(Quantize(torch::randn({8}), 0, false), std::invalid_argument);
  EXPECT_THROW(Quantize(torch::ones({8}, torch::kInt64), 64, false), std::invalid_argument);
}

}  // namespace
}  // namespace tune::model::nf4
