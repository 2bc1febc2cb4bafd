#include "worker/agent/worker_metrics.h"

#include <string>
#include <utility>

namespace tune::worker {

using prometheus::BuildGauge;

namespace {

// Serves the registry after refreshing it, so every scrape is current
// without a timer thread of its own.
class RefreshingCollectable : public prometheus::Collectable {
 public:
  RefreshingCollectable(WorkerMetrics* metrics, std::shared_ptr<prometheus::Registry> registry)
      : metrics_(metrics), registry_(std::move(registry)) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    metrics_->Refresh();
    return registry_->Collect();
  }

 private:
  WorkerMetrics* const metrics_;
  const std::shared_ptr<prometheus::Registry> registry_;
};

// Sets the series in `now`, removes those in `*present` but not in `now`.
void Reconcile(prometheus::Family<prometheus::Gauge>& family,
               const std::vector<std::pair<prometheus::Labels, double>>& now,
               std::set<prometheus::Labels>* present) {
  std::set<prometheus::Labels> next;
  for (const auto& [labels, value] : now) {
    family.Add(labels).Set(value);
    next.insert(labels);
  }
  for (const prometheus::Labels& labels : *present) {
    if (!next.count(labels) && family.Has(labels)) family.Remove(&family.Add(labels));
  }
  *present = std::move(next);
}

}  // namespace

std::vector<DeviceSample> DeviceSamples(const std::vector<GpuReading>& gpus,
                                        const std::optional<HostSampler::Reading>& host) {
  std::vector<DeviceSample> out;
  for (const GpuReading& g : gpus) {
    DeviceSample d;
    d.gpu = std::to_string(g.index);
    if (g.memory_used_known) d.memory_used_bytes = g.memory_used_bytes;
    if (g.memory_total_bytes > 0) d.memory_total_bytes = g.memory_total_bytes;
    if (g.utilization_percent >= 0) d.utilization = g.utilization_percent / 100.0;
    out.push_back(std::move(d));
  }
  if (host) {
    DeviceSample d;
    d.gpu = WorkerMetrics::kCpuDevice;
    if (host->memory) {
      d.memory_used_bytes = host->memory->used_bytes();
      d.memory_total_bytes = host->memory->total_bytes;
    }
    d.utilization = host->utilization;
    out.push_back(std::move(d));
  }
  return out;
}

WorkerMetrics::WorkerMetrics(std::string worker, std::function<WorkerSnapshot()> sample)
    : worker_(std::move(worker)),
      sample_(std::move(sample)),
      registry_(std::make_shared<prometheus::Registry>()),
      gpu_memory_(BuildGauge()
                      .Name("tune_worker_gpu_memory_bytes")
                      .Help("Device memory as the worker reads it, by GPU index (or \"cpu\": "
                            "host RAM of the CPU slots) and kind (used|total).")
                      .Register(*registry_)),
      gpu_utilization_(BuildGauge()
                           .Name("tune_worker_gpu_utilization_ratio")
                           .Help("Busy share of the device (NVML GPU utilisation; \"cpu\": "
                                 "all cores since the previous scrape), 0..1.")
                           .Register(*registry_)),
      connected_(BuildGauge()
                     .Name("tune_worker_connected")
                     .Help("1 while the worker's session to tune-server is up, else 0.")
                     .Register(*registry_)),
      slots_(BuildGauge()
                 .Name("tune_worker_slots")
                 .Help("Devices the worker offers, by device (gpu|cpu) and state (free|busy).")
                 .Register(*registry_)),
      ranks_running_(BuildGauge()
                         .Name("tune_worker_ranks_running")
                         .Help("tune-train ranks of the attempts running on this worker.")
                         .Register(*registry_)),
      outbox_events_(BuildGauge()
                         .Name("tune_worker_outbox_events")
                         .Help("Rank events held until tune-server acknowledges them.")
                         .Register(*registry_)) {
  collectable_ = std::make_shared<RefreshingCollectable>(this, registry_);
  Update(WorkerSnapshot{});
}

void WorkerMetrics::Refresh() {
  if (sample_) Update(sample_());
}

void WorkerMetrics::Update(const WorkerSnapshot& snapshot) {
  std::lock_guard<std::mutex> lock(mu_);
  const WorkerHealth& h = snapshot.health;
  connected_.Add({{"worker", worker_}}).Set(h.connected ? 1 : 0);
  slots_.Add({{"worker", worker_}, {"device", kGpuSlots}, {"state", kFree}}).Set(h.gpus_free);
  slots_.Add({{"worker", worker_}, {"device", kGpuSlots}, {"state", kBusy}}).Set(h.gpus_busy);
  slots_.Add({{"worker", worker_}, {"device", kCpuSlots}, {"state", kFree}})
      .Set(h.cpu_slots_free);
  slots_.Add({{"worker", worker_}, {"device", kCpuSlots}, {"state", kBusy}})
      .Set(h.cpu_slots_busy);
  ranks_running_.Add({{"worker", worker_}}).Set(h.ranks_running);
  outbox_events_.Add({{"worker", worker_}}).Set(static_cast<double>(h.outbox_events));

  std::vector<std::pair<prometheus::Labels, double>> memory, utilization;
  for (const DeviceSample& d : snapshot.devices) {
    if (d.memory_used_bytes) {
      memory.push_back({{{"worker", worker_}, {"gpu", d.gpu}, {"kind", kUsed}},
                        static_cast<double>(*d.memory_used_bytes)});
    }
    if (d.memory_total_bytes) {
      memory.push_back({{{"worker", worker_}, {"gpu", d.gpu}, {"kind", kTotal}},
                        static_cast<double>(*d.memory_total_bytes)});
    }
    if (d.utilization) {
      utilization.push_back({{{"worker", worker_}, {"gpu", d.gpu}}, *d.utilization});
    }
  }
  Reconcile(gpu_memory_, memory, &memory_series_);
  Reconcile(gpu_utilization_, utilization, &utilization_series_);
}

}  // namespace tune::worker
