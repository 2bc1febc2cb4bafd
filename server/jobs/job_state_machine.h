// The job lifecycle as pure logic (no I/O, no clocks: callers pass `now`).
//
//   QUEUED -> SCHEDULED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED
//   SCHEDULED | RUNNING -> QUEUED      worker lost while retries remain
//                                      (attempt + 1; the next attempt resumes)
//   SCHEDULED | RUNNING -> FAILED      worker lost, retries used up (reason LOST)
//   QUEUED -> CANCELLED                cancel of a job that holds no devices
//   SCHEDULED -> terminal              the worker reported `exited` before `started`
//
// Cancel of a SCHEDULED or RUNNING job only sets cancel_requested; the worker's
// `exited` event (or the loss of the worker) then ends it as CANCELLED.
// Each function changes `*job` only when it returns OK.
#ifndef TUNE_SERVER_JOBS_JOB_STATE_MACHINE_H_
#define TUNE_SERVER_JOBS_JOB_STATE_MACHINE_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/jobs/job_record.h"

namespace tune::server {

bool IsTerminal(v1::JobState state);
// True for the edges drawn above.
bool IsAllowedTransition(v1::JobState from, v1::JobState to);

// QUEUED -> SCHEDULED on `worker` with `devices` (GPU indices or CPU slots).
absl::Status ScheduleJob(JobRecord* job, const std::string& worker,
                         const std::vector<int>& devices, absl::Time now);

// The worker's `started` event: SCHEDULED -> RUNNING. Already RUNNING: no change.
absl::Status MarkRunning(JobRecord* job, absl::Time now);

enum class CancelOutcome {
  kCancelled,         // Was QUEUED; now CANCELLED.
  kRequested,         // SCHEDULED/RUNNING; cancel_requested set, worker must stop it.
  kAlreadyRequested,  // cancel_requested was already set; nothing changed.
  kAlreadyCancelled,  // Already CANCELLED; nothing changed.
};
// FAILED_PRECONDITION for SUCCEEDED and FAILED jobs.
absl::StatusOr<CancelOutcome> RequestCancel(JobRecord* job, absl::Time now);

// The fields of a worker `exited` event that decide the job's fate.
struct ExitReport {
  v1::JobState state = v1::JOB_STATE_FAILED;  // SUCCEEDED, FAILED or CANCELLED.
  v1::FailureReason reason = v1::FAILURE_REASON_UNSPECIFIED;
  std::string message;
};
// Reads `state`, `reason`, `message` of an exited payload (docs/events.md).
// Never fails: an unreadable payload becomes FAILED/CRASH with a message that
// says so, because a job must not stay RUNNING after its ranks are gone.
ExitReport ParseExitedPayload(const std::string& payload_json);

enum class ExitOutcome {
  kTerminal,  // The job ended (state/reason set from the report).
  kRequeued,  // The worker stopped the attempt on its own; retried (see below).
  kFailed,    // As kRequeued but retries were used up: FAILED/LOST.
};
// Applies the `exited` event of the job's current attempt (SCHEDULED or
// RUNNING). A report of CANCELLED that the user never asked for (the worker was
// shut down) counts like a lost worker. FAILED_PRECONDITION in other states.
absl::StatusOr<ExitOutcome> ApplyExited(JobRecord* job, const ExitReport& report,
                                        absl::Time now);

enum class LostOutcome {
  kRequeued,   // QUEUED again, attempt + 1, resume from the last checkpoint.
  kFailed,     // Retries used up: FAILED, reason LOST.
  kCancelled,  // A cancel was pending: CANCELLED.
};
// The current attempt vanished (worker lost, or it no longer runs it).
// `why` becomes part of the job message. FAILED_PRECONDITION unless SCHEDULED
// or RUNNING.
absl::StatusOr<LostOutcome> HandleAttemptLost(JobRecord* job, const std::string& why,
                                              absl::Time now);

// Whether the assignment of the current attempt should resume from a checkpoint.
bool ShouldResume(const JobRecord& job);

}  // namespace tune::server

#endif  // TUNE_SERVER_JOBS_JOB_STATE_MACHINE_H_
