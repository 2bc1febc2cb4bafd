#include "server/jobs/job_state_machine.h"

#include <set>

#include <gtest/gtest.h>

namespace tune::server {
namespace {

const absl::Time kNow = absl::FromUnixSeconds(1700000000);

JobRecord Queued(int max_retries = 2) {
  JobRecord r;
  r.job.set_id("job-000001");
  r.job.set_state(v1::JOB_STATE_QUEUED);
  r.job.set_attempt(1);
  r.job.mutable_spec()->set_max_retries(max_retries);
  r.job.mutable_spec()->mutable_resources()->set_gpus(2);
  return r;
}

JobRecord Running(int max_retries = 2) {
  JobRecord r = Queued(max_retries);
  EXPECT_TRUE(ScheduleJob(&r, "w1", {0, 1}, kNow).ok());
  EXPECT_TRUE(MarkRunning(&r, kNow).ok());
  return r;
}

TEST(JobStateTest, AllowedTransitions) {
  using S = v1::JobState;
  const S kAll[] = {v1::JOB_STATE_QUEUED,    v1::JOB_STATE_SCHEDULED, v1::JOB_STATE_RUNNING,
                    v1::JOB_STATE_SUCCEEDED, v1::JOB_STATE_FAILED,    v1::JOB_STATE_CANCELLED};
  std::set<std::pair<S, S>> allowed = {
      {v1::JOB_STATE_QUEUED, v1::JOB_STATE_SCHEDULED},
      {v1::JOB_STATE_QUEUED, v1::JOB_STATE_CANCELLED},
      {v1::JOB_STATE_SCHEDULED, v1::JOB_STATE_RUNNING},
      {v1::JOB_STATE_SCHEDULED, v1::JOB_STATE_QUEUED},
      {v1::JOB_STATE_SCHEDULED, v1::JOB_STATE_SUCCEEDED},
      {v1::JOB_STATE_SCHEDULED, v1::JOB_STATE_FAILED},
      {v1::JOB_STATE_SCHEDULED, v1::JOB_STATE_CANCELLED},
      {v1::JOB_STATE_RUNNING, v1::JOB_STATE_QUEUED},
      {v1::JOB_STATE_RUNNING, v1::JOB_STATE_SUCCEEDED},
      {v1::JOB_STATE_RUNNING, v1::JOB_STATE_FAILED},
      {v1::JOB_STATE_RUNNING, v1::JOB_STATE_CANCELLED},
  };
  for (S from : kAll) {
    for (S to : kAll) {
      EXPECT_EQ(IsAllowedTransition(from, to), allowed.count({from, to}) > 0)
          << v1::JobState_Name(from) << " -> " << v1::JobState_Name(to);
    }
  }
  EXPECT_TRUE(IsTerminal(v1::JOB_STATE_CANCELLED));
  EXPECT_FALSE(IsTerminal(v1::JOB_STATE_RUNNING));
}

TEST(JobStateTest, HappyPath) {
  JobRecord r = Queued();
  ASSERT_TRUE(ScheduleJob(&r, "w1", {0, 1}, kNow).ok());
  EXPECT_EQ(r.state(), v1::JOB_STATE_SCHEDULED);
  EXPECT_EQ(r.job.worker(), "w1");
  EXPECT_EQ(r.job.devices_size(), 2);
  EXPECT_FALSE(ShouldResume(r));
  // Scheduling twice is refused and changes nothing.
  JobRecord copy = r;
  EXPECT_EQ(ScheduleJob(&copy, "w2", {3}, kNow).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(copy.job.worker(), "w1");
  ASSERT_TRUE(MarkRunning(&r, kNow + absl::Seconds(1)).ok());
  EXPECT_EQ(r.state(), v1::JOB_STATE_RUNNING);
  EXPECT_TRUE(r.job.has_started_at());
  ASSERT_TRUE(MarkRunning(&r, kNow).ok());  // Idempotent.
  auto out = ApplyExited(&r, ParseExitedPayload(R"({"state":"SUCCEEDED","reason":""})"), kNow);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, ExitOutcome::kTerminal);
  EXPECT_EQ(r.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(r.job.reason(), v1::FAILURE_REASON_UNSPECIFIED);
  EXPECT_TRUE(r.job.has_finished_at());
  // Nothing leaves a terminal state.
  EXPECT_FALSE(MarkRunning(&r, kNow).ok());
  EXPECT_FALSE(HandleAttemptLost(&r, "x", kNow).ok());
  EXPECT_FALSE(ApplyExited(&r, ExitReport{}, kNow).ok());
}

TEST(JobStateTest, ExitedFailureKeepsTheWorkersReason) {
  JobRecord r = Running();
  auto out = ApplyExited(
      &r, ParseExitedPayload(R"({"state":"FAILED","reason":"OOM","message":"rank 1 OOM"})"), kNow);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(r.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(r.job.reason(), v1::FAILURE_REASON_OOM);
  EXPECT_EQ(r.job.message(), "rank 1 OOM");

  JobRecord s = Running();
  ASSERT_TRUE(ApplyExited(&s, ParseExitedPayload(R"({"state":"FAILED"})"), kNow).ok());
  EXPECT_EQ(s.job.reason(), v1::FAILURE_REASON_CRASH);
}

TEST(JobStateTest, UnreadableExitedPayloadFailsTheJobInsteadOfHanging) {
  ExitReport e = ParseExitedPayload("not json");
  EXPECT_EQ(e.state, v1::JOB_STATE_FAILED);
  EXPECT_EQ(e.reason, v1::FAILURE_REASON_CRASH);
  EXPECT_NE(e.message.find("not json"), std::string::npos);
  e = ParseExitedPayload(R"({"state":"EXPLODED"})");
  EXPECT_EQ(e.state, v1::JOB_STATE_FAILED);
  EXPECT_NE(e.message.find("EXPLODED"), std::string::npos);
}

TEST(JobStateTest, CancelQueuedIsImmediate) {
  JobRecord r = Queued();
  auto out = RequestCancel(&r, kNow);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, CancelOutcome::kCancelled);
  EXPECT_EQ(r.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(r.job.reason(), v1::FAILURE_REASON_CANCELLED);
  out = RequestCancel(&r, kNow);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, CancelOutcome::kAlreadyCancelled);
}

TEST(JobStateTest, CancelRunningWaitsForTheWorker) {
  JobRecord r = Running();
  auto out = RequestCancel(&r, kNow);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, CancelOutcome::kRequested);
  EXPECT_EQ(r.state(), v1::JOB_STATE_RUNNING);
  EXPECT_TRUE(r.job.cancel_requested());
  EXPECT_EQ(*RequestCancel(&r, kNow), CancelOutcome::kAlreadyRequested);
  // The ranks died from the SIGTERM: whatever the exit says, the job is CANCELLED.
  ASSERT_TRUE(ApplyExited(&r, ParseExitedPayload(R"({"state":"FAILED","reason":"CRASH"})"), kNow)
                  .ok());
  EXPECT_EQ(r.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(r.job.reason(), v1::FAILURE_REASON_CANCELLED);

  // A job that finished before the signal landed keeps its success.
  JobRecord s = Running();
  ASSERT_TRUE(RequestCancel(&s, kNow).ok());
  ASSERT_TRUE(ApplyExited(&s, ParseExitedPayload(R"({"state":"SUCCEEDED"})"), kNow).ok());
  EXPECT_EQ(s.state(), v1::JOB_STATE_SUCCEEDED);
}

TEST(JobStateTest, CancelOfFinishedJobIsRefused) {
  JobRecord r = Running();
  ASSERT_TRUE(ApplyExited(&r, ParseExitedPayload(R"({"state":"SUCCEEDED"})"), kNow).ok());
  auto out = RequestCancel(&r, kNow);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(out.status().message().find("SUCCEEDED"), std::string::npos);
}

TEST(JobStateTest, LostWorkerRequeuesUntilRetriesRunOut) {
  JobRecord r = Running(/*max_retries=*/1);
  auto out = HandleAttemptLost(&r, "worker w1 lost", kNow);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, LostOutcome::kRequeued);
  EXPECT_EQ(r.state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(r.job.attempt(), 2);
  EXPECT_EQ(r.retries_used, 1);
  EXPECT_TRUE(r.job.worker().empty());
  EXPECT_EQ(r.job.devices_size(), 0);
  EXPECT_FALSE(r.job.has_started_at());
  EXPECT_TRUE(ShouldResume(r));
  EXPECT_NE(r.job.message().find("worker w1 lost"), std::string::npos);

  ASSERT_TRUE(ScheduleJob(&r, "w2", {0, 1}, kNow).ok());
  out = HandleAttemptLost(&r, "worker w2 lost", kNow);  // SCHEDULED counts too.
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, LostOutcome::kFailed);
  EXPECT_EQ(r.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(r.job.reason(), v1::FAILURE_REASON_LOST);
  EXPECT_EQ(r.job.attempt(), 2);
}

TEST(JobStateTest, LostWorkerWithPendingCancelEndsCancelled) {
  JobRecord r = Running();
  ASSERT_TRUE(RequestCancel(&r, kNow).ok());
  auto out = HandleAttemptLost(&r, "worker w1 lost", kNow);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, LostOutcome::kCancelled);
  EXPECT_EQ(r.state(), v1::JOB_STATE_CANCELLED);
}

TEST(JobStateTest, UnrequestedCancelFromWorkerIsRetried) {
  JobRecord r = Running(/*max_retries=*/1);
  auto out = ApplyExited(&r, ParseExitedPayload(R"({"state":"CANCELLED","reason":"CANCELLED"})"),
                         kNow);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, ExitOutcome::kRequeued);
  EXPECT_EQ(r.state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(r.job.attempt(), 2);
}

}  // namespace
}  // namespace tune::server
