// Every Prometheus metric family of tune-worker, declared in one place and
// served on `--metrics-listen` (Prometheus text format). The names and labels
// are the contract with deploy/grafana and deploy/prometheus;
// tests/integration/observability checks that every PromQL expression there
// finds a series from a real Prometheus scraping a worker.
//
// Families (all declared in the constructor, nowhere else); `worker` is the
// worker's --name, the same value tune-server puts in
// tune_gpu_memory_bytes{worker=...}:
//   tune_worker_gpu_memory_bytes{worker,gpu,kind}  gauge; kind is used|total
//   tune_worker_gpu_utilization_ratio{worker,gpu}  gauge, 0..1
//   tune_worker_connected{worker}                  gauge, 1 while the Session
//                                                  stream to tune-server is up
//   tune_worker_slots{worker,device,state}         gauge; device gpu|cpu,
//                                                  state free|busy
//   tune_worker_ranks_running{worker}              gauge, tune-train processes
//                                                  of running attempts
//   tune_worker_outbox_events{worker}              gauge, events not yet
//                                                  acknowledged by the server
//
// The `gpu` label: one value per device the worker offers. An offered GPU is
// its driver index ("0", "1", ...) with VRAM from NVML (or nvidia-smi) and
// NVML's GPU utilisation. When the worker offers CPU slots, the host is the
// device "cpu" (as tune-server labels CPU ranks): memory is host RAM
// (used = MemTotal - MemAvailable, total = MemTotal) and utilisation the
// share of busy jiffies of all cores since the previous scrape. So one panel
// shows VRAM on GPU workers and RAM on CPU workers; nothing is made up for a
// device that does not exist. A number the driver does not give (utilisation
// on MIG, an NVML error of one GPU) has no series rather than a fake 0.
// The four health families always have their series.
//
// Thread-safe.
#ifndef TUNE_WORKER_AGENT_WORKER_METRICS_H_
#define TUNE_WORKER_AGENT_WORKER_METRICS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <prometheus/collectable.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include "worker/agent/gpu_inventory.h"
#include "worker/agent/host_stats.h"

namespace tune::worker {

// One device as /metrics shows it. Unknown numbers leave their series out.
struct DeviceSample {
  std::string gpu;  // GPU index as text, or WorkerMetrics::kCpuDevice
  std::optional<int64_t> memory_used_bytes;
  std::optional<int64_t> memory_total_bytes;
  std::optional<double> utilization;  // 0..1
};

// The worker's own state, for the health families.
struct WorkerHealth {
  bool connected = false;
  int gpus_free = 0;
  int gpus_busy = 0;
  int cpu_slots_free = 0;
  int cpu_slots_busy = 0;
  int ranks_running = 0;
  int64_t outbox_events = 0;
};

struct WorkerSnapshot {
  WorkerHealth health;
  std::vector<DeviceSample> devices;
};

// The devices of a worker: each GPU of `gpus` (used memory only when
// memory_used_known, total when > 0, utilisation when the driver gave one),
// then the host as "cpu" when `host` is given (the worker offers CPU slots).
std::vector<DeviceSample> DeviceSamples(const std::vector<GpuReading>& gpus,
                                        const std::optional<HostSampler::Reading>& host);

class WorkerMetrics {
 public:
  // Label values.
  static constexpr const char* kUsed = "used";
  static constexpr const char* kTotal = "total";
  static constexpr const char* kCpuDevice = "cpu";
  static constexpr const char* kGpuSlots = "gpu";
  static constexpr const char* kCpuSlots = "cpu";
  static constexpr const char* kFree = "free";
  static constexpr const char* kBusy = "busy";

  // `sample` is called on every scrape (on the exposer's thread) and its
  // result applied with Update() before the registry is collected, so a
  // scrape shows the state of that moment. It must not block for long:
  // tune-worker passes numbers the heartbeat GPU sampler already holds.
  // Null: only Update() changes the values (tests).
  explicit WorkerMetrics(std::string worker, std::function<WorkerSnapshot()> sample = nullptr);

  // The registry holding every family (for tests that inspect it directly).
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }
  // What the HTTP exposer serves: sample(), Update(), then the registry. It
  // refers to this object: destroy the exposer first.
  std::shared_ptr<prometheus::Collectable> collectable() const { return collectable_; }

  // Sets every family from `snapshot`. Device series of a device or number
  // missing from `snapshot` are removed (a GPU whose NVML read failed
  // disappears until it reads again).
  void Update(const WorkerSnapshot& snapshot);
  // sample() then Update(); no-op without a sample function.
  void Refresh();

 private:
  const std::string worker_;
  const std::function<WorkerSnapshot()> sample_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> collectable_;
  prometheus::Family<prometheus::Gauge>& gpu_memory_;
  prometheus::Family<prometheus::Gauge>& gpu_utilization_;
  prometheus::Family<prometheus::Gauge>& connected_;
  prometheus::Family<prometheus::Gauge>& slots_;
  prometheus::Family<prometheus::Gauge>& ranks_running_;
  prometheus::Family<prometheus::Gauge>& outbox_events_;

  std::mutex mu_;
  // Label sets of the device series now present, to remove stale ones.
  std::set<prometheus::Labels> memory_series_;
  std::set<prometheus::Labels> utilization_series_;
};

}  // namespace tune::worker

#endif  // TUNE_WORKER_AGENT_WORKER_METRICS_H_
