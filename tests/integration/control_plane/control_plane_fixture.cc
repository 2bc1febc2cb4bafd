#include "tests/integration/control_plane/control_plane_fixture.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>

namespace tune::testing {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

bool Executable(const std::string& path) { return access(path.c_str(), X_OK) == 0; }

std::string EnvOr(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

}  // namespace

void ControlPlaneTest::SetUp() {
  tmp_ = MakeTempDir("tune-cp");
  ASSERT_FALSE(tmp_.empty()) << "cannot create a temp dir";
  db_path_ = tmp_ + "/tunefleet.db";
  port_ = FreePort();
  ASSERT_GT(port_, 0) << "no free loopback port";
  for (const char* bin : {"tune-server", "tune-worker", "tunectl"}) {
    ASSERT_TRUE(Executable(Bin(bin))) << Bin(bin) << " is missing; build it first (TUNE_BIN_DIR="
                                      << BinDir() << ")";
  }
}

void ControlPlaneTest::TearDown() {
  bool failed = HasFailure();
  if (failed) DumpLogs();
  // Workers first, so that their ranks are stopped by them; then the server.
  for (auto it = processes_.rbegin(); it != processes_.rend(); ++it) {
    if ((*it)->Running()) (*it)->Stop(std::chrono::seconds(5));
  }
  processes_.clear();
  if (failed || EnvOr("TUNE_KEEP_TEST_DIRS", "") == "1") {
    std::cerr << "test files kept in " << tmp_ << "\n";
  } else {
    RemoveTree(tmp_);
  }
}

std::string ControlPlaneTest::BinDir() { return EnvOr("TUNE_BIN_DIR", TUNE_BIN_DIR); }
std::string ControlPlaneTest::Bin(const std::string& name) { return BinDir() + "/" + name; }

TrainerChoice ControlPlaneTest::FakeTrainer() { return {TUNE_FAKE_TRAINER, false}; }

TrainerChoice ControlPlaneTest::PreferredTrainer() {
  std::string choice = EnvOr("TUNE_TEST_TRAINER", "auto");
  std::string real = Bin("tune-train");
  if (choice == "fake") return FakeTrainer();
  if (!choice.empty() && choice[0] == '/') {
    EXPECT_TRUE(Executable(choice)) << "TUNE_TEST_TRAINER=" << choice << " is not executable";
    return {choice, true};
  }
  if (choice == "real") {
    EXPECT_TRUE(Executable(real)) << "TUNE_TEST_TRAINER=real but " << real << " is missing";
    return {real, true};
  }
  if (Executable(real)) return {real, true};
  return FakeTrainer();
}

Process* ControlPlaneTest::StartServer(double heartbeat_timeout_s,
                                       const std::vector<std::string>& extra) {
  std::vector<std::string> argv = {Bin("tune-server"),
                                   "--listen",
                                   server_address(),
                                   "--db",
                                   db_path_,
                                   "--heartbeat-timeout",
                                   std::to_string(heartbeat_timeout_s)};
  argv.insert(argv.end(), extra.begin(), extra.end());
  std::string error;
  auto p = Process::Spawn(argv, {}, tmp_ + "/server.log", &error);
  if (!p) {
    ADD_FAILURE() << error;
    return nullptr;
  }
  Process* raw = p.get();
  processes_.push_back(std::move(p));
  if (!WaitForPort(port_, std::chrono::seconds(20))) {
    ADD_FAILURE() << "tune-server did not listen on " << server_address() << " within 20 s";
    return nullptr;
  }
  return raw;
}

Process* ControlPlaneTest::StartWorker(const std::string& name, int cpu_slots,
                                       const TrainerChoice& trainer, const Env& env,
                                       const std::vector<std::string>& extra) {
  std::vector<std::string> argv = {Bin("tune-worker"), "--server",   server_address(),
                                   "--name",           name,         "--work-dir",
                                   tmp_ + "/" + name,  "--gpus",     "none",
                                   "--cpu-slots",      std::to_string(cpu_slots),
                                   "--trainer",        trainer.path};
  argv.insert(argv.end(), extra.begin(), extra.end());
  std::string error;
  auto p = Process::Spawn(argv, env, tmp_ + "/" + name + ".log", &error);
  if (!p) {
    ADD_FAILURE() << error;
    return nullptr;
  }
  Process* raw = p.get();
  processes_.push_back(std::move(p));
  return raw;
}

CommandResult ControlPlaneTest::Tunectl(const std::vector<std::string>& args,
                                        std::chrono::milliseconds timeout) {
  std::vector<std::string> argv = {Bin("tunectl"), "--server", server_address()};
  argv.insert(argv.end(), args.begin(), args.end());
  // TUNE_SERVER must not leak in from the developer's shell.
  return RunCommand(argv, {{"TUNE_SERVER", ""}}, timeout);
}

json ControlPlaneTest::TunectlJson(const std::vector<std::string>& args) {
  std::vector<std::string> a = {"-o", "json"};
  a.insert(a.end(), args.begin(), args.end());
  CommandResult r = Tunectl(a);
  if (r.exit_code != 0) {
    std::ostringstream cmd;
    for (const auto& s : args) cmd << s << " ";
    ADD_FAILURE() << "tunectl " << cmd.str() << "exited " << r.exit_code << ": " << r.err;
    return nullptr;
  }
  json j = json::parse(r.out, nullptr, false);
  if (j.is_discarded()) {
    ADD_FAILURE() << "tunectl printed invalid JSON: " << r.out;
    return nullptr;
  }
  return j;
}

json ControlPlaneTest::GetJob(const std::string& id) { return TunectlJson({"get", id}); }

std::vector<json> ControlPlaneTest::Logs(const std::string& id) {
  std::vector<json> events;
  CommandResult r = Tunectl({"logs", id, "-o", "json"});
  if (r.exit_code != 0) {
    ADD_FAILURE() << "tunectl logs " << id << " exited " << r.exit_code << ": " << r.err;
    return events;
  }
  std::istringstream in(r.out);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded()) {
      ADD_FAILURE() << "logs -o json line is not JSON: " << line;
      continue;
    }
    events.push_back(std::move(j));
  }
  return events;
}

