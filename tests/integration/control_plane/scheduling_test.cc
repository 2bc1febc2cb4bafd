// Issue 2, acceptance 2: two workers + one server on loopback. Jobs are placed
// by priority (then FIFO) and never over-commit a worker's slots; cancelling a
// running job ends its processes within the grace period. Also: `tunectl
// watch` / `submit --wait` exit codes on success and failure.
#include <atomic>
#include <sstream>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "tests/integration/control_plane/control_plane_fixture.h"

namespace tune::testing {
namespace {

using nlohmann::json;
using std::chrono::milliseconds;
using std::chrono::seconds;

double Seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The worker's `started` / `exited` event of the job's attempt `attempt`.
json FindEvent(const std::vector<json>& events, const std::string& type, int attempt) {
  for (const auto& e : events) {
    if (e.value("type", "") == type && e.value("attempt", 0) == attempt) return e;
  }
  return nullptr;
}

std::vector<int> Pids(const json& started) {
  std::vector<int> pids;
  if (started.is_object() && started.contains("pids")) {
    for (const auto& p : started["pids"]) pids.push_back(p.get<int>());
  }
  return pids;
}

class SchedulingTest : public ControlPlaneTest {};

TEST_F(SchedulingTest, PlacesByPriorityAndNeverOvercommits) {
  ASSERT_NE(StartServer(5), nullptr);
  // Each job needs 2 CPU ranks and each worker offers 2 slots: one job per
  // worker at a time, so the third job must wait for a free worker.
  // Submitted lowest priority first, so FIFO alone would get it wrong.
  std::string low = Submit(WriteJob(Params("low", 25, 2, 1, 5),
                                    false));
  std::string high = Submit(
      WriteJob(Params("high", 25, 2, 9, 5), false));
  std::string mid = Submit(WriteJob(Params("mid", 25, 2, 5, 5),
                                    false));
  ASSERT_FALSE(low.empty() || high.empty() || mid.empty());
  for (const auto& id : {low, high, mid}) {
    EXPECT_EQ(GetJob(id).value("state", ""), "QUEUED") << id << " must wait: no worker yet";
  }

  // Poll ListWorkers in the background for the whole run.
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::vector<std::string> overcommits;
  int polls = 0;
  std::thread poller([&] {
    while (!stop) {
      CommandResult r = Tunectl({"-o", "json", "workers"}, seconds(10));
      if (r.exit_code == 0) {
        json ws = json::parse(r.out, nullptr, false);
        std::lock_guard<std::mutex> lock(mu);
        ++polls;
        for (const auto& w : ws) {
          int slots = w.value("cpu_slots", 0);
          int free = w.value("free_cpu_slots", 0);
          size_t jobs = w.contains("job_ids") ? w["job_ids"].size() : 0;
          if (free < 0 || free > slots || jobs > 1 ||
              slots - free != 2 * static_cast<int>(jobs)) {
            overcommits.push_back(w.dump());
          }
        }
      }
      std::this_thread::sleep_for(milliseconds(150));
    }
  });

  Env env = {{"FAKE_TRAINER_STEP_MS", "100"}};
  ASSERT_NE(StartWorker("wa", 2, FakeTrainer(), env), nullptr);
  json h = WaitForState(high, "RUNNING", seconds(30));
  ASSERT_FALSE(h.is_null());
  EXPECT_EQ(h.value("worker", ""), "wa");
  EXPECT_EQ(GetJob(mid).value("state", ""), "QUEUED");
  EXPECT_EQ(GetJob(low).value("state", ""), "QUEUED");

  ASSERT_NE(StartWorker("wb", 2, FakeTrainer(), env), nullptr);
  ASSERT_FALSE(WaitForJob(mid, [](const json& j) { return j.value("state", "") != "QUEUED"; },
                          seconds(30))
                   .is_null())
      << "the second worker must take the next job by priority";

  for (const auto& id : {high, mid, low}) {
    json j = WaitForState(id, "", seconds(90));
    EXPECT_EQ(j.value("state", ""), "SUCCEEDED") << j.dump();
  }
  stop = true;
  poller.join();
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_GT(polls, 3);
    EXPECT_TRUE(overcommits.empty()) << "over-committed worker seen: " << overcommits.front();
  }

