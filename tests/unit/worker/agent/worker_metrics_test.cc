// tune-worker's metric families: names, label sets, values following
// Update(), stale device series removed, refresh on every collect, and the
// GPU/host readings -> device series mapping.
#include "worker/agent/worker_metrics.h"

#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <prometheus/text_serializer.h>

namespace tune::worker {
namespace {

// "name{k=v,...}" -> value for every gauge series of a collection.
std::map<std::string, double> Series(const std::vector<prometheus::MetricFamily>& families) {
  std::map<std::string, double> out;
  for (const prometheus::MetricFamily& f : families) {
    EXPECT_EQ(f.type, prometheus::MetricType::Gauge) << f.name;
    for (const prometheus::ClientMetric& m : f.metric) {
      std::string key = f.name + "{";
      for (size_t i = 0; i < m.label.size(); ++i) {
        key += (i ? "," : "") + m.label[i].name + "=" + m.label[i].value;
      }
      out[key + "}"] = m.gauge.value;
    }
  }
  return out;
}

std::map<std::string, double> Series(const WorkerMetrics& metrics) {
  return Series(metrics.registry()->Collect());
}

TEST(WorkerMetricsTest, HealthSeriesExistFromTheStart) {
  WorkerMetrics metrics("w1");
  const std::map<std::string, double> s = Series(metrics);
  const std::map<std::string, double> expected = {
      {"tune_worker_connected{worker=w1}", 0},
      {"tune_worker_ranks_running{worker=w1}", 0},
      {"tune_worker_outbox_events{worker=w1}", 0},
      {"tune_worker_slots{device=cpu,state=busy,worker=w1}", 0},
      {"tune_worker_slots{device=cpu,state=free,worker=w1}", 0},
      {"tune_worker_slots{device=gpu,state=busy,worker=w1}", 0},
      {"tune_worker_slots{device=gpu,state=free,worker=w1}", 0},
  };
  EXPECT_EQ(s, expected);
  // Every family is declared with HELP; the registry leaves families without
  // series out of a scrape, so the device ones show once a device is known.
  WorkerSnapshot snap;
  snap.devices = {{"cpu", 1, 2, 0.5}};
  metrics.Update(snap);
  std::vector<std::string> names;
  for (const auto& f : metrics.registry()->Collect()) {
    names.push_back(f.name);
    EXPECT_FALSE(f.help.empty()) << f.name;
  }
  EXPECT_EQ(names, (std::vector<std::string>{
                       "tune_worker_gpu_memory_bytes", "tune_worker_gpu_utilization_ratio",
                       "tune_worker_connected", "tune_worker_slots", "tune_worker_ranks_running",
                       "tune_worker_outbox_events"}));
}

TEST(WorkerMetricsTest, UpdateSetsEveryFamilyWithItsLabels) {
  WorkerMetrics metrics("gpu-host-1");
  WorkerSnapshot snap;
  snap.health = {true, 1, 2, 0, 0, 2, 17};
  snap.devices = {
      {"0", 1000, 8000, 0.25},
      {"1", std::nullopt, 8000, std::nullopt},  // NVML gave neither
  };
  metrics.Update(snap);
  std::map<std::string, double> s = Series(metrics);
  EXPECT_EQ(s["tune_worker_connected{worker=gpu-host-1}"], 1);
  EXPECT_EQ(s["tune_worker_slots{device=gpu,state=free,worker=gpu-host-1}"], 1);
  EXPECT_EQ(s["tune_worker_slots{device=gpu,state=busy,worker=gpu-host-1}"], 2);
  EXPECT_EQ(s["tune_worker_ranks_running{worker=gpu-host-1}"], 2);
  EXPECT_EQ(s["tune_worker_outbox_events{worker=gpu-host-1}"], 17);
  EXPECT_EQ(s.at("tune_worker_gpu_memory_bytes{gpu=0,kind=used,worker=gpu-host-1}"), 1000);
  EXPECT_EQ(s.at("tune_worker_gpu_memory_bytes{gpu=0,kind=total,worker=gpu-host-1}"), 8000);
  EXPECT_EQ(s.at("tune_worker_gpu_utilization_ratio{gpu=0,worker=gpu-host-1}"), 0.25);
  EXPECT_EQ(s.at("tune_worker_gpu_memory_bytes{gpu=1,kind=total,worker=gpu-host-1}"), 8000);
  EXPECT_EQ(s.count("tune_worker_gpu_memory_bytes{gpu=1,kind=used,worker=gpu-host-1}"), 0u);
  EXPECT_EQ(s.count("tune_worker_gpu_utilization_ratio{gpu=1,worker=gpu-host-1}"), 0u);

  // The next update changes values and removes what is no longer known.
  snap.health.connected = false;
  snap.health.outbox_events = 0;
  snap.devices = {{"0", 3000, 8000, std::nullopt}};
  metrics.Update(snap);
  s = Series(metrics);
  EXPECT_EQ(s["tune_worker_connected{worker=gpu-host-1}"], 0);
  EXPECT_EQ(s["tune_worker_outbox_events{worker=gpu-host-1}"], 0);
  EXPECT_EQ(s.at("tune_worker_gpu_memory_bytes{gpu=0,kind=used,worker=gpu-host-1}"), 3000);
  EXPECT_EQ(s.count("tune_worker_gpu_utilization_ratio{gpu=0,worker=gpu-host-1}"), 0u);
  EXPECT_EQ(s.count("tune_worker_gpu_memory_bytes{gpu=1,kind=total,worker=gpu-host-1}"), 0u);

  // And brings a series back when the number returns.
  snap.devices = {{"0", 3000, 8000, 0.5}};
  metrics.Update(snap);
  EXPECT_EQ(Series(metrics).at("tune_worker_gpu_utilization_ratio{gpu=0,worker=gpu-host-1}"), 0.5);
}

TEST(WorkerMetricsTest, CollectableRefreshesOnEveryScrape) {
  int calls = 0;
  WorkerMetrics metrics("w", [&] {
    ++calls;
    WorkerSnapshot snap;
    snap.health.ranks_running = calls;
    snap.devices = {{WorkerMetrics::kCpuDevice, 100 * calls, 1000, 0.1 * calls}};
    return snap;
  });
  EXPECT_EQ(calls, 0);  // nothing runs until someone scrapes
  std::map<std::string, double> s = Series(metrics.collectable()->Collect());
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(s["tune_worker_ranks_running{worker=w}"], 1);
  EXPECT_EQ(s.at("tune_worker_gpu_memory_bytes{gpu=cpu,kind=used,worker=w}"), 100);
  s = Series(metrics.collectable()->Collect());
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(s["tune_worker_ranks_running{worker=w}"], 2);
  EXPECT_EQ(s.at("tune_worker_gpu_memory_bytes{gpu=cpu,kind=used,worker=w}"), 200);
  EXPECT_DOUBLE_EQ(s.at("tune_worker_gpu_utilization_ratio{gpu=cpu,worker=w}"), 0.2);

  // The exposition text Prometheus gets.
  const std::string text =
      prometheus::TextSerializer().Serialize(metrics.collectable()->Collect());
  EXPECT_NE(text.find("# TYPE tune_worker_gpu_memory_bytes gauge"), std::string::npos) << text;
  EXPECT_NE(text.find("tune_worker_gpu_memory_bytes{gpu=\"cpu\",kind=\"total\",worker=\"w\"} 1000"),
            std::string::npos)
      << text;
}

TEST(DeviceSamplesTest, GpusThenHostWithUnknownsLeftOut) {
  GpuReading a;
  a.index = 0;
  a.memory_total_bytes = 80;
  a.memory_used_bytes = 20;
  a.utilization_percent = 37;
  GpuReading b;
  b.index = 3;
  b.memory_total_bytes = 80;
  b.memory_used_known = false;  // NVML error on this GPU, or no sample yet
  b.utilization_percent = -1;   // e.g. MIG
  HostSampler::Reading host;
  host.memory = HostMemory{1000, 250};
  std::vector<DeviceSample> d = DeviceSamples({a, b}, host);
  ASSERT_EQ(d.size(), 3u);
  EXPECT_EQ(d[0].gpu, "0");
  EXPECT_EQ(d[0].memory_used_bytes, 20);
  EXPECT_EQ(d[0].memory_total_bytes, 80);
  ASSERT_TRUE(d[0].utilization.has_value());
  EXPECT_DOUBLE_EQ(*d[0].utilization, 0.37);
  EXPECT_EQ(d[1].gpu, "3");
  EXPECT_FALSE(d[1].memory_used_bytes.has_value());
  EXPECT_EQ(d[1].memory_total_bytes, 80);
  EXPECT_FALSE(d[1].utilization.has_value());
  EXPECT_EQ(d[2].gpu, "cpu");
  EXPECT_EQ(d[2].memory_used_bytes, 750);
  EXPECT_EQ(d[2].memory_total_bytes, 1000);
  EXPECT_FALSE(d[2].utilization.has_value());  // first reading: no interval yet

  // No CPU slots offered: no "cpu" device.
  EXPECT_EQ(DeviceSamples({a}, std::nullopt).size(), 1u);
  EXPECT_TRUE(DeviceSamples({}, std::nullopt).empty());
}

}  // namespace
}  // namespace tune::worker
