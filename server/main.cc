// tune-server: the coordinator of tunefleet (DESIGN.md). Serves JobService to
// clients and AgentService to workers over gRPC, keeps everything in SQLite,
// and optionally serves Prometheus /metrics and runs a local worker.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <memory>

#include <grpcpp/grpcpp.h>
#include <prometheus/exposer.h>
#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "common/control/logging.h"
#include "server/api/agent_service.h"
#include "server/api/job_service.h"
#include "server/config.h"
#include "server/coordinator/coordinator.h"
#include "server/local_worker.h"
#include "server/metrics/metrics.h"
#include "server/store/job_store.h"

namespace {

int Fail(const std::string& message) {
  std::fprintf(stderr, "tune-server: %s\n", message.c_str());
  return 1;
}

// Where the local worker should dial: our own address, with a wildcard host
// replaced by loopback.
std::string DialAddress(const tune::server::HostPort& hp, int port) {
  std::string host = hp.host;
  if (host == "0.0.0.0" || host.empty()) host = "127.0.0.1";
  if (host == "::") host = "::1";
  if (host.find(':') != std::string::npos) return absl::StrCat("[", host, "]:", port);
  return absl::StrCat(host, ":", port);
}

}  // namespace

int main(int argc, char** argv) {
  // Signals are taken by sigwait in main; every thread started later inherits
  // the blocked mask (the local worker child undoes it before exec).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  tune::server::Config config;
  CLI::App app{"tune-server: the tunefleet coordinator (jobs, scheduling, workers, metrics)"};
  tune::server::AddConfigFlags(app, &config);
  double metrics_retention_s = 3600;
  app.add_option("--metrics-retention", metrics_retention_s,
                 "Seconds a finished job's series stay on /metrics before they are removed "
                 "(bounds the number of series; default 3600)")
      ->check(CLI::Range(0.0, 30.0 * 24 * 3600));  // Up to 30 days.
  CLI11_PARSE(app, argc, argv);

  if (!tune::InitLogging("tune-server", config.log_level)) {
    return Fail(absl::StrCat("--log-level: \"", config.log_level,
                             "\" is not one of trace, debug, info, warn, error"));
  }
  if (absl::Status s = config.Validate(); !s.ok()) return Fail(std::string(s.message()));
  const tune::server::HostPort listen = *tune::server::ParseHostPort(config.listen, "--listen");

  auto store = tune::server::JobStore::Open(config.db);
  if (!store.ok()) return Fail(std::string(store.status().message()));

  tune::server::ServerMetricsOptions metrics_options;
  metrics_options.retention = absl::Seconds(metrics_retention_s);
  tune::server::ServerMetrics metrics(metrics_options);
  std::unique_ptr<prometheus::Exposer> exposer;
  if (!config.metrics_listen.empty()) {
    try {
      exposer = std::make_unique<prometheus::Exposer>(config.metrics_listen);
    } catch (const std::exception& e) {
      return Fail(absl::StrCat("--metrics-listen ", config.metrics_listen,
                               ": cannot listen: ", e.what()));
    }
    exposer->RegisterCollectable(metrics.collectable());
  }

  tune::server::CoordinatorOptions options;
  options.heartbeat_timeout = absl::Seconds(config.heartbeat_timeout_s);
  options.heartbeat_interval =
      std::min(absl::Seconds(1), options.heartbeat_timeout / 4);
  options.tick = std::min(absl::Seconds(1), options.heartbeat_timeout / 4);
  options.cancel_grace = absl::Seconds(config.cancel_grace_s);
  options.join_token = config.join_token;
  tune::server::Coordinator coordinator(store->get(), &metrics, options);
  if (absl::Status s = coordinator.Recover(); !s.ok()) {
    return Fail(absl::StrCat("cannot load state from ", config.db, ": ", s.message()));
  }

  tune::server::JobServiceImpl job_service(&coordinator, &metrics);
  tune::server::AgentServiceImpl agent_service(&coordinator, &metrics);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config.listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&job_service);
  builder.RegisterService(&agent_service);
  // Let clients keep idle streams alive with pings.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    return Fail(absl::StrCat("--listen ", config.listen,
                             ": cannot listen (address in use or not local?)"));
  }
  coordinator.Start();
  const std::string dial = DialAddress(listen, port);
  spdlog::info("tune-server listening on {}:{} (db {}, heartbeat timeout {} s{})", listen.host,
               port, config.db, config.heartbeat_timeout_s,
               config.metrics_listen.empty() ? ""
                                             : absl::StrCat(", metrics on ", config.metrics_listen,
                                                            "/metrics"));

  std::unique_ptr<tune::server::LocalWorker> local;
  if (config.local_worker) {
    tune::server::LocalWorkerOptions lw;
    lw.binary = tune::server::LocalWorkerBinary();
    lw.server = dial;
    std::filesystem::path db_dir =
        std::filesystem::absolute(config.db).parent_path();
    lw.work_dir = (db_dir / "worker").string();
    lw.cpu_slots = tune::server::HostHasNvidiaGpu() ? -1 : tune::server::UsableCores();
    lw.log_level = config.log_level;
    lw.join_token = config.join_token;
    local = std::make_unique<tune::server::LocalWorker>(lw);
    if (absl::Status s = local->Start(); !s.ok()) {
      coordinator.Shutdown();
      server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
      return Fail(std::string(s.message()));
    }
  }

  int sig = 0;
  sigwait(&signals, &sig);
  spdlog::info("received {}; shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
  // The local worker goes first, while the server still stores its last events.
  if (local) local->Stop(absl::Seconds(config.cancel_grace_s + 10));
  coordinator.Shutdown();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server->Wait();
  spdlog::info("tune-server stopped");
  return 0;
}
