// LR schedules vs values worked out by hand from Hugging Face's definitions
// (get_linear/cosine/constant_schedule_with_warmup; step s uses lambda(s-1)).
#include "worker/trainer/train/schedule.h"

#include <cmath>
#include <stdexcept>

#include <gtest/gtest.h>

namespace tune::train {
namespace {

TEST(ScheduleTest, LinearWarmupThenDecay) {
  LrSchedule s(ScheduleKind::kLinear, 1e-3, /*warmup=*/4, /*total=*/12);
  EXPECT_DOUBLE_EQ(s.LrForStep(1), 0.0);          // lambda(0) = 0/4
  EXPECT_DOUBLE_EQ(s.LrForStep(2), 0.25e-3);      // 1/4
  EXPECT_DOUBLE_EQ(s.LrForStep(4), 0.75e-3);      // 3/4
  EXPECT_DOUBLE_EQ(s.LrForStep(5), 1e-3);         // (12-4)/(12-4)
  EXPECT_DOUBLE_EQ(s.LrForStep(9), 0.5e-3);       // (12-8)/8
  EXPECT_DOUBLE_EQ(s.LrForStep(12), 0.125e-3);    // (12-11)/8
  EXPECT_DOUBLE_EQ(s.LrForStep(13), 0.0);         // past the end clamps at 0
  EXPECT_DOUBLE_EQ(s.LrForStep(20), 0.0);
}

TEST(ScheduleTest, CosineWarmupThenHalfCosine) {
  LrSchedule s(ScheduleKind::kCosine, 2.0, /*warmup=*/2, /*total=*/10);
  EXPECT_DOUBLE_EQ(s.LrForStep(1), 0.0);
  EXPECT_DOUBLE_EQ(s.LrForStep(2), 1.0);          // 1/2 * 2
  EXPECT_DOUBLE_EQ(s.LrForStep(3), 2.0);          // progress 0 -> 1.0
  EXPECT_NEAR(s.LrForStep(7), 2.0 * 0.5 * (1 + std::cos(M_PI * 0.5)), 1e-12);  // k=6: (6-2)/8
  EXPECT_NEAR(s.LrForStep(5), 2.0 * 0.5 * (1 + std::cos(M_PI * 0.25)), 1e-12);
  EXPECT_NEAR(s.LrForStep(11), 0.0, 1e-12);       // k=10: progress 1
}

TEST(ScheduleTest, ConstantWithWarmupAndNoWarmup) {
  LrSchedule w(ScheduleKind::kConstant, 3e-4, 3, 100);
  EXPECT_DOUBLE_EQ(w.LrForStep(1), 0.0);
  EXPECT_DOUBLE_EQ(w.LrForStep(2), 1e-4);
  EXPECT_DOUBLE_EQ(w.LrForStep(4), 3e-4);
  EXPECT_DOUBLE_EQ(w.LrForStep(100), 3e-4);
  LrSchedule nw(ScheduleKind::kLinear, 1.0, 0, 4);
  EXPECT_DOUBLE_EQ(nw.LrForStep(1), 1.0);   // no warmup: starts at full LR
  EXPECT_DOUBLE_EQ(nw.LrForStep(2), 0.75);
  EXPECT_DOUBLE_EQ(nw.LrForStep(4), 0.25);
}

TEST(ScheduleTest, ParseNames) {
  EXPECT_EQ(ParseScheduleKind("cosine"), ScheduleKind::kCosine);
  EXPECT_EQ(ScheduleKindName(ParseScheduleKind("linear")), "linear");
  EXPECT_THROW(ParseScheduleKind("step"), std::invalid_argument);
}

}  // namespace
}  // namespace tune::train
