#include "worker/trainer/train/loss_scaler.h"

#include <stdexcept>

#include <gtest/gtest.h>

namespace tune::train {
namespace {

TEST(LossScalerTest, DisabledIsIdentityAndNeverSkips) {
  LossScaler s(/*enabled=*/false);
  EXPECT_EQ(s.scale(), 1.0);
  EXPECT_EQ(s.Update(/*overflow=*/true), LossScaler::Outcome::kApplied);
  EXPECT_EQ(s.scale(), 1.0);
}

TEST(LossScalerTest, StartsAt2To16AndHalvesOnOverflow) {
  LossScaler s(true);
  EXPECT_EQ(s.scale(), 65536.0);
  EXPECT_EQ(s.Update(true), LossScaler::Outcome::kSkipped);
  EXPECT_EQ(s.scale(), 32768.0);
  EXPECT_EQ(s.Update(true), LossScaler::Outcome::kSkipped);
  EXPECT_EQ(s.scale(), 16384.0);
}

TEST(LossScalerTest, DoublesAfter2000CleanStepsInARow) {
  LossScaler s(true);
  for (int i = 0; i < 1999; ++i) ASSERT_EQ(s.Update(false), LossScaler::Outcome::kApplied);
  EXPECT_EQ(s.scale(), 65536.0);
  EXPECT_EQ(s.clean_steps(), 1999);
  s.Update(false);
  EXPECT_EQ(s.scale(), 131072.0);
  EXPECT_EQ(s.clean_steps(), 0);
}

TEST(LossScalerTest, OverflowRestartsTheCleanRun) {
  LossScaler s(true);
  for (int i = 0; i < 1500; ++i) s.Update(false);
  s.Update(true);  // 32768, clean run restarts
  for (int i = 0; i < 1999; ++i) s.Update(false);
  EXPECT_EQ(s.scale(), 32768.0);
  s.Update(false);
  EXPECT_EQ(s.scale(), 65536.0);
}

TEST(LossScalerTest, CollapsesBelowTheFloor) {
  LossScalerOptions o;
  o.init_scale = 4.0;
  o.min_scale = 1.0;
  LossScaler s(true, o);
  EXPECT_EQ(s.Update(true), LossScaler::Outcome::kSkipped);  // 2
  EXPECT_EQ(s.Update(true), LossScaler::Outcome::kSkipped);  // 1
  EXPECT_EQ(s.Update(true), LossScaler::Outcome::kCollapsed);
  EXPECT_EQ(s.scale(), 1.0) << "the scale stays at the floor after a collapse";
}

TEST(LossScalerTest, ResetAndBadOptions) {
  LossScaler s(true);
  for (int i = 0; i < 10; ++i) s.Update(false);
  s.Reset(8.0);
  EXPECT_EQ(s.scale(), 8.0);
  EXPECT_EQ(s.clean_steps(), 0);
  EXPECT_THROW(s.Reset(0.0), std::invalid_argument);
  LossScalerOptions bad;
  bad.backoff_factor = 1.5;
  EXPECT_THROW(LossScaler(true, bad), std::invalid_argument);
}

}  // namespace
}  // namespace tune::train
