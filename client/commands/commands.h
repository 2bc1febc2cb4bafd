// The tunectl subcommands. Each has an options struct, an Add*Command that
// declares its CLI11 subcommand on the root app, and a Run* that executes it
// and returns the process exit code (client.h: kExit*).
#ifndef TUNE_CLIENT_COMMANDS_COMMANDS_H_
#define TUNE_CLIENT_COMMANDS_COMMANDS_H_

#include <string>

#include <CLI/CLI.hpp>

#include "client/client.h"

namespace tune::client {

struct SubmitOptions {
  std::string file;
  bool wait = false;
  int reconnect_timeout_s = 300;
};
CLI::App* AddSubmitCommand(CLI::App& app, SubmitOptions* opts);
// Reads FILE and submits it (base_dir = the file's absolute directory). A
// rejected spec prints the server's error lines and returns kExitUsage. Prints
// the job id (table) or the Job object (json/yaml). With `wait`, follows the
// job like `watch` and returns its exit code; json/yaml then print only the
// final Job object.
int RunSubmit(const CommandContext& ctx, const SubmitOptions& opts);

struct ListOptions {
  std::vector<std::string> states;  // JobState names; empty = all.
  int limit = 100;
};
CLI::App* AddListCommand(CLI::App& app, ListOptions* opts);
int RunList(const CommandContext& ctx, const ListOptions& opts);

struct GetOptions {
  std::string id;
};
CLI::App* AddGetCommand(CLI::App& app, GetOptions* opts);
// The job plus a loss summary (first/min/last) computed from its step events.
int RunGet(const CommandContext& ctx, const GetOptions& opts);

struct WatchOptions {
  std::string id;
  // Give up after this long without a working stream (0: never).
  int reconnect_timeout_s = 300;
};
CLI::App* AddWatchCommand(CLI::App& app, WatchOptions* opts);
// Streams the job's events until its terminal state. A broken stream is
// re-opened with after_seq = the last seq seen, so no event is missed or
// shown twice. Returns kExitOk only when the job SUCCEEDED. In json/yaml mode
// each event is printed as one compact JSON object a line (yaml: one document
// each), then the final Job object.
int RunWatch(const CommandContext& ctx, ApiClient& api, const WatchOptions& opts);

struct LogsOptions {
  std::string id;
  int64_t after_seq = 0;
};
CLI::App* AddLogsCommand(CLI::App& app, LogsOptions* opts);
// All stored events (paging through GetJobEvents). json: one event object a
// line (JSON Lines), so huge logs stream; yaml: a sequence; table: one row each.
int RunLogs(const CommandContext& ctx, const LogsOptions& opts);

struct CancelOptions {
  std::string id;
};
CLI::App* AddCancelCommand(CLI::App& app, CancelOptions* opts);
int RunCancel(const CommandContext& ctx, const CancelOptions& opts);

CLI::App* AddWorkersCommand(CLI::App& app);
int RunWorkers(const CommandContext& ctx);

}  // namespace tune::client

#endif  // TUNE_CLIENT_COMMANDS_COMMANDS_H_
