// tune-worker: one per node. Registers its GPUs (or CPU slots) with
// tune-server, runs the tune-train ranks of the attempts it is assigned, and
// relays their events (docs/events.md). See worker/agent/*.h for the parts.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>

#include <CLI/CLI.hpp>
#include <prometheus/exposer.h>

#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/control/logging.h"
#include "spdlog/spdlog.h"
#include "worker/agent/config.h"
#include "worker/agent/coordinator_link.h"
#include "worker/agent/event_relay.h"
#include "worker/agent/gpu_inventory.h"
#include "worker/agent/host_stats.h"
#include "worker/agent/rank_launcher.h"
#include "worker/agent/worker_metrics.h"

#ifndef TUNE_VERSION
#define TUNE_VERSION "dev"
#endif

namespace tune::worker {
namespace {

// How long a stopping worker waits for the server to acknowledge the last
// events of its attempts before it disconnects.
constexpr absl::Duration kFlushOnExit = absl::Seconds(3);
constexpr absl::Duration kGpuSamplePeriod = absl::Seconds(5);

int Run(Config config) {
  // SIGTERM/SIGINT are taken by sigwait below; blocking them before any
  // thread starts makes every thread inherit the mask (ranks get it reset).
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  // A server that vanishes mid-write must not kill the worker.
  signal(SIGPIPE, SIG_IGN);

  absl::StatusOr<std::unique_ptr<GpuInventory>> inventory =
      GpuInventory::Discover(config.gpu_selection);
  if (!inventory.ok()) {
    std::fprintf(stderr, "tune-worker: %s\n", std::string(inventory.status().message()).c_str());
    return 2;
  }
  std::vector<int> gpu_indices;
  for (const GpuReading& g : (*inventory)->offered()) gpu_indices.push_back(g.index);
  const int cpu_slots = EffectiveCpuSlots(config, static_cast<int>(gpu_indices.size()));
  if (gpu_indices.empty() && cpu_slots == 0) {
    std::fprintf(stderr,
                 "tune-worker: nothing to offer: no GPUs (--gpus %s) and --cpu-slots 0; "
                 "pass --cpu-slots N to run CPU ranks.\n",
                 config.gpus.c_str());
    return 2;
  }
  std::error_code ec;
  std::filesystem::create_directories(config.work_dir, ec);
  if (ec) {
    std::fprintf(stderr, "tune-worker: --work-dir: cannot create %s: %s\n",
                 config.work_dir.c_str(), ec.message().c_str());
    return 2;
  }
  spdlog::info("tune-worker {} '{}': GPUs [{}] via {}, {} CPU slot(s), trainer {}, work dir {}",
               TUNE_VERSION, config.name, absl::StrJoin(gpu_indices, ","),
               (*inventory)->source(), cpu_slots, config.trainer, config.work_dir);

  Outbox outbox;
  LauncherOptions launcher_options;
  launcher_options.trainer = config.trainer;
  launcher_options.work_dir = config.work_dir;
  launcher_options.worker_name = config.name;
  launcher_options.grace = absl::Seconds(config.cancel_grace_s);
  launcher_options.offered_gpus = gpu_indices;
  launcher_options.usable_cores = UsableCores();
  RankLauncher launcher(launcher_options, &outbox);
  GpuSampler sampler(inventory->get(), kGpuSamplePeriod);

  LinkOptions link_options;
  link_options.server = config.server;
  link_options.join_token = config.join_token;
  v1::WorkerInfo& info = link_options.info;
  info.set_name(config.name);
  char host[HOST_NAME_MAX + 1] = {};
  gethostname(host, sizeof(host) - 1);
  info.set_hostname(host);
  for (const GpuReading& g : (*inventory)->offered()) {
    v1::GpuInfo* gi = info.add_gpus();
    gi->set_index(g.index);
    gi->set_name(g.name);
    gi->set_memory_total_bytes(g.memory_total_bytes);
    gi->set_uuid(g.uuid);
  }
  info.set_cpu_slots(cpu_slots);
  info.set_version(TUNE_VERSION);

  LinkCallbacks callbacks;
  callbacks.on_assignment = [&](const v1::Assignment& a) {
    spdlog::info("assignment: {} attempt {} ({} GPUs [{}], {} CPU ranks{})", a.job_id(),
                 a.attempt(), a.gpus_size(), absl::StrJoin(a.gpus(), ","), a.cpu_ranks(),
                 a.resume() ? ", resume" : "");
    absl::Status s = launcher.Launch(a);
    if (absl::IsAlreadyExists(s)) {
      spdlog::info("{} (assignment repeated after a reconnect)", s.ToString());
    } else if (!s.ok()) {
      spdlog::warn("assignment {} attempt {} not started: {}", a.job_id(), a.attempt(),
                   s.ToString());
    }
  };
  callbacks.on_cancel = [&](const v1::CancelAttempt& c) {
    const absl::Duration grace =
        c.grace_ms() > 0 ? absl::Milliseconds(c.grace_ms()) : launcher_options.grace;
    if (launcher.Cancel(AttemptKey{c.job_id(), c.attempt()}, grace)) {
      spdlog::info("cancel {} attempt {}: SIGTERM, SIGKILL after {} ms", c.job_id(),
                   c.attempt(), absl::ToInt64Milliseconds(grace));
    } else {
      spdlog::info("cancel {} attempt {}: not running here", c.job_id(), c.attempt());
    }
  };
  callbacks.on_stale = [&](const AttemptKey& key) {
    launcher.Cancel(key, launcher_options.grace);
  };
  callbacks.running = [&] { return launcher.Running(); };
  callbacks.gpu_stats = [&] {
    std::vector<v1::GpuStats> out;
    for (const GpuReading& g : sampler.Latest()) {
      v1::GpuStats s;
      s.set_index(g.index);
      s.set_memory_used_bytes(g.memory_used_bytes);
      s.set_memory_total_bytes(g.memory_total_bytes);
      s.set_utilization_percent(g.utilization_percent);
      out.push_back(std::move(s));
    }
    return out;
  };
  launcher.SetExitCallback([](const AttemptKey& key, const ExitSummary& summary) {
    spdlog::debug("{} attempt {} ended {}", key.job_id, key.attempt, summary.state);
  });

  CoordinatorLink link(link_options, &outbox, callbacks);

  // /metrics is refreshed on each scrape rather than on a timer: the health
  // numbers are exact at scrape time, nothing runs when nobody scrapes, and
  // GPU numbers come from the heartbeat sampler (at most kGpuSamplePeriod
  // old), so a scrape never waits for NVML or a slow nvidia-smi. Declared
  // after everything it reads, so the exposer is destroyed first.
  HostSampler host_sampler;
  const int offered_gpus = static_cast<int>(gpu_indices.size());
  WorkerMetrics metrics(config.name, [&] {
    WorkerSnapshot snap;
    const RankLauncher::Usage usage = launcher.CurrentUsage();
    snap.health.connected = link.connected();
    snap.health.gpus_busy = usage.gpus;
    snap.health.gpus_free = std::max(0, offered_gpus - usage.gpus);
    snap.health.cpu_slots_busy = usage.cpu_slots;
    snap.health.cpu_slots_free = std::max(0, cpu_slots - usage.cpu_slots);
    snap.health.ranks_running = usage.ranks;
    snap.health.outbox_events = static_cast<int64_t>(outbox.unacked());
    std::optional<HostSampler::Reading> host;
    if (cpu_slots > 0) host = host_sampler.Read();
    snap.devices = DeviceSamples(sampler.Latest(), host);
    return snap;
  });
  std::unique_ptr<prometheus::Exposer> exposer;
  if (!config.metrics_listen.empty()) {
    try {
      exposer = std::make_unique<prometheus::Exposer>(config.metrics_listen);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "tune-worker: --metrics-listen %s: cannot listen: %s\n",
                   config.metrics_listen.c_str(), e.what());
      return 2;
    }
    exposer->RegisterCollectable(metrics.collectable());
    spdlog::info("metrics on http://{}/metrics", config.metrics_listen);
  }

