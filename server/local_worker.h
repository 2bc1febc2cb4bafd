// --local-worker: runs `tune-worker` (next to tune-server) as a child process
// named "local", restarts it when it dies unexpectedly, and stops it
// (SIGTERM, then SIGKILL after a grace period) on shutdown. The child also
// gets SIGTERM when tune-server dies (PR_SET_PDEATHSIG).
#ifndef TUNE_SERVER_LOCAL_WORKER_H_
#define TUNE_SERVER_LOCAL_WORKER_H_

#include <sys/types.h>

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace tune::server {

struct LocalWorkerOptions {
  std::string binary;       // tune-worker path.
  std::string server;       // HOST:PORT it connects to.
  std::string work_dir;     // --work-dir.
  int cpu_slots = -1;       // --cpu-slots when >= 0.
  std::string log_level;    // --log-level.
  std::string join_token;   // Passed as TUNE_JOIN_TOKEN (not on the command line).
};

// The tune-worker next to the running executable.
std::string LocalWorkerBinary();
// True when the NVIDIA driver lists at least one GPU on this host.
bool HostHasNvidiaGpu();
// Cores this process may run on (at least 1).
int UsableCores();

class LocalWorker {
 public:
  explicit LocalWorker(LocalWorkerOptions options) : options_(std::move(options)) {}
  ~LocalWorker() { Stop(absl::Seconds(5)); }

  // Starts the child; FAILED_PRECONDITION when the binary is missing.
  absl::Status Start();
  // SIGTERM, waits up to `grace`, then SIGKILL. Idempotent.
  void Stop(absl::Duration grace);

 private:
  absl::Status SpawnLocked();
  void Supervise();

  const LocalWorkerOptions options_;
  std::mutex mu_;
  std::condition_variable cv_;
  pid_t pid_ = -1;
  bool stopping_ = false;
  std::thread supervisor_;
};

}  // namespace tune::server

#endif  // TUNE_SERVER_LOCAL_WORKER_H_
