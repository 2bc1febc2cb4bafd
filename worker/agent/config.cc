#include "worker/agent/config.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/control/cli_config.h"

namespace tune::worker {
namespace {

// HOST:PORT with a non-empty host (IPv6 in brackets) and a port in 1..65535.
// `fix` ends every error; `flag` starts it.
absl::Status CheckHostPort(const std::string& address, const std::string& flag,
                           const std::string& fix) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": '", address, "' is not HOST:PORT.", fix));
  }
  std::string host = address.substr(0, colon);
  if (host.front() == '[' ? host.back() != ']' || host.size() < 3
                          : host.find(':') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, ": host '", host, "' is malformed (IPv6 addresses go in brackets, [::1]:7070).",
        fix));
  }
  int port = 0;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 1 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, ": port '", address.substr(colon + 1), "' must be a number in 1..65535.", fix));
  }
  return absl::OkStatus();
}

// gRPC's own "unix:" addresses pass as they are.
absl::Status CheckServerAddress(const std::string& address) {
  if (absl::StartsWith(address, "unix:")) return absl::OkStatus();
  return CheckHostPort(address, "--server",
                       " Pass --server HOST:PORT (e.g. 127.0.0.1:7070) or set TUNE_SERVER.");
}

std::string HostName() {
  char buf[HOST_NAME_MAX + 1] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0') return "";
  return buf;
}

bool IsExecutableFile(const std::string& path) {
  std::error_code ec;
  return std::filesystem::is_regular_file(path, ec) && access(path.c_str(), X_OK) == 0;
}

}  // namespace

absl::StatusOr<GpuSelection> ParseGpuSelection(const std::string& text) {
  GpuSelection selection;
  const std::string trimmed(absl::StripAsciiWhitespace(text));
  if (trimmed == "all") return selection;
  if (trimmed == "none" || trimmed.empty()) {
    selection.mode = GpuSelection::Mode::kNone;
    return selection;
  }
  selection.mode = GpuSelection::Mode::kList;
  for (absl::string_view part : absl::StrSplit(trimmed, ',')) {
    part = absl::StripAsciiWhitespace(part);
    int index = -1;
    if (!absl::SimpleAtoi(part, &index) || index < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--gpus: '", part, "' in '", text,
          "' is not a GPU index; use all, none or a comma-separated list such as 0,2."));
    }
    selection.indices.push_back(index);
  }
  std::sort(selection.indices.begin(), selection.indices.end());
  auto dup = std::adjacent_find(selection.indices.begin(), selection.indices.end());
  if (dup != selection.indices.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--gpus: GPU ", *dup, " is listed twice in '", text, "'; list each once."));
  }
  return selection;
}

absl::Status Config::Validate() {
  if (absl::Status s = CheckServerAddress(server); !s.ok()) return s;

  if (name.empty()) name = HostName();
  if (name.empty()) {
    return absl::InvalidArgumentError(
        "--name: the host name is unknown; pass --name NAME (unique per worker).");
  }
  if (name.size() > 128 || name.find_first_of(" \t\r\n/") != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--name: '", name, "' must be at most 128 characters without spaces or '/'."));
  }

  if (work_dir.empty()) {
    return absl::InvalidArgumentError(
        "--work-dir: must not be empty; pass a directory for attempt files, e.g. ./tune-worker.");
  }
  std::error_code ec;
  std::filesystem::path abs = std::filesystem::absolute(work_dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("--work-dir: cannot resolve '", work_dir, "': ", ec.message()));
  }
  work_dir = abs.lexically_normal().string();
  if (work_dir.size() > 1 && work_dir.back() == '/') work_dir.pop_back();

  absl::StatusOr<GpuSelection> selection = ParseGpuSelection(gpus);
  if (!selection.ok()) return selection.status();
  gpu_selection = *std::move(selection);

  if (cpu_slots < -1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--cpu-slots: must be >= 0 (got ", cpu_slots, "); omit it to offer one per core "
        "on machines without GPUs."));
  }

  if (trainer.empty()) trainer = DefaultTrainerPath();
  if (!IsExecutableFile(trainer)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--trainer: '", trainer, "' is not an executable file; build tune-train "
        "(cmake -DTUNE_BUILD_TRAINER=ON) or pass --trainer PATH."));
  }

  if (!std::isfinite(cancel_grace_s) || cancel_grace_s < 0 || cancel_grace_s > 3600) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--cancel-grace: must be between 0 and 3600 seconds (got ", cancel_grace_s, ")."));
  }

  static const char* const kLevels[] = {"trace", "debug", "info", "warn", "error"};
  if (std::find(std::begin(kLevels), std::end(kLevels), log_level) == std::end(kLevels)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--log-level: '", log_level, "' is not one of trace, debug, info, warn, error."));
  }
  if (!metrics_listen.empty()) {
    if (absl::Status s = CheckHostPort(
            metrics_listen, "--metrics-listen",
            " Pass the address Prometheus scrapes, e.g. --metrics-listen 0.0.0.0:9091 "
            "(or TUNE_WORKER_METRICS_LISTEN), or leave it out to serve no metrics.");
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

void AddConfigFlags(CLI::App& app, Config* config) {
  app.add_option("--server", config->server, "Coordinator address HOST:PORT")
      ->envname("TUNE_SERVER")
      ->capture_default_str();
  app.add_option("--name", config->name, "Worker name, unique in the fleet (default: host name)")
      ->envname("TUNE_WORKER_NAME");
  app.add_option("--work-dir", config->work_dir, "Directory for attempt files and rank logs")
      ->envname("TUNE_WORK_DIR")
      ->capture_default_str();
  app.add_option("--gpus", config->gpus, "GPUs to offer: all | none | LIST (e.g. 0,2)")
      ->envname("TUNE_GPUS")
      ->capture_default_str();
  app.add_option("--cpu-slots", config->cpu_slots,
                 "CPU ranks to offer (default: 0 with GPUs, else one per core)")
      ->envname("TUNE_CPU_SLOTS");
  app.add_option("--trainer", config->trainer,
                 "tune-train binary (default: tune-train next to tune-worker)")
      ->envname("TUNE_TRAINER");
  app.add_option("--join-token", config->join_token, "Shared secret the server asks workers for")
      ->envname("TUNE_JOIN_TOKEN");
  app.add_option("--cancel-grace", config->cancel_grace_s,
                 "Seconds between SIGTERM and SIGKILL when stopping ranks")
      ->envname("TUNE_CANCEL_GRACE")
      ->capture_default_str();
  app.add_option("--log-level", config->log_level, "trace | debug | info | warn | error")
      ->envname("TUNE_LOG_LEVEL")
      ->capture_default_str();
  app.add_option("--metrics-listen", config->metrics_listen,
                 "Serve Prometheus /metrics (GPU memory/utilisation, health) on "
                 "HOST:PORT (default: off)")
      ->envname("TUNE_WORKER_METRICS_LISTEN");
  UseYamlConfigFile(app);
}

std::string DefaultTrainerPath() {
  std::error_code ec;
  std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return "tune-train";
  return (self.parent_path() / "tune-train").string();
}

int UsableCores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

int EffectiveCpuSlots(const Config& config, int offered_gpus) {
  if (config.cpu_slots >= 0) return config.cpu_slots;
  return offered_gpus > 0 ? 0 : UsableCores();
}

}  // namespace tune::worker
