// RankLauncher with a fake trainer (fake_trainer.sh): environment, argv, event
// relay, group kill, SIGTERM -> SIGKILL, cancel, PDEATHSIG; plus SummarizeExit.
#include "worker/agent/rank_launcher.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/time/clock.h"

namespace tune::worker {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const char* kFakeTrainer = TUNE_SOURCE_DIR "/tests/unit/worker/agent/fake_trainer.sh";

std::map<std::string, std::string> ReadKeyValues(const std::string& path) {
  std::map<std::string, std::string> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    size_t eq = line.find('=');
    if (eq != std::string::npos) out[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return out;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class RankLauncherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/rank_launcher_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    options_.trainer = kFakeTrainer;
    options_.work_dir = root_ + "/work";
    options_.worker_name = "test-worker";
    options_.grace = absl::Seconds(5);
    options_.usable_cores = 8;
    options_.offered_gpus = {0, 1, 2, 3};
    options_.poll_interval = absl::Milliseconds(20);
  }
  void TearDown() override {
    launcher_.reset();
    if (HasFailure()) {
      std::fprintf(stderr, "keeping %s for inspection\n", root_.c_str());
      return;
    }
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  void MakeLauncher() {
    launcher_ = std::make_unique<RankLauncher>(options_, &outbox_);
    launcher_->SetExitCallback([this](const AttemptKey& key, const ExitSummary& s) {
      std::lock_guard<std::mutex> lock(mu_);
      exits_[key.job_id] = s;
      cv_.notify_all();
    });
  }

  v1::Assignment CpuAssignment(const std::string& job, int ranks, const std::string& behaviour) {
    v1::Assignment a;
    a.set_job_id(job);
    a.set_attempt(1);
    a.set_cpu_ranks(ranks);
    a.set_spec_yaml(behaviour);
    a.mutable_spec()->mutable_output()->set_dir(OutputDir(job));
    return a;
  }
  std::string OutputDir(const std::string& job) const { return root_ + "/out/" + job; }

  // Polls CurrentUsage() until `pred` holds (true) or 20 s pass (false).
  bool WaitUntilUsage(const std::function<bool(const RankLauncher::Usage&)>& pred) {
    for (absl::Time end = absl::Now() + absl::Seconds(20); absl::Now() < end;) {
      if (pred(launcher_->CurrentUsage())) return true;
      absl::SleepFor(absl::Milliseconds(10));
    }
    return false;
  }

  // Waits for the attempt's `exited` (via the exit callback).
  ExitSummary WaitExit(const std::string& job, absl::Duration timeout = absl::Seconds(20)) {
    std::unique_lock<std::mutex> lock(mu_);
    bool ok = cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                           [&] { return exits_.count(job) > 0; });
    EXPECT_TRUE(ok) << job << " did not exit in time";
    return ok ? exits_[job] : ExitSummary{};
  }

  // All events so far for `job`, parsed.
  std::vector<std::pair<v1::AgentEvent, json>> Events(const std::string& job) {
    for (v1::AgentEvent& e : outbox_.TakeUnsent(100000)) taken_.push_back(std::move(e));
    std::vector<std::pair<v1::AgentEvent, json>> out;
    for (const v1::AgentEvent& e : taken_) {
      if (e.job_id() == job) out.emplace_back(e, json::parse(e.payload_json()));
    }
    return out;
  }
  json ExitedPayload(const std::string& job) {
    for (auto& [e, j] : Events(job)) {
      if (e.type() == v1::EVENT_TYPE_EXITED) return j;
    }
    ADD_FAILURE() << "no exited event for " << job;
    return json::object();
  }

  std::string root_;
  LauncherOptions options_;
  Outbox outbox_;
  std::unique_ptr<RankLauncher> launcher_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, ExitSummary> exits_;
  std::vector<v1::AgentEvent> taken_;
};

TEST_F(RankLauncherTest, CpuRanksGetEnvironmentArgvAndEventsInOrder) {
  setenv("TUNE_JOIN_TOKEN", "secret", 1);
  MakeLauncher();
  ASSERT_TRUE(launcher_->Launch(CpuAssignment("job-1", 2, "all: exit 0\n")).ok());
  ExitSummary s = WaitExit("job-1");
  unsetenv("TUNE_JOIN_TOKEN");
  EXPECT_EQ(s.state, "SUCCEEDED");
  EXPECT_EQ(s.reason, "");

  const std::string dir = launcher_->AttemptDir({"job-1", 1});
  EXPECT_EQ(dir, options_.work_dir + "/jobs/job-1/attempt-1");
  EXPECT_EQ(ReadFile(dir + "/job.yaml"), "all: exit 0\n");
  std::string port;
  std::string pgid;
  for (int r = 0; r < 2; ++r) {
    auto env = ReadKeyValues(OutputDir("job-1") + "/env-rank" + std::to_string(r) + ".txt");
    EXPECT_EQ(env["RANK"], std::to_string(r));
    EXPECT_EQ(env["LOCAL_RANK"], std::to_string(r));
    EXPECT_EQ(env["WORLD_SIZE"], "2");
    EXPECT_EQ(env["MASTER_ADDR"], "127.0.0.1");
    EXPECT_GT(std::atoi(env["MASTER_PORT"].c_str()), 0);
    EXPECT_EQ(env["CUDA_VISIBLE_DEVICES"], "");  // set, and empty: no GPU for CPU ranks
    EXPECT_EQ(env["OMP_NUM_THREADS"], "4");      // 8 cores / 2 ranks
    EXPECT_EQ(env["NCCL_NVLS_ENABLE"], "0");
    EXPECT_EQ(env["TUNE_JOIN_TOKEN"], "unset");  // the worker's secret stays with it
    EXPECT_EQ(env["args"], "--config " + dir + "/job.yaml --events-fd 3 --output " +
                               OutputDir("job-1"));
    EXPECT_EQ(env["resume"], "0");
    EXPECT_NE(env["fd3"].find("pipe:"), std::string::npos) << env["fd3"];
    if (r == 0) {
      port = env["MASTER_PORT"];
      pgid = env["pgid"];
    } else {
      EXPECT_EQ(env["MASTER_PORT"], port);
      EXPECT_EQ(env["pgid"], pgid);  // one process group per attempt
    }
  }
  EXPECT_NE(pgid, std::to_string(getpgrp()));
  EXPECT_TRUE(fs::exists(dir + "/rank-0.log"));
  EXPECT_NE(ReadFile(dir + "/rank-1.log").find("rank 1 stderr line 1"), std::string::npos);

  auto events = Events("job-1");
  ASSERT_EQ(events.size(), 4u);  // started, 2 x step, exited
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].first.source_seq(), static_cast<int64_t>(i + 1));
    EXPECT_EQ(events[i].first.attempt(), 1);
  }
  const json& started = events.front().second;
  EXPECT_EQ(events.front().first.type(), v1::EVENT_TYPE_STARTED);
  EXPECT_EQ(events.front().first.rank(), -1);
  EXPECT_EQ(started["type"], "started");
  EXPECT_EQ(started["worker"], "test-worker");
  EXPECT_EQ(started["world_size"], 2);
  EXPECT_EQ(started["resume"], false);
  EXPECT_EQ(started["pids"].size(), 2u);
  EXPECT_TRUE(started["devices"].empty());
  std::set<int> step_ranks;
  for (size_t i = 1; i < 3; ++i) {
    EXPECT_EQ(events[i].first.type(), v1::EVENT_TYPE_STEP);
    step_ranks.insert(events[i].first.rank());
    EXPECT_EQ(events[i].second["loss"], 2.5);
  }
  EXPECT_EQ(step_ranks, (std::set<int>{0, 1}));
  const json& exited = events.back().second;
  EXPECT_EQ(events.back().first.type(), v1::EVENT_TYPE_EXITED);
  EXPECT_EQ(exited["state"], "SUCCEEDED");
  EXPECT_EQ(exited["reason"], "");
  EXPECT_EQ(exited["exit_codes"], json::array({0, 0}));
  EXPECT_EQ(exited["stderr_tail"], "");
  EXPECT_TRUE(launcher_->Running().empty());
}

