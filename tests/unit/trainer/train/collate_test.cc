#include "worker/trainer/train/collate.h"

#include <gtest/gtest.h>

namespace tune::train {
namespace {

TEST(CollateTest, RightPadsWithIgnoredLabels) {
  std::vector<int32_t> a_ids{1, 2, 3}, a_lab{2, 3, -100}, b_ids{7, 8, 9, 10, 11}, b_lab{-100, -100, 10, 11, -100};
  std::vector<int32_t> empty;
  MicroBatch mb = Collate({{&a_ids, &a_lab, &empty, &empty}, {&b_ids, &b_lab, nullptr, nullptr}}, /*pad_id=*/0,
                          torch::kCPU, /*use_segments=*/false);
  ASSERT_EQ(mb.input_ids.sizes(), (std::vector<int64_t>{2, 5}));
  EXPECT_TRUE(torch::equal(mb.input_ids[0], torch::tensor({1, 2, 3, 0, 0}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(mb.labels[0], torch::tensor({2, 3, -100, -100, -100}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(mb.position_ids[1], torch::arange(5, torch::kInt64)));
  EXPECT_FALSE(mb.segment_ids.defined());
  EXPECT_EQ(mb.supervised_tokens, 4);
  EXPECT_EQ(mb.input_tokens, 8);
}

TEST(CollateTest, PackedRowsKeepPositionsAndSegments) {
  std::vector<int32_t> ids{5, 6, 7, 8}, lab{6, -100, 8, -100}, pos{0, 1, 0, 1}, seg{0, 0, 1, 1};
  std::vector<int32_t> ids2{5, 6}, lab2{6, -100}, pos2{0, 1}, seg2{0, 0};
  MicroBatch mb = Collate({{&ids, &lab, &pos, &seg}, {&ids2, &lab2, &pos2, &seg2}}, 9, torch::kCPU, true);
  EXPECT_TRUE(torch::equal(mb.position_ids[0], torch::tensor({0, 1, 0, 1}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(mb.position_ids[1], torch::tensor({0, 1, 2, 3}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(mb.segment_ids[1], torch::tensor({0, 0, -1, -1}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(mb.input_ids[1], torch::tensor({5, 6, 9, 9}, torch::kInt64)));
}

TEST(CollateTest, RejectsMismatchedLengths) {
  std::vector<int32_t> ids{1, 2}, lab{1};
  EXPECT_THROW(Collate({{&ids, &lab, nullptr, nullptr}}, 0, torch::kCPU, false), std::invalid_argument);
  EXPECT_THROW(Collate({}, 0, torch::kCPU, false), std::invalid_argument);
}

}  // namespace
}  // namespace tune::train