  // Order and exclusivity from the stored events (times from the workers).
  std::map<std::string, std::pair<double, double>> span;  // id -> [started, exited]
  std::map<std::string, std::string> where;
  for (const auto& id : {high, mid, low}) {
    std::vector<json> events = Logs(id);
    ExpectEventLogConsistent(events);
    json started = FindEvent(events, "started", 1);
    json exited = FindEvent(events, "exited", 1);
    ASSERT_TRUE(started.is_object() && exited.is_object()) << id;
    span[id] = {started["time"].get<double>(), exited["time"].get<double>()};
    where[id] = started.value("worker", "");
  }
  EXPECT_LT(span[high].first, span[mid].first) << "priority 9 starts before priority 5";
  EXPECT_LT(span[mid].first, span[low].first) << "priority 5 starts before priority 1";
  // `low` could only start once one of the others had freed its worker.
  EXPECT_GE(span[low].first, std::min(span[high].second, span[mid].second) - 0.001);
  // Jobs on the same worker never overlap.
  std::vector<std::string> ids = {high, mid, low};
  for (size_t a = 0; a < ids.size(); ++a) {
    for (size_t b = a + 1; b < ids.size(); ++b) {
      if (where[ids[a]] != where[ids[b]]) continue;
      bool disjoint = span[ids[a]].second <= span[ids[b]].first + 0.001 ||
                      span[ids[b]].second <= span[ids[a]].first + 0.001;
      EXPECT_TRUE(disjoint) << ids[a] << " and " << ids[b] << " overlapped on " << where[ids[a]];
    }
  }
}

TEST_F(SchedulingTest, CancelOfRunningJobEndsItsProcessesPromptly) {
  ASSERT_NE(StartServer(5), nullptr);
  ASSERT_NE(StartWorker("wa", 2, FakeTrainer(), {{"FAKE_TRAINER_STEP_MS", "100"}}), nullptr);
  std::string id = Submit(WriteJob(Params("long", 100000, 2, 0, 5), false));
  ASSERT_FALSE(id.empty());
  ASSERT_FALSE(
      WaitForJob(id, [](const json& j) { return j.value("last_step", 0) >= 3; }, seconds(30))
          .is_null());
  std::vector<int> pids = Pids(FindEvent(Logs(id), "started", 1));
  ASSERT_EQ(pids.size(), 2u) << "the started event lists one pid per rank";
  for (int pid : pids) EXPECT_TRUE(PidAlive(pid));

  double t0 = Seconds();
  CommandResult r = Tunectl({"cancel", id});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  json j = WaitForState(id, "CANCELLED", seconds(20));
  EXPECT_EQ(j.value("state", ""), "CANCELLED");
  EXPECT_TRUE(WaitUntil([&] {
    for (int pid : pids) {
      if (PidAlive(pid)) return false;
    }
    return true;
  }, seconds(15)));
  double took = Seconds() - t0;
  // The trainer honours SIGTERM: well within the (default 10 s) grace period.
  EXPECT_LT(took, 10.0) << "ranks took " << took << " s to end after cancel";
  json exited = FindEvent(Logs(id), "exited", 1);
  ASSERT_TRUE(exited.is_object());
  EXPECT_EQ(exited.value("state", ""), "CANCELLED") << exited.dump();
  // The worker is free again.
  json ws = Workers();
  ASSERT_EQ(ws.size(), 1u);
  EXPECT_EQ(ws[0].value("free_cpu_slots", -1), 2) << ws.dump();
}

TEST_F(SchedulingTest, CancelEscalatesToSigkillAfterGrace) {
  const double grace = 3.0;
  ASSERT_NE(StartServer(5, {"--cancel-grace", "3"}), nullptr);
  ASSERT_NE(StartWorker("wa", 1, FakeTrainer(),
                        {{"FAKE_TRAINER_STEP_MS", "100"}, {"FAKE_TRAINER_IGNORE_SIGTERM", "1"}},
                        {"--cancel-grace", "3"}),
            nullptr);
  std::string id = Submit(WriteJob(Params("stubborn", 100000, 1, 0, 5), false));
  ASSERT_FALSE(id.empty());
  ASSERT_FALSE(
      WaitForJob(id, [](const json& j) { return j.value("last_step", 0) >= 2; }, seconds(30))
          .is_null());
  std::vector<int> pids = Pids(FindEvent(Logs(id), "started", 1));
  ASSERT_EQ(pids.size(), 1u);
  double t0 = Seconds();
  ASSERT_EQ(Tunectl({"cancel", id}).exit_code, 0);
  // The server sends its grace with CancelAttempt; the worker must SIGKILL
  // a trainer that ignores SIGTERM once it has passed.
  EXPECT_TRUE(WaitUntil([&] { return !PidAlive(pids[0]); }, seconds(25)));
  double took = Seconds() - t0;
  EXPECT_GT(took, grace * 0.5) << "SIGTERM was ignored, so only SIGKILL after the grace can end it";
  EXPECT_LT(took, grace + 4.0) << "SIGKILL must follow soon after the grace period";
  json j = WaitForState(id, "CANCELLED", seconds(20));
  EXPECT_EQ(j.value("state", ""), "CANCELLED");
}

TEST_F(SchedulingTest, WatchAndWaitExitCodesFollowTheJob) {
  ASSERT_NE(StartServer(5), nullptr);
  ASSERT_NE(StartWorker("wa", 1, FakeTrainer(),
                        {{"FAKE_TRAINER_STEP_MS", "20"}, {"FAKE_TRAINER_FAIL_AT_STEP", "7"}}),
            nullptr);
  // The worker's trainer fails at step 7: a job with 5 steps succeeds, one
  // with 12 fails.
  std::string ok_yaml = WriteJob(Params("short", 5, 1, 0, 2), false);
  CommandResult r = Tunectl({"submit", ok_yaml, "--wait"}, seconds(60));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("step 5/5"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("SUCCEEDED"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('\r'), std::string::npos) << "no live redraw when stdout is not a TTY";

  std::string bad_yaml = WriteJob(Params("doomed", 12, 1, 0, 5), false);
  std::string id = Submit(bad_yaml);
  r = Tunectl({"watch", id}, seconds(60));
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.out.find("FAILED"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("injected failure at step 7"), std::string::npos) << r.out;

  json j = GetJob(id);
  EXPECT_EQ(j.value("state", ""), "FAILED");
  EXPECT_EQ(j.value("reason", ""), "CRASH");
  ASSERT_TRUE(j["loss"].is_object()) << j.dump();
  EXPECT_EQ(j["loss"].value("last_step", 0), 6);
  EXPECT_LT(j["loss"].value("min", 99.0), j["loss"].value("first", 0.0));

  // json mode of watch on a finished job: every event once, then the job.
  r = Tunectl({"-o", "json", "watch", id}, seconds(30));
  EXPECT_EQ(r.exit_code, 1);
  std::istringstream in(r.out);
  std::string line;
  int64_t expect_seq = 1;
  json last;
  while (std::getline(in, line)) {
    json e = json::parse(line, nullptr, false);
    ASSERT_FALSE(e.is_discarded()) << line;
    if (e.contains("seq")) {
      EXPECT_EQ(e["seq"].get<int64_t>(), expect_seq++);
    }
    last = e;
  }
  EXPECT_EQ(last.value("id", ""), id);
  EXPECT_EQ(last.value("state", ""), "FAILED");
}

TEST_F(SchedulingTest, NonFiniteLossEventsAreStoredLikeAnyOther) {
  // The trainer writes a NaN loss as the string "nan" (docs/events.md); the
  // event must be stored and shown like any other, not dropped.
  ASSERT_NE(StartServer(5), nullptr);
  ASSERT_NE(StartWorker("wa", 2, FakeTrainer(), {{"FAKE_TRAINER_STEP_MS", "20"}}), nullptr);
  JobParams p = Params("nan", 8, 2);
  p.extra_yaml = "faults: {nan_at_steps: [4]}\n";
  std::string id = Submit(WriteJob(p, false));
  ASSERT_FALSE(id.empty());
  json j = WaitForState(id, "", seconds(60));
  EXPECT_EQ(j.value("state", ""), "SUCCEEDED") << j.dump();
  std::vector<json> events = Logs(id);
  ExpectEventLogConsistent(events);
  std::set<std::pair<int, int>> rank_steps;
  json nan_step;
  for (const auto& e : StepEvents(events)) {
    rank_steps.insert({e.value("rank", -1), e.value("step", -1)});
    if (e.value("rank", -1) == 0 && e.value("step", -1) == 4) nan_step = e;
  }
  EXPECT_EQ(rank_steps.size(), 16u) << "one step event per rank and step";
  ASSERT_TRUE(nan_step.is_object()) << "rank 0's NaN step event was lost";
  EXPECT_EQ(nan_step.value("loss", ""), "nan");
  ASSERT_TRUE(j["loss"].is_object());
  EXPECT_EQ(j["loss"].value("non_finite", 0), 1);
  EXPECT_EQ(j["loss"].value("steps", 0), 7);
}

}  // namespace
}  // namespace tune::testing
