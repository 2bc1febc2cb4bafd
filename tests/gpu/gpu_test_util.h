// Shared by the `gpu`-labelled tests: running tune-train as a subprocess,
// reading its events, and skipping (exit 77, ctest's SKIP_RETURN_CODE) where
// no CUDA device is visible.
#ifndef TUNE_TESTS_GPU_GPU_TEST_UTIL_H_
#define TUNE_TESTS_GPU_GPU_TEST_UTIL_H_

#include <sys/wait.h>
#include <torch/cuda.h>

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace tune::gpu_test {

// Runs `cmd` with /bin/sh; returns its exit code (128 + signal when killed).
inline int RunCmd(const std::string& cmd) {
  const int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
}

// The events of `type` in a tune-train events.jsonl, in order.
inline std::vector<nlohmann::json> ReadEvents(const std::filesystem::path& file, const std::string& type) {
  std::vector<nlohmann::json> out;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("type", "") == type) out.push_back(j);
  }
  return out;
}

// main() of a GPU test binary: 77 (skipped) without a CUDA device.
inline int RunGpuTests(int argc, char** argv) {
  if (!torch::cuda::is_available()) {
    std::printf("no CUDA device: skipping GPU tests\n");
    return 77;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}

}  // namespace tune::gpu_test

#endif  // TUNE_TESTS_GPU_GPU_TEST_UTIL_H_