TEST_F(RankLauncherTest, GpuAssignmentSetsVisibleDevicesAndResume) {
  setenv("NCCL_NVLS_ENABLE", "1", 1);  // an operator's explicit choice is kept
  unsetenv("OMP_NUM_THREADS");
  MakeLauncher();
  v1::Assignment a = CpuAssignment("job-gpu", 0, "all: exit 0\n");
  a.add_gpus(1);
  a.add_gpus(3);
  a.set_resume(true);
  ASSERT_TRUE(launcher_->Launch(a).ok());
  ExitSummary s = WaitExit("job-gpu");
  unsetenv("NCCL_NVLS_ENABLE");
  EXPECT_EQ(s.state, "SUCCEEDED");
  for (int r = 0; r < 2; ++r) {
    auto env = ReadKeyValues(OutputDir("job-gpu") + "/env-rank" + std::to_string(r) + ".txt");
    EXPECT_EQ(env["WORLD_SIZE"], "2");
    EXPECT_EQ(env["CUDA_VISIBLE_DEVICES"], "1,3");
    EXPECT_EQ(env["CUDA_DEVICE_ORDER"], "PCI_BUS_ID");
    EXPECT_EQ(env["NCCL_NVLS_ENABLE"], "1");
    EXPECT_EQ(env["OMP_NUM_THREADS"], "4");
    EXPECT_EQ(env["resume"], "1");
    EXPECT_NE(env["args"].find(" --resume"), std::string::npos);
  }
  auto events = Events("job-gpu");
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.front().second["devices"], json::array({1, 3}));
  EXPECT_EQ(events.front().second["resume"], true);
}

