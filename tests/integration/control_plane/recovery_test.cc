// Issue 2, acceptance 3 and 4: kill -9 of a worker mid-job (lost after the
// heartbeat timeout, requeued, resumed from the last checkpoint on the other
// worker, SUCCEEDED, event log without gaps or duplicates), and kill -9 of the
// server mid-job (restart on the same --db: jobs, states and acknowledged
// events intact, the worker reconnects and the job continues).
//
// These run the real tune-train when it is built (TUNE_BIN_DIR/tune-train),
// else the test double; TUNE_TEST_TRAINER=fake|real forces one.
#include <sys/wait.h>

#include <map>
#include <sstream>
#include <thread>

#include "tests/integration/control_plane/control_plane_fixture.h"

namespace tune::testing {
namespace {

using nlohmann::json;
using std::chrono::milliseconds;
using std::chrono::seconds;

class RecoveryTest : public ControlPlaneTest {
 protected:
  Env TrainerEnv(const TrainerChoice& t, int step_ms) {
    if (t.real) return {};
    return {{"FAKE_TRAINER_STEP_MS", std::to_string(step_ms)}};
  }
  Process* Find(const std::string& log_name) {
    for (auto& p : processes_) {
      if (p->log_path() == tmp_ + "/" + log_name) return p.get();
    }
    return nullptr;
  }
};

// Rank-0 step events of one attempt: step -> loss.
std::map<int, double> Losses(const std::vector<json>& events, int attempt) {
  std::map<int, double> out;
  for (const auto& e : StepEvents(events)) {
    if (e.value("attempt", 0) != attempt || e.value("rank", -1) != 0) continue;
    if (e["loss"].is_number()) out[e["step"].get<int>()] = e["loss"].get<double>();
  }
  return out;
}

int LastCheckpointStep(const std::vector<json>& events, int attempt) {
  int step = 0;
  for (const auto& e : events) {
    if (e.value("type", "") == "checkpoint" && e.value("attempt", 0) == attempt) {
      step = std::max(step, e.value("step", 0));
    }
  }
  return step;
}

TEST_F(RecoveryTest, KilledWorkerIsLostAndJobResumesElsewhere) {
  TrainerChoice trainer = PreferredTrainer();
  std::cerr << "trainer: " << trainer.path << (trainer.real ? " (real)" : " (double)") << "\n";
  const double heartbeat_timeout = 3.0;
  ASSERT_NE(StartServer(heartbeat_timeout), nullptr);
  ASSERT_NE(StartWorker("wa", 1, trainer, TrainerEnv(trainer, 150)), nullptr);
  ASSERT_NE(StartWorker("wb", 1, trainer, TrainerEnv(trainer, 150)), nullptr);
  ASSERT_TRUE(WaitUntil([&] { return Workers().size() == 2; }, seconds(20)));

  const int max_steps = trainer.real ? 30 : 40;
  std::string id = Submit(WriteJob(Params("resumable", max_steps, 1, 0, 5), trainer.real));
  ASSERT_FALSE(id.empty());
  json running = WaitForJob(
      id,
      [](const json& j) {
        return j.value("state", "") == "RUNNING" && j.value("last_checkpoint_step", 0) >= 5;
      },
      seconds(trainer.real ? 300 : 60));
  ASSERT_FALSE(running.is_null()) << "the job never got past its first checkpoint";
  ASSERT_LT(running.value("last_step", 0), max_steps) << "too late to kill: job almost done";
  std::string victim = running.value("worker", "");
  std::string survivor = victim == "wa" ? "wb" : "wa";
  Process* victim_proc = Find(victim + ".log");
  ASSERT_NE(victim_proc, nullptr) << "unknown worker " << victim;

  auto t_kill = std::chrono::steady_clock::now();
  victim_proc->Kill9();
  bool lost = WaitUntil(
      [&] {
        for (const auto& w : Workers()) {
          if (w.value("name", "") == victim) return w.value("state", "") == "LOST";
        }
        return false;
      },
      seconds(20), milliseconds(200));
  double lost_after =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_kill).count();
  ASSERT_TRUE(lost) << victim << " was never marked LOST";
  EXPECT_LE(lost_after, heartbeat_timeout + 5.0) << "LOST is declared after the heartbeat timeout";
  EXPECT_GE(lost_after, heartbeat_timeout - 2.0) << "LOST declared before the heartbeat timeout";

  json done = WaitForState(id, "", seconds(trainer.real ? 600 : 90));
  ASSERT_EQ(done.value("state", ""), "SUCCEEDED") << done.dump();
  EXPECT_EQ(done.value("attempt", 0), 2) << "one retry after the lost worker";
  EXPECT_EQ(done.value("last_step", 0), max_steps);

  std::vector<json> events = Logs(id);
  ExpectEventLogConsistent(events);
  // The requeue is recorded as a state change back to QUEUED.
  bool requeued = false;
  for (const auto& e : events) {
    if (e.value("type", "") == "state" && e.value("state", "") == "QUEUED" &&
        e.value("seq", 0) > 2) {
      requeued = true;
    }
  }
  EXPECT_TRUE(requeued) << "no state event requeueing the job";

  json started2;
  for (const auto& e : events) {
    if (e.value("type", "") == "started" && e.value("attempt", 0) == 2) started2 = e;
  }
  ASSERT_TRUE(started2.is_object()) << "attempt 2 never started";
  EXPECT_EQ(started2.value("worker", ""), survivor);
  EXPECT_TRUE(started2.value("resume", false)) << started2.dump();

