// Drives the Coordinator (store + scheduler + state machine + worker registry)
// directly, without gRPC, on a fake clock.
#include "server/coordinator/coordinator.h"

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/control/time_util.h"

namespace tune::server {
namespace {

namespace fs = std::filesystem;

class CoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("tune_coord_test_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    OpenCoordinator();
  }
  void TearDown() override {
    coord_.reset();
    store_.reset();
    fs::remove_all(dir_);
  }

  // (Re)starts the coordinator over the same database, like a server restart.
  void OpenCoordinator() {
    coord_.reset();
    store_.reset();
    auto s = JobStore::Open((dir_ / "jobs.db").string());
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
    CoordinatorOptions o;
    o.heartbeat_timeout = absl::Seconds(10);
    o.cancel_grace = absl::Seconds(3);
    o.join_token = join_token_;
    o.clock = [this] { return now_; };
    coord_ = std::make_unique<Coordinator>(store_.get(), &metrics_, o);
    ASSERT_TRUE(coord_->Recover().ok());
  }

  static v1::JobSpec Spec(int cpu_ranks, int priority = 0, int max_retries = 2) {
    v1::JobSpec s;
    s.set_name("test");
    s.set_priority(priority);
    s.set_max_retries(max_retries);
    s.mutable_resources()->set_cpu_ranks(cpu_ranks);
    return s;
  }

  std::string Submit(int cpu_ranks, int priority = 0, int max_retries = 2) {
    auto job = coord_->Submit(Spec(cpu_ranks, priority, max_retries), "name: test\n");
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? job->id() : "";
  }

  std::shared_ptr<AgentSession> Connect(const std::string& name, int cpu_slots,
                                        std::vector<std::pair<std::string, int>> running = {},
                                        v1::RegisterResponse* resp_out = nullptr) {
    v1::RegisterRequest req;
    req.mutable_info()->set_name(name);
    req.mutable_info()->set_hostname("host-" + name);
    req.mutable_info()->set_cpu_slots(cpu_slots);
    req.set_join_token(join_token_);
    for (auto& [job, attempt] : running) {
      auto* ra = req.add_running();
      ra->set_job_id(job);
      ra->set_attempt(attempt);
    }
    auto resp = coord_->Register(req);
    EXPECT_TRUE(resp.ok()) << resp.status();
    if (!resp.ok()) return nullptr;
    if (resp_out) *resp_out = *resp;
    auto session = coord_->AttachSession(resp->session_id());
    EXPECT_TRUE(session.ok()) << session.status();
    return session.ok() ? *session : nullptr;
  }

  absl::StatusOr<v1::EventAck> Send(AgentSession& s, const std::string& job, int attempt,
                                    int64_t source_seq, v1::EventType type,
                                    nlohmann::json payload, int rank = -1) {
    v1::AgentEvent e;
    e.set_job_id(job);
    e.set_attempt(attempt);
    e.set_source_seq(source_seq);
    e.set_rank(rank);
    e.set_type(type);
    *e.mutable_time() = ToProtoTime(now_);
    e.set_payload_json(payload.dump());
    return coord_->HandleAgentEvent(s, e);
  }

  void Heartbeat(AgentSession& s, std::vector<std::pair<std::string, int>> running) {
    v1::Heartbeat hb;
    for (auto& [job, attempt] : running) {
      auto* ra = hb.add_running();
      ra->set_job_id(job);
      ra->set_attempt(attempt);
    }
    ASSERT_TRUE(coord_->Heartbeat(s, hb).ok());
  }

  v1::Job Get(const std::string& id) {
    auto j = coord_->GetJob(id);
    EXPECT_TRUE(j.ok()) << j.status();
    return j.ok() ? *j : v1::Job();
  }

  std::vector<v1::JobEvent> Events(const std::string& id) {
    auto page = coord_->GetJobEvents(id, 0, 0);
    EXPECT_TRUE(page.ok()) << page.status();
    return page.ok() ? page->events : std::vector<v1::JobEvent>();
  }

  static std::vector<v1::Assignment> Assignments(AgentSession& s,
                                                 std::vector<v1::CancelAttempt>* cancels = nullptr) {
    std::vector<v1::Assignment> out;
    for (const v1::ServerMessage& m : s.Drain()) {
      if (m.has_assignment()) out.push_back(m.assignment());
      if (m.has_cancel() && cancels) cancels->push_back(m.cancel());
    }
    return out;
  }

