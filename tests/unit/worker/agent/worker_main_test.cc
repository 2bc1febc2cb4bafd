// The tune-worker binary end to end against an in-process AgentService, with
// fake_trainer.sh as the trainer: registration, an assignment run to SUCCEEDED
// with every event delivered once and in order, a cancel, and SIGTERM shutdown.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/time/clock.h"
#include "tests/unit/worker/agent/fake_agent_service.h"

namespace tune::worker {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

template <typename F>
bool Eventually(F f, absl::Duration timeout = absl::Seconds(15)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (f()) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return f();
}

class WorkerMainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/worker_main_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    server_.Start();
  }
  void TearDown() override {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    server_.Stop();
    if (!HasFailure()) fs::remove_all(root_);
  }

  void StartWorker(std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {
        TUNE_BIN_DIR "/tune-worker",
        "--server", "127.0.0.1:" + std::to_string(server_.port),
        "--name", "main-test-worker",
        "--work-dir", root_ + "/work",
        "--gpus", "none",
        "--cpu-slots", "2",
        "--trainer", TUNE_SOURCE_DIR "/tests/unit/worker/agent/fake_trainer.sh",
        "--cancel-grace", "5",
        "--log-level", "debug"};
    // `extra` flags replace the defaults of the same name.
    for (size_t i = 0; i + 1 < extra.size(); i += 2) {
      auto it = std::find(args.begin(), args.end(), extra[i]);
      if (it != args.end()) {
        *(it + 1) = extra[i + 1];
      } else {
        args.push_back(extra[i]);
        args.push_back(extra[i + 1]);
      }
    }
    pid_ = fork();
    ASSERT_GE(pid_, 0);
    if (pid_ == 0) {
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
  }

  void Send(const v1::ServerMessage& m) {
    std::lock_guard<std::mutex> lock(server_.service.mu_);
    server_.service.to_send_.push_back(m);
  }

  std::vector<v1::AgentEvent> EventsOf(const std::string& job) {
    std::lock_guard<std::mutex> lock(server_.service.mu_);
    std::vector<v1::AgentEvent> out;
    for (const auto& e : server_.service.events_) {
      if (e.job_id() == job) out.push_back(e);
    }
    return out;
  }
  bool HasExited(const std::string& job) {
    for (const auto& e : EventsOf(job)) {
      if (e.type() == v1::EVENT_TYPE_EXITED) return true;
    }
    return false;
  }

  v1::ServerMessage Assignment(const std::string& job, const std::string& behaviour) {
    v1::ServerMessage m;
    v1::Assignment* a = m.mutable_assignment();
    a->set_job_id(job);
    a->set_attempt(1);
    a->set_cpu_ranks(2);
    a->set_spec_yaml(behaviour);
    a->mutable_spec()->mutable_output()->set_dir(root_ + "/out/" + job);
    return m;
  }

  std::string root_;
  FakeAgentServer server_;
  pid_t pid_ = -1;
};

TEST_F(WorkerMainTest, RunsAnAssignmentCancelsAnotherAndStopsOnSigterm) {
  StartWorker();
  ASSERT_TRUE(Eventually([&] {
    std::lock_guard<std::mutex> lock(server_.service.mu_);
    return server_.service.heartbeats_ > 0;
  }));
  {
    std::lock_guard<std::mutex> lock(server_.service.mu_);
    ASSERT_EQ(server_.service.registers_.size(), 1u);
    const v1::WorkerInfo& info = server_.service.registers_[0].info();
    EXPECT_EQ(info.name(), "main-test-worker");
    EXPECT_EQ(info.cpu_slots(), 2);
    EXPECT_EQ(info.gpus_size(), 0);
    EXPECT_FALSE(info.version().empty());
  }

  Send(Assignment("job-ok", "all: exit 0\n"));
  ASSERT_TRUE(Eventually([&] { return HasExited("job-ok"); }));
  std::vector<v1::AgentEvent> events = EventsOf("job-ok");
  ASSERT_EQ(events.size(), 4u);  // started, 2 steps, exited
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].source_seq(), static_cast<int64_t>(i + 1));
  }
  EXPECT_EQ(events.front().type(), v1::EVENT_TYPE_STARTED);
  json exited = json::parse(events.back().payload_json());
  EXPECT_EQ(exited["state"], "SUCCEEDED");
  EXPECT_EQ(json::parse(events.front().payload_json())["worker"], "main-test-worker");

  Send(Assignment("job-cancel", "all: sleep\n"));
  ASSERT_TRUE(Eventually([&] { return fs::exists(root_ + "/out/job-cancel/ready-rank1"); }));
  v1::ServerMessage cancel;
  cancel.mutable_cancel()->set_job_id("job-cancel");
  cancel.mutable_cancel()->set_attempt(1);
  cancel.mutable_cancel()->set_grace_ms(2000);
  Send(cancel);
  ASSERT_TRUE(Eventually([&] { return HasExited("job-cancel"); }));
  exited = json::parse(EventsOf("job-cancel").back().payload_json());
  EXPECT_EQ(exited["state"], "CANCELLED");
  EXPECT_EQ(exited["reason"], "CANCELLED");

  // A running attempt shows up in heartbeats; SIGTERM stops it and the worker.
  Send(Assignment("job-running", "all: sleep\n"));
  ASSERT_TRUE(Eventually([&] { return fs::exists(root_ + "/out/job-running/ready-rank1"); }));
  ASSERT_TRUE(Eventually([&] {
    std::lock_guard<std::mutex> lock(server_.service.mu_);
    return server_.service.last_heartbeat_.running_size() == 1;
  }));
  const absl::Time t0 = absl::Now();
  ASSERT_EQ(kill(pid_, SIGTERM), 0);
  int status = 0;
  ASSERT_TRUE(Eventually([&] { return waitpid(pid_, &status, WNOHANG) == pid_; }));
  pid_ = -1;
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_FALSE(HasExited("job-running"));  // the server requeues it; not a failure
}

TEST_F(WorkerMainTest, BadFlagsExitWithUsageError) {
  for (std::vector<std::string> bad :
       {std::vector<std::string>{"--gpus", "zero"}, {"--cpu-slots", "many"},
        {"--no-such-flag", "1"}, {"--trainer", "/nonexistent"}}) {
    StartWorker(bad);
    int status = 0;
    ASSERT_TRUE(Eventually([&] { return waitpid(pid_, &status, WNOHANG) == pid_; }));
    pid_ = -1;
    ASSERT_TRUE(WIFEXITED(status)) << bad[0];
    EXPECT_EQ(WEXITSTATUS(status), 2) << bad[0];
  }
  std::lock_guard<std::mutex> lock(server_.service.mu_);
  EXPECT_TRUE(server_.service.registers_.empty());
}

}  // namespace
}  // namespace tune::worker
