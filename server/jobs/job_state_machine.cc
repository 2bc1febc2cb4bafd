#include "server/jobs/job_state_machine.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "common/control/spec_proto.h"
#include "common/control/time_util.h"

namespace tune::server {
namespace {

absl::Status BadTransition(const JobRecord& job, v1::JobState to) {
  return absl::FailedPreconditionError(absl::StrCat(
      "job ", job.id(), " is ", JobStateName(job.state()), "; it cannot become ",
      JobStateName(to)));
}

void Finish(JobRecord* job, v1::JobState state, v1::FailureReason reason,
            const std::string& message, absl::Time now) {
  v1::Job& j = job->job;
  j.set_state(state);
  j.set_reason(reason);
  j.set_message(message);
  *j.mutable_finished_at() = ToProtoTime(now);
}

}  // namespace

bool IsTerminal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

bool IsAllowedTransition(v1::JobState from, v1::JobState to) {
  switch (from) {
    case v1::JOB_STATE_QUEUED:
      return to == v1::JOB_STATE_SCHEDULED || to == v1::JOB_STATE_CANCELLED;
    case v1::JOB_STATE_SCHEDULED:
      return to == v1::JOB_STATE_RUNNING || to == v1::JOB_STATE_QUEUED || IsTerminal(to);
    case v1::JOB_STATE_RUNNING:
      return to == v1::JOB_STATE_QUEUED || IsTerminal(to);
    default:
      return false;
  }
}

absl::Status ScheduleJob(JobRecord* job, const std::string& worker,
                         const std::vector<int>& devices, absl::Time now) {
  if (job->state() != v1::JOB_STATE_QUEUED) return BadTransition(*job, v1::JOB_STATE_SCHEDULED);
  if (worker.empty() || devices.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("job ", job->id(), ": a placement needs a worker and at least one device"));
  }
  v1::Job& j = job->job;
  j.set_state(v1::JOB_STATE_SCHEDULED);
  j.set_reason(v1::FAILURE_REASON_UNSPECIFIED);
  j.set_worker(worker);
  j.clear_devices();
  for (int d : devices) j.add_devices(d);
  j.clear_pending_reason();
  j.set_message(absl::StrCat("attempt ", j.attempt(), " assigned to worker ", worker));
  return absl::OkStatus();
}

absl::Status MarkRunning(JobRecord* job, absl::Time now) {
  if (job->state() == v1::JOB_STATE_RUNNING) return absl::OkStatus();
  if (job->state() != v1::JOB_STATE_SCHEDULED) return BadTransition(*job, v1::JOB_STATE_RUNNING);
  v1::Job& j = job->job;
  j.set_state(v1::JOB_STATE_RUNNING);
  *j.mutable_started_at() = ToProtoTime(now);
  j.set_message(absl::StrCat("attempt ", j.attempt(), " running on worker ", j.worker()));
  return absl::OkStatus();
}

absl::StatusOr<CancelOutcome> RequestCancel(JobRecord* job, absl::Time now) {
  switch (job->state()) {
    case v1::JOB_STATE_QUEUED:
      job->job.set_cancel_requested(true);
      Finish(job, v1::JOB_STATE_CANCELLED, v1::FAILURE_REASON_CANCELLED,
             "cancelled by user before it was scheduled", now);
      return CancelOutcome::kCancelled;
    case v1::JOB_STATE_SCHEDULED:
    case v1::JOB_STATE_RUNNING:
      if (job->job.cancel_requested()) return CancelOutcome::kAlreadyRequested;
      job->job.set_cancel_requested(true);
      job->job.set_message(absl::StrCat("cancel requested; stopping attempt ",
                                        job->job.attempt(), " on worker ", job->job.worker()));
      return CancelOutcome::kRequested;
    case v1::JOB_STATE_CANCELLED:
      return CancelOutcome::kAlreadyCancelled;
    default:
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", job->id(), " already finished as ", JobStateName(job->state()),
          "; there is nothing to cancel"));
  }
}