  int checkpoint = LastCheckpointStep(events, 1);
  ASSERT_GE(checkpoint, 5);
  std::map<int, double> first = Losses(events, 1);
  std::map<int, double> second = Losses(events, 2);
  ASSERT_FALSE(second.empty());
  EXPECT_EQ(second.begin()->first, checkpoint + 1)
      << "attempt 2 must resume right after attempt 1's last checkpoint (step " << checkpoint
      << ")";
  EXPECT_EQ(second.rbegin()->first, max_steps);
  EXPECT_EQ(static_cast<int>(second.size()), max_steps - checkpoint) << "no step skipped";
  // Steps that ran in both attempts (after the checkpoint, before the kill)
  // give the same loss: the checkpoint captured the whole training state.
  for (const auto& [step, loss] : second) {
    auto it = first.find(step);
    if (it == first.end()) continue;
    EXPECT_NEAR(loss, it->second, 1e-4 * std::max(1.0, std::abs(loss)))
        << "step " << step << " differs between the attempts";
  }
}

TEST_F(RecoveryTest, ServerKilledAndRestartedLosesNothing) {
  TrainerChoice trainer = PreferredTrainer();
  std::cerr << "trainer: " << trainer.path << (trainer.real ? " (real)" : " (double)") << "\n";
  // Generous timeout: after its restart the server waits this long for the
  // worker to come back before it calls the job lost.
  const double heartbeat_timeout = 15.0;
  Process* server = StartServer(heartbeat_timeout);
  ASSERT_NE(server, nullptr);
  ASSERT_NE(StartWorker("wa", 1, trainer, TrainerEnv(trainer, 200)), nullptr);
  const int max_steps = trainer.real ? 30 : 40;
  std::string id = Submit(WriteJob(Params("survivor", max_steps, 1, 0, 5), trainer.real));
  ASSERT_FALSE(id.empty());

  // A watcher that lives through the restart.
  std::string error;
  auto watcher = Process::Spawn({Bin("tunectl"), "--server", server_address(), "-o", "json",
                                 "watch", id, "--reconnect-timeout", "120"},
                                {{"TUNE_SERVER", ""}}, tmp_ + "/watch.out", &error);
  ASSERT_NE(watcher, nullptr) << error;

  json mid = WaitForJob(
      id, [](const json& j) { return j.value("last_step", 0) >= 4; },
      seconds(trainer.real ? 300 : 60));
  ASSERT_FALSE(mid.is_null());
  ASSERT_LT(mid.value("last_step", 0), max_steps - 5) << "too late to kill the server";
  std::vector<json> before = Logs(id);
  ASSERT_FALSE(before.empty());

  server->Kill9();
  ASSERT_FALSE(PortOpen(port_));
  std::this_thread::sleep_for(milliseconds(1500));  // Ranks keep training meanwhile.
  ASSERT_NE(StartServer(heartbeat_timeout), nullptr) << "restart on the same --db";

  // Right after the restart: the job and its history are there.
  json again = GetJob(id);
  ASSERT_TRUE(again.is_object());
  EXPECT_NE(again.value("state", ""), "QUEUED") << "a running job must not be requeued at once";
  EXPECT_GE(again.value("last_event_seq", 0), before.back().value("seq", 0));

  json done = WaitForState(id, "", seconds(trainer.real ? 600 : 120));
  ASSERT_EQ(done.value("state", ""), "SUCCEEDED") << done.dump();
  EXPECT_EQ(done.value("attempt", 0), 1) << "the job continued; it was not restarted";

  std::vector<json> after = Logs(id);
  ExpectEventLogConsistent(after);
  ASSERT_GE(after.size(), before.size());
  for (size_t i = 0; i < before.size(); ++i) {
    EXPECT_EQ(after[i], before[i]) << "acknowledged event seq " << i + 1 << " changed";
  }
  // Every step arrived exactly once although the server died in between:
  // the worker resent what was not acknowledged.
  std::map<int, double> steps = Losses(after, 1);
  EXPECT_EQ(static_cast<int>(steps.size()), max_steps);
  EXPECT_EQ(steps.begin()->first, 1);
  EXPECT_EQ(steps.rbegin()->first, max_steps);

  json ws = Workers();
  ASSERT_EQ(ws.size(), 1u);
  EXPECT_EQ(ws[0].value("state", ""), "READY") << "the worker reconnected";

  // The watcher saw every event exactly once, across the restart, and ended
  // with the job's final state and exit code 0.
  auto status = watcher->Wait(seconds(60));
  ASSERT_TRUE(status.has_value()) << "tunectl watch did not end";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << watcher->Log();
  std::istringstream in(watcher->Log());
  std::string line;
  int64_t expect_seq = 1;
  json last;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] != '{') continue;  // stderr notices ("reconnecting")
    json e = json::parse(line, nullptr, false);
    ASSERT_FALSE(e.is_discarded()) << line;
    if (e.contains("seq")) {
      EXPECT_EQ(e["seq"].get<int64_t>(), expect_seq++) << line;
    }
    last = e;
  }
  EXPECT_EQ(expect_seq - 1, static_cast<int64_t>(after.size()));
  EXPECT_EQ(last.value("state", ""), "SUCCEEDED");
  EXPECT_NE(watcher->Log().find("reconnecting after seq"), std::string::npos)
      << "the watcher should have lost its stream when the server died";
}

}  // namespace
}  // namespace tune::testing