json ControlPlaneTest::Workers() { return TunectlJson({"workers"}); }

json ControlPlaneTest::WaitForJob(const std::string& id,
                                  const std::function<bool(const json&)>& pred,
                                  std::chrono::milliseconds timeout) {
  json last;
  bool ok = WaitUntil(
      [&] {
        CommandResult r = Tunectl({"-o", "json", "get", id}, std::chrono::seconds(20));
        if (r.exit_code != 0) return false;
        json j = json::parse(r.out, nullptr, false);
        if (j.is_discarded()) return false;
        last = j;
        return pred(j);
      },
      timeout, std::chrono::milliseconds(200));
  return ok ? last : json(nullptr);
}

json ControlPlaneTest::WaitForState(const std::string& id, const std::string& state,
                                    std::chrono::milliseconds timeout) {
  static const std::set<std::string> kTerminal = {"SUCCEEDED", "FAILED", "CANCELLED"};
  json last;
  json j = WaitForJob(
      id,
      [&](const json& job) {
        last = job;
        std::string s = job.value("state", "");
        return state.empty() ? kTerminal.count(s) > 0 : s == state;
      },
      timeout);
  if (j.is_null()) {
    ADD_FAILURE() << id << " did not reach " << (state.empty() ? "a terminal state" : state)
                  << " within " << timeout.count() << " ms; last seen: " << last.dump();
  }
  return j;
}

