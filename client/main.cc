// tunectl: the command-line client of tune-server (JobService).
//
//   tunectl [--server HOST:PORT] [-o table|json|yaml] COMMAND ...
//   COMMAND: submit FILE [--wait] | list | get ID | watch ID | logs ID | cancel ID | workers
//
// Exit codes: 0 success (watch / submit --wait: the job SUCCEEDED), 1 an RPC
// failed or the job ended FAILED/CANCELLED, 2 bad usage, unreadable file or a
// rejected spec, 3 tune-server unreachable.
#include <sys/ioctl.h>
#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>

#include "client/client.h"
#include "client/commands/commands.h"

namespace {

int TerminalWidth() {
  struct winsize ws {};
  if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  if (const char* cols = std::getenv("COLUMNS")) {
    int n = std::atoi(cols);
    if (n > 0) return n;
  }
  return 100;
}

// HOST:PORT with a non-empty host and a numeric port (IPv6 as [addr]:port).
std::string ValidateServer(const std::string& s) {
  auto colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == s.size()) {
    return "must be HOST:PORT, e.g. 127.0.0.1:7070 (got '" + s + "')";
  }
  for (size_t i = colon + 1; i < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9') return "port must be a number (got '" + s + "')";
  }
  long port = std::strtol(s.c_str() + colon + 1, nullptr, 10);
  if (port <= 0 || port > 65535) return "port must be 1..65535 (got '" + s + "')";
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  using namespace tune::client;
  CommandContext ctx;
  ctx.out = &std::cout;
  ctx.err = &std::cerr;
  std::string format = "table";

  CLI::App app{"tunectl: submit, watch and manage tunefleet fine-tuning jobs", "tunectl"};
  app.set_version_flag("--version", "tunectl 0.1.0");
  app.require_subcommand(1);
  app.fallthrough();  // Global options may follow the subcommand: `get ID -o json`.
  app.footer(
      "Exit codes: 0 success (watch/submit --wait: job SUCCEEDED), 1 RPC error or job "
      "FAILED/CANCELLED, 2 usage error or rejected spec, 3 tune-server unreachable.");
  app.add_option("--server,-s", ctx.server, "tune-server address HOST:PORT")
      ->envname("TUNE_SERVER")
      ->default_str(kDefaultServer)
      ->check(CLI::Validator(ValidateServer, "HOST:PORT"));
  app.add_option("--output,-o", format, "Output format")
      ->check(CLI::IsMember({"table", "json", "yaml"}))
      ->default_str("table");
  app.add_option("--timeout", ctx.rpc_timeout_s, "Seconds to wait for each request")
      ->check(CLI::Range(1, 3600))
      ->default_str("30");

  SubmitOptions submit;
  ListOptions list;
  GetOptions get;
  WatchOptions watch;
  LogsOptions logs;
  CancelOptions cancel;
  CLI::App* submit_cmd = AddSubmitCommand(app, &submit);
  CLI::App* list_cmd = AddListCommand(app, &list);
  CLI::App* get_cmd = AddGetCommand(app, &get);
  CLI::App* watch_cmd = AddWatchCommand(app, &watch);
  CLI::App* logs_cmd = AddLogsCommand(app, &logs);
  CLI::App* cancel_cmd = AddCancelCommand(app, &cancel);
  CLI::App* workers_cmd = AddWorkersCommand(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  ctx.format = ParseOutputFormat(format).value_or(OutputFormat::kTable);
  ctx.out_is_tty = isatty(STDOUT_FILENO) == 1;
  ctx.terminal_width = TerminalWidth();

  if (submit_cmd->parsed()) return RunSubmit(ctx, submit);
  if (list_cmd->parsed()) return RunList(ctx, list);
  if (get_cmd->parsed()) return RunGet(ctx, get);
  if (watch_cmd->parsed()) {
    ApiClient api(ctx.server);
    return RunWatch(ctx, api, watch);
  }
  if (logs_cmd->parsed()) return RunLogs(ctx, logs);
  if (cancel_cmd->parsed()) return RunCancel(ctx, cancel);
  if (workers_cmd->parsed()) return RunWorkers(ctx);
  std::cerr << app.help();
  return kExitUsage;
}
