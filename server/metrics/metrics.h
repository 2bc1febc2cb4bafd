// Every Prometheus metric family of tune-server, declared in one place. The
// names are the contract with the dashboards in deploy/ (DESIGN.md, Metrics).
// Thread-safe. Per-job series are dropped some time after the job ends so the
// number of series stays bounded (the newest kKeepFinishedJobs are kept).
#ifndef TUNE_SERVER_METRICS_METRICS_H_
#define TUNE_SERVER_METRICS_METRICS_H_

#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace tune::server {

class ServerMetrics {
 public:
  static constexpr size_t kKeepFinishedJobs = 50;

  ServerMetrics();
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // tune_jobs{state}: `counts` maps "QUEUED", "RUNNING", ... to job counts;
  // states missing from the map are set to 0.
  void SetJobCounts(const std::map<std::string, int>& counts);
  // tune_queue_depth.
  void SetQueueDepth(int depth);
  // tune_workers{state}: "READY" / "LOST" counts.
  void SetWorkerCounts(int ready, int lost);
  // From a rank-0 `step` event: tune_job_step, tune_job_loss, tune_job_grad_norm,
  // tune_job_learning_rate, tune_job_tokens_per_second.
  void RecordStep(const std::string& job, double step, double loss, double grad_norm, double lr,
                  double tokens_per_s);
  // tune_nan_alerts_total{job} / tune_oom_recoveries_total{job}.
  void IncNanAlerts(const std::string& job);
  void IncOomRecoveries(const std::string& job);
  // tune_gpu_memory_bytes{worker,gpu,kind}; kind is allocated|reserved|peak|total.
  void SetGpuMemory(const std::string& worker, int gpu, const std::string& kind, double bytes);
  // tune_scheduling_latency_seconds: time from QUEUED to SCHEDULED.
  void ObserveSchedulingLatency(double seconds);
  // tune_grpc_requests_total{method,code}.
  void CountGrpcRequest(const std::string& method, const std::string& code);
  // Marks the job finished; its series go away once kKeepFinishedJobs newer
  // jobs finished.
  void JobFinished(const std::string& job);

 private:
  void DropJobLocked(const std::string& job);

  std::shared_ptr<prometheus::Registry> registry_;
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
  std::deque<std::string> finished_;
};

}  // namespace tune::server

#endif  // TUNE_SERVER_METRICS_METRICS_H_
