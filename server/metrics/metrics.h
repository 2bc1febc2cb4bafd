// Every Prometheus metric family of tune-server, declared in one place. The
// names and labels are the contract with deploy/grafana and deploy/prometheus
// (DESIGN.md, Metrics); tests/integration/observability checks that every
// PromQL expression there finds a series.
//
// Families (all declared in the constructor, nowhere else):
//   tune_jobs{state}                      gauge, one series per JobState name
//   tune_queue_depth                      gauge
//   tune_workers{state}                   gauge, READY / LOST
//   tune_job_step{job}                    gauge, latest rank-0 step
//   tune_job_loss{job}                    gauge
//   tune_job_grad_norm{job}               gauge
//   tune_job_learning_rate{job}           gauge
//   tune_job_tokens_per_second{job}       gauge
//   tune_nan_alerts_total{job}            counter
//   tune_oom_recoveries_total{job}        counter
//   tune_gpu_memory_bytes{worker,gpu,kind} gauge; gpu is the GPU index or
//                                         "cpu"; kind is allocated|reserved|peak|total
//   tune_scheduling_latency_seconds       histogram, QUEUED -> SCHEDULED
//   tune_grpc_requests_total{method,code} counter
//
// Bounded cardinality: a job's series (the {job} families) exist from its
// first reported number until `retention` after JobFinished(job); the next
// sweep then removes them. Sweeps run on every scrape (through
// collectable()) and on JobFinished, so no timer thread is needed.
//
// Thread-safe.
#ifndef TUNE_SERVER_METRICS_METRICS_H_
#define TUNE_SERVER_METRICS_METRICS_H_

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace tune::server {

struct ServerMetricsOptions {
  // How long a finished job's series stay visible (so dashboards show how it
  // ended) before they are removed. Zero removes them at the next sweep.
  absl::Duration retention = absl::Hours(1);
  // Clock; tests substitute a fake one.
  std::function<absl::Time()> clock = [] { return absl::Now(); };
};

class ServerMetrics {
 public:
  // The kind label values of tune_gpu_memory_bytes.
  static constexpr const char* kAllocated = "allocated";
  static constexpr const char* kReserved = "reserved";
  static constexpr const char* kPeak = "peak";
  static constexpr const char* kTotal = "total";
  // The gpu label of ranks that run on the CPU.
  static constexpr const char* kCpuDevice = "cpu";

  // Upper bounds (seconds) of tune_scheduling_latency_seconds: 10 ms to
  // 10 min in roughly 1-2.5-5 steps, so both "instant" placement and a
  // queue that waits for a GPU to free up are resolved.
  static const std::vector<double>& SchedulingLatencyBuckets();

  explicit ServerMetrics(ServerMetricsOptions options = {});

  // The registry holding every family (for tests that inspect it directly).
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }
  // What the HTTP exposer serves: the registry, swept of expired jobs first.
  // It refers to this object: unregister it (or destroy the exposer) first.
  std::shared_ptr<prometheus::Collectable> collectable() const { return collectable_; }

  // tune_jobs{state}: `counts` maps "QUEUED", "RUNNING", ... to job counts;
  // states missing from the map are set to 0.
  void SetJobCounts(const std::map<std::string, int>& counts);
  // tune_queue_depth.
  void SetQueueDepth(int depth);
  // tune_workers{state}: "READY" / "LOST" counts.
  void SetWorkerCounts(int ready, int lost);
  // From a rank-0 `step` event: tune_job_step, tune_job_loss, tune_job_grad_norm,
  // tune_job_learning_rate, tune_job_tokens_per_second. Also creates the
  // job's counters at 0 if JobStarted was not called.
  void RecordStep(const std::string& job, double step, double loss, double grad_norm, double lr,
                  double tokens_per_s);
  // Creates the job's counters at 0 (called when the job is scheduled), so
  // that Prometheus sees 0 before the first increment and `increase()` can
  // report it; a series born at 1 looks unchanged.
  void JobStarted(const std::string& job);
  // tune_nan_alerts_total{job} / tune_oom_recoveries_total{job}.
  void IncNanAlerts(const std::string& job);
  void IncOomRecoveries(const std::string& job);
  // tune_gpu_memory_bytes{worker,gpu,kind}; `gpu` is a GPU index as text or
  // kCpuDevice; `kind` is one of kAllocated, kReserved, kPeak, kTotal.
  void SetGpuMemory(const std::string& worker, const std::string& gpu, const std::string& kind,
                    double bytes);
  void SetGpuMemory(const std::string& worker, int gpu, const std::string& kind, double bytes) {
    SetGpuMemory(worker, std::to_string(gpu), kind, bytes);
  }
  // tune_scheduling_latency_seconds: time from QUEUED to SCHEDULED.
  void ObserveSchedulingLatency(double seconds);
  // tune_grpc_requests_total{method,code}.
  void CountGrpcRequest(const std::string& method, const std::string& code);
  // Marks the job finished (idempotent: the first call starts the retention
  // window); its series are removed by the first sweep after the window.
  void JobFinished(const std::string& job);
  // Removes the series of jobs finished more than `retention` ago. Called on
  // every scrape; public for tests and callers without an exposer.
  void Sweep();

 private:
  void SweepLocked(absl::Time now);
  void DropJobLocked(const std::string& job);
  void TouchJobLocked(const std::string& job);

  const ServerMetricsOptions options_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> collectable_;
  prometheus::Family<prometheus::Gauge>& jobs_;
  prometheus::Family<prometheus::Gauge>& queue_depth_;
  prometheus::Family<prometheus::Gauge>& workers_;
  prometheus::Family<prometheus::Gauge>& job_loss_;
  prometheus::Family<prometheus::Gauge>& job_grad_norm_;
  prometheus::Family<prometheus::Gauge>& job_lr_;
  prometheus::Family<prometheus::Gauge>& job_tokens_per_s_;
  prometheus::Family<prometheus::Gauge>& job_step_;
  prometheus::Family<prometheus::Counter>& nan_alerts_;
  prometheus::Family<prometheus::Counter>& oom_recoveries_;
  prometheus::Family<prometheus::Gauge>& gpu_memory_;
  prometheus::Family<prometheus::Histogram>& scheduling_latency_;
  prometheus::Family<prometheus::Counter>& grpc_requests_;
  prometheus::Histogram* scheduling_latency_hist_;

  std::mutex mu_;
  // Finished jobs -> when they finished.
  std::map<std::string, absl::Time> finished_;
};

}  // namespace tune::server

#endif  // TUNE_SERVER_METRICS_METRICS_H_
