// tune-worker configuration: one struct with defaults, filled from a YAML file,
// TUNE_* environment variables and flags (common/control/cli_config.h), then
// checked once by Validate().
#ifndef TUNE_WORKER_AGENT_CONFIG_H_
#define TUNE_WORKER_AGENT_CONFIG_H_

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tune::worker {

// Which GPUs the worker offers (`--gpus all|none|0,2`).
struct GpuSelection {
  enum class Mode { kAll, kNone, kList };
  Mode mode = Mode::kAll;
  std::vector<int> indices;  // kList only: sorted, unique, >= 0.
};

// Parses `all`, `none` or a comma-separated list of GPU indices ("0,2").
// Errors name the flag and say what is accepted.
absl::StatusOr<GpuSelection> ParseGpuSelection(const std::string& text);

struct Config {
  // Coordinator address, HOST:PORT.
  std::string server = "127.0.0.1:7070";
  // Worker name, unique in the fleet; "" means the host name (filled by Validate).
  std::string name;
  // Where attempts get their directories (<work-dir>/jobs/<job>/attempt-<n>/).
  // Made absolute by Validate.
  std::string work_dir = "./tune-worker";
  // all | none | comma-separated indices.
  std::string gpus = "all";
  // CPU ranks offered; -1 means "auto": 0 when GPUs are offered, else the
  // number of usable cores (see EffectiveCpuSlots).
  int cpu_slots = -1;
  // tune-train binary; "" means `tune-train` next to this executable (filled by
  // Validate).
  std::string trainer;
  // Shared secret the server asks workers for ("" when it needs none).
  std::string join_token;
  // Seconds between SIGTERM and SIGKILL when ranks are stopped (cancel, a rank
  // failing, worker shutdown) and the server gave no grace of its own.
  double cancel_grace_s = 10;
  // trace | debug | info | warn | error.
  std::string log_level = "info";
  // HOST:PORT for Prometheus /metrics (worker_metrics.h); "" serves none.
  std::string metrics_listen;

  // Filled by Validate from `gpus`.
  GpuSelection gpu_selection;

  // Checks every field and fills the derived values (name, trainer, absolute
  // work_dir, gpu_selection). Errors name the flag and the fix.
  absl::Status Validate();
};

// Declares every option of Config on `app` with TUNE_* env names, plus
// --config FILE (YAML). Values are written into `*config` by app.parse().
void AddConfigFlags(CLI::App& app, Config* config);

// `tune-train` in the directory of the running executable (/proc/self/exe).
std::string DefaultTrainerPath();

// Cores this process may run on (sched_getaffinity), at least 1.
int UsableCores();

// CPU ranks to offer: `config.cpu_slots` when >= 0, else 0 when at least one
// GPU is offered and UsableCores() otherwise.
int EffectiveCpuSlots(const Config& config, int offered_gpus);

}  // namespace tune::worker

#endif  // TUNE_WORKER_AGENT_CONFIG_H_
