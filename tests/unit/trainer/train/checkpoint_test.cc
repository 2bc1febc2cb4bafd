#include "worker/trainer/checkpoint/checkpoint.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <stdexcept>

#include <gtest/gtest.h>

namespace tune::train {
namespace {

namespace fs = std::filesystem;

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("tune-ckpt-test-" + std::to_string(::getpid()) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
  }
  void TearDown() override { fs::remove_all(root_); }
  static void WriteFile(const fs::path& p, const std::string& text) {
    std::ofstream(p) << text;
  }
  std::string Commit(int64_t step, int keep) {
    return CommitCheckpoint(root_.string(), step, keep, [&](const std::string& dir) {
      WriteFile(fs::path(dir) / "adapter.pt", "weights" + std::to_string(step));
      WriteFile(fs::path(dir) / "meta.json", "{}");
    });
  }
  fs::path root_;
};

TEST_F(CheckpointTest, NamesAndLatest) {
  EXPECT_EQ(CheckpointDirName(20), "step-000020");
  EXPECT_EQ(CheckpointDirName(1234567), "step-1234567");
  EXPECT_FALSE(LatestCheckpoint(root_.string()).has_value());
  Commit(10, 3);
  Commit(20, 3);
  auto latest = LatestCheckpoint(root_.string());
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->step, 20);
  EXPECT_TRUE(fs::exists(fs::path(latest->path) / "adapter.pt"));
}

TEST_F(CheckpointTest, TempAndIncompleteDirsAreIgnored) {
  Commit(10, 3);
  // A writer that crashed mid-way leaves a temp dir (even with meta.json) and
  // a step dir without meta.json is incomplete: neither may be picked.
  fs::create_directories(root_ / ".tmp-step-000030-99");
  WriteFile(root_ / ".tmp-step-000030-99" / "meta.json", "{}");
  fs::create_directories(root_ / "step-000040");
  fs::create_directories(root_ / "step-00x050");
  auto latest = LatestCheckpoint(root_.string());
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->step, 10);
  // The next commit clears the stale temp dir.
  Commit(20, 3);
  EXPECT_FALSE(fs::exists(root_ / ".tmp-step-000030-99"));
  EXPECT_EQ(LatestCheckpoint(root_.string())->step, 20);
}

TEST_F(CheckpointTest, KeepsNewestN) {
  for (int s = 1; s <= 5; ++s) Commit(s * 10, 2);
  auto all = ListCheckpoints(root_.string());
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].step, 40);
  EXPECT_EQ(all[1].step, 50);
}

TEST_F(CheckpointTest, FailedWriterLeavesNothingVisible) {
  Commit(10, 3);
  EXPECT_THROW(CommitCheckpoint(root_.string(), 20, 3,
                                [](const std::string& dir) {
                                  std::ofstream(fs::path(dir) / "meta.json") << "{}";
                                  throw std::runtime_error("disk full");
                                }),
               std::runtime_error);
  EXPECT_EQ(LatestCheckpoint(root_.string())->step, 10);
  for (const auto& e : fs::directory_iterator(root_)) {
    EXPECT_NE(e.path().filename().string().rfind(".tmp-", 0), 0u) << e.path();
  }
}

TEST_F(CheckpointTest, RecommitSameStepReplaces) {
  Commit(10, 3);
  CommitCheckpoint(root_.string(), 10, 3, [](const std::string& dir) {
    std::ofstream(fs::path(dir) / "meta.json") << "{\"v\":2}";
  });
  auto all = ListCheckpoints(root_.string());
  ASSERT_EQ(all.size(), 1u);
  EXPECT_FALSE(fs::exists(fs::path(all[0].path) / "adapter.pt"));
}

}  // namespace
}  // namespace tune::train
