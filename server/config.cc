#include "server/config.h"

#include <cmath>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/control/cli_config.h"

namespace tune::server {

absl::StatusOr<HostPort> ParseHostPort(const std::string& text, const std::string& flag) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": \"", text, "\" ", why,
                                                   "; expected HOST:PORT, e.g. 127.0.0.1:7070"));
  };
  HostPort hp;
  std::string port;
  if (!text.empty() && text[0] == '[') {
    size_t close = text.find(']');
    if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return bad("is not a bracketed IPv6 address with a port");
    }
    hp.host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    size_t colon = text.rfind(':');
    if (colon == std::string::npos) return bad("has no port");
    hp.host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (hp.host.find(':') != std::string::npos) return bad("needs brackets around an IPv6 host");
  }
  if (hp.host.empty()) return bad("has no host");
  if (!absl::SimpleAtoi(port, &hp.port) || hp.port < 0 || hp.port > 65535) {
    return bad("has no valid port (0-65535)");
  }
  return hp;
}

absl::Status Config::Validate() const {
  if (auto hp = ParseHostPort(listen, "--listen"); !hp.ok()) return hp.status();
  if (!metrics_listen.empty()) {
    auto hp = ParseHostPort(metrics_listen, "--metrics-listen");
    if (!hp.ok()) return hp.status();
    if (hp->port == 0) {
      return absl::InvalidArgumentError(
          "--metrics-listen: port 0 is not supported; pick the port Prometheus scrapes");
    }
  }
  if (db.empty()) {
    return absl::InvalidArgumentError("--db: must name the SQLite file, e.g. ./tunefleet.db");
  }
  if (!(heartbeat_timeout_s >= 0.5) || !std::isfinite(heartbeat_timeout_s)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--heartbeat-timeout: must be at least 0.5 seconds (got ", heartbeat_timeout_s, ")"));
  }
  if (!(cancel_grace_s >= 0) || !std::isfinite(cancel_grace_s) || cancel_grace_s > 3600) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--cancel-grace: must be between 0 and 3600 seconds (got ", cancel_grace_s, ")"));
  }
  static const char* const kLevels[] = {"trace", "debug", "info", "warn", "error"};
  bool level_ok = false;
  for (const char* l : kLevels) level_ok |= log_level == l;
  if (!level_ok) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--log-level: \"", log_level, "\" is not one of trace, debug, info, warn, error"));
  }
  return absl::OkStatus();
}

void AddConfigFlags(CLI::App& app, Config* config) {
  app.add_option("--listen", config->listen, "gRPC address HOST:PORT")
      ->envname("TUNE_LISTEN")
      ->capture_default_str();
  app.add_option("--db", config->db, "SQLite database file (created when missing)")
      ->envname("TUNE_DB")
      ->capture_default_str();
  app.add_option("--metrics-listen", config->metrics_listen,
                 "Serve Prometheus /metrics on HOST:PORT (default: off)")
      ->envname("TUNE_METRICS_LISTEN");
  app.add_option("--heartbeat-timeout", config->heartbeat_timeout_s,
                 "Seconds without a heartbeat before a worker is lost")
      ->envname("TUNE_HEARTBEAT_TIMEOUT")
      ->capture_default_str();
  app.add_flag("--local-worker", config->local_worker,
               "Also run a tune-worker named 'local' on this host")
      ->envname("TUNE_LOCAL_WORKER");
  app.add_option("--log-level", config->log_level, "trace | debug | info | warn | error")
      ->envname("TUNE_LOG_LEVEL")
      ->capture_default_str();
  app.add_option("--join-token", config->join_token,
                 "Shared secret workers must present (default: none)")
      ->envname("TUNE_JOIN_TOKEN");
  app.add_option("--cancel-grace", config->cancel_grace_s,
                 "Seconds between SIGTERM and SIGKILL when a cancelled job is stopped")
      ->envname("TUNE_CANCEL_GRACE")
      ->capture_default_str();
  UseYamlConfigFile(app);
}

}  // namespace tune::server
