// Unit tests of tune-server's metric definitions (server/metrics): the names
// and label sets the dashboards rely on, the scheduling-latency buckets, and
// removal of a finished job's series after the retention window.
#include "server/metrics/metrics.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

namespace tune::server {
namespace {

using prometheus::MetricFamily;
using prometheus::MetricType;

class FakeClock {
 public:
  absl::Time Now() const { return now_; }
  void Advance(absl::Duration d) { now_ += d; }

 private:
  absl::Time now_ = absl::FromUnixSeconds(1'800'000'000);
};

ServerMetricsOptions WithClock(FakeClock* clock, absl::Duration retention) {
  ServerMetricsOptions o;
  o.retention = retention;
  o.clock = [clock] { return clock->Now(); };
  return o;
}

std::vector<MetricFamily> Scrape(const ServerMetrics& m) { return m.collectable()->Collect(); }

const MetricFamily* Find(const std::vector<MetricFamily>& families, const std::string& name) {
  for (const auto& f : families) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

// Label names of every series of a family, e.g. {"job"} or {"gpu","kind","worker"}.
std::set<std::set<std::string>> LabelNameSets(const MetricFamily& f) {
  std::set<std::set<std::string>> out;
  for (const auto& m : f.metric) {
    std::set<std::string> names;
    for (const auto& l : m.label) names.insert(l.name);
    out.insert(names);
  }
  return out;
}

// Value of the series of `family` whose labels are exactly `labels`; NaN when
// there is none.
double Value(const std::vector<MetricFamily>& families, const std::string& family,
             const std::map<std::string, std::string>& labels) {
  const MetricFamily* f = Find(families, family);
  if (f == nullptr) return std::nan("");
  for (const auto& m : f->metric) {
    std::map<std::string, std::string> got;
    for (const auto& l : m.label) got[l.name] = l.value;
    if (got != labels) continue;
    switch (f->type) {
      case MetricType::Gauge:
        return m.gauge.value;
      case MetricType::Counter:
        return m.counter.value;
      default:
        return std::nan("");
    }
  }
  return std::nan("");
}

size_t SeriesWithLabel(const std::vector<MetricFamily>& families, const std::string& name,
                       const std::string& value) {
  size_t n = 0;
  for (const auto& f : families) {
    for (const auto& m : f.metric) {
      for (const auto& l : m.label) n += (l.name == name && l.value == value);
    }
  }
  return n;
}

TEST(ServerMetricsTest, DeclaresEveryDesignFamilyWithItsType) {
  ServerMetrics m;
  m.RecordStep("j1", 1, 2.5, 0.5, 1e-4, 100);
  m.SetGpuMemory("w1", 0, ServerMetrics::kTotal, 80e9);
  m.CountGrpcRequest("/tune.v1.JobService/SubmitJob", "OK");
  const auto families = Scrape(m);
  const std::map<std::string, MetricType> want = {
      {"tune_jobs", MetricType::Gauge},
      {"tune_queue_depth", MetricType::Gauge},
      {"tune_workers", MetricType::Gauge},
      {"tune_job_loss", MetricType::Gauge},
      {"tune_job_grad_norm", MetricType::Gauge},
      {"tune_job_learning_rate", MetricType::Gauge},
      {"tune_job_tokens_per_second", MetricType::Gauge},
      {"tune_job_step", MetricType::Gauge},
      {"tune_nan_alerts_total", MetricType::Counter},
      {"tune_oom_recoveries_total", MetricType::Counter},
      {"tune_gpu_memory_bytes", MetricType::Gauge},
      {"tune_scheduling_latency_seconds", MetricType::Histogram},
      {"tune_grpc_requests_total", MetricType::Counter},
  };
  for (const auto& [name, type] : want) {
    const MetricFamily* f = Find(families, name);
    ASSERT_NE(f, nullptr) << name << " is not registered";
    EXPECT_EQ(f->type, type) << name;
    EXPECT_FALSE(f->help.empty()) << name << " has no HELP text";
  }
  EXPECT_EQ(families.size(), want.size()) << "a family outside DESIGN.md's list";
}

TEST(ServerMetricsTest, LabelSets) {
  ServerMetrics m;
  m.SetJobCounts({{"RUNNING", 2}, {"QUEUED", 1}});
  m.SetQueueDepth(1);
  m.SetWorkerCounts(3, 1);
  m.RecordStep("j1", 7, 2.5, 0.5, 1e-4, 1234);
  m.IncNanAlerts("j1");
  m.IncOomRecoveries("j1");
  m.SetGpuMemory("w1", 3, ServerMetrics::kAllocated, 1e9);
  m.SetGpuMemory("w2", ServerMetrics::kCpuDevice, ServerMetrics::kPeak, 0);
  m.CountGrpcRequest("/tune.v1.JobService/GetJob", "NOT_FOUND");
  const auto f = Scrape(m);

  using Names = std::set<std::set<std::string>>;
  EXPECT_EQ(LabelNameSets(*Find(f, "tune_jobs")), Names({{"state"}}));
  EXPECT_EQ(LabelNameSets(*Find(f, "tune_queue_depth")), Names({{}}));
  EXPECT_EQ(LabelNameSets(*Find(f, "tune_workers")), Names({{"state"}}));
  for (const char* name : {"tune_job_loss", "tune_job_grad_norm", "tune_job_learning_rate",
                           "tune_job_tokens_per_second", "tune_job_step", "tune_nan_alerts_total",
                           "tune_oom_recoveries_total"}) {
    EXPECT_EQ(LabelNameSets(*Find(f, name)), Names({{"job"}})) << name;
  }
  EXPECT_EQ(LabelNameSets(*Find(f, "tune_gpu_memory_bytes")), Names({{"worker", "gpu", "kind"}}));
  EXPECT_EQ(LabelNameSets(*Find(f, "tune_grpc_requests_total")), Names({{"method", "code"}}));
  EXPECT_EQ(LabelNameSets(*Find(f, "tune_scheduling_latency_seconds")), Names({{}}));

  // Every job state has a series (0 when absent), so "no FAILED jobs" is a 0,
  // not a missing series.
  EXPECT_EQ(Find(f, "tune_jobs")->metric.size(), 6u);
  EXPECT_EQ(Value(f, "tune_jobs", {{"state", "RUNNING"}}), 2);
  EXPECT_EQ(Value(f, "tune_jobs", {{"state", "QUEUED"}}), 1);
  EXPECT_EQ(Value(f, "tune_jobs", {{"state", "FAILED"}}), 0);
  EXPECT_EQ(Value(f, "tune_workers", {{"state", "READY"}}), 3);
  EXPECT_EQ(Value(f, "tune_workers", {{"state", "LOST"}}), 1);
  EXPECT_EQ(Value(f, "tune_job_step", {{"job", "j1"}}), 7);
  EXPECT_EQ(Value(f, "tune_job_loss", {{"job", "j1"}}), 2.5);
  EXPECT_EQ(Value(f, "tune_job_learning_rate", {{"job", "j1"}}), 1e-4);
  EXPECT_EQ(Value(f, "tune_job_tokens_per_second", {{"job", "j1"}}), 1234);
  EXPECT_EQ(Value(f, "tune_nan_alerts_total", {{"job", "j1"}}), 1);
  EXPECT_EQ(Value(f, "tune_gpu_memory_bytes", {{"worker", "w1"}, {"gpu", "3"}, {"kind", "allocated"}}),
            1e9);
  EXPECT_EQ(Value(f, "tune_gpu_memory_bytes", {{"worker", "w2"}, {"gpu", "cpu"}, {"kind", "peak"}}),
            0);
  EXPECT_EQ(Value(f, "tune_grpc_requests_total",
                  {{"method", "/tune.v1.JobService/GetJob"}, {"code", "NOT_FOUND"}}),
            1);
}

TEST(ServerMetricsTest, JobCountersExistAtZeroFromTheFirstStep) {
  ServerMetrics m;
  m.RecordStep("j1", 1, 3, 1, 1e-4, 10);
  const auto f = Scrape(m);
  EXPECT_EQ(Value(f, "tune_nan_alerts_total", {{"job", "j1"}}), 0);
  EXPECT_EQ(Value(f, "tune_oom_recoveries_total", {{"job", "j1"}}), 0);
}

TEST(ServerMetricsTest, JobStartedCreatesOnlyTheCountersAtZero) {
  ServerMetrics m;
  m.JobStarted("j2");
  const auto f = Scrape(m);
  EXPECT_EQ(Value(f, "tune_nan_alerts_total", {{"job", "j2"}}), 0);
  EXPECT_EQ(Value(f, "tune_oom_recoveries_total", {{"job", "j2"}}), 0);
  // No made-up loss or step before the trainer reports one.
  EXPECT_EQ(SeriesWithLabel(f, "job", "j2"), 2u);
}

TEST(ServerMetricsTest, NonFiniteLossIsExposedAsNaN) {
  ServerMetrics m;
  m.RecordStep("j1", 4, std::nan(""), std::nan(""), 1e-4, 10);
  const std::string text = prometheus::TextSerializer().Serialize(Scrape(m));
  const std::string key = "tune_job_loss{job=\"j1\"} ";
  const size_t at = text.find(key);
  ASSERT_NE(at, std::string::npos) << text;
  std::string value = text.substr(at + key.size(), 3);
  std::transform(value.begin(), value.end(), value.begin(), ::tolower);
  EXPECT_EQ(value, "nan") << text;  // The exposition format's NaN, any case.
}

TEST(ServerMetricsTest, SchedulingLatencyBucketsCoverTenMillisecondsToTenMinutes) {
  const auto& b = ServerMetrics::SchedulingLatencyBuckets();
  ASSERT_FALSE(b.empty());
  EXPECT_DOUBLE_EQ(b.front(), 0.01);
  EXPECT_DOUBLE_EQ(b.back(), 600);
  EXPECT_TRUE(std::is_sorted(b.begin(), b.end()));
  EXPECT_EQ(std::adjacent_find(b.begin(), b.end()), b.end()) << "duplicate bound";
  // No gap wider than a factor 3: quantiles stay meaningful across the range.
  for (size_t i = 1; i < b.size(); ++i) EXPECT_LE(b[i] / b[i - 1], 3.0) << b[i];

  ServerMetrics m;
  for (double s : {0.005, 0.02, 0.7, 45.0, 599.0, 3600.0}) m.ObserveSchedulingLatency(s);
  const auto f = Scrape(m);
  const MetricFamily* h = Find(f, "tune_scheduling_latency_seconds");
  ASSERT_NE(h, nullptr);
  ASSERT_EQ(h->metric.size(), 1u);
  const auto& hist = h->metric[0].histogram;
  EXPECT_EQ(hist.sample_count, 6u);
  EXPECT_DOUBLE_EQ(hist.sample_sum, 0.005 + 0.02 + 0.7 + 45.0 + 599.0 + 3600.0);
  // prometheus-cpp exposes the bounds plus +Inf, with cumulative counts.
  ASSERT_EQ(hist.bucket.size(), b.size() + 1);
  std::map<double, uint64_t> cumulative;
  for (const auto& bucket : hist.bucket) cumulative[bucket.upper_bound] = bucket.cumulative_count;
  EXPECT_EQ(cumulative[0.01], 1u);
  EXPECT_EQ(cumulative[0.025], 2u);
  EXPECT_EQ(cumulative[1], 3u);
  EXPECT_EQ(cumulative[60], 4u);
  EXPECT_EQ(cumulative[600], 5u);
  EXPECT_EQ(cumulative[std::numeric_limits<double>::infinity()], 6u);
}

TEST(ServerMetricsTest, FinishedJobSeriesStayForTheRetentionWindowThenGo) {
  FakeClock clock;
  ServerMetrics m(WithClock(&clock, absl::Hours(1)));
  m.RecordStep("done", 10, 1.5, 0.2, 1e-5, 500);
  m.IncNanAlerts("done");
  m.RecordStep("running", 3, 2.0, 0.3, 1e-4, 400);
  m.SetGpuMemory("w1", 0, ServerMetrics::kTotal, 80e9);
  m.JobFinished("done");

  clock.Advance(absl::Minutes(59));
  auto f = Scrape(m);
  EXPECT_EQ(Value(f, "tune_job_loss", {{"job", "done"}}), 1.5) << "removed too early";
  EXPECT_EQ(Value(f, "tune_nan_alerts_total", {{"job", "done"}}), 1);

  // A second JobFinished (e.g. replayed) must not restart the window.
  m.JobFinished("done");
  clock.Advance(absl::Minutes(1));
  f = Scrape(m);
  EXPECT_EQ(SeriesWithLabel(f, "job", "done"), 0u) << "finished job still exposed";
  // Everything else stays.
  EXPECT_EQ(SeriesWithLabel(f, "job", "running"), 7u);
  EXPECT_EQ(Value(f, "tune_gpu_memory_bytes", {{"worker", "w1"}, {"gpu", "0"}, {"kind", "total"}}),
            80e9);
  EXPECT_EQ(Find(f, "tune_jobs")->metric.size(), 6u);
}

TEST(ServerMetricsTest, ExplicitSweepAndZeroRetention) {
  FakeClock clock;
  ServerMetrics m(WithClock(&clock, absl::ZeroDuration()));
  m.RecordStep("a", 1, 1, 1, 1, 1);
  m.JobFinished("a");  // Zero retention: gone at once.
  EXPECT_EQ(SeriesWithLabel(m.registry()->Collect(), "job", "a"), 0u);

  ServerMetrics m2(WithClock(&clock, absl::Seconds(30)));
  m2.RecordStep("b", 1, 1, 1, 1, 1);
  m2.JobFinished("b");
  clock.Advance(absl::Seconds(31));
  // The registry itself does not sweep; Sweep() (or a scrape) does.
  EXPECT_EQ(SeriesWithLabel(m2.registry()->Collect(), "job", "b"), 7u);
  m2.Sweep();
  EXPECT_EQ(SeriesWithLabel(m2.registry()->Collect(), "job", "b"), 0u);
}

TEST(ServerMetricsTest, TextExpositionIsWellFormed) {
  ServerMetrics m;
  m.RecordStep("j1", 1, 2, 3, 4, 5);
  m.ObserveSchedulingLatency(0.2);
  const std::string text = prometheus::TextSerializer().Serialize(Scrape(m));
  EXPECT_NE(text.find("# TYPE tune_scheduling_latency_seconds histogram"), std::string::npos);
  EXPECT_NE(text.find("tune_scheduling_latency_seconds_bucket{le=\"0.25\"} 1"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("# TYPE tune_nan_alerts_total counter"), std::string::npos);
}

}  // namespace
}  // namespace tune::server
