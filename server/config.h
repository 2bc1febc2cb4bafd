// tune-server configuration: one struct with defaults, filled from a YAML file
// (--config), TUNE_* environment variables and flags (common/control/cli_config.h),
// then checked once by Validate().
#ifndef TUNE_SERVER_CONFIG_H_
#define TUNE_SERVER_CONFIG_H_

#include <string>

#include <CLI/CLI.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tune::server {

struct Config {
  // gRPC address, HOST:PORT (port 0: any free port, logged at start).
  std::string listen = "127.0.0.1:7070";
  // SQLite database (created when missing).
  std::string db = "./tunefleet.db";
  // Prometheus /metrics endpoint HOST:PORT; "" disables it.
  std::string metrics_listen;
  // Seconds without a heartbeat before a worker is LOST.
  double heartbeat_timeout_s = 30;
  // Also run a `tune-worker` (found next to tune-server) named "local".
  bool local_worker = false;
  // trace | debug | info | warn | error.
  std::string log_level = "info";
  // Shared secret workers must present ("" = none).
  std::string join_token;
  // Seconds between SIGTERM and SIGKILL when a cancelled attempt is stopped.
  double cancel_grace_s = 10;

  // Checks every field; errors name the flag and the fix.
  absl::Status Validate() const;
};

// Declares every option of Config on `app` (with TUNE_* env names) plus
// --config FILE. app.parse() writes into *config.
void AddConfigFlags(CLI::App& app, Config* config);

struct HostPort {
  std::string host;  // Without brackets for IPv6.
  int port = 0;
};
// Parses "HOST:PORT" or "[V6]:PORT"; `flag` names the option in errors.
absl::StatusOr<HostPort> ParseHostPort(const std::string& text, const std::string& flag);

}  // namespace tune::server

#endif  // TUNE_SERVER_CONFIG_H_
