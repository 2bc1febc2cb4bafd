#include "server/scheduler/scheduler.h"

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"

namespace tune::server {
namespace {

std::string DeviceNoun(bool gpu, int n) {
  if (gpu) return n == 1 ? "GPU" : "GPUs";
  return n == 1 ? "CPU slot" : "CPU slots";
}

}  // namespace

ScheduleResult Schedule(std::vector<QueuedJob> jobs, std::vector<WorkerCapacity> workers) {
  std::stable_sort(jobs.begin(), jobs.end(), [](const QueuedJob& a, const QueuedJob& b) {
    if (a.priority != b.priority) return a.priority > b.priority;
    return a.submit_order < b.submit_order;
  });
  for (WorkerCapacity& w : workers) {
    std::sort(w.free_gpus.begin(), w.free_gpus.end());
    std::sort(w.free_cpu_slots.begin(), w.free_cpu_slots.end());
  }
  std::sort(workers.begin(), workers.end(),
            [](const WorkerCapacity& a, const WorkerCapacity& b) { return a.name < b.name; });

  ScheduleResult result;
  // Workers claimed by a waiting higher-ranked job, per device kind (0 = GPU, 1 = CPU),
  // and the first such job for the pending message.
  std::set<std::string> claimed[2];
  std::string first_waiting[2];

  for (const QueuedJob& job : jobs) {
    const bool gpu = job.gpus > 0;
    const int need = gpu ? job.gpus : job.cpu_ranks;
    const int kind = gpu ? 0 : 1;
    if (need <= 0) {
      result.pending_reasons[job.id] = "the job asks for no devices (resources.gpus and "
                                       "resources.cpu_ranks are both 0)";
      continue;
    }
    bool anyone_could = false;
    int largest_free = 0;
    WorkerCapacity* best = nullptr;
    std::vector<WorkerCapacity*> capable;
    for (WorkerCapacity& w : workers) {
      const int total = gpu ? w.total_gpus : w.total_cpu_slots;
      if (total < need) continue;
      anyone_could = true;
      capable.push_back(&w);
      if (!w.accepting) continue;
      const int free = static_cast<int>(gpu ? w.free_gpus.size() : w.free_cpu_slots.size());
      largest_free = std::max(largest_free, free);
      if (free < need || claimed[kind].count(w.name)) continue;
      const int best_free = best ? static_cast<int>(gpu ? best->free_gpus.size()
                                                        : best->free_cpu_slots.size())
                                 : 0;
      if (!best || free < best_free) best = &w;
    }
    if (!anyone_could) {
      result.pending_reasons[job.id] =
          absl::StrCat("no worker offers ", need, " ", DeviceNoun(gpu, need));
      continue;
    }
    if (best == nullptr) {
      std::string reason;
      if (!first_waiting[kind].empty() && largest_free >= need) {
        reason = absl::StrCat("waiting behind ", first_waiting[kind],
                              " (higher priority or submitted earlier)");
      } else {
        reason = absl::StrCat("waiting for ", need, " free ", DeviceNoun(gpu, need),
                              " on one worker (most free now: ", largest_free, ")");
      }
      result.pending_reasons[job.id] = reason;
      for (WorkerCapacity* w : capable) claimed[kind].insert(w->name);
      if (first_waiting[kind].empty()) first_waiting[kind] = job.id;
      continue;
    }
    std::vector<int>& free = gpu ? best->free_gpus : best->free_cpu_slots;
    Placement p;
    p.job_id = job.id;
    p.worker = best->name;
    p.devices.assign(free.begin(), free.begin() + need);
    free.erase(free.begin(), free.begin() + need);
    result.placements.push_back(std::move(p));
  }
  return result;
}

}  // namespace tune::server
