// Placement of queued jobs on workers, as pure logic.
//
// Rules:
//  * Jobs are considered by priority (higher first), then submit order (FIFO).
//  * A job needing N devices (GPUs, or CPU slots for cpu_ranks jobs) is placed
//    on ONE worker that has N free devices of that kind; among those, the one
//    left with the fewest free devices (best fit, then name) so big holes stay
//    open for big jobs. Nothing is ever over-committed.
//  * A job larger than every ready worker's total capacity can never run now:
//    it gets a pending reason ("no worker offers 4 GPUs") and is skipped
//    without blocking anyone.
//  * A job that fits some worker's total but not its free devices waits, and
//    claims the workers it could run on: lower-ranked jobs of the same device
//    kind are not placed there (so a big job is not starved by a stream of
//    small ones), but may still use workers the waiting job cannot use.
#ifndef TUNE_SERVER_SCHEDULER_SCHEDULER_H_
#define TUNE_SERVER_SCHEDULER_SCHEDULER_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tune::server {

struct QueuedJob {
  std::string id;
  int priority = 0;
  int64_t submit_order = 0;
  int gpus = 0;       // Exactly one of gpus / cpu_ranks is > 0.
  int cpu_ranks = 0;
};

struct WorkerCapacity {
  std::string name;
  // Connected and heart-beating: may receive placements. Workers that are
  // known but momentarily disconnected count for "does any worker offer N"
  // (accepting = false) but receive nothing.
  bool accepting = true;
  int total_gpus = 0;
  std::vector<int> free_gpus;  // GPU indices not reserved.
  int total_cpu_slots = 0;
  std::vector<int> free_cpu_slots;  // CPU slot indices not reserved.
};

struct Placement {
  std::string job_id;
  std::string worker;
  std::vector<int> devices;  // GPU indices, or CPU slot indices; ascending.
};

struct ScheduleResult {
  std::vector<Placement> placements;  // In the order the jobs were considered.
  // Why each job that was not placed still waits.
  std::map<std::string, std::string> pending_reasons;
};

ScheduleResult Schedule(std::vector<QueuedJob> jobs, std::vector<WorkerCapacity> workers);

}  // namespace tune::server

#endif  // TUNE_SERVER_SCHEDULER_SCHEDULER_H_
