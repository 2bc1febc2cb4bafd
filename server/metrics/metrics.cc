#include "server/metrics/metrics.h"

#include <utility>

namespace tune::server {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

namespace {

const char* const kJobStates[] = {"QUEUED",    "SCHEDULED", "RUNNING",
                                  "SUCCEEDED", "FAILED",    "CANCELLED"};

// Serves the registry, sweeping expired jobs first so a scrape never shows
// a job past its retention window even when nothing else happened since.
class SweepingCollectable : public prometheus::Collectable {
 public:
  SweepingCollectable(ServerMetrics* metrics, std::shared_ptr<prometheus::Registry> registry)
      : metrics_(metrics), registry_(std::move(registry)) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    metrics_->Sweep();
    return registry_->Collect();
  }

 private:
  ServerMetrics* const metrics_;
  const std::shared_ptr<prometheus::Registry> registry_;
};

template <typename T>
void RemoveIfPresent(prometheus::Family<T>& family, const prometheus::Labels& labels) {
  if (family.Has(labels)) family.Remove(&family.Add(labels));
}

}  // namespace

const std::vector<double>& ServerMetrics::SchedulingLatencyBuckets() {
  static const std::vector<double> kBuckets = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,   2.5,
                                               5,    10,    30,   60,  120,  300, 600};
  return kBuckets;
}

ServerMetrics::ServerMetrics(ServerMetricsOptions options)
    : options_(std::move(options)),
      registry_(std::make_shared<prometheus::Registry>()),
      jobs_(BuildGauge().Name("tune_jobs").Help("Jobs by state.").Register(*registry_)),
      queue_depth_(BuildGauge()
                       .Name("tune_queue_depth")
                       .Help("Jobs waiting for devices (QUEUED).")
                       .Register(*registry_)),
      workers_(BuildGauge().Name("tune_workers").Help("Workers by state.").Register(*registry_)),
      job_loss_(BuildGauge()
                    .Name("tune_job_loss")
                    .Help("Training loss at the job's latest step.")
                    .Register(*registry_)),
      job_grad_norm_(BuildGauge()
                         .Name("tune_job_grad_norm")
                         .Help("Gradient norm (before clipping) at the latest step.")
                         .Register(*registry_)),
      job_lr_(BuildGauge()
                  .Name("tune_job_learning_rate")
                  .Help("Learning rate at the latest step.")
                  .Register(*registry_)),
      job_tokens_per_s_(BuildGauge()
                            .Name("tune_job_tokens_per_second")
                            .Help("Supervised tokens per second at the latest step.")
                            .Register(*registry_)),
      job_step_(BuildGauge()
                    .Name("tune_job_step")
                    .Help("Latest optimizer step of the job.")
                    .Register(*registry_)),
      nan_alerts_(BuildCounter()
                      .Name("tune_nan_alerts_total")
                      .Help("Steps with non-finite loss or gradients.")
                      .Register(*registry_)),
      oom_recoveries_(BuildCounter()
                          .Name("tune_oom_recoveries_total")
                          .Help("CUDA out-of-memory errors absorbed by re-planning.")
                          .Register(*registry_)),
      gpu_memory_(BuildGauge()
                      .Name("tune_gpu_memory_bytes")
                      .Help("Device memory by worker, GPU index (or \"cpu\") and kind "
                            "(allocated|reserved|peak|total).")
                      .Register(*registry_)),
      scheduling_latency_(BuildHistogram()
                              .Name("tune_scheduling_latency_seconds")
                              .Help("Time from QUEUED to SCHEDULED.")
                              .Register(*registry_)),
      grpc_requests_(BuildCounter()
                         .Name("tune_grpc_requests_total")
                         .Help("gRPC requests by method and status code.")
                         .Register(*registry_)) {
  collectable_ = std::make_shared<SweepingCollectable>(this, registry_);
  scheduling_latency_hist_ = &scheduling_latency_.Add({}, SchedulingLatencyBuckets());
  for (const char* s : kJobStates) jobs_.Add({{"state", s}}).Set(0);
  queue_depth_.Add({}).Set(0);
  workers_.Add({{"state", "READY"}}).Set(0);
  workers_.Add({{"state", "LOST"}}).Set(0);
}

