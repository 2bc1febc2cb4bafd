// Every CUDA kernel against its CPU reference on odd sizes, strided and
// unaligned inputs, with a tolerance stated per kernel; then one Llama-3-8B
// shaped case per kernel, timed, with the achieved bandwidth or FLOP/s printed
// against the H200's ceilings (4.3 TB/s, 790 TFLOP/s bf16 dense). Exits 77
// (skipped) without a CUDA device.
#include <cuda_runtime.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/reference/reference.h"
#include "tests/unit/kernels/random_bf16.h"
#include "tune/kernels/gemm.h"
#include "tune/kernels/linear_cross_entropy.h"
#include "tune/kernels/nf4.h"
#include "tune/kernels/rmsnorm.h"
#include "tune/kernels/rope.h"
#include "tune/kernels/swiglu.h"

namespace tune::kernels {
namespace {

using ref::Bf16ToFloat;
using ref::FloatToBf16;
using test_data::RandomBf16;

constexpr double kPeakBytesPerS = 4.3e12;
constexpr double kPeakFlops = 790e12;

#define ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(expr)
#define ASSERT_KOK(expr)                                                  \
  do {                                                                    \
    const Status s_ = (expr);                                             \
    ASSERT_TRUE(s_.ok()) << StatusCodeName(s_.code) << ": " << s_.message; \
  } while (0)

// A device buffer of T (freed on scope exit).
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)) != cudaSuccess) p_ = nullptr;
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { Upload(host); }
  ~DeviceBuffer() { cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return p_; }
  void Upload(const std::vector<T>& host) { cudaMemcpy(p_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice); }
  std::vector<T> Download() const {
    std::vector<T> out(n_);
    cudaMemcpy(out.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
    return out;
  }

 private:
  T* p_ = nullptr;
  size_t n_;
};

// One bf16 ulp at |v| (the spacing of bf16 values around v).
double Ulp(double v) {
  const double a = std::max(std::abs(v), 1e-30);
  return std::ldexp(1.0, static_cast<int>(std::floor(std::log2(a))) - 7);
}