TEST_F(RankLauncherTest, OneFailingRankStopsTheGroup) {
  MakeLauncher();
  const absl::Time t0 = absl::Now();
  ASSERT_TRUE(launcher_->Launch(CpuAssignment("job-oom", 3, "rank0: sleep\nrank1: exit 3 ready-rank2\n"
                                                            "rank2: sleep\n"))
                  .ok());
  ExitSummary s = WaitExit("job-oom");
  EXPECT_LT(absl::Now() - t0, options_.grace);  // SIGTERM ended the sleepers
  EXPECT_EQ(s.state, "FAILED");
  EXPECT_EQ(s.reason, "OOM");
  EXPECT_EQ(s.failed_rank, 1);
  json exited = ExitedPayload("job-oom");
  EXPECT_EQ(exited["exit_codes"], json::array({128 + SIGTERM, 3, 128 + SIGTERM}));
  EXPECT_EQ(exited["reason"], "OOM");
  const std::string tail = exited["stderr_tail"];
  EXPECT_NE(tail.find("rank 1 exiting with 3"), std::string::npos) << tail;
  EXPECT_EQ(tail.find("rank 0"), std::string::npos) << tail;
  EXPECT_NE(s.message.find("rank 1 exited with code 3"), std::string::npos) << s.message;
}

TEST_F(RankLauncherTest, RanksIgnoringSigtermGetSigkillAfterGrace) {
  options_.grace = absl::Milliseconds(600);
  MakeLauncher();
  const absl::Time t0 = absl::Now();
  ASSERT_TRUE(
      launcher_->Launch(CpuAssignment("job-stuck", 2, "rank0: ignore-term\nrank1: exit 1 ready-rank0\n")).ok());
  ExitSummary s = WaitExit("job-stuck");
  EXPECT_GE(absl::Now() - t0, absl::Milliseconds(550));
  EXPECT_EQ(s.state, "FAILED");
  EXPECT_EQ(s.reason, "CRASH");
  EXPECT_EQ(ExitedPayload("job-stuck")["exit_codes"], json::array({128 + SIGKILL, 1}));
}

