// Host memory and CPU load from procfs, for the worker's CPU slots. A worker
// that offers CPU ranks reports the host as its "cpu" device on /metrics
// (worker_metrics.h), the way tune-server labels CPU ranks gpu="cpu": the
// ranks' memory is host RAM and their compute is the host's cores.
#ifndef TUNE_WORKER_AGENT_HOST_STATS_H_
#define TUNE_WORKER_AGENT_HOST_STATS_H_

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace tune::worker {

// /proc/meminfo's MemTotal and MemAvailable, in bytes.
struct HostMemory {
  int64_t total_bytes = 0;
  int64_t available_bytes = 0;
  // What the ranks cannot have: total - available (page cache that the kernel
  // can drop counts as available, as `free` shows it).
  int64_t used_bytes() const { return total_bytes - available_bytes; }
};

// Parses /proc/meminfo text ("MemTotal:  16318412 kB" lines). MemTotal and
// MemAvailable (kernel >= 3.14) are required; an error names the missing or
// malformed field and its line.
absl::StatusOr<HostMemory> ParseMeminfo(std::string_view text);

// Jiffies of the aggregate "cpu" line of /proc/stat since boot.
struct CpuTimes {
  uint64_t busy = 0;   // user + nice + system + irq + softirq + steal
  uint64_t total = 0;  // busy + idle + iowait (guest time is inside user/nice)
};

// Parses the first line of /proc/stat ("cpu  user nice system idle iowait irq
// softirq steal ..."); at least the first four numbers must be present.
absl::StatusOr<CpuTimes> ParseProcStatCpu(std::string_view text);

// Busy share of the jiffies between two readings, in [0, 1]; nullopt when no
// time passed (or the counters went backwards).
std::optional<double> CpuUtilization(const CpuTimes& earlier, const CpuTimes& later);

// One reading of the host as the "cpu" device: memory and the utilisation
// since the previous Read() (the first Read() measures from construction).
// A missing or unreadable file leaves that part unknown and is logged once.
// Thread-safe.
class HostSampler {
 public:
  struct Reading {
    std::optional<HostMemory> memory;
    std::optional<double> utilization;  // 0..1
  };
  // `proc_dir` is /proc; tests pass a directory with meminfo and stat files.
  explicit HostSampler(std::string proc_dir = "/proc");
  Reading Read();

 private:
  std::optional<CpuTimes> ReadCpuLocked();

  const std::string proc_dir_;
  std::mutex mu_;
  std::optional<CpuTimes> previous_;
  // The last utilisation, kept when two reads fall in the same jiffy.
  std::optional<double> last_utilization_;
  bool warned_memory_ = false;
  bool warned_cpu_ = false;
};

}  // namespace tune::worker

#endif  // TUNE_WORKER_AGENT_HOST_STATS_H_
