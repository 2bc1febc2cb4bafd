// Starts and supervises the tune-train ranks of assignments.
//
// For each attempt: <work-dir>/jobs/<job>/attempt-<n>/ gets job.yaml (the
// assignment's spec_yaml) and rank-N.log (stdout+stderr of rank N). One
// process per rank runs
//   <trainer> --config <job.yaml> --events-fd 3 --output <output dir> [--resume]
// with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT,
// CUDA_VISIBLE_DEVICES (the assigned GPUs; "" for CPU jobs), CUDA_DEVICE_ORDER
// (PCI_BUS_ID unless set), OMP_NUM_THREADS and NCCL_NVLS_ENABLE=0 (unless set).
// All ranks of an attempt share one process group; each dies with SIGKILL when
// the worker dies (PR_SET_PDEATHSIG). Events they write to fd 3 are relayed to
// the outbox (event_relay.h), framed by the worker's own `started` and
// `exited` events (docs/events.md).
//
// Supervision: when a rank exits non-zero the others get SIGTERM, then
// SIGKILL after the grace period; a cancel does the same to all ranks. Exit
// codes map to reasons as docs/events.md says (SummarizeExit).
#ifndef TUNE_WORKER_AGENT_RANK_LAUNCHER_H_
#define TUNE_WORKER_AGENT_RANK_LAUNCHER_H_

#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tune/v1/agent_service.pb.h"
#include "worker/agent/event_relay.h"

namespace tune::worker {

// What happened to an attempt's ranks, as observed by the supervisor.
struct AttemptOutcome {
  // One per rank: exit code, 128+N for signal N, -1 when never started.
  std::vector<int> exit_codes;
  // Rank whose non-zero exit was observed first (-1: none failed).
  int first_failed_rank = -1;
  // The worker stopped the ranks because of a cancel.
  bool cancelled = false;
  // First `error` event seen, if any: its rank, reason and message.
  int error_rank = -1;
  std::string error_reason;
  std::string error_message;
  // Set when the ranks could not be started at all (then exit_codes is empty
  // or partial): what went wrong.
  std::string launch_error;
};

// The `exited` event's state/reason/message.
struct ExitSummary {
  std::string state;    // SUCCEEDED | FAILED | CANCELLED
  std::string reason;   // OOM, NAN_ABORT, CRASH, CANCELLED, INVALID_SPEC, DATA or ""
  std::string message;  // one line for humans
  int failed_rank = -1; // rank whose log tail explains the failure (-1: none)
};

// Reason for one rank's exit code (docs/events.md): 0 -> "", 2 -> INVALID_SPEC,
// 3 -> OOM, 4 -> NAN_ABORT, 5 -> DATA, anything else (incl. signals) -> CRASH.
std::string ReasonForExitCode(int exit_code);

// Cancelled attempts are CANCELLED; all ranks 0 is SUCCEEDED; otherwise
// FAILED with the `error` event's reason when one was written (the failing
// rank's first), else the first failing rank's exit code reason.
ExitSummary SummarizeExit(const AttemptOutcome& outcome);

// The last `max_lines` lines (at most the last 64 KiB) of a file; "" when unreadable.
std::string TailOfFile(const std::string& path, int max_lines);

struct LauncherOptions {
  std::string trainer;        // executable to start per rank
  std::string work_dir;       // absolute
  std::string worker_name;    // for the `started` event
  // GPU indices this worker offers; an assignment naming any other fails
  // (with an `exited` event) instead of starting ranks on a GPU it does not own.
  std::vector<int> offered_gpus;
  absl::Duration grace = absl::Seconds(10);  // SIGTERM -> SIGKILL when not given
  int usable_cores = 1;       // for OMP_NUM_THREADS
  absl::Duration poll_interval = absl::Milliseconds(50);
  int stderr_tail_lines = 20;
};

// Thread-safe. Each attempt is supervised by its own thread, which also forks
// the ranks: PR_SET_PDEATHSIG fires when the forking *thread* ends, so the
// thread lives exactly as long as the ranks.
class RankLauncher {
 public:
  // Called after an attempt's `exited` event is in the outbox (from the
  // attempt's thread). For logs and tests.
  using ExitCallback = std::function<void(const AttemptKey&, const ExitSummary&)>;

  RankLauncher(LauncherOptions options, Outbox* outbox);
  // StopAll(grace from the options).
  ~RankLauncher();

  void SetExitCallback(ExitCallback callback);

  // Starts an attempt in the background. AlreadyExists when the same attempt
  // runs; FailedPrecondition after StopAll. Any later problem (bad job id, no
  // ranks, unwritable work dir, exec failure) ends in an `exited` event with
  // state FAILED and the reason.
  absl::Status Launch(const v1::Assignment& assignment);

  // SIGTERM to every rank of the attempt, SIGKILL after `grace` (the
  // options' grace when <= 0); the attempt ends CANCELLED. False when the
  // attempt is not running.
  bool Cancel(const AttemptKey& key, absl::Duration grace);

  // Attempts whose ranks are running or being stopped.
  std::vector<AttemptKey> Running() const;
  // What those attempts hold: GPUs and CPU slots of their assignments, and
  // their ranks (one tune-train process each). For /metrics.
  struct Usage {
    int gpus = 0;
    int cpu_slots = 0;
    int ranks = 0;
  };
  Usage CurrentUsage() const;

  // Worker shutdown: stops every attempt (SIGTERM, SIGKILL after `grace`) and
  // waits for the supervisors. These attempts get no `exited` event: the
  // server sees the worker leave and requeues their jobs (resuming from the
  // last checkpoint) instead of failing them. Launch refuses new work after.
  void StopAll(absl::Duration grace);

  // Waits until no attempt runs; true when idle before `deadline`.
  bool WaitIdle(absl::Time deadline);

  // Attempt directory for `key`: <work_dir>/jobs/<job_id>/attempt-<n>.
  std::string AttemptDir(const AttemptKey& key) const;

 private:
  struct Attempt;
  void Supervise(std::shared_ptr<Attempt> attempt);
  void JoinFinishedLocked(std::vector<std::thread>* out);

  const LauncherOptions options_;
  Outbox* const outbox_;

  mutable std::mutex mu_;
  std::condition_variable idle_cv_;
  std::map<AttemptKey, std::shared_ptr<Attempt>> running_;
  std::vector<std::thread> finished_;  // threads of ended attempts, joined lazily
  bool stopped_ = false;
  ExitCallback on_exit_;
};

// A free TCP port on 127.0.0.1 (bind port 0, read it back, close).
absl::StatusOr<int> PickFreePort();

// True for ids safe as one path component: [A-Za-z0-9._-], 1..128 chars, not "." or "..".
bool IsSafeJobId(const std::string& job_id);

}  // namespace tune::worker

#endif  // TUNE_WORKER_AGENT_RANK_LAUNCHER_H_
