// fake-trainer: a test-only double of `tune-train` for the control-plane
// integration tests. It is never installed and never used by the README.
//
// It honours the command line and the event contract of the real trainer
// (docs/events.md) so that tune-worker cannot tell the difference:
//
//   fake-trainer --config job.yaml [--events-fd N] [--output DIR] [--resume]
//   env RANK (default 0), WORLD_SIZE (default 1)
//
// From the YAML it reads training.max_steps, checkpoint.every_steps,
// checkpoint.keep, training.learning_rate, output.dir (when --output is
// absent) and faults.nan_at_steps. Every rank emits `plan` and one `step`
// per step; rank 0 also writes checkpoints (DIR/checkpoints/step-N/state.json,
// built in a temp dir, fsync'ed and renamed into place) with `checkpoint`
// events, and ends with `done`. The loss is a fixed decreasing function of
// the step, so a resumed run continues the same curve. With --resume it
// continues after the newest complete checkpoint.
//
// Test knobs (environment):
//   FAKE_TRAINER_STEP_MS         sleep per step (default 50)
//   FAKE_TRAINER_FAIL_AT_STEP    rank 0 emits error CRASH and exits 1 at that step
//   FAKE_TRAINER_IGNORE_SIGTERM  "1": ignore SIGTERM (tests the SIGKILL escalation)
//   FAKE_TRAINER_MARK_DIR        each rank writes MARK_DIR/pid-<pid> with its pid at start
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

int g_events_fd = -1;
int g_rank = 0;

