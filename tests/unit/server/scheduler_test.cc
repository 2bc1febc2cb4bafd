#include "server/scheduler/scheduler.h"

#include <map>
#include <set>

#include <gtest/gtest.h>

namespace tune::server {
namespace {

QueuedJob Gpu(const std::string& id, int gpus, int priority, int64_t order) {
  QueuedJob j;
  j.id = id;
  j.gpus = gpus;
  j.priority = priority;
  j.submit_order = order;
  return j;
}

QueuedJob Cpu(const std::string& id, int ranks, int priority, int64_t order) {
  QueuedJob j;
  j.id = id;
  j.cpu_ranks = ranks;
  j.priority = priority;
  j.submit_order = order;
  return j;
}

WorkerCapacity GpuWorker(const std::string& name, int total, std::vector<int> free) {
  WorkerCapacity w;
  w.name = name;
  w.total_gpus = total;
  w.free_gpus = std::move(free);
  return w;
}

WorkerCapacity CpuWorker(const std::string& name, int total, std::vector<int> free) {
  WorkerCapacity w;
  w.name = name;
  w.total_cpu_slots = total;
  w.free_cpu_slots = std::move(free);
  return w;
}

std::map<std::string, Placement> ByJob(const ScheduleResult& r) {
  std::map<std::string, Placement> out;
  for (const Placement& p : r.placements) out[p.job_id] = p;
  return out;
}

TEST(SchedulerTest, PriorityThenFifo) {
  // One free GPU, three candidates: the highest priority wins; among equals, the oldest.
  auto r = Schedule({Gpu("low", 1, 0, 1), Gpu("high-late", 1, 5, 3), Gpu("high-early", 1, 5, 2)},
                    {GpuWorker("w", 1, {0})});
  ASSERT_EQ(r.placements.size(), 1u);
  EXPECT_EQ(r.placements[0].job_id, "high-early");
  EXPECT_EQ(r.placements[0].worker, "w");
  EXPECT_EQ(r.placements[0].devices, std::vector<int>({0}));
  EXPECT_EQ(r.pending_reasons.count("high-late"), 1u);
  EXPECT_EQ(r.pending_reasons.count("low"), 1u);
}

TEST(SchedulerTest, PlacesAJobOnOneWorkerOnlyAndNeverOverCommits) {
  // 2 + 2 free GPUs on two workers: a 3-GPU job must not be split.
  auto r = Schedule({Gpu("three", 3, 0, 1)}, {GpuWorker("a", 2, {0, 1}), GpuWorker("b", 2, {0, 1})});
  EXPECT_TRUE(r.placements.empty());
  EXPECT_EQ(r.pending_reasons.at("three"), "no worker offers 3 GPUs");

  // Many 1-GPU jobs: exactly as many placements as free GPUs, each GPU once.
  std::vector<QueuedJob> jobs;
  for (int i = 0; i < 10; ++i) jobs.push_back(Gpu("j" + std::to_string(i), 1, 0, i));
  r = Schedule(jobs, {GpuWorker("a", 4, {0, 2, 3}), GpuWorker("b", 2, {1})});
  ASSERT_EQ(r.placements.size(), 4u);
  std::set<std::pair<std::string, int>> used;
  for (const Placement& p : r.placements) {
    ASSERT_EQ(p.devices.size(), 1u);
    EXPECT_TRUE(used.insert({p.worker, p.devices[0]}).second) << "device given twice";
  }
  EXPECT_EQ(used.count({"a", 1}), 0u) << "a's GPU 1 was not free";
  EXPECT_EQ(r.pending_reasons.size(), 6u);
}

TEST(SchedulerTest, TooBigJobIsSkippedWithReasonAndDoesNotBlock) {
  auto r = Schedule({Gpu("huge", 4, 10, 1), Gpu("small", 1, 0, 2)}, {GpuWorker("w", 2, {0, 1})});
  auto placed = ByJob(r);
  EXPECT_EQ(placed.count("huge"), 0u);
  EXPECT_EQ(r.pending_reasons.at("huge"), "no worker offers 4 GPUs");
  ASSERT_EQ(placed.count("small"), 1u);
  EXPECT_EQ(placed["small"].worker, "w");

  r = Schedule({Cpu("c", 1, 0, 1)}, {GpuWorker("w", 2, {0, 1})});
  EXPECT_EQ(r.pending_reasons.at("c"), "no worker offers 1 CPU slot");
  r = Schedule({Gpu("g", 1, 0, 1)}, {});
  EXPECT_EQ(r.pending_reasons.at("g"), "no worker offers 1 GPU");
}

TEST(SchedulerTest, WaitingBigJobBlocksLowerJobsOnWorkersItCouldUse) {
  // "big" needs 4 GPUs; only "a" can ever hold it and it has 2 free now. The
  // small job must not take a's GPUs (that would starve big) but may use b.
  auto r = Schedule({Gpu("big", 4, 5, 1), Gpu("small1", 1, 0, 2), Gpu("small2", 1, 0, 3)},
                    {GpuWorker("a", 4, {2, 3}), GpuWorker("b", 1, {0})});
  auto placed = ByJob(r);
  EXPECT_EQ(placed.count("big"), 0u);
  EXPECT_NE(r.pending_reasons.at("big").find("waiting for 4 free GPUs"), std::string::npos)
      << r.pending_reasons.at("big");
  ASSERT_EQ(placed.count("small1"), 1u);
  EXPECT_EQ(placed["small1"].worker, "b");
  EXPECT_EQ(placed.count("small2"), 0u);
  EXPECT_NE(r.pending_reasons.at("small2").find("waiting behind big"), std::string::npos)
      << r.pending_reasons.at("small2");
}

TEST(SchedulerTest, GpuAndCpuJobsDoNotBlockEachOther) {
  WorkerCapacity w = GpuWorker("w", 2, {1});
  w.total_cpu_slots = 4;
  w.free_cpu_slots = {0, 1, 2, 3};
  auto r = Schedule({Gpu("g2", 2, 9, 1), Cpu("c2", 2, 0, 2)}, {w});
  auto placed = ByJob(r);
  EXPECT_EQ(placed.count("g2"), 0u);
  ASSERT_EQ(placed.count("c2"), 1u);
  EXPECT_EQ(placed["c2"].devices, std::vector<int>({0, 1}));
}

TEST(SchedulerTest, BestFitKeepsBigHolesOpen) {
  // A 1-GPU job goes to the worker with fewer free GPUs, leaving 4 for a later 4-GPU job.
  auto r = Schedule({Gpu("one", 1, 0, 1), Gpu("four", 4, 0, 2)},
                    {GpuWorker("big", 4, {0, 1, 2, 3}), GpuWorker("small", 2, {0, 1})});
  auto placed = ByJob(r);
  ASSERT_EQ(placed.size(), 2u);
  EXPECT_EQ(placed["one"].worker, "small");
  EXPECT_EQ(placed["four"].worker, "big");
  EXPECT_EQ(placed["four"].devices, std::vector<int>({0, 1, 2, 3}));
}

TEST(SchedulerTest, DisconnectedWorkerCountsForCapacityButGetsNothing) {
  WorkerCapacity away = CpuWorker("away", 8, {0, 1, 2, 3, 4, 5, 6, 7});
  away.accepting = false;
  auto r = Schedule({Cpu("c", 4, 0, 1)}, {away, CpuWorker("tiny", 2, {0, 1})});
  EXPECT_TRUE(r.placements.empty());
  EXPECT_NE(r.pending_reasons.at("c").find("waiting for 4 free CPU slots"), std::string::npos)
      << r.pending_reasons.at("c");
}

TEST(SchedulerTest, JobAskingForNothingIsReported) {
  QueuedJob j;
  j.id = "none";
  auto r = Schedule({j}, {CpuWorker("w", 2, {0, 1})});
  EXPECT_TRUE(r.placements.empty());
  EXPECT_NE(r.pending_reasons.at("none").find("no devices"), std::string::npos);
}

}  // namespace
}  // namespace tune::server
