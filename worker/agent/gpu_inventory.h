// GPU discovery and live numbers without libtorch or a CUDA toolkit: NVML
// through dlopen("libnvidia-ml.so.1") when the driver provides it, otherwise
// `nvidia-smi --query-gpu=...` parsed as CSV; no driver means no GPUs.
#ifndef TUNE_WORKER_AGENT_GPU_INVENTORY_H_
#define TUNE_WORKER_AGENT_GPU_INVENTORY_H_

#include <cstdint>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/agent/config.h"

namespace tune::worker {

// One GPU as the driver reports it. Indices are the driver's (PCI bus order),
// which CUDA uses as well once CUDA_DEVICE_ORDER=PCI_BUS_ID (the rank launcher
// sets it).
struct GpuReading {
  int index = 0;
  std::string name;
  std::string uuid;
  int64_t memory_total_bytes = 0;
  int64_t memory_used_bytes = 0;
  int utilization_percent = -1;  // -1 when the driver does not say.
  // False when memory_used_bytes is not a live reading: the driver did not
  // say ("[N/A]", an NVML error for this GPU), the sample failed, or no sample
  // was taken yet. memory_used_bytes is 0 then; /metrics leaves the series out.
  bool memory_used_known = true;
};

// A source of GPU readings. Read() returns every GPU of the machine.
class GpuProbe {
 public:
  virtual ~GpuProbe() = default;
  virtual absl::StatusOr<std::vector<GpuReading>> Read() = 0;
  // "nvml" or "nvidia-smi", for logs.
  virtual std::string Source() const = 0;
};

// NVML through dlopen; nullptr (with the reason in *why when given) when the
// library or one of its symbols is missing or nvmlInit fails. Errors of one
// GPU do not fail Read(): a GPU whose handle cannot be had is left out, one
// whose memory cannot be read has memory_used_known false; each (GPU, call)
// error is logged once at warn.
std::unique_ptr<GpuProbe> OpenNvmlProbe(std::string* why = nullptr);

// Runs `binary --query-gpu=index,name,memory.total,uuid,memory.used,utilization.gpu
// --format=csv,noheader,nounits` (10 s timeout) and parses its output.
std::unique_ptr<GpuProbe> MakeNvidiaSmiProbe(std::string binary = "nvidia-smi");

// Parses nvidia-smi's CSV (columns as above; memory in MiB; "[N/A]" or
// "[Not Supported]" utilisation becomes -1). Blank lines are skipped; any other
// malformed line is an error naming the line number and its text.
absl::StatusOr<std::vector<GpuReading>> ParseNvidiaSmiCsv(std::string_view csv);

// The GPUs `selection` offers out of `found`: all of them, none, or the listed
// indices (an index that is not present is an error naming it and what exists).
absl::StatusOr<std::vector<GpuReading>> SelectGpus(const GpuSelection& selection,
                                                   const std::vector<GpuReading>& found);

// The GPUs this worker offers, and fresh numbers for them.
class GpuInventory {
 public:
  // Probes NVML, then nvidia-smi (`nvidia_smi` binary); when neither works the
  // machine has no GPUs (logged at info). Then applies `selection`; an error
  // only when a listed GPU does not exist or GPUs were listed but none found.
  static absl::StatusOr<std::unique_ptr<GpuInventory>> Discover(
      const GpuSelection& selection, const std::string& nvidia_smi = "nvidia-smi");

  // For tests and --gpus none: a fixed list with no probe behind it.
  GpuInventory(std::unique_ptr<GpuProbe> probe, std::vector<GpuReading> offered);

  // Offered GPUs as discovered (sorted by index).
  const std::vector<GpuReading>& offered() const { return offered_; }
  std::string source() const { return probe_ ? probe_->Source() : "none"; }

  // Fresh readings of the offered GPUs; on a probe error (or for a GPU the
  // probe could not read) the last known totals with used memory unknown
  // (memory_used_known false, 0) and utilisation -1. Thread-safe only when called
  // from one thread at a time (the heartbeat loop).
  std::vector<GpuReading> Sample();

 private:
  std::unique_ptr<GpuProbe> probe_;
  std::vector<GpuReading> offered_;
};

// Samples an inventory in the background every `period`, so heartbeats never
// wait for nvidia-smi. Thread-safe.
class GpuSampler {
 public:
  GpuSampler(GpuInventory* inventory, absl::Duration period);
  ~GpuSampler();
  // The newest sample (the offered GPUs with unknown usage before the first:
  // memory_used_known false, utilisation -1).
  std::vector<GpuReading> Latest() const;

 private:
  GpuInventory* const inventory_;
  const absl::Duration period_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::vector<GpuReading> latest_;
  std::thread thread_;
};

}  // namespace tune::worker

#endif  // TUNE_WORKER_AGENT_GPU_INVENTORY_H_