double Now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// One event = one write(2) of one line; lines under PIPE_BUF are atomic on a
// pipe shared by several ranks.
void Emit(json event) {
  event["time"] = Now();
  event["rank"] = g_rank;
  std::string line = event.dump() + "\n";
  int fd = g_events_fd >= 0 ? g_events_fd : STDOUT_FILENO;
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    ssize_t n = write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      // The worker is gone; a trainer without its agent has no one to talk to.
      std::_Exit(1);
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

[[noreturn]] void Fail(int code, const std::string& reason, const std::string& message) {
  std::cerr << "fake-trainer: " << message << "\n";
  Emit({{"type", "error"}, {"reason", reason}, {"message", message}});
  std::exit(code);
}

double LossAt(int step) { return 0.2 + 2.5 * std::exp(-static_cast<double>(step) / 15.0); }

void FsyncPath(const fs::path& p, bool dir) {
  int fd = open(p.c_str(), dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd >= 0) {
    fsync(fd);
    close(fd);
  }
}

// DIR/checkpoints/step-N/state.json, complete or absent.
void WriteCheckpoint(const fs::path& out, int step) {
  fs::path root = out / "checkpoints";
  fs::create_directories(root);
  fs::path tmp = root / (".tmp-step-" + std::to_string(step) + "-" + std::to_string(getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  {
    std::ofstream f(tmp / "state.json");
    f << json{{"step", step}, {"loss", LossAt(step)}, {"writer", "fake-trainer"}}.dump() << "\n";
  }
  FsyncPath(tmp / "state.json", false);
  FsyncPath(tmp, true);
  fs::path final_dir = root / ("step-" + std::to_string(step));
  fs::remove_all(final_dir);
  fs::rename(tmp, final_dir);
  FsyncPath(root, true);
}

std::vector<int> Checkpoints(const fs::path& out) {
  std::vector<int> steps;
  std::error_code ec;
  fs::path root = out / "checkpoints";
  if (!fs::is_directory(root, ec)) return steps;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    std::string name = entry.path().filename().string();
    if (name.rfind("step-", 0) != 0) continue;
    if (!fs::exists(entry.path() / "state.json")) continue;
    char* end = nullptr;
    long n = std::strtol(name.c_str() + 5, &end, 10);
    if (end && *end == '\0' && n > 0) steps.push_back(static_cast<int>(n));
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

template <typename T>
T Get(const YAML::Node& root, const char* section, const char* key, T fallback) {
  YAML::Node s = root[section];
  if (!s || !s.IsMap() || !s[key]) return fallback;
  try {
    return s[key].as<T>();
  } catch (const YAML::Exception& e) {
    Fail(2, "INVALID_SPEC", std::string(section) + "." + key + ": " + e.what());
  }
}

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

}  // namespace

int main(int argc, char** argv) {
  std::string config;
  std::string output;
  bool resume = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* flag) -> std::string {
      if (i + 1 >= argc) Fail(2, "INVALID_SPEC", std::string(flag) + " needs a value");
      return argv[++i];
    };
    if (a == "--config") {
      config = value("--config");
    } else if (a == "--events-fd") {
      g_events_fd = std::atoi(value("--events-fd").c_str());
    } else if (a == "--output") {
      output = value("--output");
    } else if (a == "--resume") {
      resume = true;
    } else {
      Fail(2, "INVALID_SPEC", "unknown argument '" + a + "' (fake-trainer takes --config, "
                                  "--events-fd, --output, --resume)");
    }
  }
  g_rank = EnvInt("RANK", 0);
  int world = EnvInt("WORLD_SIZE", 1);
  if (config.empty()) Fail(2, "INVALID_SPEC", "--config FILE is required");
  if (std::getenv("FAKE_TRAINER_IGNORE_SIGTERM") &&
      std::string(std::getenv("FAKE_TRAINER_IGNORE_SIGTERM")) == "1") {
    std::signal(SIGTERM, SIG_IGN);
  }
  if (const char* mark = std::getenv("FAKE_TRAINER_MARK_DIR"); mark && *mark) {
    std::error_code ec;
    fs::create_directories(mark, ec);
    std::ofstream(fs::path(mark) / ("pid-" + std::to_string(getpid()))) << getpid() << "\n";
  }

  YAML::Node root;
  try {
    root = YAML::LoadFile(config);
  } catch (const YAML::Exception& e) {
    Fail(2, "INVALID_SPEC", "cannot read " + config + ": " + e.what());
  }
  int max_steps = Get<int>(root, "training", "max_steps", 60);
  int every = Get<int>(root, "checkpoint", "every_steps", 50);
  int keep = Get<int>(root, "checkpoint", "keep", 3);
  double lr = Get<double>(root, "training", "learning_rate", 2e-4);
  if (output.empty()) output = Get<std::string>(root, "output", "dir", "");
  if (output.empty()) Fail(2, "INVALID_SPEC", "no --output and no output.dir in the spec");
  if (max_steps <= 0) Fail(2, "INVALID_SPEC", "training.max_steps must be > 0");
  std::set<int> nan_steps;
  if (root["faults"] && root["faults"]["nan_at_steps"]) {
    for (const auto& n : root["faults"]["nan_at_steps"]) nan_steps.insert(n.as<int>());
  }
  int step_ms = EnvInt("FAKE_TRAINER_STEP_MS", 50);
  int fail_at = EnvInt("FAKE_TRAINER_FAIL_AT_STEP", 0);
  fs::path out(output);
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec) Fail(1, "CRASH", "cannot create " + output + ": " + ec.message());

  Emit({{"type", "plan"},
        {"micro_batch_size", 1},
        {"grad_accum", 1},
        {"world_size", world},
        {"effective_batch_size", world},
        {"gradient_checkpointing", "off"},
        {"precision", "fp32"},
        {"device", "cpu"},
        {"predicted_peak_bytes", 0},
        {"device_memory_bytes", 0}});

  int start = 1;
  if (resume) {
    std::vector<int> cps = Checkpoints(out);
    if (!cps.empty()) {
      start = cps.back() + 1;
      if (g_rank == 0) {
        Emit({{"type", "log"},
              {"level", "info"},
              {"message", "resumed from checkpoint step " + std::to_string(cps.back())}});
      }
    } else if (g_rank == 0) {
      Emit({{"type", "log"}, {"level", "info"}, {"message", "no checkpoint; starting at step 1"}});
    }
  }

  auto t0 = std::chrono::steady_clock::now();
  for (int step = start; step <= max_steps; ++step) {
    std::this_thread::sleep_for(std::chrono::milliseconds(step_ms));
    if (fail_at > 0 && step == fail_at && g_rank == 0) {
      Fail(1, "CRASH", "injected failure at step " + std::to_string(step));
    }
    double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    json loss = nan_steps.count(step) ? json("nan") : json(LossAt(step));
    if (nan_steps.count(step)) {
      Emit({{"type", "nan_alert"},
            {"step", step},
            {"where", "loss"},
            {"consecutive", 1},
            {"total", 1},
            {"action", "skip"}});
    }
    Emit({{"type", "step"},
          {"step", step},
          {"max_steps", max_steps},
          {"loss", loss},
          {"lr", lr},
          {"grad_norm", 1.0 / step},
          {"tokens", 128 * world},
          {"tokens_per_s", 128.0 * world * 1000.0 / std::max(step_ms, 1)},
          {"vram_allocated", 0},
          {"vram_reserved", 0},
          {"vram_peak", 0},
          {"elapsed", elapsed}});
    std::printf("rank %d step %d/%d loss %.4f\n", g_rank, step, max_steps, LossAt(step));
    std::fflush(stdout);
    if (g_rank == 0 && every > 0 && step % every == 0 && step < max_steps) {
      WriteCheckpoint(out, step);
      std::vector<int> cps = Checkpoints(out);
      for (size_t i = 0; keep > 0 && i + static_cast<size_t>(keep) < cps.size(); ++i) {
        fs::remove_all(out / "checkpoints" / ("step-" + std::to_string(cps[i])), ec);
      }
      Emit({{"type", "checkpoint"},
            {"step", step},
            {"path", (out / "checkpoints" / ("step-" + std::to_string(step))).string()}});
    }
  }
  if (g_rank == 0) {
    fs::path adapter = out / "adapter";
    fs::create_directories(adapter, ec);
    std::ofstream(adapter / "FAKE_TRAINER") << "written by the control-plane test double\n";
    Emit({{"type", "done"},
          {"step", max_steps},
          {"loss", LossAt(max_steps)},
          {"output_dir", out.string()},
          {"adapter_dir", adapter.string()}});
  }
  return 0;
}
