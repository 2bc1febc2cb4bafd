// GoogleTest fixture for the control-plane integration tests: a temp dir, a
// loopback port and SQLite DB for tune-server, helpers to start tune-server and
// tune-worker, to run `tunectl ... -o json` and to write job specs.
//
// Binaries come from TUNE_BIN_DIR (compile definition; the environment
// variable of the same name overrides it at run time). The trainer the
// workers run is chosen per test:
//   * FakeTrainer(): the test double (fake_trainer.cc), fast and scriptable;
//   * PreferredTrainer(): the real tune-train when it exists in TUNE_BIN_DIR,
//     else the double. Env TUNE_TEST_TRAINER=fake|real forces one (real
//     fails the test when tune-train is missing); an absolute path selects
//     that tune-train binary (e.g. from another build dir).
// Temp dirs are removed after passing tests; kept (and their path printed)
// after a failure or with TUNE_KEEP_TEST_DIRS=1.
#ifndef TUNE_TESTS_INTEGRATION_CONTROL_PLANE_CONTROL_PLANE_FIXTURE_H_
#define TUNE_TESTS_INTEGRATION_CONTROL_PLANE_CONTROL_PLANE_FIXTURE_H_

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/integration/control_plane/process_harness.h"

namespace tune::testing {

struct TrainerChoice {
  std::string path;
  bool real = false;
};

struct JobParams {
  std::string name = "job";
  int max_steps = 20;
  int every_steps = 5;
  int cpu_ranks = 1;
  int priority = 0;
  int max_retries = 2;
  // Appended verbatim (top-level YAML keys).
  std::string extra_yaml;
};

inline JobParams Params(const std::string& name, int max_steps, int cpu_ranks = 1,
                        int priority = 0, int every_steps = 5) {
  JobParams p;
  p.name = name;
  p.max_steps = max_steps;
  p.cpu_ranks = cpu_ranks;
  p.priority = priority;
  p.every_steps = every_steps;
  return p;
}

class ControlPlaneTest : public ::testing::Test {
 protected:
  void SetUp() override;
  void TearDown() override;

  static std::string BinDir();
  static std::string Bin(const std::string& name);
  static TrainerChoice FakeTrainer();
  static TrainerChoice PreferredTrainer();

  std::string server_address() const { return "127.0.0.1:" + std::to_string(port_); }

  // tune-server --listen 127.0.0.1:<port> --db <tmp>/tunefleet.db
  //   --heartbeat-timeout <s> + extra; waits for the port. Fails the test
  //   (and returns nullptr) when it does not come up.
  Process* StartServer(double heartbeat_timeout_s, const std::vector<std::string>& extra = {});
  // tune-worker --server ... --name NAME --work-dir <tmp>/NAME --gpus none
  //   --cpu-slots N --trainer PATH, with `env` (e.g. FAKE_TRAINER_STEP_MS).
  Process* StartWorker(const std::string& name, int cpu_slots, const TrainerChoice& trainer,
                       const Env& env = {}, const std::vector<std::string>& extra = {});

  // tunectl --server <addr> ARGS...
  CommandResult Tunectl(const std::vector<std::string>& args,
                        std::chrono::milliseconds timeout = std::chrono::seconds(60));
  // tunectl -o json ARGS...; records a test failure and returns null unless it
  // exits 0 with valid JSON.
  nlohmann::json TunectlJson(const std::vector<std::string>& args);
  nlohmann::json GetJob(const std::string& id);
  // `tunectl logs ID -o json`: one object per line.
  std::vector<nlohmann::json> Logs(const std::string& id);
  nlohmann::json Workers();

  // Polls `tunectl get` until state is `state` (or any terminal state when
  // `state` is ""); returns the last job seen (null on timeout, with a failure).
  nlohmann::json WaitForState(const std::string& id, const std::string& state,
                              std::chrono::milliseconds timeout);
  // Polls until `pred(job)` holds; returns the job or null (no failure recorded).
  nlohmann::json WaitForJob(const std::string& id,
                            const std::function<bool(const nlohmann::json&)>& pred,
                            std::chrono::milliseconds timeout);

  // A model folder the spec validator accepts: the real tiny model from
  // `tune-train init-model` when `real`, else a config.json-only stand-in
  // (the double never reads weights). Created once per test.
  std::string Model(bool real);
  // A small memorisable `text` JSONL dataset in the temp dir.
  std::string Dataset();
  // Writes <tmp>/<name>.yaml for `params` and returns its path.
  std::string WriteJob(const JobParams& params, bool real_trainer);
  // `tunectl submit FILE -o json`; returns the job id ("" with a failure).
  std::string Submit(const std::string& yaml_path);

  // Dumps every process log tail into the test output (on failures).
  void DumpLogs();

  std::string tmp_;
  std::string db_path_;
  int port_ = 0;
  std::vector<std::unique_ptr<Process>> processes_;

 private:
  std::string fake_model_;
  std::string real_model_;
  std::string dataset_;
};

// Step events (type "step") of `events`, in order.
std::vector<nlohmann::json> StepEvents(const std::vector<nlohmann::json>& events);
// Checks seq 1..N without gaps or duplicates and no duplicated
// (attempt, rank, step) step events; records failures with details.
void ExpectEventLogConsistent(const std::vector<nlohmann::json>& events);

}  // namespace tune::testing

#endif  // TUNE_TESTS_INTEGRATION_CONTROL_PLANE_CONTROL_PLANE_FIXTURE_H_
