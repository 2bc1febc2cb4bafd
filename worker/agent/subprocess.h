// Small process helpers shared by the agent's modules (no shell involved).
#ifndef TUNE_WORKER_AGENT_SUBPROCESS_H_
#define TUNE_WORKER_AGENT_SUBPROCESS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tune::worker {

struct CapturedRun {
  int exit_code = 0;  // 128+N when killed by signal N.
  std::string out;    // stdout (stderr is discarded), at most 4 MiB.
};

// Runs argv[0] (searched in PATH) with argv, captures stdout, and waits at most
// `timeout` (then SIGKILLs it and returns DeadlineExceeded). NotFound when the
// program does not exist.
absl::StatusOr<CapturedRun> RunAndCapture(const std::vector<std::string>& argv,
                                          absl::Duration timeout);

// Exit code convention of docs/events.md from a waitpid status: the exit code,
// or 128+N for a signal N.
int ExitCodeFromWaitStatus(int wait_status);

// "SIGKILL" etc. for 1..31, else "signal N".
std::string SignalName(int signal_number);

}  // namespace tune::worker

#endif  // TUNE_WORKER_AGENT_SUBPROCESS_H_