// Compares bf16 buffers element-wise at the given positions: |got - want| <=
// ulps * ulp(want) + abs_tol. Reports the first mismatches.
void ExpectBf16Near(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want,
                    const std::vector<int64_t>& positions, double ulps, double abs_tol, const std::string& what) {
  int bad = 0;
  for (int64_t i : positions) {
    const double g = Bf16ToFloat(got[i]), w = Bf16ToFloat(want[i]);
    if (std::isnan(w) && std::isnan(g)) continue;
    if (!(std::abs(g - w) <= ulps * Ulp(w) + abs_tol)) {
      if (++bad <= 5) ADD_FAILURE() << what << " at " << i << ": got " << g << " want " << w;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << positions.size() << " out of tolerance";
}

std::vector<int64_t> RowPositions(int64_t rows, int64_t cols, int64_t stride, int64_t offset = 0) {
  std::vector<int64_t> out;
  out.reserve(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out.push_back(offset + r * stride + c);
  }
  return out;
}

// Mean milliseconds of fn over `iters` runs after 3 warm-up runs.
double TimeMs(const std::function<void()>& fn, int iters = 10) {
  for (int i = 0; i < 3; ++i) fn();
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a);
  for (int i = 0; i < iters; ++i) fn();
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / iters;
}

void ReportBandwidth(const char* what, double bytes, double ms) {
  const double bps = bytes / (ms * 1e-3);
  std::printf("[perf] %-48s %8.3f ms  %7.1f GB/s  (%.0f%% of 4.3 TB/s)\n", what, ms, bps / 1e9,
              100.0 * bps / kPeakBytesPerS);
  std::fflush(stdout);
}

void ReportFlops(const char* what, double flops, double ms) {
  const double fps = flops / (ms * 1e-3);
  std::printf("[perf] %-48s %8.3f ms  %7.1f TFLOP/s  (%.0f%% of 790 TFLOP/s)\n", what, ms, fps / 1e12,
              100.0 * fps / kPeakFlops);
  std::fflush(stdout);
}

// ----------------------------------------------------------------------- NF4

struct Nf4Case {
  int64_t numel, block_size;
  bool double_quant;
  int64_t out_offset;  // elements; 1 makes the output unaligned
  int64_t row_len = 0, out_stride = 0;  // set: rows of row_len at out_stride (Nf4DequantizeBf16Rows)
};

void RunNf4(const Nf4Case& c) {
  SCOPED_TRACE("numel " + std::to_string(c.numel) + " block " + std::to_string(c.block_size) + " dq " +
               std::to_string(c.double_quant) + " offset " + std::to_string(c.out_offset));
  const int64_t nb = (c.numel + c.block_size - 1) / c.block_size;
  std::mt19937 gen(static_cast<uint32_t>(c.numel * 7 + c.block_size));
  std::vector<uint8_t> packed(nb * c.block_size / 2);
  for (auto& b : packed) b = static_cast<uint8_t>(gen() & 0xff);
  std::uniform_real_distribution<float> pos(0.001f, 0.2f);
  std::vector<float> absmax(nb), scale((nb + 255) / 256), offset = {0.05f};
  std::vector<uint8_t> aq(nb);
  for (auto& v : absmax) v = pos(gen);
  for (auto& v : scale) v = pos(gen);
  for (auto& v : aq) v = static_cast<uint8_t>(gen() & 0xff);
  const auto map_arr = ref::Nf4DynamicMap();
  const std::vector<float> map(map_arr.begin(), map_arr.end());

  DeviceBuffer<uint8_t> d_packed(packed), d_aq(aq);
  DeviceBuffer<float> d_absmax(absmax), d_scale(scale), d_offset(offset), d_map(map);
  const bool rows = c.row_len > 0;
  const int64_t span = rows ? c.numel / c.row_len * c.out_stride : c.numel;  // elements the output covers
  constexpr uint16_t kSentinel = 0xabcd;  // never a dequantised value here (a negative bf16 below -1e-12)
  DeviceBuffer<uint16_t> d_out(std::vector<uint16_t>(span + c.out_offset, kSentinel));
  Nf4View q, hq;
  q.numel = hq.numel = c.numel;
  q.block_size = hq.block_size = c.block_size;
  q.packed = d_packed.get();
  hq.packed = packed.data();
  if (c.double_quant) {
    q.absmax_q = d_aq.get(), q.absmax_scale = d_scale.get(), q.absmax_offset = d_offset.get(),
    q.dynamic_map = d_map.get();
    hq.absmax_q = aq.data(), hq.absmax_scale = scale.data(), hq.absmax_offset = offset.data(),
    hq.dynamic_map = map.data();
  } else {
    q.absmax = d_absmax.get();
    hq.absmax = absmax.data();
  }
  if (rows) {
    ASSERT_KOK(Nf4DequantizeBf16Rows(q, c.row_len, d_out.get() + c.out_offset, c.out_stride, nullptr));
  } else {
    ASSERT_KOK(Nf4DequantizeBf16(q, d_out.get() + c.out_offset, nullptr));
  }
  ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<uint16_t> want(c.numel);
  ASSERT_KOK(ref::Nf4DequantizeBf16(hq, want.data()));
  if (rows) {  // the reference's own rows variant places the same values
    std::vector<uint16_t> want_rows(span, kSentinel);
    ASSERT_KOK(ref::Nf4DequantizeBf16Rows(hq, c.row_len, want_rows.data(), c.out_stride));
    for (int64_t i = 0; i < c.numel; ++i) ASSERT_EQ(want_rows[i / c.row_len * c.out_stride + i % c.row_len], want[i]);
  }
  const std::vector<uint16_t> got_all = d_out.Download();
  auto at = [&](int64_t i) { return rows ? i / c.row_len * c.out_stride + i % c.row_len : i; };
  // Bit-identical (tolerance 0): the same fp32 roundings, then round-to-nearest-even.
  int bad = 0;
  for (int64_t i = 0; i < c.numel; ++i) {
    const uint16_t got = got_all[c.out_offset + at(i)];
    if (got != want[i] && ++bad <= 5) {
      ADD_FAILURE() << "element " << i << ": got 0x" << std::hex << got << " want 0x" << want[i];
    }
  }
  EXPECT_EQ(bad, 0);
  // Nothing outside the rows is written (the LoRA columns of a folded weight).
  for (int64_t i = 0; i < c.out_offset; ++i) EXPECT_EQ(got_all[i], kSentinel);
  for (int64_t e = 0; rows && e < span; ++e) {
    if (e % c.out_stride >= c.row_len) {
      ASSERT_EQ(got_all[c.out_offset + e], kSentinel) << e;
    }
  }
}

TEST(KernelsGpuTest, Nf4DequantIsBitIdenticalToReference) {
  for (bool dq : {true, false}) {
    RunNf4({1, 64, dq, 0});
    RunNf4({1000, 64, dq, 0});     // partial last block
    RunNf4({4097 * 3, 64, dq, 1});  // unaligned output: per-element path
    RunNf4({64 * 300 + 32, 64, dq, 0});
    RunNf4({999, 2, dq, 0});       // tiny blocks: many double-quant blocks
    RunNf4({5000, 48, dq, 0});     // block % 16 == 0 but not a power of two
    RunNf4({5003, 30, dq, 0});     // block % 16 != 0
    // Rows spaced wider than their length: 16-byte path (row_len % 16 == 0,
    // stride % 8 == 0), then per-element paths (odd row, odd stride, unaligned).
    RunNf4({96 * 7, 64, dq, 0, 96, 96 + 32});
    RunNf4({4096 * 3, 64, dq, 0, 4096, 4096 + 48});
    RunNf4({40 * 9, 64, dq, 0, 40, 45});
    RunNf4({64 * 5, 64, dq, 0, 64, 67});
    RunNf4({64 * 5, 64, dq, 1, 64, 80});
  }
}

TEST(KernelsGpuTest, Nf4DequantPerf) {
  const int64_t rows = 4096, cols = 14336, numel = rows * cols, nb = numel / 64;
  DeviceBuffer<uint8_t> packed(numel / 2), aq(nb);
  DeviceBuffer<float> scale((nb + 255) / 256), offset(1), map(256);
  DeviceBuffer<uint16_t> out(numel);
  cudaMemset(packed.get(), 0x5a, numel / 2);
  cudaMemset(aq.get(), 0x80, nb);
  cudaMemset(scale.get(), 0, (nb + 255) / 256 * 4);
  cudaMemset(offset.get(), 0, 4);
  cudaMemset(map.get(), 0, 256 * 4);
  Nf4View q;
  q.packed = packed.get(), q.numel = numel, q.block_size = 64, q.absmax_q = aq.get(), q.absmax_scale = scale.get(),
  q.absmax_offset = offset.get(), q.dynamic_map = map.get();
  ASSERT_KOK(Nf4DequantizeBf16(q, out.get(), nullptr));
  const double ms = TimeMs([&] { Nf4DequantizeBf16(q, out.get(), nullptr); });
  ASSERT_CUDA(cudaGetLastError());
  ReportBandwidth("nf4 dequant 4096x14336 (double quant) -> bf16", numel / 2.0 + numel * 2.0 + nb, ms);
  // The folded gate/up weight's layout: rows of 4096 in a [rows, 4096 + 32] buffer.
  const int64_t in = 4096;
  DeviceBuffer<uint16_t> wide(numel / in * (in + 32));
  const double wide_ms = TimeMs([&] { Nf4DequantizeBf16Rows(q, in, wide.get(), in + 32, nullptr); });
  ASSERT_CUDA(cudaGetLastError());
  ReportBandwidth("nf4 dequant 14336x4096 into rows of 4128 (folded LoRA layout)", numel / 2.0 + numel * 2.0 + nb,
                  wide_ms);
}

// ------------------------------------------------------------------- RMSNorm

void RunRmsNorm(int64_t rows, int64_t hidden, int64_t stride, bool with_dweight) {
  SCOPED_TRACE("rows " + std::to_string(rows) + " hidden " + std::to_string(hidden) + " stride " +
               std::to_string(stride));
  const RmsNormShape shape{rows, hidden, 1e-5f};
  const auto x = RandomBf16(rows * stride, 11, 3.0f), w = RandomBf16(hidden, 12), dy = RandomBf16(rows * stride, 13);
  DeviceBuffer<uint16_t> d_x(x), d_w(w), d_dy(dy), d_y(rows * stride), d_dx(rows * stride);
  DeviceBuffer<float> d_rstd(rows), d_dw(hidden);
  cudaMemset(d_dw.get(), 0, hidden * sizeof(float));
  ASSERT_KOK(RmsNormForward(shape, d_x.get(), stride, d_w.get(), d_y.get(), stride, d_rstd.get(), nullptr));
  ASSERT_KOK(RmsNormBackward(shape, d_x.get(), stride, d_w.get(), d_rstd.get(), d_dy.get(), stride, d_dx.get(),
                             stride, with_dweight ? d_dw.get() : nullptr, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<uint16_t> y(rows * stride), dx(rows * stride);
  std::vector<float> rstd(rows), dw(hidden, 0.0f);
  ASSERT_KOK(ref::RmsNormForward(shape, x.data(), stride, w.data(), y.data(), stride, rstd.data()));
  ASSERT_KOK(ref::RmsNormBackward(shape, x.data(), stride, w.data(), rstd.data(), dy.data(), stride, dx.data(),
                                  stride, dw.data()));
  const auto pos = RowPositions(rows, hidden, stride);
  const auto got_rstd = d_rstd.Download();
  for (int64_t r = 0; r < rows; ++r) EXPECT_NEAR(got_rstd[r], rstd[r], rstd[r] * 1e-5) << r;
  // y: fp32 sums in another order move rstd by ~1e-7; at most one bf16 rounding flips (1 ulp per rounding, 2 roundings).
  ExpectBf16Near(d_y.Download(), y, pos, 2.0, 0.0, "rmsnorm y");
  // dx: fp32 vs double accumulation of sum(gn * x); 1 ulp plus 1e-3 of the row's scale.
  ExpectBf16Near(d_dx.Download(), dx, pos, 1.0, 2e-3, "rmsnorm dx");
  if (with_dweight) {
    const auto got = d_dw.Download();
    for (int64_t j = 0; j < hidden; ++j) EXPECT_NEAR(got[j], dw[j], 1e-4 * rows + 1e-3 * std::abs(dw[j])) << j;
  }
}

TEST(KernelsGpuTest, RmsNormMatchesReference) {
  for (int64_t rows : {1, 3, 127}) {
    for (int64_t hidden : {4095, 4097, 1000, 4096}) RunRmsNorm(rows, hidden, hidden, rows == 3);
  }
  RunRmsNorm(5, 1000, 1003, true);  // strided rows (scalar path)
  RunRmsNorm(5, 1024, 1032, false);  // strided, 16-byte aligned rows (vector path)
  // Backward's register-held vector path at 1, 2 and 4 pieces per thread,
  // with rows that do not fill the last piece round, and the scalar path
  // past its 8192-element limit.
  RunRmsNorm(4, 2056, 2056, true);
  RunRmsNorm(3, 8192, 8200, true);
  RunRmsNorm(7, 6152, 6152, false);
  RunRmsNorm(2, 8200, 8200, true);
}

TEST(KernelsGpuTest, RmsNormPerf) {
  const int64_t rows = 16384, hidden = 4096;
  DeviceBuffer<uint16_t> x(RandomBf16(rows * hidden, 1)), w(RandomBf16(hidden, 2)), y(rows * hidden),
      dx(rows * hidden);
  DeviceBuffer<float> rstd(rows);
  const RmsNormShape shape{rows, hidden, 1e-5f};
  ASSERT_KOK(RmsNormForward(shape, x.get(), hidden, w.get(), y.get(), hidden, rstd.get(), nullptr));
  const double fwd = TimeMs([&] { RmsNormForward(shape, x.get(), hidden, w.get(), y.get(), hidden, rstd.get(), nullptr); });
  ReportBandwidth("rmsnorm fwd 16384x4096", 2.0 * rows * hidden * 2, fwd);
  const double bwd = TimeMs([&] {
    RmsNormBackward(shape, x.get(), hidden, w.get(), rstd.get(), y.get(), hidden, dx.get(), hidden, nullptr, nullptr);
  });
  ReportBandwidth("rmsnorm bwd 16384x4096 (no dweight)", 3.0 * rows * hidden * 2, bwd);
  ASSERT_CUDA(cudaGetLastError());
}

// ---------------------------------------------------------------------- RoPE

void RunRope(int64_t B, int64_t T, int64_t H, int64_t D, bool transposed, bool use_pos, bool in_place) {
  SCOPED_TRACE("B" + std::to_string(B) + " T" + std::to_string(T) + " H" + std::to_string(H) + " D" +
               std::to_string(D) + (transposed ? " [B,H,T,D] storage" : "") + (use_pos ? " position ids" : "") +
               (in_place ? " in place" : ""));
  const int64_t n = B * T * H * D;
  // transposed: the trainer's q/k, stored [B,H,T,D] and addressed as [B,T,H,D].
  RopeTensor layout = transposed ? RopeTensor{nullptr, H * T * D, D, T * D} : RopeTensor{nullptr, T * H * D, H * D, D};
  const int64_t P = T + 3;
  std::vector<uint16_t> c(B * P * D), s(B * P * D);
  std::mt19937 gen(static_cast<uint32_t>(n));
  std::uniform_real_distribution<float> ang(-3.2f, 3.2f);
  for (size_t i = 0; i < c.size(); ++i) {
    const float a = ang(gen);
    c[i] = FloatToBf16(std::cos(a));
    s[i] = FloatToBf16(std::sin(a));
  }
  std::vector<int64_t> pos(B * T);
  for (auto& p : pos) p = static_cast<int64_t>(gen() % P);
  const auto x = RandomBf16(n, 21), g = RandomBf16(n, 22);
  DeviceBuffer<uint16_t> d_x(x), d_g(g), d_out(n), d_dx(n), d_c(c), d_s(s);
  DeviceBuffer<int64_t> d_pos(pos);
  RopeTables ht{c.data(), s.data(), P * D, D, nullptr, 0}, dt{d_c.get(), d_s.get(), P * D, D, nullptr, 0};
  if (use_pos) {
    ht = {c.data(), s.data(), 0, D, pos.data(), P};
    dt = {d_c.get(), d_s.get(), 0, D, d_pos.get(), P};
  }
  const RopeShape shape{B, T, H, D};
  auto with = [&](uint16_t* p) { RopeTensor t = layout; t.data = p; return t; };
  RopeTensor dx_in = with(d_x.get()), dx_out = with(in_place ? d_x.get() : d_out.get());
  RopeTensor dg_in = with(d_g.get()), dg_out = with(in_place ? d_g.get() : d_dx.get());
  ASSERT_KOK(RopeForward(shape, dx_in, dx_out, dt, nullptr));
  ASSERT_KOK(RopeBackward(shape, dg_in, dg_out, dt, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<uint16_t> hx = x, hg = g, out(n), dx(n);
  ASSERT_KOK(ref::RopeForward(shape, with(hx.data()), with(out.data()), ht));
  ASSERT_KOK(ref::RopeBackward(shape, with(hg.data()), with(dx.data()), ht));
  std::vector<int64_t> all(n);
  for (int64_t i = 0; i < n; ++i) all[i] = i;
  // Bit-identical: the same bf16-rounded products and sums as torch's ApplyRope.
  ExpectBf16Near((in_place ? d_x : d_out).Download(), out, all, 0.0, 0.0, "rope forward");
  ExpectBf16Near((in_place ? d_g : d_dx).Download(), dx, all, 0.0, 0.0, "rope backward");
}

TEST(KernelsGpuTest, RopeMatchesReferenceBitForBit) {
  RunRope(2, 5, 3, 128, /*transposed=*/true, /*use_pos=*/false, /*in_place=*/false);
  RunRope(2, 5, 3, 128, true, false, true);
  RunRope(1, 7, 5, 128, false, true, true);
  RunRope(3, 1, 1, 6, false, false, false);  // head dim 6: scalar path
  RunRope(2, 127, 3, 64, true, true, false);
  RunRope(1, 3, 2, 24, true, false, true);  // half 12: not a multiple of 8
}

TEST(KernelsGpuTest, RopePerf) {
  const int64_t B = 8, T = 2048, H = 32, D = 128, n = B * T * H * D;
  DeviceBuffer<uint16_t> x(RandomBf16(n, 1)), c(RandomBf16(T * D, 2)), s(RandomBf16(T * D, 3));
  const RopeShape shape{B, T, H, D};
  const RopeTensor t{x.get(), T * H * D, H * D, D};
  const RopeTables tables{c.get(), s.get(), 0, D, nullptr, 0};
  ASSERT_KOK(RopeForward(shape, t, t, tables, nullptr));
  const double ms = TimeMs([&] { RopeForward(shape, t, t, tables, nullptr); });
  ReportBandwidth("rope fwd in place 8x2048x32x128", 2.0 * n * 2, ms);
  const double bms = TimeMs([&] { RopeBackward(shape, t, t, tables, nullptr); });
  ReportBandwidth("rope bwd in place 8x2048x32x128", 2.0 * n * 2, bms);
  ASSERT_CUDA(cudaGetLastError());
}

// -------------------------------------------------------------------- SwiGLU

void RunSwiGlu(int64_t rows, int64_t cols, int64_t pad) {
  SCOPED_TRACE("rows " + std::to_string(rows) + " cols " + std::to_string(cols) + " pad " + std::to_string(pad));
  // gate and up are the two halves of one fused [rows, 2*cols + pad] output.
  const int64_t fs = 2 * cols + pad;
  const auto fused = RandomBf16(rows * fs, 31, 2.0f), dh = RandomBf16(rows * cols, 32);
  DeviceBuffer<uint16_t> d_fused(fused), d_dh(dh), d_h(rows * cols), d_dfused(rows * fs);
  const SwiGluShape shape{rows, cols};
  ASSERT_KOK(SwiGluForward(shape, d_fused.get(), fs, d_fused.get() + cols, fs, d_h.get(), cols, nullptr));
  ASSERT_KOK(SwiGluBackward(shape, d_fused.get(), fs, d_fused.get() + cols, fs, d_dh.get(), cols, d_dfused.get(), fs,
                            d_dfused.get() + cols, fs, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<uint16_t> h(rows * cols), dfused(rows * fs);
  ASSERT_KOK(ref::SwiGluForward(shape, fused.data(), fs, fused.data() + cols, fs, h.data(), cols));
  ASSERT_KOK(ref::SwiGluBackward(shape, fused.data(), fs, fused.data() + cols, fs, dh.data(), cols, dfused.data(), fs,
                                 dfused.data() + cols, fs));
  // expf (device) vs std::exp (host) may differ by an fp32 ulp, which can flip
  // the bf16 rounding of silu and then of the product: 2 bf16 ulps.
  ExpectBf16Near(d_h.Download(), h, RowPositions(rows, cols, cols), 2.0, 1e-6, "swiglu h");
  const auto got = d_dfused.Download();
  ExpectBf16Near(got, dfused, RowPositions(rows, cols, fs), 2.0, 1e-6, "swiglu dgate");
  ExpectBf16Near(got, dfused, RowPositions(rows, cols, fs, cols), 2.0, 1e-6, "swiglu dup");
  // The backward that also writes h: the same bits as the two kernels apart,
  // in place over gate/up as the trainer runs it.
  DeviceBuffer<uint16_t> d_fused2(fused), d_h2(rows * cols);
  ASSERT_KOK(SwiGluBackwardWithForward(shape, d_fused2.get(), fs, d_fused2.get() + cols, fs, d_dh.get(), cols,
                                       d_fused2.get(), fs, d_fused2.get() + cols, fs, d_h2.get(), cols, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(d_h2.Download(), d_h.Download());
  const auto got2 = d_fused2.Download();
  for (int64_t p : RowPositions(rows, 2 * cols, fs)) ASSERT_EQ(got2[p], got[p]) << p;
  EXPECT_EQ(SwiGluBackwardWithForward(shape, d_fused2.get(), fs, d_fused2.get() + cols, fs, d_dh.get(), cols,
                                      d_dfused.get(), fs, d_dfused.get() + cols, fs, d_fused2.get(), fs, nullptr)
                .code,
            StatusCode::kInvalidArgument);
}

TEST(KernelsGpuTest, SwiGluMatchesReference) {
  for (int64_t rows : {1, 3, 127}) {
    for (int64_t cols : {1000, 4097, 1024}) RunSwiGlu(rows, cols, 0);
  }
  RunSwiGlu(5, 1024, 8);  // padded fused rows, still aligned
  RunSwiGlu(5, 1024, 3);  // padded, unaligned
}

TEST(KernelsGpuTest, SwiGluPerf) {
  const int64_t rows = 16384, cols = 14336;
  DeviceBuffer<uint16_t> fused(RandomBf16(rows * 2 * cols, 1)), h(rows * cols);
  const SwiGluShape shape{rows, cols};
  auto fwd = [&] { SwiGluForward(shape, fused.get(), 2 * cols, fused.get() + cols, 2 * cols, h.get(), cols, nullptr); };
  ASSERT_KOK(SwiGluForward(shape, fused.get(), 2 * cols, fused.get() + cols, 2 * cols, h.get(), cols, nullptr));
  ReportBandwidth("swiglu fwd 16384x14336 (fused gate/up input)", 3.0 * rows * cols * 2, TimeMs(fwd));
  // Backward in place: dgate/dup overwrite gate/up.
  auto bwd = [&] {
    SwiGluBackward(shape, fused.get(), 2 * cols, fused.get() + cols, 2 * cols, h.get(), cols, fused.get(), 2 * cols,
                   fused.get() + cols, 2 * cols, nullptr);
  };
  ReportBandwidth("swiglu bwd 16384x14336 (in place)", 5.0 * rows * cols * 2, TimeMs(bwd));
  DeviceBuffer<uint16_t> h_out(rows * cols);
  auto bwd_with_h = [&] {
    SwiGluBackwardWithForward(shape, fused.get(), 2 * cols, fused.get() + cols, 2 * cols, h.get(), cols, fused.get(),
                              2 * cols, fused.get() + cols, 2 * cols, h_out.get(), cols, nullptr);
  };
  ReportBandwidth("swiglu bwd + h 16384x14336 (in place)", 6.0 * rows * cols * 2, TimeMs(bwd_with_h));
  ASSERT_CUDA(cudaGetLastError());
}

// ------------------------------------------------------ linear + cross-entropy

void RunLinearCe(int64_t rows, int64_t hidden, int64_t vocab, int64_t chunk) {
  SCOPED_TRACE("rows " + std::to_string(rows) + " hidden " + std::to_string(hidden) + " vocab " +
               std::to_string(vocab) + " chunk " + std::to_string(chunk));
  const auto h = RandomBf16(rows * hidden, 41);
  const auto w = RandomBf16(vocab * hidden, 42, 1.0f / std::sqrt(static_cast<float>(hidden)));
  std::vector<int64_t> labels(rows);
  std::mt19937 gen(43);
  for (int64_t r = 0; r < rows; ++r) labels[r] = (r % 5 == 4) ? kIgnoreIndex : static_cast<int64_t>(gen() % vocab);
  const std::vector<float> scale = {0.37f};
  DeviceBuffer<uint16_t> d_h(h), d_w(w), d_logits(chunk * vocab), d_dh(rows * hidden);
  DeviceBuffer<int64_t> d_labels(labels);
  DeviceBuffer<float> d_lse(rows), d_loss(rows), d_sum(1), d_scale(scale);
  LinearCrossEntropyArgs a;
  a.hidden = d_h.get(), a.hidden_stride = hidden, a.weight = d_w.get(), a.weight_stride = hidden;
  a.labels = d_labels.get(), a.rows = rows, a.hidden_dim = hidden, a.vocab = vocab;
  a.logits_chunk = d_logits.get(), a.chunk_rows = chunk;
  ASSERT_KOK(LinearCrossEntropyForward(a, d_lse.get(), d_loss.get(), d_sum.get(), nullptr));
  ASSERT_KOK(LinearCrossEntropyBackward(a, d_lse.get(), d_scale.get(), d_dh.get(), hidden, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  LinearCrossEntropyArgs ha = a;
  ha.hidden = h.data(), ha.weight = w.data(), ha.labels = labels.data(), ha.logits_chunk = nullptr;
  std::vector<float> lse(rows), loss(rows);
  float sum = 0;
  std::vector<uint16_t> dh(rows * hidden);
  ASSERT_KOK(ref::LinearCrossEntropyForward(ha, lse.data(), loss.data(), &sum));
  ASSERT_KOK(ref::LinearCrossEntropyBackward(ha, lse.data(), scale.data(), dh.data(), hidden));
  // cuBLAS's fp32 accumulation order vs the reference's double sums can flip a
  // logit's bf16 rounding (1 ulp, ~4e-3 relative): the lse moves by far less,
  // the target logit by at most that ulp.
  const auto got_lse = d_lse.Download(), got_loss = d_loss.Download();
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_NEAR(got_lse[r], lse[r], 2e-3 * std::max(1.0f, std::abs(lse[r]))) << r;
    EXPECT_NEAR(got_loss[r], loss[r], 2e-2 + 4e-3 * std::abs(loss[r])) << r;
    if (labels[r] == kIgnoreIndex) {
      EXPECT_EQ(got_loss[r], 0.0f);
    }
  }
  EXPECT_NEAR(d_sum.Download()[0], sum, 2e-2 * std::sqrt(static_cast<double>(rows)) + 1e-3 * std::abs(sum));
  // dhidden: a sum over the vocab of bf16 dlogits times weights; tolerance 1
  // ulp plus 2% of the largest gradient magnitude.
  double max_ref = 0;
  for (uint16_t v : dh) max_ref = std::max(max_ref, std::abs(static_cast<double>(Bf16ToFloat(v))));
  const auto got_dh = d_dh.Download();
  ExpectBf16Near(got_dh, dh, RowPositions(rows, hidden, hidden), 1.0, 2e-2 * max_ref, "linear ce dhidden");
  for (int64_t r = 0; r < rows; ++r) {
    if (labels[r] != kIgnoreIndex) continue;
    for (int64_t k = 0; k < hidden; ++k) ASSERT_EQ(Bf16ToFloat(got_dh[r * hidden + k]), 0.0f) << r;
  }
  // The training path: the forward writes the unit-scale gradient (the same
  // bits as backward with grad_scale 1), which is scaled afterwards; the loss
  // is the plain forward's, bit for bit.
  const std::vector<float> one = {1.0f};
  DeviceBuffer<float> d_one(one), d_lse2(rows), d_loss2(rows), d_sum2(1);
  DeviceBuffer<uint16_t> d_unit(rows * hidden), d_unit_bwd(rows * hidden), d_scaled(rows * hidden);
  ASSERT_KOK(LinearCrossEntropyForwardWithGrad(a, d_lse2.get(), d_loss2.get(), d_sum2.get(), d_unit.get(), hidden,
                                               nullptr));
  ASSERT_KOK(LinearCrossEntropyBackward(a, d_lse.get(), d_one.get(), d_unit_bwd.get(), hidden, nullptr));
  ASSERT_KOK(ScaleBf16Rows(d_unit.get(), hidden, d_scaled.get(), hidden, rows, hidden, d_scale.get(), nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(d_loss2.Download(), got_loss);
  EXPECT_EQ(d_lse2.Download(), got_lse);
  EXPECT_EQ(d_sum2.Download(), d_sum.Download());
  const auto unit = d_unit.Download();
  EXPECT_EQ(unit, d_unit_bwd.Download());
  std::vector<uint16_t> scaled(rows * hidden);
  ASSERT_KOK(ref::ScaleBf16Rows(unit.data(), hidden, scaled.data(), hidden, rows, hidden, scale.data()));
  EXPECT_EQ(d_scaled.Download(), scaled);
  // Two roundings instead of one: within 1 ulp plus the dlogits' own
  // rounding (2% of the largest gradient) of the one-pass backward.
  ExpectBf16Near(scaled, dh, RowPositions(rows, hidden, hidden), 1.0, 2e-2 * max_ref, "linear ce scaled dhidden");
}

TEST(KernelsGpuTest, ScaleBf16RowsMatchesReference) {
  // Odd widths (scalar path), strided rows, in place, and the 8-wide path.
  for (const auto& [rows, cols, src_stride, dst_stride] :
       std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{{7, 13, 13, 13}, {5, 13, 21, 17}, {33, 4096, 4104, 4096},
                                                                   {3, 8, 8, 8}}) {
    SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(cols));
    const auto src = RandomBf16(rows * src_stride, 7);
    const std::vector<float> scale = {-0.0131f};
    DeviceBuffer<uint16_t> d_src(src), d_dst(rows * dst_stride);
    DeviceBuffer<float> d_scale(scale);
    ASSERT_KOK(ScaleBf16Rows(d_src.get(), src_stride, d_dst.get(), dst_stride, rows, cols, d_scale.get(), nullptr));
    std::vector<uint16_t> want(rows * dst_stride);
    ASSERT_KOK(ref::ScaleBf16Rows(src.data(), src_stride, want.data(), dst_stride, rows, cols, scale.data()));
    const auto got = d_dst.Download();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(got[r * dst_stride + c], want[r * dst_stride + c]) << r << "," << c;
    }
    if (src_stride == dst_stride) {  // in place gives the same
      ASSERT_KOK(ScaleBf16Rows(d_src.get(), src_stride, d_src.get(), src_stride, rows, cols, d_scale.get(), nullptr));
      const auto in_place = d_src.Download();
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(in_place[r * src_stride + c], want[r * dst_stride + c]);
      }
    }
  }
  EXPECT_EQ(ScaleBf16Rows(nullptr, 4, nullptr, 4, 1, 4, nullptr, nullptr).code, StatusCode::kInvalidArgument);
}

TEST(KernelsGpuTest, LinearCrossEntropyMatchesReference) {
  RunLinearCe(127, 1000, 1003, 50);  // odd sizes, chunk not dividing rows, ignored rows
  RunLinearCe(1, 64, 1003, 8);
  RunLinearCe(9, 4096, 128256, 4);   // the Llama-3 vocabulary
  RunLinearCe(3, 4095, 128256, 3);
}

TEST(KernelsGpuTest, LinearCrossEntropyPerf) {
  const int64_t rows = 16384, hidden = 4096, vocab = 128256, chunk = 4096;
  DeviceBuffer<uint16_t> h(RandomBf16(rows * hidden, 1)), w(RandomBf16(vocab * hidden, 2, 0.015f)),
      logits(chunk * vocab), dh(rows * hidden);
  std::vector<int64_t> labels(rows);
  for (int64_t r = 0; r < rows; ++r) labels[r] = (r * 7919) % vocab;
  DeviceBuffer<int64_t> d_labels(labels);
  DeviceBuffer<float> lse(rows), loss(rows), sum(1), scale(std::vector<float>{1.0f / rows});
  LinearCrossEntropyArgs a;
  a.hidden = h.get(), a.hidden_stride = hidden, a.weight = w.get(), a.weight_stride = hidden;
  a.labels = d_labels.get(), a.rows = rows, a.hidden_dim = hidden, a.vocab = vocab;
  a.logits_chunk = logits.get(), a.chunk_rows = chunk;
  ASSERT_KOK(LinearCrossEntropyForward(a, lse.get(), loss.get(), sum.get(), nullptr));
  const double flops = 2.0 * rows * hidden * vocab;
  const double fwd = TimeMs([&] { LinearCrossEntropyForward(a, lse.get(), loss.get(), sum.get(), nullptr); }, 5);
  ReportFlops("linear+CE fwd 16384x4096 @ 128256 (chunk 4096)", flops, fwd);
  const double bwd = TimeMs([&] { LinearCrossEntropyBackward(a, lse.get(), scale.get(), dh.get(), hidden, nullptr); }, 5);
  ReportFlops("linear+CE bwd (recompute + dhidden GEMMs)", 2 * flops, bwd);
  // Training's path: forward with the gradient (two GEMMs), then the scale.
  const double fwd_grad = TimeMs(
      [&] { LinearCrossEntropyForwardWithGrad(a, lse.get(), loss.get(), sum.get(), dh.get(), hidden, nullptr); }, 5);
  ReportFlops("linear+CE fwd with dhidden (logits + dhidden GEMMs)", 2 * flops, fwd_grad);
  const double scale_ms =
      TimeMs([&] { ScaleBf16Rows(dh.get(), hidden, dh.get(), hidden, rows, hidden, scale.get(), nullptr); }, 5);
  ReportBandwidth("linear+CE gradient scale 16384x4096 (in place)", 2.0 * rows * hidden * 2, scale_ms);
  std::printf("[perf] linear+CE per step: forward + backward %.2f ms, forward with grad + scale %.2f ms\n", fwd + bwd,
              fwd_grad + scale_ms);
  const float step0 = sum.Download()[0] / rows;
  std::printf("[perf] linear+CE mean loss %.4f (ln 128256 = %.4f for near-uniform logits)\n", step0,
              std::log(128256.0));
  ASSERT_CUDA(cudaGetLastError());
}

// ------------------------------------------------------------ GEMM + residual

struct GemmCase {
  int64_t rows, cols, k;
  int64_t x_pad, w_pad, y_pad;  // extra elements per row
  int64_t offset;               // elements every matrix starts past its buffer's start (1: 2-byte aligned)
  bool in_place;
};

void RunGemmResidual(const GemmCase& c) {
  SCOPED_TRACE(std::to_string(c.rows) + "x" + std::to_string(c.cols) + "x" + std::to_string(c.k) + " pads " +
               std::to_string(c.x_pad) + "/" + std::to_string(c.w_pad) + "/" + std::to_string(c.y_pad) + " offset " +
               std::to_string(c.offset) + (c.in_place ? " in place" : ""));
  const int64_t xs = c.k + c.x_pad, ws = c.k + c.w_pad, ys = c.cols + c.y_pad;
  const auto x = RandomBf16(c.offset + c.rows * xs, 51);
  const auto w = RandomBf16(c.offset + c.cols * ws, 52, 1.0f / std::sqrt(static_cast<float>(c.k)));
  const auto r = RandomBf16(c.offset + c.rows * ys, 53);
  constexpr uint16_t kSentinel = 0xabcd;
  DeviceBuffer<uint16_t> d_x(x), d_w(w), d_r(r), d_y(std::vector<uint16_t>(c.offset + c.rows * ys, kSentinel));
  DeviceBuffer<uint8_t> d_ws(kGemmWorkspaceBytes);
  GemmResidualArgs a;
  a.x = d_x.get() + c.offset, a.x_stride = xs, a.w = d_w.get() + c.offset, a.w_stride = ws;
  a.residual = d_r.get() + c.offset, a.y = (c.in_place ? d_r.get() : d_y.get()) + c.offset, a.y_stride = ys;
  a.rows = c.rows, a.cols = c.cols, a.k = c.k, a.workspace = d_ws.get(), a.workspace_bytes = kGemmWorkspaceBytes;
  ASSERT_KOK(GemmResidualBf16(a, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  GemmResidualArgs ha = a;
  std::vector<uint16_t> want(c.offset + c.rows * ys, kSentinel);
  ha.x = x.data() + c.offset, ha.w = w.data() + c.offset, ha.residual = r.data() + c.offset;
  ha.y = want.data() + c.offset, ha.workspace = nullptr, ha.workspace_bytes = 0;
  ASSERT_KOK(ref::GemmResidualBf16(ha));
  // fp32 accumulation in cuBLAS's order vs the reference's double sum rounded
  // to fp32 can flip the final bf16 rounding (1 ulp); where the residual
  // cancels the product, the fp32 sum's own error (growing with k) is what
  // remains.
  const auto got = (c.in_place ? d_r : d_y).Download();
  ExpectBf16Near(got, want, RowPositions(c.rows, c.cols, ys, c.offset), 1.0, 1e-6 + 3e-8 * c.k, "gemm + residual");
  // Nothing but y's rows written: outside them the output buffer keeps its
  // sentinel (out of place) or the residual's values (in place).
  for (int64_t e = 0; e < c.offset + c.rows * ys; ++e) {
    const bool in_y = e >= c.offset && (e - c.offset) % ys < c.cols;
    if (!in_y) {
      ASSERT_EQ(got[e], c.in_place ? r[e] : kSentinel) << e;
    }
  }
  if (!c.in_place) {
    EXPECT_EQ(d_r.Download(), r);  // the residual untouched
  }
}

TEST(KernelsGpuTest, GemmResidualMatchesReference) {
  RunGemmResidual({127, 257, 1031, 0, 0, 0, 0, false});   // odd sizes (2-byte aligned rows)
  RunGemmResidual({1, 1, 1, 0, 0, 0, 0, false});
  RunGemmResidual({64, 96, 128, 8, 16, 24, 0, false});    // strided, 16-byte aligned
  RunGemmResidual({33, 40, 72, 3, 5, 1, 1, false});       // strided and unaligned
  RunGemmResidual({200, 128, 4128, 0, 0, 0, 0, false});   // a folded projection's K (4096 + r 32)
  RunGemmResidual({45, 77, 300, 2, 0, 6, 0, true});       // in place over the residual
  GemmResidualArgs bad;
  bad.rows = 2, bad.cols = 2, bad.k = 2;
  EXPECT_EQ(GemmResidualBf16(bad, nullptr).code, StatusCode::kInvalidArgument);
}

TEST(KernelsGpuTest, GemmResidualPerf) {
  // The two residual projections of a Llama-3-8B layer at 16k tokens: o
  // (4096 -> 4096) and down (14336 -> 4096). Out of place (what the trainer
  // runs) against in place plus the copy torch::addmm makes first.
  for (const int64_t k : {int64_t{4096}, int64_t{14336}}) {
    const int64_t rows = 16384, cols = 4096;
    DeviceBuffer<uint16_t> x(RandomBf16(rows * k, 1)), w(RandomBf16(cols * k, 2, 0.01f)), r(RandomBf16(rows * cols, 3)),
        y(rows * cols);
    DeviceBuffer<uint8_t> ws(kGemmWorkspaceBytes);
    GemmResidualArgs a;
    a.x = x.get(), a.x_stride = k, a.w = w.get(), a.w_stride = k, a.residual = r.get(), a.y = y.get();
    a.y_stride = cols, a.rows = rows, a.cols = cols, a.k = k, a.workspace = ws.get();
    a.workspace_bytes = kGemmWorkspaceBytes;
    ASSERT_KOK(GemmResidualBf16(a, nullptr));
    const double flops = 2.0 * rows * cols * k;
    const std::string what = "gemm + residual 16384x4096, K " + std::to_string(k);
    Status last;
    ReportFlops((what + " (epilogue)").c_str(), flops, TimeMs([&] { last = GemmResidualBf16(a, nullptr); }));
    ASSERT_KOK(last);
    GemmResidualArgs in_place = a;
    in_place.residual = y.get();
    const double copy_ms = TimeMs([&] {
      cudaMemcpyAsync(y.get(), r.get(), rows * cols * 2, cudaMemcpyDeviceToDevice, nullptr);
    });
    const double both_ms = TimeMs([&] {
      cudaMemcpyAsync(y.get(), r.get(), rows * cols * 2, cudaMemcpyDeviceToDevice, nullptr);
      GemmResidualBf16(in_place, nullptr);
    });
    ReportFlops((what + " (copy, then in place)").c_str(), flops, both_ms);
    ReportBandwidth("  of which the residual copy", 2.0 * rows * cols * 2, copy_ms);
  }
  ASSERT_CUDA(cudaGetLastError());
}

}  // namespace
}  // namespace tune::kernels

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipping the kernel GPU tests\n");
    return 77;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
