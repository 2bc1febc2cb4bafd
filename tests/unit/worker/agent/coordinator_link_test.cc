// CoordinatorLink against an in-process AgentService on loopback: register,
// session, heartbeats, acks, dispatch of assignments/cancels/stale attempts,
// and reconnect with resend of every unacknowledged event after a restart.
#include "worker/agent/coordinator_link.h"

#include <atomic>
#include <deque>
#include <map>
#include <mutex>
#include <set>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "tests/unit/worker/agent/fake_agent_service.h"

namespace tune::worker {
namespace {

template <typename F>
bool Eventually(F f, absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (f()) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return f();
}

RelayedEvent Ev(int rank) {
  RelayedEvent e;
  e.rank = rank;
  e.type = v1::EVENT_TYPE_STEP;
  e.payload_json = R"({"type":"step"})";
  return e;
}

LinkOptions Options(int port) {
  LinkOptions o;
  o.server = "127.0.0.1:" + std::to_string(port);
  o.info.set_name("worker-a");
  o.info.set_cpu_slots(2);
  o.join_token = "tok";
  o.min_backoff = absl::Milliseconds(20);
  o.max_backoff = absl::Milliseconds(200);
  o.register_timeout = absl::Seconds(1);
  return o;
}

TEST(ReconnectBackoffTest, DoublesToTheCapWithJitter) {
  const absl::Duration min = absl::Milliseconds(100), max = absl::Seconds(5);
  EXPECT_EQ(ReconnectBackoff(0, min, max, 1.0), absl::Milliseconds(100));
  EXPECT_EQ(ReconnectBackoff(0, min, max, 0.0), absl::Milliseconds(50));
  EXPECT_EQ(ReconnectBackoff(3, min, max, 1.0), absl::Milliseconds(800));
  EXPECT_EQ(ReconnectBackoff(10, min, max, 1.0), max);
  EXPECT_EQ(ReconnectBackoff(1000, min, max, 1.0), max);
  EXPECT_EQ(ReconnectBackoff(1000, min, max, 0.0), max / 2);
}

TEST(CoordinatorLinkTest, RegistersHeartbeatsAndDeliversEvents) {
  FakeAgentServer server;
  server.service.token_ = "tok";
  server.Start();
  Outbox outbox;
  const AttemptKey key{"job-1", 1};
  for (int i = 0; i < 3; ++i) outbox.Add(key, Ev(i));
  LinkCallbacks cb;
  cb.running = [] { return std::vector<AttemptKey>{{"job-1", 1}}; };
  cb.gpu_stats = [] {
    v1::GpuStats g;
    g.set_index(0);
    g.set_memory_used_bytes(42);
    return std::vector<v1::GpuStats>{g};
  };
  CoordinatorLink link(Options(server.port), &outbox, cb);
  link.Start();
  ASSERT_TRUE(link.WaitConnected(absl::Now() + absl::Seconds(10)));
  EXPECT_TRUE(outbox.WaitUntilEmpty(absl::Now() + absl::Seconds(10)));
  ASSERT_TRUE(Eventually([&] {
    std::lock_guard<std::mutex> lock(server.service.mu_);
    return server.service.heartbeats_ >= 2;
  }));
  {
    std::lock_guard<std::mutex> lock(server.service.mu_);
    ASSERT_EQ(server.service.registers_.size(), 1u);
    const v1::RegisterRequest& r = server.service.registers_[0];
    EXPECT_EQ(r.info().name(), "worker-a");
    EXPECT_EQ(r.info().cpu_slots(), 2);
    EXPECT_EQ(r.join_token(), "tok");
    ASSERT_EQ(r.running_size(), 1);
    EXPECT_EQ(r.running(0).job_id(), "job-1");
    EXPECT_EQ(server.service.session_ids_, std::vector<std::string>{"session-1"});
    EXPECT_EQ(server.service.stored_.size(), 3u);
    EXPECT_EQ(server.service.events_received_, 3);  // sent once each
    ASSERT_EQ(server.service.last_heartbeat_.gpus_size(), 1);
    EXPECT_EQ(server.service.last_heartbeat_.gpus(0).memory_used_bytes(), 42);
    EXPECT_EQ(server.service.last_heartbeat_.running_size(), 1);
  }
  // New events flow on the same session.
  outbox.Add(key, Ev(0));
  EXPECT_TRUE(outbox.WaitUntilEmpty(absl::Now() + absl::Seconds(10)));
  EXPECT_EQ(link.sessions(), 1);
  link.Stop();
  EXPECT_FALSE(link.connected());
  server.Stop();
}

TEST(CoordinatorLinkTest, ResendsUnackedEventsAfterServerRestart) {
  FakeAgentServer first;
  first.service.ack_ = false;  // persists nothing it acknowledges: all must come again
  first.Start();
  const int port = first.port;
  Outbox outbox;
  const AttemptKey key{"job-7", 2};
  for (int i = 0; i < 5; ++i) outbox.Add(key, Ev(0));
  CoordinatorLink link(Options(port), &outbox, LinkCallbacks{});
  link.Start();
  ASSERT_TRUE(Eventually([&] {
    std::lock_guard<std::mutex> lock(first.service.mu_);
    return first.service.stored_.size() == 5;
  }));
  EXPECT_EQ(outbox.unacked(), 5u);
  first.Stop();
  // Events produced while the server is down wait in the outbox.
  outbox.Add(key, Ev(1));
  outbox.Add(key, Ev(-1));

  FakeAgentServer second;
  second.Start(port);
  ASSERT_TRUE(outbox.WaitUntilEmpty(absl::Now() + absl::Seconds(20)));
  EXPECT_GE(link.sessions(), 2);
  {
    std::lock_guard<std::mutex> lock(second.service.mu_);
    ASSERT_EQ(second.service.stored_.size(), 7u);
    int64_t expect = 1;
    for (const auto& [job, attempt, seq] : second.service.stored_) {
      EXPECT_EQ(job, "job-7");
      EXPECT_EQ(attempt, 2);
      EXPECT_EQ(seq, expect++);
    }
    EXPECT_GE(second.service.registers_.size(), 1u);
  }
  link.Stop();
  second.Stop();
}

TEST(CoordinatorLinkTest, DispatchesAssignmentsCancelsAndStale) {
  FakeAgentServer server;
  v1::RunningAttempt stale;
  stale.set_job_id("job-old");
  stale.set_attempt(3);
  server.service.stale_.push_back(stale);
  v1::ServerMessage assign;
  assign.mutable_assignment()->set_job_id("job-2");
  assign.mutable_assignment()->set_attempt(1);
  assign.mutable_assignment()->set_cpu_ranks(2);
  v1::ServerMessage cancel;
  cancel.mutable_cancel()->set_job_id("job-2");
  cancel.mutable_cancel()->set_attempt(1);
  cancel.mutable_cancel()->set_grace_ms(1500);
  server.service.to_send_ = {assign, cancel};
  server.Start();

  std::mutex mu;
  std::vector<std::string> seen;
  LinkCallbacks cb;
  cb.on_assignment = [&](const v1::Assignment& a) {
    std::lock_guard<std::mutex> lock(mu);
    seen.push_back("assign " + a.job_id() + " " + std::to_string(a.cpu_ranks()));
  };
  cb.on_cancel = [&](const v1::CancelAttempt& c) {
    std::lock_guard<std::mutex> lock(mu);
    seen.push_back("cancel " + c.job_id() + " " + std::to_string(c.grace_ms()));
  };
  cb.on_stale = [&](const AttemptKey& k) {
    std::lock_guard<std::mutex> lock(mu);
    seen.push_back("stale " + k.job_id + " " + std::to_string(k.attempt));
  };
  Outbox outbox;
  CoordinatorLink link(Options(server.port), &outbox, cb);
  link.Start();
  ASSERT_TRUE(Eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    return seen.size() >= 3;
  }));
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(seen, (std::vector<std::string>{"stale job-old 3", "assign job-2 2",
                                              "cancel job-2 1500"}));
  }
  link.Stop();
  server.Stop();
}