std::string ControlPlaneTest::Model(bool real) {
  if (!real) {
    if (fake_model_.empty()) {
      fake_model_ = tmp_ + "/fake-model";
      // Enough for the submit-time validator (a Llama config.json); the
      // double never loads weights.
      WriteFile(fake_model_ + "/config.json",
                json{{"architectures", {"LlamaForCausalLM"}},
                     {"model_type", "llama"},
                     {"hidden_size", 64},
                     {"intermediate_size", 128},
                     {"num_attention_heads", 4},
                     {"num_key_value_heads", 2},
                     {"num_hidden_layers", 2},
                     {"vocab_size", 128256},
                     {"max_position_embeddings", 256},
                     {"rms_norm_eps", 1e-5},
                     {"rope_theta", 500000.0},
                     {"torch_dtype", "float32"}}
                    .dump(2));
      // A valid safetensors file holding no tensors (8-byte little-endian
      // header size, then the JSON header): the validator wants the file.
      std::string header = R"({"__metadata__":{"format":"pt"}})";
      std::string st(8, '\0');
      for (int i = 0; i < 8; ++i) st[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
      WriteFile(fake_model_ + "/model.safetensors", st + header);
    }
    return fake_model_;
  }
  if (real_model_.empty()) {
    std::string out = tmp_ + "/tiny-model";
    CommandResult r = RunCommand({PreferredTrainer().path, "init-model", "--preset", "tiny",
                                  "--tokenizer", std::string(TUNE_ASSETS_DIR) + "/llama3", "--out",
                                  out, "--seed", "1"},
                                 {}, std::chrono::seconds(120));
    EXPECT_EQ(r.exit_code, 0) << "tune-train init-model failed: " << r.err << r.out;
    real_model_ = out;
  }
  return real_model_;
}

std::string ControlPlaneTest::Dataset() {
  if (dataset_.empty()) {
    dataset_ = tmp_ + "/data.jsonl";
    std::string text;
    const char* kLines[] = {
        "The quick brown fox jumps over the lazy dog.",
        "tunefleet fine-tunes Llama models with QLoRA.",
        "Checkpoints are written atomically: temp, fsync, rename.",
        "A job goes from QUEUED to RUNNING to SUCCEEDED.",
        "Every event is stored before it is acknowledged.",
        "The scheduler places jobs by priority, then in order of arrival.",
        "Workers heartbeat; a silent worker is marked lost.",
        "A lost worker's job resumes from its last checkpoint.",
    };
    for (int rep = 0; rep < 4; ++rep) {
      for (const char* l : kLines) text += json{{"text", l}}.dump() + "\n";
    }
    WriteFile(dataset_, text);
  }
  return dataset_;
}

std::string ControlPlaneTest::WriteJob(const JobParams& p, bool real_trainer) {
  std::ostringstream y;
  y << "name: " << p.name << "\n"
    << "model: " << Model(real_trainer) << "\n"
    << "dataset:\n"
    << "  path: " << Dataset() << "\n"
    << "  format: text\n"
    << "  train_on: all\n"
    << "  max_seq_length: 32\n"
    << "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
    << "quantization: {base: bf16}\n"
    << "training:\n"
    << "  precision: fp32\n"
    << "  effective_batch_size: " << 2 * p.cpu_ranks << "\n"
    << "  micro_batch_size: 2\n"
    << "  learning_rate: 1.0e-3\n"
    << "  lr_scheduler: constant\n"
    << "  warmup_steps: 0\n"
    << "  max_steps: " << p.max_steps << "\n"
    << "  optimizer: adamw\n"
    << "  gradient_checkpointing: off\n"
    << "  seed: 7\n"
    << "checkpoint: {every_steps: " << p.every_steps << ", keep: 3}\n"
    << "output: {dir: runs/" << p.name << "}\n"
    << "resources: {cpu_ranks: " << p.cpu_ranks << "}\n"
    << "priority: " << p.priority << "\n"
    << "max_retries: " << p.max_retries << "\n"
    << p.extra_yaml;
  std::string path = tmp_ + "/" + p.name + ".yaml";
  WriteFile(path, y.str());
  return path;
}

std::string ControlPlaneTest::Submit(const std::string& yaml_path) {
  json job = TunectlJson({"submit", yaml_path});
  if (!job.is_object() || !job.contains("id")) {
    ADD_FAILURE() << "submit of " << yaml_path << " gave " << job.dump();
    return "";
  }
  EXPECT_EQ(job.value("state", ""), "QUEUED") << job.dump();
  return job["id"].get<std::string>();
}

void ControlPlaneTest::DumpLogs() {
  for (const auto& p : processes_) {
    std::cerr << "----- " << p->log_path() << " (last 80 lines) -----\n"
              << p->LogTail(80) << "\n";
  }
}

std::vector<json> StepEvents(const std::vector<json>& events) {
  std::vector<json> out;
  for (const auto& e : events) {
    if (e.value("type", "") == "step") out.push_back(e);
  }
  return out;
}

void ExpectEventLogConsistent(const std::vector<json>& events) {
  ASSERT_FALSE(events.empty());
  for (size_t i = 0; i < events.size(); ++i) {
    ASSERT_TRUE(events[i].contains("seq")) << events[i].dump();
    EXPECT_EQ(events[i]["seq"].get<int64_t>(), static_cast<int64_t>(i + 1))
        << "event seq must run 1..N without gaps or duplicates; at index " << i << ": "
        << events[i].dump();
  }
  std::map<std::tuple<int, int, int>, int64_t> seen;
  for (const auto& e : StepEvents(events)) {
    auto key = std::make_tuple(e.value("attempt", -1), e.value("rank", -1), e.value("step", -1));
    auto [it, inserted] = seen.emplace(key, e.value("seq", int64_t{0}));
    EXPECT_TRUE(inserted) << "step event (attempt " << std::get<0>(key) << ", rank "
                          << std::get<1>(key) << ", step " << std::get<2>(key)
                          << ") stored twice: seq " << it->second << " and " << e.value("seq", 0);
  }
}

}  // namespace tune::testing
