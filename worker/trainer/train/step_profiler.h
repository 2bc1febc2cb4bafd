// Where a training step's time goes: `tune-train --profile-steps A[-B]
// --profile-out FILE` runs torch's profiler over steps A..B (rank 0 only) and
// writes FILE, a plain-text report:
//   * wall time of the profiled steps; on a GPU the device's busy time (the
//     union of kernel and copy intervals) and its idle share, which is time
//     the GPU waited on the host (launch overhead, syncs);
//   * device time by kernel class (GEMM, attention, tune's fused kernels,
//     other torch kernels, copies) and the kernels with the most total time;
//   * where the device idled: before the first kernel, after the last, and
//     between kernels split by gap length (many short gaps: launch-bound;
//     a few long ones: the host busy or syncing), with the longest gaps, the
//     kernels on either side and the host ops that covered each gap (the
//     trainer names its phases tune::collate, tune::forward, tune::loss,
//     tune::backward, tune::read_loss, tune::grad_norm, tune::optimizer,
//     tune::report);
//   * without a GPU, the aten ops with the most inclusive time.
// Where torch has Kineto (the CUDA wheels), FILE.trace.json holds the Chrome
// trace as well (chrome://tracing, Perfetto).
#ifndef TUNE_WORKER_TRAINER_TRAIN_STEP_PROFILER_H_
#define TUNE_WORKER_TRAINER_TRAIN_STEP_PROFILER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tune::train {

// Parses "A" or "A-B" (1 <= A <= B). Returns false on anything else.
bool ParseProfileSteps(const std::string& text, int64_t* first, int64_t* last);

// One profiled interval: a device kernel/copy or a host op, times in ns from
// the start of the profiled window.
struct ProfiledEvent {
  std::string name;
  bool on_device = false;
  int64_t start_ns = 0, duration_ns = 0;
  // A device-side span of a host scope (Kineto's GPU_USER_ANNOTATION: from
  // the first to the last kernel launched inside a RECORD_USER_SCOPE), not
  // a kernel: left out of every device figure.
  bool annotation = false;
};

// "GEMM", "attention", "tune kernels", "copy" or "other" for a device kernel name.
std::string KernelClass(const std::string& name);

// The report described above for events recorded over the `wall_ns` window
// (event times count from its start), which ran
// `steps` steps numbered first..last (more than last - first + 1 when a
// rollback redid some).
std::string FormatProfileReport(const std::vector<ProfiledEvent>& events, int64_t wall_ns, int64_t first,
                                int64_t last, int64_t steps, int top = 25);

class StepProfiler {
 public:
  // Inactive when `out` is empty. Throws ConfigError when `out` cannot be
  // written (checked here, before any step runs).
  StepProfiler(int64_t first, int64_t last, std::string out);
  ~StepProfiler();
  // Call around each step; with `use_cuda` the device is synchronised first,
  // so the window holds whole steps. Starts before the first step in
  // [first, last] (a resumed run may begin inside the window), stops and
  // writes the report after `last`, or after the run's final step inside the
  // window (`final_step`: max_steps or --stop-after-step), so a window cut
  // short holds no checkpoint writing. Steps redone after a rollback count
  // again.
  void BeforeStep(int64_t step, bool use_cuda);
  void AfterStep(int64_t step, bool use_cuda, bool final_step);
  // A stop request before a step inside the window: writes the report for the
  // steps profiled so far. A no-op otherwise.
  void Finish(bool use_cuda);

 private:
  void Write(bool use_cuda);

  int64_t first_, last_;
  std::string out_;
  bool running_ = false, done_ = false;
  int64_t t0_ns_ = 0;
  int64_t first_run_ = 0, last_run_ = 0, steps_run_ = 0;
};

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_TRAIN_STEP_PROFILER_H_
