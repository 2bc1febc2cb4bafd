// nvidia-smi CSV parsing, --gpus selection, and the nvidia-smi probe against
// a stand-in script.
#include "worker/agent/gpu_inventory.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include <gtest/gtest.h>

namespace tune::worker {
namespace {

constexpr int64_t kMiB = 1024 * 1024;

TEST(ParseNvidiaSmiCsvTest, TypicalOutput) {
  const char* csv =
      "0, NVIDIA H200, 143771, GPU-11111111-2222-3333-4444-555555555555, 512, 37\n"
      "1, NVIDIA H200, 143771, GPU-66666666-7777-8888-9999-000000000000, 0, 0\n";
  absl::StatusOr<std::vector<GpuReading>> gpus = ParseNvidiaSmiCsv(csv);
  ASSERT_TRUE(gpus.ok()) << gpus.status();
  ASSERT_EQ(gpus->size(), 2u);
  const GpuReading& g = (*gpus)[0];
  EXPECT_EQ(g.index, 0);
  EXPECT_EQ(g.name, "NVIDIA H200");
  EXPECT_EQ(g.memory_total_bytes, 143771 * kMiB);
  EXPECT_EQ(g.uuid, "GPU-11111111-2222-3333-4444-555555555555");
  EXPECT_EQ(g.memory_used_bytes, 512 * kMiB);
  EXPECT_EQ(g.utilization_percent, 37);
  EXPECT_EQ((*gpus)[1].index, 1);
}

TEST(ParseNvidiaSmiCsvTest, NotAvailableFieldsAndOddSpacing) {
  const char* csv =
      "\n  2 ,NVIDIA A100-SXM4-80GB,81920,GPU-aa,[N/A],[Not Supported]  \r\n"
      "0, Tesla T4, 15360, GPU-bb, 100, 5\n\n";
  auto gpus = ParseNvidiaSmiCsv(csv);
  ASSERT_TRUE(gpus.ok()) << gpus.status();
  ASSERT_EQ(gpus->size(), 2u);
  EXPECT_EQ((*gpus)[0].index, 0);  // sorted by index
  EXPECT_EQ((*gpus)[1].index, 2);
  EXPECT_EQ((*gpus)[1].name, "NVIDIA A100-SXM4-80GB");
  EXPECT_EQ((*gpus)[1].memory_used_bytes, 0);
  EXPECT_FALSE((*gpus)[1].memory_used_known);  // "[N/A]" is not a reading of 0
  EXPECT_TRUE((*gpus)[0].memory_used_known);
  EXPECT_EQ((*gpus)[1].utilization_percent, -1);
}

TEST(ParseNvidiaSmiCsvTest, NameWithCommaIsKept) {
  auto gpus = ParseNvidiaSmiCsv("0, Weird, GPU Name, 1024, GPU-x, 1, 2\n");
  ASSERT_TRUE(gpus.ok()) << gpus.status();
  EXPECT_EQ((*gpus)[0].name, "Weird,GPU Name");
  EXPECT_EQ((*gpus)[0].memory_total_bytes, 1024 * kMiB);
}

TEST(ParseNvidiaSmiCsvTest, EmptyOutputIsNoGpus) {
  auto gpus = ParseNvidiaSmiCsv("");
  ASSERT_TRUE(gpus.ok());
  EXPECT_TRUE(gpus->empty());
}

TEST(ParseNvidiaSmiCsvTest, ErrorsNameTheLine) {
  auto bad = ParseNvidiaSmiCsv("0, GPU, 100, GPU-a, 1, 2\nNo devices were found\n");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("line 2"), absl::string_view::npos) << bad.status();
  EXPECT_FALSE(ParseNvidiaSmiCsv("x, GPU, 100, GPU-a, 1, 2\n").ok());
  EXPECT_FALSE(ParseNvidiaSmiCsv("0, GPU, lots, GPU-a, 1, 2\n").ok());
  EXPECT_FALSE(ParseNvidiaSmiCsv("0, GPU, 100, GPU-a, 1, 250\n").ok());
  EXPECT_FALSE(ParseNvidiaSmiCsv("0, A, 1, u, 1, 2\n0, B, 1, v, 1, 2\n").ok());  // duplicate
}

std::vector<GpuReading> Found(std::initializer_list<int> indices) {
  std::vector<GpuReading> out;
  for (int i : indices) {
    GpuReading g;
    g.index = i;
    g.name = "GPU " + std::to_string(i);
    out.push_back(g);
  }
  return out;
}

TEST(SelectGpusTest, AllNoneAndList) {
  const auto found = Found({0, 1, 2, 3});
  GpuSelection all;
  EXPECT_EQ(SelectGpus(all, found)->size(), 4u);
  GpuSelection none;
  none.mode = GpuSelection::Mode::kNone;
  EXPECT_TRUE(SelectGpus(none, found)->empty());
  absl::StatusOr<GpuSelection> list = ParseGpuSelection("2,0");
  ASSERT_TRUE(list.ok());
  auto picked = SelectGpus(*list, found);
  ASSERT_TRUE(picked.ok());
  ASSERT_EQ(picked->size(), 2u);
  EXPECT_EQ((*picked)[0].index, 0);
  EXPECT_EQ((*picked)[1].index, 2);
}

TEST(SelectGpusTest, MissingIndexIsAnErrorNamingWhatExists) {
  auto list = ParseGpuSelection("0,5");
  ASSERT_TRUE(list.ok());
  auto picked = SelectGpus(*list, Found({0, 1}));
  ASSERT_FALSE(picked.ok());
  EXPECT_NE(picked.status().message().find("GPU 5"), absl::string_view::npos);
  EXPECT_NE(picked.status().message().find("found: 0,1"), absl::string_view::npos)
      << picked.status();
}

class FakeSmiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/fake_smi.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    unlink((dir_ + "/nvidia-smi").c_str());
    rmdir(dir_.c_str());
  }
  std::string Script(const std::string& body) {
    std::string path = dir_ + "/nvidia-smi";
    std::ofstream(path) << "#!/bin/sh\n" << body;
    chmod(path.c_str(), 0755);
    return path;
  }
  std::string dir_;
};

