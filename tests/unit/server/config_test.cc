#include "server/config.h"

#include <gtest/gtest.h>

namespace tune::server {
namespace {

TEST(ServerConfigTest, DefaultsAreValid) {
  Config c;
  EXPECT_TRUE(c.Validate().ok());
  EXPECT_EQ(c.listen, "127.0.0.1:7070");
  EXPECT_EQ(c.db, "./tunefleet.db");
  EXPECT_EQ(c.heartbeat_timeout_s, 30);
  EXPECT_TRUE(c.metrics_listen.empty());
}

TEST(ServerConfigTest, ErrorsNameTheFlag) {
  Config c;
  c.listen = "7070";
  EXPECT_NE(c.Validate().message().find("--listen"), std::string::npos);
  c = Config();
  c.metrics_listen = "localhost:99999";
  EXPECT_NE(c.Validate().message().find("--metrics-listen"), std::string::npos);
  c = Config();
  c.heartbeat_timeout_s = 0;
  EXPECT_NE(c.Validate().message().find("--heartbeat-timeout"), std::string::npos);
  c = Config();
  c.log_level = "loud";
  EXPECT_NE(c.Validate().message().find("--log-level"), std::string::npos);
  c = Config();
  c.db = "";
  EXPECT_NE(c.Validate().message().find("--db"), std::string::npos);
}

TEST(ServerConfigTest, ParseHostPort) {
  auto hp = ParseHostPort("0.0.0.0:7070", "--listen");
  ASSERT_TRUE(hp.ok());
  EXPECT_EQ(hp->host, "0.0.0.0");
  EXPECT_EQ(hp->port, 7070);
  hp = ParseHostPort("[::1]:0", "--listen");
  ASSERT_TRUE(hp.ok());
  EXPECT_EQ(hp->host, "::1");
  EXPECT_EQ(hp->port, 0);
  EXPECT_FALSE(ParseHostPort("::1:80", "--listen").ok());
  EXPECT_FALSE(ParseHostPort(":80", "--listen").ok());
  EXPECT_FALSE(ParseHostPort("host:http", "--listen").ok());
}

TEST(ServerConfigTest, FlagsAndEnvironment) {
  Config c;
  CLI::App app;
  AddConfigFlags(app, &c);
  setenv("TUNE_HEARTBEAT_TIMEOUT", "4", 1);
  const char* argv[] = {"tune-server", "--listen", "0.0.0.0:9000", "--local-worker"};
  app.parse(4, const_cast<char**>(argv));
  unsetenv("TUNE_HEARTBEAT_TIMEOUT");
  EXPECT_EQ(c.listen, "0.0.0.0:9000");
  EXPECT_TRUE(c.local_worker);
  EXPECT_EQ(c.heartbeat_timeout_s, 4);
}

}  // namespace
}  // namespace tune::server

// --local-worker, with a stand-in script for tune-worker that records how it
// was started.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "server/local_worker.h"

namespace tune::server {
namespace {

namespace fs = std::filesystem;

std::string ReadAll(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool WaitForFile(const fs::path& p, std::chrono::seconds limit) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (fs::exists(p) && !ReadAll(p).empty()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

class LocalWorkerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("tune_local_worker_test_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    // First run exits 3 (to exercise the restart); later runs record their
    // arguments and environment, then wait to be stopped.
    script_ = dir_ / "tune-worker";
    std::ofstream(script_) << "#!/bin/sh\n"
                           << "if [ ! -e " << (dir_ / "ran-once") << " ]; then touch "
                           << (dir_ / "ran-once") << "; exit 3; fi\n"
                           << "echo \"$@ token=$TUNE_JOIN_TOKEN\" > " << (dir_ / "args") << "\n"
                           << "exec sleep 60\n";
    fs::permissions(script_, fs::perms::owner_all);
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path dir_;
  fs::path script_;
};

TEST_F(LocalWorkerTest, StartsRestartsAndStopsTheWorker) {
  LocalWorkerOptions o;
  o.binary = script_.string();
  o.server = "127.0.0.1:7070";
  o.work_dir = (dir_ / "worker").string();
  o.cpu_slots = 3;
  o.log_level = "warn";
  o.join_token = "tok";
  LocalWorker w(o);
  ASSERT_TRUE(w.Start().ok());
  ASSERT_TRUE(WaitForFile(dir_ / "args", std::chrono::seconds(10))) << "not restarted";
  const std::string args = ReadAll(dir_ / "args");
  EXPECT_NE(args.find("--server 127.0.0.1:7070 --name local --work-dir " + o.work_dir),
            std::string::npos)
      << args;
  EXPECT_NE(args.find("--cpu-slots 3"), std::string::npos) << args;
  EXPECT_NE(args.find("--log-level warn"), std::string::npos) << args;
  EXPECT_NE(args.find("token=tok"), std::string::npos) << args;
  auto start = std::chrono::steady_clock::now();
  w.Stop(absl::Seconds(5));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(4))
      << "SIGTERM should have ended it";
}

TEST_F(LocalWorkerTest, MissingBinaryIsAClearError) {
  LocalWorkerOptions o;
  o.binary = (dir_ / "nope" / "tune-worker").string();
  LocalWorker w(o);
  absl::Status s = w.Start();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("tune-worker"), std::string::npos);
}

}  // namespace
}  // namespace tune::server