void ServerMetrics::SetJobCounts(const std::map<std::string, int>& counts) {
  for (const char* s : kJobStates) {
    auto it = counts.find(s);
    jobs_.Add({{"state", s}}).Set(it == counts.end() ? 0 : it->second);
  }
}

void ServerMetrics::SetQueueDepth(int depth) { queue_depth_.Add({}).Set(depth); }

void ServerMetrics::SetWorkerCounts(int ready, int lost) {
  workers_.Add({{"state", "READY"}}).Set(ready);
  workers_.Add({{"state", "LOST"}}).Set(lost);
}

void ServerMetrics::TouchJobLocked(const std::string& job) {
  // Counters start at 0 with the job: a series that appears only at its
  // first increment hides that increment from rate()/increase().
  nan_alerts_.Add({{"job", job}});
  oom_recoveries_.Add({{"job", job}});
}

void ServerMetrics::JobStarted(const std::string& job) {
  std::lock_guard<std::mutex> lock(mu_);
  TouchJobLocked(job);
}

void ServerMetrics::RecordStep(const std::string& job, double step, double loss,
                               double grad_norm, double lr, double tokens_per_s) {
  std::lock_guard<std::mutex> lock(mu_);
  TouchJobLocked(job);
  job_step_.Add({{"job", job}}).Set(step);
  job_loss_.Add({{"job", job}}).Set(loss);
  job_grad_norm_.Add({{"job", job}}).Set(grad_norm);
  job_lr_.Add({{"job", job}}).Set(lr);
  job_tokens_per_s_.Add({{"job", job}}).Set(tokens_per_s);
}

void ServerMetrics::IncNanAlerts(const std::string& job) {
  std::lock_guard<std::mutex> lock(mu_);
  TouchJobLocked(job);
  nan_alerts_.Add({{"job", job}}).Increment();
}

void ServerMetrics::IncOomRecoveries(const std::string& job) {
  std::lock_guard<std::mutex> lock(mu_);
  TouchJobLocked(job);
  oom_recoveries_.Add({{"job", job}}).Increment();
}

void ServerMetrics::SetGpuMemory(const std::string& worker, const std::string& gpu,
                                 const std::string& kind, double bytes) {
  gpu_memory_.Add({{"worker", worker}, {"gpu", gpu}, {"kind", kind}}).Set(bytes);
}

void ServerMetrics::ObserveSchedulingLatency(double seconds) {
  scheduling_latency_hist_->Observe(seconds);
}

void ServerMetrics::CountGrpcRequest(const std::string& method, const std::string& code) {
  grpc_requests_.Add({{"method", method}, {"code", code}}).Increment();
}

void ServerMetrics::JobFinished(const std::string& job) {
  std::lock_guard<std::mutex> lock(mu_);
  const absl::Time now = options_.clock();
  finished_.emplace(job, now);  // Keeps the first finish time.
  SweepLocked(now);
}

void ServerMetrics::Sweep() {
  std::lock_guard<std::mutex> lock(mu_);
  SweepLocked(options_.clock());
}

void ServerMetrics::SweepLocked(absl::Time now) {
  for (auto it = finished_.begin(); it != finished_.end();) {
    if (now - it->second >= options_.retention) {
      DropJobLocked(it->first);
      it = finished_.erase(it);
    } else {
      ++it;
    }
  }
}

void ServerMetrics::DropJobLocked(const std::string& job) {
  const prometheus::Labels labels{{"job", job}};
  for (auto* family : {&job_loss_, &job_grad_norm_, &job_lr_, &job_tokens_per_s_, &job_step_}) {
    RemoveIfPresent(*family, labels);
  }
  for (auto* family : {&nan_alerts_, &oom_recoveries_}) RemoveIfPresent(*family, labels);
}

}  // namespace tune::server