ExitReport ParseExitedPayload(const std::string& payload_json) {
  ExitReport r;
  nlohmann::json j = nlohmann::json::parse(payload_json, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("state") || !j["state"].is_string()) {
    r.state = v1::JOB_STATE_FAILED;
    r.reason = v1::FAILURE_REASON_CRASH;
    r.message = absl::StrCat("worker sent an exited event without a readable state: ",
                             payload_json.substr(0, 200));
    return r;
  }
  std::string state = j["state"].get<std::string>();
  std::string reason = j.contains("reason") && j["reason"].is_string()
                           ? j["reason"].get<std::string>()
                           : std::string();
  if (j.contains("message") && j["message"].is_string()) r.message = j["message"].get<std::string>();
  r.reason = FailureReasonFromName(reason);
  if (state == "SUCCEEDED") {
    r.state = v1::JOB_STATE_SUCCEEDED;
    r.reason = v1::FAILURE_REASON_UNSPECIFIED;
  } else if (state == "CANCELLED") {
    r.state = v1::JOB_STATE_CANCELLED;
    r.reason = v1::FAILURE_REASON_CANCELLED;
  } else if (state == "FAILED") {
    r.state = v1::JOB_STATE_FAILED;
    if (r.reason == v1::FAILURE_REASON_UNSPECIFIED) r.reason = v1::FAILURE_REASON_CRASH;
  } else {
    r.state = v1::JOB_STATE_FAILED;
    r.reason = v1::FAILURE_REASON_CRASH;
    r.message = absl::StrCat("worker reported unknown exit state \"", state, "\"",
                             r.message.empty() ? "" : ": ", r.message);
  }
  return r;
}

absl::StatusOr<ExitOutcome> ApplyExited(JobRecord* job, const ExitReport& report,
                                        absl::Time now) {
  if (job->state() != v1::JOB_STATE_SCHEDULED && job->state() != v1::JOB_STATE_RUNNING) {
    return BadTransition(*job, report.state);
  }
  const int attempt = job->job.attempt();
  if (report.state == v1::JOB_STATE_SUCCEEDED) {
    Finish(job, v1::JOB_STATE_SUCCEEDED, v1::FAILURE_REASON_UNSPECIFIED,
           report.message.empty() ? absl::StrCat("attempt ", attempt, " finished")
                                  : report.message,
           now);
    return ExitOutcome::kTerminal;
  }
  if (job->job.cancel_requested()) {
    Finish(job, v1::JOB_STATE_CANCELLED, v1::FAILURE_REASON_CANCELLED,
           absl::StrCat("cancelled by user; attempt ", attempt, " stopped"), now);
    return ExitOutcome::kTerminal;
  }
  if (report.state == v1::JOB_STATE_CANCELLED) {
    // Nobody asked for it: the worker stopped the ranks (it is shutting down).
    // The job is not at fault, so it is retried like a lost worker.
    auto lost = HandleAttemptLost(
        job,
        absl::StrCat("worker ", job->job.worker(), " stopped attempt ", attempt,
                     report.message.empty() ? "" : ": ", report.message),
        now);
    if (!lost.ok()) return lost.status();
    return *lost == LostOutcome::kRequeued ? ExitOutcome::kRequeued : ExitOutcome::kFailed;
  }
  Finish(job, v1::JOB_STATE_FAILED, report.reason,
         report.message.empty()
             ? absl::StrCat("attempt ", attempt, " failed: ", FailureReasonName(report.reason))
             : report.message,
         now);
  return ExitOutcome::kTerminal;
}

absl::StatusOr<LostOutcome> HandleAttemptLost(JobRecord* job, const std::string& why,
                                              absl::Time now) {
  if (job->state() != v1::JOB_STATE_SCHEDULED && job->state() != v1::JOB_STATE_RUNNING) {
    return BadTransition(*job, v1::JOB_STATE_QUEUED);
  }
  v1::Job& j = job->job;
  if (j.cancel_requested()) {
    Finish(job, v1::JOB_STATE_CANCELLED, v1::FAILURE_REASON_CANCELLED,
           absl::StrCat("cancelled by user (", why, ")"), now);
    return LostOutcome::kCancelled;
  }
  if (job->retries_used >= job->max_retries()) {
    Finish(job, v1::JOB_STATE_FAILED, v1::FAILURE_REASON_LOST,
           absl::StrCat(why, "; no retries left (max_retries: ", job->max_retries(), ")"), now);
    return LostOutcome::kFailed;
  }
  ++job->retries_used;
  j.set_attempt(j.attempt() + 1);
  j.set_state(v1::JOB_STATE_QUEUED);
  j.set_reason(v1::FAILURE_REASON_UNSPECIFIED);
  j.clear_worker();
  j.clear_devices();
  j.clear_started_at();
  j.set_message(absl::StrCat(why, "; requeued as attempt ", j.attempt(), " (retry ",
                             job->retries_used, " of ", job->max_retries(),
                             "), resuming from the last checkpoint"));
  return LostOutcome::kRequeued;
}

bool ShouldResume(const JobRecord& job) { return job.job.attempt() > 1; }

}  // namespace tune::server
