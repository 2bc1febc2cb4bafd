// /proc/meminfo and /proc/stat parsing, and HostSampler over a fixture proc
// directory (the worker's "cpu" device on /metrics).
#include "worker/agent/host_stats.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

namespace tune::worker {
namespace {

namespace fs = std::filesystem;

// The head of a real /proc/meminfo (Linux 6.1).
constexpr char kMeminfo[] =
    "MemTotal:       24684092 kB\n"
    "MemFree:         1210460 kB\n"
    "MemAvailable:   20960776 kB\n"
    "Buffers:          300124 kB\n"
    "Cached:         18313308 kB\n"
    "SwapCached:            0 kB\n"
    "HugePages_Total:       0\n"
    "Hugepagesize:       2048 kB\n";

TEST(ParseMeminfoTest, TotalAndAvailableInBytes) {
  absl::StatusOr<HostMemory> m = ParseMeminfo(kMeminfo);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->total_bytes, int64_t{24684092} * 1024);
  EXPECT_EQ(m->available_bytes, int64_t{20960776} * 1024);
  EXPECT_EQ(m->used_bytes(), int64_t{24684092 - 20960776} * 1024);
}

TEST(ParseMeminfoTest, ErrorsNameTheFieldAndLine) {
  absl::StatusOr<HostMemory> m = ParseMeminfo("MemTotal:       1000 kB\nMemFree: 10 kB\n");
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("MemAvailable"), std::string::npos) << m.status();

  m = ParseMeminfo("MemFree: 10 kB\nMemTotal:   lots kB\nMemAvailable: 5 kB\n");
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("line 2"), std::string::npos) << m.status();
  EXPECT_NE(m.status().message().find("MemTotal"), std::string::npos) << m.status();

  m = ParseMeminfo("MemTotal: 10 kB\nMemAvailable: 20 kB\n");
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("exceeds MemTotal"), std::string::npos) << m.status();
}

TEST(ParseProcStatCpuTest, BusyExcludesIdleAndIowaitAndCountsGuestOnce) {
  // user nice system idle iowait irq softirq steal guest guest_nice
  absl::StatusOr<CpuTimes> t =
      ParseProcStatCpu("cpu  100 5 50 800 20 3 2 0 40 0\ncpu0 50 2 25 400 10 1 1 0 20 0\n");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->busy, 100u + 5 + 50 + 3 + 2 + 0);
  EXPECT_EQ(t->total, t->busy + 800 + 20);

  // Old kernels print only four numbers.
  t = ParseProcStatCpu("cpu 1 2 3 4\n");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->busy, 6u);
  EXPECT_EQ(t->total, 10u);
}

TEST(ParseProcStatCpuTest, Errors) {
  EXPECT_FALSE(ParseProcStatCpu("").ok());
  EXPECT_FALSE(ParseProcStatCpu("cpu0 1 2 3 4\n").ok());
  absl::StatusOr<CpuTimes> t = ParseProcStatCpu("cpu 1 2 x 4\n");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("field 3"), std::string::npos) << t.status();
}

TEST(CpuUtilizationTest, DeltaOfBusyOverDeltaOfTotal) {
  const CpuTimes a{100, 1000};
  ASSERT_TRUE(CpuUtilization(a, CpuTimes{175, 1100}).has_value());
  EXPECT_DOUBLE_EQ(*CpuUtilization(a, CpuTimes{175, 1100}), 0.75);
  EXPECT_DOUBLE_EQ(*CpuUtilization(a, CpuTimes{100, 1100}), 0.0);
  EXPECT_FALSE(CpuUtilization(a, a).has_value());                     // no time passed
  EXPECT_FALSE(CpuUtilization(a, CpuTimes{50, 900}).has_value());      // went backwards
}

class HostSamplerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/host_stats_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  void Write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ + "/" + name) << text;
  }
  std::string dir_;
};

TEST_F(HostSamplerTest, MemoryAndUtilisationSincePreviousRead) {
  Write("meminfo", kMeminfo);
  Write("stat", "cpu  100 0 0 900 0 0 0 0 0 0\n");
  HostSampler sampler(dir_);  // baseline: busy 100 of 1000
  Write("stat", "cpu  160 0 20 920 0 0 0 0 0 0\n");  // +80 busy of +100
  HostSampler::Reading r = sampler.Read();
  ASSERT_TRUE(r.memory.has_value());
  EXPECT_EQ(r.memory->total_bytes, int64_t{24684092} * 1024);
  ASSERT_TRUE(r.utilization.has_value());
  EXPECT_DOUBLE_EQ(*r.utilization, 0.8);

  // Same jiffies again: the last value stays.
  r = sampler.Read();
  ASSERT_TRUE(r.utilization.has_value());
  EXPECT_DOUBLE_EQ(*r.utilization, 0.8);

  Write("stat", "cpu  170 0 20 1010 0 0 0 0 0 0\n");  // +10 busy of +100
  r = sampler.Read();
  ASSERT_TRUE(r.utilization.has_value());
  EXPECT_DOUBLE_EQ(*r.utilization, 0.1);

  Write("meminfo", "MemTotal: 2048 kB\nMemAvailable: 1024 kB\n");
  r = sampler.Read();
  ASSERT_TRUE(r.memory.has_value());
  EXPECT_EQ(r.memory->used_bytes(), 1024 * 1024);
}

TEST_F(HostSamplerTest, MissingFilesLeaveNumbersUnknown) {
  HostSampler sampler(dir_);
  HostSampler::Reading r = sampler.Read();
  EXPECT_FALSE(r.memory.has_value());
  EXPECT_FALSE(r.utilization.has_value());
  // Files appearing later are picked up; utilisation needs two readings.
  Write("meminfo", kMeminfo);
  Write("stat", "cpu 1 0 0 1 0 0 0 0 0 0\n");
  r = sampler.Read();
  EXPECT_TRUE(r.memory.has_value());
  EXPECT_FALSE(r.utilization.has_value());
  Write("stat", "cpu 2 0 0 2 0 0 0 0 0 0\n");
  r = sampler.Read();
  ASSERT_TRUE(r.utilization.has_value());
  EXPECT_DOUBLE_EQ(*r.utilization, 0.5);
}

TEST(HostSamplerRealProcTest, ReadsThisMachine) {
  HostSampler sampler;
  usleep(30 * 1000);  // a few jiffies
  HostSampler::Reading r = sampler.Read();
  ASSERT_TRUE(r.memory.has_value());
  EXPECT_GT(r.memory->total_bytes, 0);
  EXPECT_GE(r.memory->used_bytes(), 0);
  if (r.utilization) {
    EXPECT_GE(*r.utilization, 0.0);
    EXPECT_LE(*r.utilization, 1.0);
  }
}

}  // namespace
}  // namespace tune::worker