  static std::string StateOf(const v1::JobEvent& e) {
    return nlohmann::json::parse(e.payload_json()).value("state", "");
  }

  fs::path dir_;
  std::string join_token_;
  absl::Time now_ = absl::FromUnixSeconds(1700000000);
  ServerMetrics metrics_;
  std::unique_ptr<JobStore> store_;
  std::unique_ptr<Coordinator> coord_;
};

const nlohmann::json kStarted = {{"type", "started"}, {"worker", "w1"}};
const nlohmann::json kSucceeded = {{"type", "exited"}, {"state", "SUCCEEDED"}, {"reason", ""}};

TEST_F(CoordinatorTest, JobRunsToSuccessWithGapFreeDeduplicatedEvents) {
  const std::string id = Submit(2);
  EXPECT_EQ(id, "job-000001");
  EXPECT_EQ(Get(id).state(), v1::JOB_STATE_QUEUED);
  auto w1 = Connect("w1", 2);
  ASSERT_NE(w1, nullptr);
  coord_->Tick();
  v1::Job j = Get(id);
  EXPECT_EQ(j.state(), v1::JOB_STATE_SCHEDULED);
  EXPECT_EQ(j.worker(), "w1");
  auto assigned = Assignments(*w1);
  ASSERT_EQ(assigned.size(), 1u);
  EXPECT_EQ(assigned[0].job_id(), id);
  EXPECT_EQ(assigned[0].attempt(), 1);
  EXPECT_EQ(assigned[0].cpu_ranks(), 2);
  EXPECT_EQ(assigned[0].gpus_size(), 0);
  EXPECT_FALSE(assigned[0].resume());
  EXPECT_EQ(assigned[0].spec_yaml(), "name: test\n");

  auto ack = Send(*w1, id, 1, 1, v1::EVENT_TYPE_STARTED, kStarted);
  ASSERT_TRUE(ack.ok()) << ack.status();
  EXPECT_EQ(ack->source_seq(), 1);
  EXPECT_EQ(Get(id).state(), v1::JOB_STATE_RUNNING);
  nlohmann::json step = {{"type", "step"}, {"step", 3}, {"loss", 1.5}, {"lr", 1e-4}};
  ASSERT_TRUE(Send(*w1, id, 1, 2, v1::EVENT_TYPE_STEP, step, 0).ok());
  // Resent after a reconnect: acknowledged again, stored once.
  ack = Send(*w1, id, 1, 2, v1::EVENT_TYPE_STEP, step, 0);
  ASSERT_TRUE(ack.ok());
  EXPECT_EQ(ack->source_seq(), 2);
  j = Get(id);
  EXPECT_EQ(j.last_step(), 3);
  EXPECT_DOUBLE_EQ(j.last_loss(), 1.5);
  ASSERT_TRUE(Send(*w1, id, 1, 3, v1::EVENT_TYPE_EXITED, kSucceeded).ok());
  j = Get(id);
  EXPECT_EQ(j.state(), v1::JOB_STATE_SUCCEEDED);

  auto events = Events(id);
  ASSERT_EQ(events.size(), 7u);
  for (size_t i = 0; i < events.size(); ++i) EXPECT_EQ(events[i].seq(), static_cast<int64_t>(i + 1));
  EXPECT_EQ(StateOf(events[0]), "QUEUED");
  EXPECT_EQ(StateOf(events[1]), "SCHEDULED");
  EXPECT_EQ(events[2].type(), v1::EVENT_TYPE_STARTED);
  EXPECT_EQ(events[2].attempt(), 1);
  EXPECT_EQ(StateOf(events[3]), "RUNNING");
  EXPECT_EQ(events[4].type(), v1::EVENT_TYPE_STEP);
  EXPECT_EQ(events[5].type(), v1::EVENT_TYPE_EXITED);
  EXPECT_EQ(events[6].type(), v1::EVENT_TYPE_STATE);
  EXPECT_EQ(events[6].attempt(), 0);
  EXPECT_EQ(events[6].rank(), -1);
  EXPECT_EQ(StateOf(events[6]), "SUCCEEDED");
  EXPECT_EQ(j.last_event_seq(), 7);

  // The slots are free again.
  auto workers = coord_->ListWorkers();
  ASSERT_EQ(workers.size(), 1u);
  EXPECT_EQ(workers[0].free_cpu_slots(), 2);
  EXPECT_EQ(workers[0].job_ids_size(), 0);
}

TEST_F(CoordinatorTest, WatchReplaysThenFollowsAndEndsAfterTerminalState) {
  const std::string id = Submit(1);
  auto w1 = Connect("w1", 1);
  coord_->Tick();
  ASSERT_TRUE(Send(*w1, id, 1, 1, v1::EVENT_TYPE_STARTED, kStarted).ok());

  std::vector<v1::WatchJobResponse> seen;
  std::mutex mu;
  std::atomic<bool> done{false};
  std::thread watcher([&] {
    absl::Status s = coord_->Watch(
        id, 0,
        [&](const v1::WatchJobResponse& r) {
          std::lock_guard<std::mutex> lock(mu);
          seen.push_back(r);
          return true;
        },
        [] { return false; });
    EXPECT_TRUE(s.ok()) << s;
    done = true;
  });
  // Wait for the replay of the 4 stored events, then add live ones.
  for (int i = 0; i < 200; ++i) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (seen.size() >= 4) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_FALSE(done);
  ASSERT_TRUE(Send(*w1, id, 1, 2, v1::EVENT_TYPE_STEP, {{"step", 1}, {"loss", 2.0}}, 0).ok());
  ASSERT_TRUE(Send(*w1, id, 1, 3, v1::EVENT_TYPE_EXITED, kSucceeded).ok());
  watcher.join();
  ASSERT_EQ(seen.size(), 7u);
  for (size_t i = 0; i < seen.size(); ++i) {
    EXPECT_EQ(seen[i].event().seq(), static_cast<int64_t>(i + 1));
  }
  // Each snapshot carries the state as of its event.
  EXPECT_EQ(seen[0].job().state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(seen[1].job().state(), v1::JOB_STATE_SCHEDULED);
  EXPECT_EQ(seen[2].job().state(), v1::JOB_STATE_SCHEDULED);
  EXPECT_EQ(seen[3].job().state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(seen[5].job().state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(seen[6].job().state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_FALSE(seen[5].job().has_finished_at());

  // Resuming after the last seen seq of a finished job returns at once.
  int more = 0;
  ASSERT_TRUE(coord_->Watch(id, 7, [&](const v1::WatchJobResponse&) { return ++more, true; },
                            [] { return false; })
                  .ok());
  EXPECT_EQ(more, 0);
  // Resuming in the middle replays just the rest.
  ASSERT_TRUE(coord_->Watch(id, 5, [&](const v1::WatchJobResponse&) { return ++more, true; },
                            [] { return false; })
                  .ok());
  EXPECT_EQ(more, 2);
  EXPECT_EQ(coord_->Watch("job-000404", 0, [](const v1::WatchJobResponse&) { return true; },
                          [] { return false; })
                .code(),
            absl::StatusCode::kNotFound);
}

TEST_F(CoordinatorTest, LostWorkerRequeuesAndAnotherWorkerResumes) {
  const std::string id = Submit(2, 0, /*max_retries=*/1);
  auto w1 = Connect("w1", 2);
  coord_->Tick();
  ASSERT_TRUE(Send(*w1, id, 1, 1, v1::EVENT_TYPE_STARTED, kStarted).ok());
  ASSERT_TRUE(Send(*w1, id, 1, 2, v1::EVENT_TYPE_CHECKPOINT, {{"step", 10}}, 0).ok());
  now_ += absl::Seconds(5);
  auto w2 = Connect("w2", 2);
  now_ += absl::Seconds(6);  // w1 silent for 11 s > 10 s; w2 for 6 s.
  coord_->Tick();
  v1::Job j = Get(id);
  EXPECT_EQ(j.state(), v1::JOB_STATE_SCHEDULED);
  EXPECT_EQ(j.worker(), "w2");
  EXPECT_EQ(j.attempt(), 2);
  EXPECT_EQ(j.last_checkpoint_step(), 10);
  EXPECT_TRUE(w1->closed());
  auto assigned = Assignments(*w2);
  ASSERT_EQ(assigned.size(), 1u);
  EXPECT_EQ(assigned[0].attempt(), 2);
  EXPECT_TRUE(assigned[0].resume());
  auto workers = coord_->ListWorkers();
  ASSERT_EQ(workers.size(), 2u);
  EXPECT_EQ(workers[0].state(), v1::WORKER_STATE_LOST);

  // The state history shows the requeue.
  std::vector<std::string> states;
  for (const auto& e : Events(id)) {
    if (e.type() == v1::EVENT_TYPE_STATE) states.push_back(StateOf(e));
  }
  EXPECT_EQ(states, (std::vector<std::string>{"QUEUED", "SCHEDULED", "RUNNING", "QUEUED",
                                              "SCHEDULED"}));

  // w1 comes back and still reports attempt 1: it is stale and its late events
  // are stored but change nothing.
  v1::RegisterResponse resp;
  auto w1b = Connect("w1", 2, {{id, 1}}, &resp);
  ASSERT_EQ(resp.stale_size(), 1);
  EXPECT_EQ(resp.stale(0).job_id(), id);
  ASSERT_TRUE(Send(*w1b, id, 1, 3, v1::EVENT_TYPE_STEP, {{"step", 11}, {"loss", 0.5}}, 0).ok());
  j = Get(id);
  EXPECT_EQ(j.state(), v1::JOB_STATE_SCHEDULED);
  EXPECT_EQ(j.worker(), "w2");
  EXPECT_EQ(j.last_step(), 0);
  std::vector<v1::CancelAttempt> cancels;
  Assignments(*w1b, &cancels);
  ASSERT_EQ(cancels.size(), 1u);
  EXPECT_EQ(cancels[0].attempt(), 1);

  // w2 is lost too: no retries left.
  now_ += absl::Seconds(11);
  Heartbeat(*w1b, {});
  coord_->Tick();
  j = Get(id);
  EXPECT_EQ(j.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(j.reason(), v1::FAILURE_REASON_LOST);
}

TEST_F(CoordinatorTest, CancelRunningAsksTheWorkerThenEndsCancelled) {
  const std::string id = Submit(1);
  auto w1 = Connect("w1", 1);
  coord_->Tick();
  Assignments(*w1);
  ASSERT_TRUE(Send(*w1, id, 1, 1, v1::EVENT_TYPE_STARTED, kStarted).ok());
  auto c = coord_->Cancel(id);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->state(), v1::JOB_STATE_RUNNING);
  EXPECT_TRUE(c->cancel_requested());
  std::vector<v1::CancelAttempt> cancels;
  Assignments(*w1, &cancels);
  ASSERT_EQ(cancels.size(), 1u);
  EXPECT_EQ(cancels[0].job_id(), id);
  EXPECT_EQ(cancels[0].attempt(), 1);
  EXPECT_EQ(cancels[0].grace_ms(), 3000);
  ASSERT_TRUE(Send(*w1, id, 1, 2, v1::EVENT_TYPE_EXITED,
                   {{"state", "CANCELLED"}, {"reason", "CANCELLED"}, {"exit_codes", {143}}})
                  .ok());
  v1::Job j = Get(id);
  EXPECT_EQ(j.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(j.reason(), v1::FAILURE_REASON_CANCELLED);
  EXPECT_EQ(coord_->Cancel(id)->state(), v1::JOB_STATE_CANCELLED);  // Idempotent.
}

TEST_F(CoordinatorTest, CancelQueuedIsImmediateAndFinishedJobsRefuse) {
  const std::string id = Submit(1);
  auto c = coord_->Cancel(id);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->state(), v1::JOB_STATE_CANCELLED);
  auto w1 = Connect("w1", 1);
  coord_->Tick();
  EXPECT_TRUE(Assignments(*w1).empty());

  const std::string id2 = Submit(1);
  coord_->Tick();
  ASSERT_TRUE(Send(*w1, id2, 1, 1, v1::EVENT_TYPE_STARTED, kStarted).ok());
  ASSERT_TRUE(Send(*w1, id2, 1, 2, v1::EVENT_TYPE_EXITED, kSucceeded).ok());
  EXPECT_EQ(coord_->Cancel(id2).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(coord_->Cancel("job-000404").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CoordinatorTest, PriorityOrderAcrossWorkersWithoutOverCommit) {
  const std::string low = Submit(2, 1);
  const std::string high = Submit(2, 5);
  const std::string mid = Submit(2, 3);
  auto a = Connect("a", 2);
  auto b = Connect("b", 2);
  coord_->Tick();
  EXPECT_EQ(Get(high).state(), v1::JOB_STATE_SCHEDULED);
  EXPECT_EQ(Get(mid).state(), v1::JOB_STATE_SCHEDULED);
  EXPECT_NE(Get(high).worker(), Get(mid).worker());
  v1::Job l = Get(low);
  EXPECT_EQ(l.state(), v1::JOB_STATE_QUEUED);
  EXPECT_NE(l.pending_reason().find("waiting for 2 free CPU slots"), std::string::npos)
      << l.pending_reason();
  // When one finishes, the low-priority job takes its slots.
  auto& w_high = Get(high).worker() == "a" ? a : b;
  ASSERT_TRUE(Send(*w_high, high, 1, 1, v1::EVENT_TYPE_STARTED, kStarted).ok());
  ASSERT_TRUE(Send(*w_high, high, 1, 2, v1::EVENT_TYPE_EXITED, kSucceeded).ok());
  coord_->Tick();
  EXPECT_EQ(Get(low).state(), v1::JOB_STATE_SCHEDULED);
  EXPECT_EQ(Get(low).worker(), Get(high).worker());
  for (const v1::Worker& w : coord_->ListWorkers()) EXPECT_EQ(w.free_cpu_slots(), 0);
}

TEST_F(CoordinatorTest, ServerRestartKeepsRunningJobWhenWorkerReturns) {
  const std::string id = Submit(1);
  {
    auto w1 = Connect("w1", 1);
    coord_->Tick();
    ASSERT_TRUE(Send(*w1, id, 1, 1, v1::EVENT_TYPE_STARTED, kStarted).ok());
    ASSERT_TRUE(Send(*w1, id, 1, 2, v1::EVENT_TYPE_STEP, {{"step", 1}, {"loss", 3.0}}, 0).ok());
  }
  OpenCoordinator();  // "kill -9" + restart on the same database.
  now_ += absl::Seconds(3);
  v1::Job j = Get(id);
  EXPECT_EQ(j.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(j.last_event_seq(), 5);
  v1::RegisterResponse resp;
  auto w1 = Connect("w1", 1, {{id, 1}}, &resp);
  EXPECT_EQ(resp.stale_size(), 0);
  EXPECT_TRUE(Assignments(*w1).empty()) << "a running attempt must not be assigned again";
  // The worker resends an event the old server stored but never acknowledged.
  auto ack = Send(*w1, id, 1, 2, v1::EVENT_TYPE_STEP, {{"step", 1}, {"loss", 3.0}}, 0);
  ASSERT_TRUE(ack.ok());
  EXPECT_EQ(Get(id).last_event_seq(), 5);
  for (int i = 0; i < 3; ++i) {
    now_ += absl::Seconds(8);
    Heartbeat(*w1, {{id, 1}});
    coord_->Tick();
  }
  EXPECT_EQ(Get(id).state(), v1::JOB_STATE_RUNNING);
  ASSERT_TRUE(Send(*w1, id, 1, 3, v1::EVENT_TYPE_EXITED, kSucceeded).ok());
  EXPECT_EQ(Get(id).state(), v1::JOB_STATE_SUCCEEDED);
}

TEST_F(CoordinatorTest, ServerRestartRequeuesWhenWorkerNeverReturns) {
  const std::string id = Submit(1);
  {
    auto w1 = Connect("w1", 1);
    coord_->Tick();
    ASSERT_TRUE(Send(*w1, id, 1, 1, v1::EVENT_TYPE_STARTED, kStarted).ok());
  }
  now_ += absl::Seconds(60);  // Downtime does not count against the worker.
  OpenCoordinator();
  coord_->Tick();
  EXPECT_EQ(Get(id).state(), v1::JOB_STATE_RUNNING);
  now_ += absl::Seconds(11);
  coord_->Tick();
  v1::Job j = Get(id);
  EXPECT_EQ(j.state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(j.attempt(), 2);
}

TEST_F(CoordinatorTest, AttemptTheWorkerForgotIsRequeuedAfterTheTimeout) {
  const std::string id = Submit(1);
  auto w1 = Connect("w1", 1);
  coord_->Tick();
  ASSERT_TRUE(Send(*w1, id, 1, 1, v1::EVENT_TYPE_STARTED, kStarted).ok());
  // The worker process restarted: it registers without the attempt.
  auto w1b = Connect("w1", 1);
  EXPECT_TRUE(w1->closed()) << "the old session is superseded";
  v1::Heartbeat hb;
  EXPECT_EQ(coord_->Heartbeat(*w1, hb).code(), absl::StatusCode::kFailedPrecondition);
  for (int i = 0; i < 3; ++i) {
    now_ += absl::Seconds(4);
    Heartbeat(*w1b, {});
    coord_->Tick();
  }
  v1::Job j = Get(id);
  // Requeued as attempt 2 and, the worker being free, placed there again.
  EXPECT_EQ(j.attempt(), 2);
  EXPECT_EQ(j.state(), v1::JOB_STATE_SCHEDULED);
  std::vector<v1::CancelAttempt> cancels;
  auto assigned = Assignments(*w1b, &cancels);
  ASSERT_EQ(assigned.size(), 1u);
  EXPECT_TRUE(assigned[0].resume());
  ASSERT_EQ(cancels.size(), 1u);
  EXPECT_EQ(cancels[0].attempt(), 1);
}

TEST_F(CoordinatorTest, AttemptMissingFromHeartbeatsIsRequeuedAfterTheTimeout) {
  const std::string id = Submit(1);
  auto w1 = Connect("w1", 1);
  coord_->Tick();
  ASSERT_TRUE(Send(*w1, id, 1, 1, v1::EVENT_TYPE_STARTED, kStarted).ok());
  // Listed: stays RUNNING however long it takes.
  for (int i = 0; i < 4; ++i) {
    now_ += absl::Seconds(6);
    Heartbeat(*w1, {{id, 1}});
    coord_->Tick();
  }
  EXPECT_EQ(Get(id).state(), v1::JOB_STATE_RUNNING);
  // Missing briefly (the exited event is on its way): still RUNNING.
  now_ += absl::Seconds(1);
  Heartbeat(*w1, {});
  now_ += absl::Seconds(5);
  coord_->Tick();
  EXPECT_EQ(Get(id).state(), v1::JOB_STATE_RUNNING);
  // Missing for longer than the timeout, no exited event: the attempt is lost.
  for (int i = 0; i < 3; ++i) {
    now_ += absl::Seconds(3);
    Heartbeat(*w1, {});
    coord_->Tick();
  }
  v1::Job j = Get(id);
  EXPECT_EQ(j.attempt(), 2);
  EXPECT_NE(j.state(), v1::JOB_STATE_RUNNING);
}

TEST_F(CoordinatorTest, LostAssignmentIsSentAgainOnReconnect) {
  const std::string id = Submit(1);
  auto w1 = Connect("w1", 1);
  coord_->Tick();
  w1->Drain();  // The assignment never made it over the wire.
  coord_->DetachSession(*w1);
  auto w1b = Connect("w1", 1);
  auto assigned = Assignments(*w1b);
  ASSERT_EQ(assigned.size(), 1u);
  EXPECT_EQ(assigned[0].job_id(), id);
  EXPECT_EQ(assigned[0].attempt(), 1);
}

TEST_F(CoordinatorTest, RegistrationChecks) {
  v1::RegisterRequest nameless;
  EXPECT_EQ(coord_->Register(nameless).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(coord_->AttachSession("bogus").status().code(), absl::StatusCode::kFailedPrecondition);
  v1::RegisterResponse resp;
  auto w = Connect("w1", 1, {{"job-000999", 1}}, &resp);
  ASSERT_EQ(resp.stale_size(), 1);
  EXPECT_EQ(resp.stale(0).job_id(), "job-000999");
  EXPECT_GT(resp.heartbeat_interval_ms(), 0);
  // Events of jobs this server never heard of are acknowledged (so the worker
  // drops them) and the attempt is cancelled.
  auto ack = Send(*w, "job-000999", 1, 1, v1::EVENT_TYPE_STEP, {{"step", 1}}, 0);
  ASSERT_TRUE(ack.ok()) << ack.status();
  std::vector<v1::CancelAttempt> cancels;
  Assignments(*w, &cancels);
  EXPECT_EQ(cancels.size(), 1u);
  EXPECT_EQ(Send(*w, "", 1, 1, v1::EVENT_TYPE_STEP, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(CoordinatorTest, JoinTokenIsEnforced) {
  join_token_ = "s3cret";
  OpenCoordinator();
  v1::RegisterRequest req;
  req.mutable_info()->set_name("w1");
  req.set_join_token("wrong");
  EXPECT_EQ(coord_->Register(req).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_NE(Connect("w1", 1), nullptr);
}

}  // namespace
}  // namespace tune::server
