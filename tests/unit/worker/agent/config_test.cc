// tune-worker flags: parsing, precedence, validation messages.
#include "worker/agent/config.h"

#include <cstdlib>
#include <fstream>

#include <functional>

#include <gtest/gtest.h>

namespace tune::worker {
namespace {

TEST(ParseGpuSelectionTest, Forms) {
  EXPECT_EQ(ParseGpuSelection("all")->mode, GpuSelection::Mode::kAll);
  EXPECT_EQ(ParseGpuSelection("none")->mode, GpuSelection::Mode::kNone);
  auto list = ParseGpuSelection(" 3, 0 ,2");
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->mode, GpuSelection::Mode::kList);
  EXPECT_EQ(list->indices, (std::vector<int>{0, 2, 3}));
}

TEST(ParseGpuSelectionTest, ErrorsSayWhatIsAccepted) {
  for (const char* bad : {"0,,1", "-1", "gpu0", "0,x", "1,1"}) {
    auto s = ParseGpuSelection(bad);
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_NE(s.status().message().find("--gpus"), absl::string_view::npos) << s.status();
  }
}

Config ValidBase() {
  Config c;
  c.trainer = "/bin/sh";  // any executable
  c.work_dir = "/tmp/tune-worker-config-test";
  c.name = "w1";
  return c;
}

TEST(ConfigTest, DefaultsValidate) {
  Config c = ValidBase();
  ASSERT_TRUE(c.Validate().ok());
  EXPECT_EQ(c.server, "127.0.0.1:7070");
  EXPECT_EQ(c.gpu_selection.mode, GpuSelection::Mode::kAll);
  EXPECT_EQ(c.cancel_grace_s, 10);

  Config unnamed = ValidBase();
  unnamed.name = "";
  ASSERT_TRUE(unnamed.Validate().ok());
  EXPECT_FALSE(unnamed.name.empty());  // the host name

  Config relative = ValidBase();
  relative.work_dir = "rel/dir/";
  ASSERT_TRUE(relative.Validate().ok());
  EXPECT_EQ(relative.work_dir.front(), '/');
  EXPECT_NE(relative.work_dir.back(), '/');
}

TEST(ConfigTest, ErrorsNameTheFlag) {
  struct Case {
    std::function<void(Config&)> mutate;
    const char* flag;
  };
  const Case cases[] = {
      {[](Config& c) { c.server = "localhost"; }, "--server"},
      {[](Config& c) { c.server = "host:0"; }, "--server"},
      {[](Config& c) { c.server = "host:99999"; }, "--server"},
      {[](Config& c) { c.server = "::1:7070"; }, "--server"},
      {[](Config& c) { c.name = "has space"; }, "--name"},
      {[](Config& c) { c.gpus = "zero"; }, "--gpus"},
      {[](Config& c) { c.cpu_slots = -2; }, "--cpu-slots"},
      {[](Config& c) { c.trainer = "/nonexistent/tune-train"; }, "--trainer"},
      {[](Config& c) { c.cancel_grace_s = -1; }, "--cancel-grace"},
      {[](Config& c) { c.log_level = "loud"; }, "--log-level"},
      {[](Config& c) { c.work_dir = ""; }, "--work-dir"},
      {[](Config& c) { c.metrics_listen = "9091"; }, "--metrics-listen"},
      {[](Config& c) { c.metrics_listen = "0.0.0.0:0"; }, "--metrics-listen"},
      {[](Config& c) { c.metrics_listen = ":9091"; }, "--metrics-listen"},
  };
  for (const Case& tc : cases) {
    Config c = ValidBase();
    tc.mutate(c);
    absl::Status s = c.Validate();
    ASSERT_FALSE(s.ok()) << tc.flag;
    EXPECT_NE(s.message().find(tc.flag), absl::string_view::npos) << s;
  }
  Config v6 = ValidBase();
  v6.server = "[::1]:7070";
  EXPECT_TRUE(v6.Validate().ok());
  Config metrics = ValidBase();
  metrics.metrics_listen = "0.0.0.0:9091";
  EXPECT_TRUE(metrics.Validate().ok());
}

TEST(ConfigTest, DefaultTrainerIsNextToTheBinary) {
  const std::string path = DefaultTrainerPath();
  EXPECT_EQ(path.substr(path.size() - std::string("/tune-train").size()), "/tune-train");
  EXPECT_EQ(path[0], '/');
}

TEST(ConfigTest, EffectiveCpuSlots) {
  Config c;
  EXPECT_EQ(EffectiveCpuSlots(c, 2), 0);
  EXPECT_EQ(EffectiveCpuSlots(c, 0), UsableCores());
  c.cpu_slots = 3;
  EXPECT_EQ(EffectiveCpuSlots(c, 2), 3);
  EXPECT_GE(UsableCores(), 1);
}

// Parses `args` (after the program name) into a fresh Config.
Config ParseArgs(std::vector<std::string> args) {
  Config c;
  CLI::App app;
  AddConfigFlags(app, &c);
  args.insert(args.begin(), "tune-worker");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  app.parse(static_cast<int>(argv.size()), argv.data());
  return c;
}

TEST(ConfigTest, FlagsOverrideTheConfigFile) {
  const std::string file = "/tmp/tune-worker-config-test.yaml";
  std::ofstream(file) << "server: file-host:1\nname: from-file\ncpu-slots: 4\ngpus: none\n";
  Config c = ParseArgs({"--config", file, "--server", "flag-host:2"});
  EXPECT_EQ(c.server, "flag-host:2");
  EXPECT_EQ(c.name, "from-file");
  EXPECT_EQ(c.cpu_slots, 4);
  EXPECT_EQ(c.gpus, "none");

  std::ofstream(file) << "no-such-option: 1\n";
  EXPECT_THROW(ParseArgs({"--config", file}), CLI::ParseError);
  std::remove(file.c_str());
}

TEST(ConfigTest, EnvOverridesDefaultsAndFlagsOverrideEnv) {
  setenv("TUNE_WORKER_NAME", "from-env", 1);
  setenv("TUNE_CANCEL_GRACE", "2.5", 1);
  Config c = ParseArgs({"--cancel-grace", "7"});
  unsetenv("TUNE_WORKER_NAME");
  unsetenv("TUNE_CANCEL_GRACE");
  EXPECT_EQ(c.name, "from-env");
  EXPECT_EQ(c.cancel_grace_s, 7);
}

// cli_config.h promises file < env < flags.
TEST(ConfigTest, EnvOverridesTheConfigFile) {
  const std::string file = "/tmp/tune-worker-config-test-env.yaml";
  std::ofstream(file) << "name: from-file\n";
  setenv("TUNE_WORKER_NAME", "from-env", 1);
  Config c = ParseArgs({"--config", file});
  unsetenv("TUNE_WORKER_NAME");
  std::remove(file.c_str());
  EXPECT_EQ(c.name, "from-env");
}

// The worker's own flag name in the environment: TUNE_METRICS_LISTEN belongs
// to tune-server, and both read the same tunefleet.env under systemd.
TEST(ConfigTest, MetricsListenFromFileEnvAndFlag) {
  const std::string file = "/tmp/tune-worker-config-test-metrics.yaml";
  std::ofstream(file) << "metrics-listen: 127.0.0.1:9001\n";
  EXPECT_EQ(ParseArgs({"--config", file}).metrics_listen, "127.0.0.1:9001");
  setenv("TUNE_WORKER_METRICS_LISTEN", "127.0.0.1:9002", 1);
  EXPECT_EQ(ParseArgs({"--config", file}).metrics_listen, "127.0.0.1:9002");
  EXPECT_EQ(ParseArgs({"--config", file, "--metrics-listen", "127.0.0.1:9003"}).metrics_listen,
            "127.0.0.1:9003");
  unsetenv("TUNE_WORKER_METRICS_LISTEN");
  std::remove(file.c_str());
}

}  // namespace
}  // namespace tune::worker