TEST_F(FakeSmiTest, ProbeRunsNvidiaSmiWithTheQuery) {
  std::string smi = Script(
      "case \"$1 $2\" in\n"
      "  '--query-gpu=index,name,memory.total,uuid,memory.used,utilization.gpu "
      "--format=csv,noheader,nounits') echo '0, Fake GPU, 2048, GPU-f, 1024, 50' ;;\n"
      "  *) echo \"bad args: $*\" >&2; exit 1 ;;\n"
      "esac\n");
  auto probe = MakeNvidiaSmiProbe(smi);
  auto gpus = probe->Read();
  ASSERT_TRUE(gpus.ok()) << gpus.status();
  ASSERT_EQ(gpus->size(), 1u);
  EXPECT_EQ((*gpus)[0].name, "Fake GPU");
  EXPECT_EQ((*gpus)[0].utilization_percent, 50);
  EXPECT_EQ(probe->Source(), "nvidia-smi");
}

TEST_F(FakeSmiTest, FailingNvidiaSmiIsUnavailable) {
  std::string smi = Script("echo 'NVIDIA-SMI has failed' ; exit 9\n");
  auto gpus = MakeNvidiaSmiProbe(smi)->Read();
  ASSERT_FALSE(gpus.ok());
  EXPECT_TRUE(absl::IsUnavailable(gpus.status())) << gpus.status();
  EXPECT_TRUE(absl::IsNotFound(MakeNvidiaSmiProbe(dir_ + "/absent")->Read().status()));
}

TEST_F(FakeSmiTest, InventorySamplesOfferedGpusOnly) {
  std::string smi = Script(
      "echo '0, Fake GPU, 2048, GPU-a, 100, 10'\n"
      "echo '1, Fake GPU, 2048, GPU-b, 200, 20'\n");
  auto all = MakeNvidiaSmiProbe(smi)->Read();
  ASSERT_TRUE(all.ok());
  std::vector<GpuReading> offered = {(*all)[1]};
  GpuInventory inventory(MakeNvidiaSmiProbe(smi), offered);
  auto sample = inventory.Sample();
  ASSERT_EQ(sample.size(), 1u);
  EXPECT_EQ(sample[0].index, 1);
  EXPECT_EQ(sample[0].memory_used_bytes, 200 * kMiB);
  EXPECT_TRUE(sample[0].memory_used_known);
  EXPECT_EQ(sample[0].utilization_percent, 20);

  GpuSampler sampler(&inventory, absl::Milliseconds(10));
  auto latest = sampler.Latest();
  ASSERT_EQ(latest.size(), 1u);
  EXPECT_EQ(latest[0].index, 1);
}

TEST_F(FakeSmiTest, FailedSampleKeepsTotalsWithUsageUnknown) {
  GpuReading offered;
  offered.index = 0;
  offered.memory_total_bytes = 2048 * kMiB;
  offered.memory_used_bytes = 5;
  offered.utilization_percent = 7;
  GpuInventory inventory(MakeNvidiaSmiProbe(Script("exit 9\n")), {offered});
  auto sample = inventory.Sample();
  ASSERT_EQ(sample.size(), 1u);
  EXPECT_EQ(sample[0].memory_total_bytes, 2048 * kMiB);
  EXPECT_FALSE(sample[0].memory_used_known);
  EXPECT_EQ(sample[0].memory_used_bytes, 0);
  EXPECT_EQ(sample[0].utilization_percent, -1);
}

TEST(GpuInventoryTest, NoneSelectionOffersNothing) {
  GpuSelection none;
  none.mode = GpuSelection::Mode::kNone;
  auto inventory = GpuInventory::Discover(none, "/nonexistent/nvidia-smi");
  ASSERT_TRUE(inventory.ok());
  EXPECT_TRUE((*inventory)->offered().empty());
  EXPECT_TRUE((*inventory)->Sample().empty());
}

}  // namespace
}  // namespace tune::worker
