#include "worker/trainer/train/sampler.h"

#include <algorithm>
#include <set>

#include <gtest/gtest.h>

namespace tune::train {
namespace {

TEST(SamplerTest, PermutationIsDeterministicAndComplete) {
  auto a = EpochPermutation(37, 3407, 0);
  auto b = EpochPermutation(37, 3407, 0);
  EXPECT_EQ(a, b);
  std::vector<int64_t> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 37; ++i) EXPECT_EQ(sorted[static_cast<size_t>(i)], i);
  EXPECT_NE(a, EpochPermutation(37, 3407, 1));  // epoch reshuffle
  EXPECT_NE(a, EpochPermutation(37, 3408, 0));  // seed matters
}

TEST(SamplerTest, StepsWalkEpochsWithoutGapsOrRepeats) {
  StepSampler s(10, 4, 1);
  std::vector<int64_t> stream;
  for (int step = 1; step <= 5; ++step) {
    auto idx = s.StepIndices(step);
    ASSERT_EQ(idx.size(), 4u);
    stream.insert(stream.end(), idx.begin(), idx.end());
  }
  // 20 positions = 2 epochs, each a permutation of 0..9.
  std::set<int64_t> e0(stream.begin(), stream.begin() + 10), e1(stream.begin() + 10, stream.end());
  EXPECT_EQ(e0.size(), 10u);
  EXPECT_EQ(e1.size(), 10u);
  auto p1 = EpochPermutation(10, 1, 1);
  EXPECT_TRUE(std::equal(p1.begin(), p1.end(), stream.begin() + 10));
  EXPECT_EQ(s.PositionBeforeStep(1).epoch, 0);
  EXPECT_EQ(s.PositionBeforeStep(4).epoch, 1);  // position 12
  EXPECT_EQ(s.PositionBeforeStep(4).index, 2);
  EXPECT_EQ(s.StepsForEpochs(1.0), 3);          // ceil(10/4)
  EXPECT_EQ(s.StepsForEpochs(0.01), 1);
}

// The property data parallelism relies on: the union of the ranks' shards of a
// step is the step's batch, whatever the world size, so 2 ranks x micro 2
// train on exactly the examples of 1 rank x micro 4.
TEST(SamplerTest, ShardsOfTwoRanksEqualOneRank) {
  for (uint64_t seed : {1u, 7u, 3407u}) {
    StepSampler s(23, 4, seed);
    for (int step = 1; step <= 12; ++step) {
      auto idx = s.StepIndices(step);
      auto one = MicroBatches(RankShard(idx, 0, 1), 4);
      ASSERT_EQ(one.size(), 1u);
      auto r0 = MicroBatches(RankShard(idx, 0, 2), 2);
      auto r1 = MicroBatches(RankShard(idx, 1, 2), 2);
      ASSERT_EQ(r0.size(), 1u);
      ASSERT_EQ(r1.size(), 1u);
      std::multiset<int64_t> a(one[0].begin(), one[0].end());
      std::multiset<int64_t> b(r0[0].begin(), r0[0].end());
      b.insert(r1[0].begin(), r1[0].end());
      EXPECT_EQ(a, b) << "step " << step;
      EXPECT_EQ(r0[0][0], idx[0]);
      EXPECT_EQ(r1[0][0], idx[1]);
    }
  }
}

TEST(SamplerTest, MicroBatchesSplitInOrder) {
  auto mb = MicroBatches({5, 6, 7, 8, 9, 10}, 2);
  ASSERT_EQ(mb.size(), 3u);
  EXPECT_EQ(mb[2], (std::vector<int64_t>{9, 10}));
  EXPECT_THROW(StepSampler(0, 4, 1), std::invalid_argument);
}

}  // namespace
}  // namespace tune::train