TEST(CoordinatorLinkTest, WrongJoinTokenKeepsRetryingAndStopIsPrompt) {
  FakeAgentServer server;
  server.service.token_ = "right";
  server.Start();
  Outbox outbox;
  LinkOptions o = Options(server.port);
  o.join_token = "wrong";
  CoordinatorLink link(o, &outbox, LinkCallbacks{});
  link.Start();
  EXPECT_FALSE(link.WaitConnected(absl::Now() + absl::Milliseconds(300)));
  const absl::Time t0 = absl::Now();
  link.Stop();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(2));
  EXPECT_EQ(link.sessions(), 0);
  server.Stop();
}

TEST(CoordinatorLinkTest, StopWhileServerUnreachable) {
  int port = 0;
  {
    FakeAgentServer s;  // grab a free port, then close it
    s.Start();
    port = s.port;
    s.Stop();
  }
  Outbox outbox;
  outbox.Add({"j", 1}, Ev(0));
  LinkOptions o = Options(port);
  o.register_timeout = absl::Seconds(30);  // Stop must not wait for it
  CoordinatorLink link(o, &outbox, LinkCallbacks{});
  link.Start();
  absl::SleepFor(absl::Milliseconds(200));
  const absl::Time t0 = absl::Now();
  link.Stop();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(2));
  EXPECT_EQ(outbox.unacked(), 1u);  // never acknowledged: kept
}

}  // namespace
}  // namespace tune::worker
