// Process harness for the control-plane integration tests: start real
// binaries (tune-server, tune-worker, tunectl) on loopback, capture their
// output, kill them with SIGKILL, wait for ports, run a command to completion.
//
// Every spawned process gets its own process group so that cleanup can reach
// the children it started; tests kill only the pid they mean to kill.
#ifndef TUNE_TESTS_INTEGRATION_CONTROL_PLANE_PROCESS_HARNESS_H_
#define TUNE_TESTS_INTEGRATION_CONTROL_PLANE_PROCESS_HARNESS_H_

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace tune::testing {

using Env = std::map<std::string, std::string>;

// A child process whose stdout and stderr go (appended) to `log_path`.
class Process {
 public:
  // Starts argv[0] (a path) with the current environment plus `env`
  // (overrides; an empty value unsets). Returns nullptr and fills *error when
  // fork/exec fails (exec failures are detected through a CLOEXEC pipe).
  static std::unique_ptr<Process> Spawn(const std::vector<std::string>& argv, const Env& env,
                                        const std::string& log_path, std::string* error);
  ~Process();  // SIGKILLs the process group if still running, and reaps.

  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  const std::string& name() const { return name_; }
  const std::string& log_path() const { return log_path_; }

  // True while the process has not exited (reaps it when it has).
  bool Running();
  // SIGKILL to this pid only (children survive unless they arranged otherwise).
  void Kill9();
  // SIGTERM, then SIGKILL after `grace`; returns the wait status.
  int Stop(std::chrono::milliseconds grace = std::chrono::milliseconds(5000));
  // Waits up to `timeout` for exit; the raw wait status, or nullopt on timeout.
  std::optional<int> Wait(std::chrono::milliseconds timeout);
  // Everything the process wrote so far.
  std::string Log() const;
  // The last `lines` lines of Log().
  std::string LogTail(int lines) const;

 private:
  Process() = default;
  pid_t pid_ = -1;
  bool reaped_ = false;
  int status_ = 0;
  std::string name_;
  std::string log_path_;
};

struct CommandResult {
  int exit_code = -1;  // Exit status, 128+N for a signal, -1 if it timed out.
  std::string out;
  std::string err;
};

// Runs argv to completion (killed after `timeout`), capturing stdout/stderr.
CommandResult RunCommand(const std::vector<std::string>& argv, const Env& env,
                         std::chrono::milliseconds timeout);

// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0).
int FreePort();
// True once something accepts connections on 127.0.0.1:port.
bool WaitForPort(int port, std::chrono::milliseconds timeout);
// True while something accepts connections on 127.0.0.1:port.
bool PortOpen(int port);

// Polls `pred` every `every` until it is true or `timeout` passes.
bool WaitUntil(const std::function<bool()>& pred, std::chrono::milliseconds timeout,
               std::chrono::milliseconds every = std::chrono::milliseconds(100));

// True if `pid` exists and is not a zombie.
bool PidAlive(pid_t pid);

// A fresh directory under $TMPDIR (or /tmp), removed by RemoveTree.
std::string MakeTempDir(const std::string& prefix);
void RemoveTree(const std::string& path);
void WriteFile(const std::string& path, const std::string& text);
std::string ReadFile(const std::string& path);

}  // namespace tune::testing

#endif  // TUNE_TESTS_INTEGRATION_CONTROL_PLANE_PROCESS_HARNESS_H_
