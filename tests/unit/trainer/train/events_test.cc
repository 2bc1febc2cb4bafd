#include "worker/trainer/events.h"

#include <fcntl.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include <gtest/gtest.h>

namespace tune::train {
namespace {

TEST(EventsTest, NonFiniteBecomeStrings) {
  nlohmann::json j = {{"a", std::nan("")},
                      {"b", std::numeric_limits<double>::infinity()},
                      {"c", {1.5, -std::numeric_limits<double>::infinity()}},
                      {"d", 2}};
  auto s = SanitizeNonFinite(j);
  EXPECT_EQ(s["a"], "nan");
  EXPECT_EQ(s["b"], "inf");
  EXPECT_EQ(s["c"][1], "-inf");
  EXPECT_EQ(s["c"][0], 1.5);
  EXPECT_EQ(s["d"], 2);
}

TEST(EventsTest, WritesToFdAndFileOneLinePerEvent) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const std::string path = std::filesystem::temp_directory_path() / ("tune-events-" + std::to_string(::getpid()));
  std::filesystem::remove(path);
  {
    EventSink sink(3, fds[1], path);
    sink.Emit("step", {{"step", 1}, {"loss", std::nan("")}});
    sink.Emit("done", {{"step", 1}});
  }
  ::close(fds[1]);
  std::string piped;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fds[0], buf, sizeof(buf))) > 0) piped.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  std::ifstream in(path);
  std::string line1, line2, extra;
  ASSERT_TRUE(std::getline(in, line1));
  ASSERT_TRUE(std::getline(in, line2));
  EXPECT_FALSE(std::getline(in, extra));
  EXPECT_EQ(piped, line1 + "\n" + line2 + "\n");
  auto e1 = nlohmann::json::parse(line1);
  EXPECT_EQ(e1["type"], "step");
  EXPECT_EQ(e1["rank"], 3);
  EXPECT_EQ(e1["loss"], "nan");
  EXPECT_GT(e1["time"].get<double>(), 1.6e9);
  std::filesystem::remove(path);
}

TEST(EventsTest, ProgressLine) {
  EXPECT_EQ(FormatProgressLine(12, 60, 2.34123, 1.8e-4, 0.912, 5321.4, 0),
            "step 12/60 loss 2.3412 lr 1.8e-04 gnorm 0.91 tok/s 5321 vram 0.0G");
}

}  // namespace
}  // namespace tune::train
