// The profile report's arithmetic on synthetic events: device busy time is
// the union of kernel intervals, idle the rest of the wall time, kernel time
// grouped by class.
#include "worker/trainer/train/step_profiler.h"

#include <gtest/gtest.h>

namespace tune::train {
namespace {

TEST(StepProfiler, ParsesStepRanges) {
  int64_t a = 0, b = 0;
  EXPECT_TRUE(ParseProfileSteps("7", &a, &b));
  EXPECT_EQ(a, 7);
  EXPECT_EQ(b, 7);
  EXPECT_TRUE(ParseProfileSteps("6-9", &a, &b));
  EXPECT_EQ(a, 6);
  EXPECT_EQ(b, 9);
  for (const char* bad : {"", "0", "3-2", "-4", "4-", "a", "1-2-3", "1.5"}) {
    EXPECT_FALSE(ParseProfileSteps(bad, &a, &b)) << bad;
  }
}

TEST(StepProfiler, ClassifiesKernels) {
  EXPECT_EQ(KernelClass("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN"), "GEMM");
  EXPECT_EQ(KernelClass("sm90_xmma_gemm_bf16bf16_bf16f32"), "GEMM");
  EXPECT_EQ(KernelClass("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16"), "attention");
  EXPECT_EQ(KernelClass("tune::kernels::(anonymous namespace)::Nf4DequantKernel(...)"), "tune kernels");
  EXPECT_EQ(KernelClass("Memcpy DtoD (Device -> Device)"), "copy");
  EXPECT_EQ(KernelClass("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add>"), "other");
}

TEST(StepProfiler, BusyIsTheUnionOfKernelIntervals) {
  // Two overlapping kernels (0-40 and 30-50 us) and one at 80-90 us in a
  // 100 us window: busy 60 us, idle 40 us; kernel time 70 us.
  const std::vector<ProfiledEvent> events = {
      {"nvjet_gemm_a", true, 0, 40000},
      {"tune::kernels::SwiGluFwdKernel", true, 30000, 20000},
      {"nvjet_gemm_a", true, 80000, 10000},
      {"aten::mm", false, 0, 90000},  // host ops are left out of the kernel tables
  };
  const std::string r = FormatProfileReport(events, 100000, 3, 4, 2);
  EXPECT_NE(r.find("steps 3-4 (2 steps), wall 0.10 ms, 0.05 ms per step"), std::string::npos) << r;
  EXPECT_NE(r.find("device busy 0.06 ms (60.0% of wall), idle 0.04 ms; kernel + copy time 0.07 ms in 3 launches"),
            std::string::npos)
      << r;
  EXPECT_NE(r.find("GEMM                     0.05   71.4%          2"), std::string::npos) << r;
  EXPECT_NE(r.find("tune kernels             0.02   28.6%          1"), std::string::npos) << r;
  // Host ops are not kernels; they only name what covered an idle gap.
  EXPECT_GT(r.find("aten::mm"), r.find("longest gaps")) << r;
  EXPECT_NE(r.find("0.03      0.05  tune::kernels::SwiGluFwdKernel -> nvjet_gemm_a; aten::mm"), std::string::npos)
      << r;
}

TEST(StepProfiler, IdleGapsAreSplitByLengthAndNamed) {
  // Window 0-10 ms: host work until 1 ms, kernels 1-3, 3.005-4 (a 5 us gap),
  // 6-7 (a 2 ms gap while the host runs aten::item > cudaMemcpyAsync) and
  // 7.05-9 (a 50 us gap); 1 ms idle after the last kernel. The device span
  // of a host scope (Kineto's GPU_USER_ANNOTATION) is no kernel: it neither
  // fills the gaps it spans nor counts as kernel time.
  const std::vector<ProfiledEvent> events = {
      {"tune::forward", true, 1000000, 8000000, /*annotation=*/true},
      {"tune::step_prep", false, 0, 900000},
      {"gemm_a", true, 1000000, 2000000},
      {"gemm_b", true, 3005000, 995000},
      {"aten::item", false, 4200000, 1900000},
      {"cudaMemcpyAsync", false, 4500000, 1000000},
      {"swiglu", true, 6000000, 1000000},
      {"gemm_c", true, 7050000, 1950000},
  };
  const std::string r = FormatProfileReport(events, 10000000, 1, 1, 1);
  EXPECT_NE(r.find("device idle: 1.00 ms before the first kernel, 1.00 ms after the last, 2.06 ms in 3 gaps"),
            std::string::npos)
      << r;
  EXPECT_NE(r.find("< 10 us 0.01 ms (1)  10-100 us 0.05 ms (1)  0.1-1 ms 0.00 ms (0)  >= 1 ms 2.00 ms (1)"),
            std::string::npos)
      << r;
  // The longest gap comes first, at 4 ms, between gemm_b and swiglu, with
  // the host ops covering its middle (5 ms).
  EXPECT_NE(r.find("    2.00      4.00  gemm_b -> swiglu; aten::item > cudaMemcpyAsync"), std::string::npos) << r;
  EXPECT_LT(r.find("gemm_b -> swiglu"), r.find("swiglu -> gemm_c")) << r;
  EXPECT_NE(r.find("swiglu -> gemm_c; (no host op recorded)"), std::string::npos) << r;
  EXPECT_NE(r.find("device busy 5.95 ms (59.5% of wall), idle 4.05 ms; kernel + copy time 5.95 ms in 4 launches"), std::string::npos) << r;
  EXPECT_EQ(r.find("tune::forward"), std::string::npos) << r;
}

TEST(StepProfiler, HostOpsWithoutADevice) {
  const std::string r = FormatProfileReport({{"aten::mm", false, 0, 3000000}, {"aten::add", false, 0, 1000000}},
                                            5000000, 2, 2, 1);
  EXPECT_NE(r.find("no device events"), std::string::npos) << r;
  EXPECT_LT(r.find("aten::mm"), r.find("aten::add")) << r;  // by time, largest first
}

}  // namespace
}  // namespace tune::train