  link.Start();

  int sig = 0;
  while (sigwait(&stop_signals, &sig) != 0) {
  }
  spdlog::info("{} received: stopping ranks (grace {} s)", sig == SIGINT ? "SIGINT" : "SIGTERM",
               config.cancel_grace_s);
  launcher.StopAll(launcher_options.grace);
  if (!outbox.WaitUntilEmpty(absl::Now() + kFlushOnExit)) {
    spdlog::warn("{} event(s) not acknowledged by the server before exit", outbox.unacked());
  }
  link.Stop();
  spdlog::info("tune-worker stopped");
  return 0;
}

}  // namespace
}  // namespace tune::worker

int main(int argc, char** argv) {
  tune::worker::Config config;
  CLI::App app{"tune-worker: runs tune-train ranks for tune-server and relays their events"};
  tune::worker::AddConfigFlags(app, &config);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help prints and exits 0; every usage error exits 2, as bad values do.
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (absl::Status s = config.Validate(); !s.ok()) {
    std::fprintf(stderr, "tune-worker: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (!tune::InitLogging("tune-worker", config.log_level)) {
    std::fprintf(stderr, "tune-worker: --log-level: '%s' is not a level\n",
                 config.log_level.c_str());
    return 2;
  }
  return tune::worker::Run(std::move(config));
}