TEST_F(RankLauncherTest, CancelSendsSigtermAndEndsCancelled) {
  MakeLauncher();
  ASSERT_TRUE(launcher_->Launch(CpuAssignment("job-c", 2, "all: sleep\n")).ok());
  // Wait until both ranks are up (they record their pids).
  for (int i = 0; i < 500 && !(fs::exists(OutputDir("job-c") + "/ready-rank0") &&
                               fs::exists(OutputDir("job-c") + "/ready-rank1"));
       ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(launcher_->Running().size(), 1u);
  EXPECT_TRUE(launcher_->Cancel({"job-c", 1}, absl::Seconds(5)));
  EXPECT_FALSE(launcher_->Cancel({"job-c", 2}, absl::Seconds(5)));
  ExitSummary s = WaitExit("job-c");
  EXPECT_EQ(s.state, "CANCELLED");
  EXPECT_EQ(s.reason, "CANCELLED");
  EXPECT_EQ(ExitedPayload("job-c")["exit_codes"],
            json::array({128 + SIGTERM, 128 + SIGTERM}));
}

TEST_F(RankLauncherTest, CurrentUsageCountsDevicesAndRanksOfRunningAttempts) {
  MakeLauncher();
  EXPECT_EQ(launcher_->CurrentUsage().ranks, 0);
  ASSERT_TRUE(launcher_->Launch(CpuAssignment("job-u-cpu", 2, "all: sleep\n")).ok());
  v1::Assignment gpu = CpuAssignment("job-u-gpu", 0, "all: sleep\n");
  gpu.add_gpus(1);
  gpu.add_gpus(3);
  gpu.add_gpus(0);
  ASSERT_TRUE(launcher_->Launch(gpu).ok());
  RankLauncher::Usage u = launcher_->CurrentUsage();
  EXPECT_EQ(u.gpus, 3);
  EXPECT_EQ(u.cpu_slots, 2);
  EXPECT_EQ(u.ranks, 5);
  EXPECT_TRUE(launcher_->Cancel({"job-u-gpu", 1}, absl::Seconds(5)));
  WaitExit("job-u-gpu");
  ASSERT_TRUE(WaitUntilUsage([&](const RankLauncher::Usage& now) { return now.gpus == 0; }));
  u = launcher_->CurrentUsage();
  EXPECT_EQ(u.cpu_slots, 2);
  EXPECT_EQ(u.ranks, 2);
  EXPECT_TRUE(launcher_->Cancel({"job-u-cpu", 1}, absl::Seconds(5)));
  ASSERT_TRUE(launcher_->WaitIdle(absl::Now() + absl::Seconds(20)));
  u = launcher_->CurrentUsage();
  EXPECT_EQ(u.gpus + u.cpu_slots + u.ranks, 0);
}

TEST_F(RankLauncherTest, CancelOfRanksIgnoringSigtermKillsAfterGrace) {
  MakeLauncher();
  ASSERT_TRUE(launcher_->Launch(CpuAssignment("job-ci", 1, "all: ignore-term\n")).ok());
  for (int i = 0; i < 500 && !fs::exists(OutputDir("job-ci") + "/ready-rank0"); ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  const absl::Time t0 = absl::Now();
  EXPECT_TRUE(launcher_->Cancel({"job-ci", 1}, absl::Milliseconds(400)));
  ExitSummary s = WaitExit("job-ci");
  EXPECT_GE(absl::Now() - t0, absl::Milliseconds(350));
  EXPECT_EQ(s.state, "CANCELLED");
  EXPECT_EQ(ExitedPayload("job-ci")["exit_codes"], json::array({128 + SIGKILL}));
}

TEST_F(RankLauncherTest, ErrorEventReasonWinsOverExitCode) {
  MakeLauncher();
  ASSERT_TRUE(launcher_
                  ->Launch(CpuAssignment("job-nan", 2, "rank0: error NAN_ABORT 1\nrank1: sleep\n"))
                  .ok());
  ExitSummary s = WaitExit("job-nan");
  EXPECT_EQ(s.state, "FAILED");
  EXPECT_EQ(s.reason, "NAN_ABORT");
  EXPECT_NE(s.message.find("fake NAN_ABORT failure"), std::string::npos) << s.message;
  bool saw_error = false;
  for (auto& [e, j] : Events("job-nan")) {
    if (e.type() == v1::EVENT_TYPE_ERROR) {
      saw_error = true;
      EXPECT_EQ(e.rank(), 0);
      EXPECT_EQ(j["reason"], "NAN_ABORT");
    }
  }
  EXPECT_TRUE(saw_error);
}

TEST_F(RankLauncherTest, MalformedLinesBecomeWarningsAndUnterminatedLastLineCounts) {
  MakeLauncher();
  ASSERT_TRUE(launcher_->Launch(CpuAssignment("job-g", 1, "all: garbage\n")).ok());
  EXPECT_EQ(WaitExit("job-g").state, "SUCCEEDED");
  int warnings = 0;
  bool eval = false;
  for (auto& [e, j] : Events("job-g")) {
    if (e.type() == v1::EVENT_TYPE_LOG && j["level"] == "warning") ++warnings;
    if (e.type() == v1::EVENT_TYPE_EVAL) eval = true;
  }
  EXPECT_EQ(warnings, 2);
  EXPECT_TRUE(eval);
}

TEST_F(RankLauncherTest, TrainerThatCannotRunFailsWithCrashAndTail) {
  options_.trainer = root_ + "/no-such-trainer";
  MakeLauncher();
  ASSERT_TRUE(launcher_->Launch(CpuAssignment("job-x", 1, "all: exit 0\n")).ok());
  ExitSummary s = WaitExit("job-x");
  EXPECT_EQ(s.state, "FAILED");
  EXPECT_EQ(s.reason, "CRASH");
  json exited = ExitedPayload("job-x");
  EXPECT_EQ(exited["exit_codes"], json::array({127}));
  EXPECT_NE(exited["stderr_tail"].get<std::string>().find("cannot execute the trainer"),
            std::string::npos);
}

TEST_F(RankLauncherTest, BadAssignmentsEndFailedWithoutStartingRanks) {
  MakeLauncher();
  v1::Assignment escape = CpuAssignment("../escape", 1, "all: exit 0\n");
  ASSERT_TRUE(launcher_->Launch(escape).ok());
  ExitSummary s = WaitExit("../escape");
  EXPECT_EQ(s.state, "FAILED");
  EXPECT_NE(s.message.find("not usable as a directory name"), std::string::npos) << s.message;
  EXPECT_FALSE(fs::exists(options_.work_dir + "/escape"));

  v1::Assignment none = CpuAssignment("job-none", 0, "all: exit 0\n");
  ASSERT_TRUE(launcher_->Launch(none).ok());
  s = WaitExit("job-none");
  EXPECT_EQ(s.state, "FAILED");
  EXPECT_NE(s.message.find("needs 1..1024"), std::string::npos) << s.message;
  auto events = Events("job-none");
  ASSERT_EQ(events.size(), 1u);  // only `exited`: nothing started
  EXPECT_EQ(events[0].first.type(), v1::EVENT_TYPE_EXITED);
  EXPECT_EQ(events[0].second["state"], "FAILED");
}

TEST_F(RankLauncherTest, GpuNotOfferedEndsFailed) {
  MakeLauncher();
  v1::Assignment a = CpuAssignment("job-g7", 0, "all: exit 0\n");
  a.add_gpus(7);
  ASSERT_TRUE(launcher_->Launch(a).ok());
  ExitSummary s = WaitExit("job-g7");
  EXPECT_EQ(s.state, "FAILED");
  EXPECT_NE(s.message.find("GPU 7 is not offered"), std::string::npos) << s.message;
  EXPECT_FALSE(fs::exists(OutputDir("job-g7") + "/pid-rank0"));
}

TEST_F(RankLauncherTest, DuplicateAssignmentIsRefused) {
  MakeLauncher();
  v1::Assignment a = CpuAssignment("job-d", 1, "all: sleep\n");
  ASSERT_TRUE(launcher_->Launch(a).ok());
  EXPECT_TRUE(absl::IsAlreadyExists(launcher_->Launch(a)));
  launcher_->Cancel({"job-d", 1}, absl::Seconds(5));
  WaitExit("job-d");
}

TEST_F(RankLauncherTest, StopAllEndsRanksWithoutExitedEvent) {
  MakeLauncher();
  ASSERT_TRUE(launcher_->Launch(CpuAssignment("job-s", 2, "all: sleep\n")).ok());
  for (int i = 0; i < 500 && !fs::exists(OutputDir("job-s") + "/pid-rank1"); ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  const pid_t pid = std::atoi(ReadFile(OutputDir("job-s") + "/pid-rank1").c_str());
  launcher_->StopAll(absl::Seconds(5));
  EXPECT_TRUE(launcher_->Running().empty());
  EXPECT_NE(kill(pid, 0), 0);  // reaped by the launcher: gone
  for (auto& [e, j] : Events("job-s")) EXPECT_NE(e.type(), v1::EVENT_TYPE_EXITED);
  EXPECT_TRUE(absl::IsFailedPrecondition(launcher_->Launch(CpuAssignment("job-t", 1, "all: exit 0\n"))));
}

TEST_F(RankLauncherTest, CancelInProgressStillReportsCancelledAtShutdown) {
  MakeLauncher();
  ASSERT_TRUE(launcher_->Launch(CpuAssignment("job-cs", 1, "all: ignore-term\n")).ok());
  for (int i = 0; i < 500 && !fs::exists(OutputDir("job-cs") + "/ready-rank0"); ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_TRUE(launcher_->Cancel({"job-cs", 1}, absl::Milliseconds(300)));
  launcher_->StopAll(absl::Seconds(5));
  json exited = ExitedPayload("job-cs");
  EXPECT_EQ(exited["state"], "CANCELLED");
  EXPECT_EQ(exited["exit_codes"], json::array({128 + SIGKILL}));
}

// kill -9 of the worker must not leave ranks behind (PR_SET_PDEATHSIG).
TEST_F(RankLauncherTest, RanksDieWhenTheWorkerIsKilled) {
  // Orphaned ranks are re-parented to this process, so we can reap them.
  ASSERT_EQ(prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
  const std::string out = OutputDir("job-p");
  pid_t worker = fork();
  ASSERT_GE(worker, 0);
  if (worker == 0) {
    // The stand-in worker: launch a rank that sleeps, then wait to be killed.
    Outbox outbox;
    RankLauncher launcher(options_, &outbox);
    if (!launcher.Launch(CpuAssignment("job-p", 1, "all: sleep\n")).ok()) _exit(3);
    while (true) pause();
  }
  std::string pid_file = out + "/pid-rank0";
  for (int i = 0; i < 1000 && !fs::exists(pid_file); ++i) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_TRUE(fs::exists(pid_file));
  const pid_t rank = std::atoi(ReadFile(pid_file).c_str());
  ASSERT_GT(rank, 0);
  ASSERT_EQ(kill(worker, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(worker, &status, 0), worker);

  // The rank (now our child via the subreaper) must die of SIGKILL promptly.
  pid_t got = 0;
  for (int i = 0; i < 500 && got == 0; ++i) {
    got = waitpid(rank, &status, WNOHANG);
    if (got == 0) absl::SleepFor(absl::Milliseconds(10));
  }
  if (got == 0) kill(rank, SIGKILL);
  ASSERT_EQ(got, rank) << "rank survived its worker";
  EXPECT_TRUE(WIFSIGNALED(status));
  EXPECT_EQ(WTERMSIG(status), SIGKILL);
  // The rank's own `sleep` child has no PDEATHSIG; end it via the group.
  kill(-rank, SIGKILL);
  while (waitpid(-1, &status, 0) > 0) {
  }
  prctl(PR_SET_CHILD_SUBREAPER, 0);
}

TEST(SummarizeExitTest, MapsExitCodesToReasons) {
  EXPECT_EQ(ReasonForExitCode(0), "");
  EXPECT_EQ(ReasonForExitCode(2), "INVALID_SPEC");
  EXPECT_EQ(ReasonForExitCode(3), "OOM");
  EXPECT_EQ(ReasonForExitCode(4), "NAN_ABORT");
  EXPECT_EQ(ReasonForExitCode(5), "DATA");
  EXPECT_EQ(ReasonForExitCode(1), "CRASH");
  EXPECT_EQ(ReasonForExitCode(128 + SIGSEGV), "CRASH");
}

TEST(SummarizeExitTest, StatesAndPrecedence) {
  AttemptOutcome ok;
  ok.exit_codes = {0, 0};
  EXPECT_EQ(SummarizeExit(ok).state, "SUCCEEDED");
  EXPECT_EQ(SummarizeExit(ok).reason, "");

  AttemptOutcome data;
  data.exit_codes = {5, 143};
  data.first_failed_rank = 0;
  ExitSummary s = SummarizeExit(data);
  EXPECT_EQ(s.state, "FAILED");
  EXPECT_EQ(s.reason, "DATA");
  EXPECT_EQ(s.failed_rank, 0);

  AttemptOutcome segv;
  segv.exit_codes = {143, 128 + SIGSEGV};
  segv.first_failed_rank = 1;
  s = SummarizeExit(segv);
  EXPECT_EQ(s.reason, "CRASH");
  EXPECT_NE(s.message.find("SIGSEGV"), std::string::npos) << s.message;

  AttemptOutcome with_error = segv;
  with_error.error_rank = 1;
  with_error.error_reason = "OOM";
  with_error.error_message = "CUDA out of memory at micro-batch 1";
  s = SummarizeExit(with_error);
  EXPECT_EQ(s.reason, "OOM");
  EXPECT_NE(s.message.find("CUDA out of memory"), std::string::npos);

  AttemptOutcome bogus_reason = segv;
  bogus_reason.error_rank = 1;
  bogus_reason.error_reason = "SOMETHING";
  EXPECT_EQ(SummarizeExit(bogus_reason).reason, "CRASH");

  AttemptOutcome cancelled;
  cancelled.exit_codes = {143, 143};
  cancelled.first_failed_rank = -1;
  cancelled.cancelled = true;
  EXPECT_EQ(SummarizeExit(cancelled).state, "CANCELLED");
  EXPECT_EQ(SummarizeExit(cancelled).reason, "CANCELLED");

  AttemptOutcome launch;
  launch.launch_error = "cannot create dir";
  EXPECT_EQ(SummarizeExit(launch).state, "FAILED");
  EXPECT_EQ(SummarizeExit(launch).reason, "CRASH");
}

TEST(TailOfFileTest, LastLines) {
  char tmpl[] = "/tmp/tail_test.XXXXXX";
  int fd = mkstemp(tmpl);
  ASSERT_GE(fd, 0);
  close(fd);
  {
    std::ofstream out(tmpl);
    for (int i = 1; i <= 30; ++i) out << "line " << i << "\n";
  }
  std::string tail = TailOfFile(tmpl, 3);
  EXPECT_EQ(tail, "line 28\nline 29\nline 30");
  EXPECT_EQ(TailOfFile(tmpl, 100).substr(0, 7), "line 1\n");
  EXPECT_EQ(TailOfFile("/nonexistent/file", 3), "");
  unlink(tmpl);
}

TEST(PickFreePortTest, ReturnsUsablePort) {
  absl::StatusOr<int> port = PickFreePort();
  ASSERT_TRUE(port.ok());
  EXPECT_GT(*port, 0);
  EXPECT_LT(*port, 65536);
}

TEST(IsSafeJobIdTest, RejectsPathTricks) {
  EXPECT_TRUE(IsSafeJobId("job-000042"));
  EXPECT_FALSE(IsSafeJobId(""));
  EXPECT_FALSE(IsSafeJobId(".."));
  EXPECT_FALSE(IsSafeJobId("a/b"));
  EXPECT_FALSE(IsSafeJobId("job 1"));
}

}  // namespace
}  // namespace tune::worker
