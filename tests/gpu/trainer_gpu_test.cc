// tune-train on a CUDA device: the tiny model trains in bf16 and in fp16 (dynamic loss
// scaling) with an NF4 base and its loss falls; step events report VRAM. Skips (exit 77)
// without CUDA.
#include <torch/cuda.h>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/gpu/gpu_test_util.h"

namespace {

using tune::gpu_test::ReadEvents;
using tune::gpu_test::RunCmd;

namespace fs = std::filesystem;

// bf16, and fp16 with dynamic loss scaling (what precision auto picks on GPUs
// without bf16): both must train the tiny model with a steady loss fall.
class TrainerGpuTest : public ::testing::TestWithParam<std::string> {};

TEST_P(TrainerGpuTest, TinyNf4LossFalls) {
  const std::string bin = TUNE_BIN_DIR;
  const std::string precision = GetParam();
  fs::path dir = fs::temp_directory_path() / ("trainer_gpu_test_" + precision + "_" + std::to_string(::getpid()));
  // rm -rf, not fs::remove_all: the PyTorch wheel's libtorch exports its own copies of the
  // std::filesystem removal symbols and remove_all crashed there.
  RunCmd("rm -rf " + dir.string());
  fs::create_directories(dir);
  ASSERT_EQ(RunCmd(bin + "/tune-train init-model --preset tiny --tokenizer " TUNE_ASSETS_DIR "/llama3 --out " +
                (dir / "model").string() + " --seed 1"),
            0);
  {
    std::ofstream data(dir / "data.jsonl");
    const char* lines[] = {"The quick brown fox jumps over the lazy dog.",
                           "tunefleet fine-tunes Llama 3 with QLoRA on GPU fleets.",
                           "Never OOM, never NaN silently, never a doubled BOS.",
                           "Loss should fall quickly on a memorisable dataset."};
    for (int i = 0; i < 8; ++i) data << nlohmann::json{{"text", lines[i % 4]}}.dump() << "\n";
  }
  {
    std::ofstream job(dir / "job.yaml");
    job << "name: gpu-tiny\nmodel: " << (dir / "model").string() << "\n"
        << "dataset: {path: " << (dir / "data.jsonl").string() << ", format: text, max_seq_length: 64}\n"
        << "quantization: {base: nf4}\n"
        << "training: {precision: " << precision << ", effective_batch_size: 4, micro_batch_size: 4, learning_rate: 5.0e-3,\n"
        << "           warmup_steps: 2, max_steps: 60, optimizer: adamw, lr_scheduler: constant}\n"
        << "lora: {r: 8, alpha: 16}\n"
        << "checkpoint: {every_steps: 0}\n"
        << "output: {dir: " << (dir / "out").string() << "}\n"
        << "resources: {gpus: 1}\n";
  }
  ASSERT_EQ(RunCmd("cd " + dir.string() + " && " + bin + "/tune-train --config job.yaml > train.log 2>&1"), 0)
      << "see " << (dir / "train.log");
  auto steps = ReadEvents(dir / "out" / "events.jsonl", "step");
  ASSERT_EQ(steps.size(), 60u);
  double first = steps.front()["loss"].get<double>();
  double last = steps.back()["loss"].get<double>();
  // The tiny preset's frozen 0.02-std embeddings bound how far LoRA alone can move the
  // loss (see the CPU integration test); a clear, steady fall is what is checked here.
  EXPECT_LT(last, first - 0.3) << "first " << first << " last " << last;
  EXPECT_GT(steps.back()["vram_peak"].get<double>(), 0.0);
  int skipped = 0;
  for (const auto& s : steps) {
    EXPECT_TRUE(std::isfinite(s["loss"].get<double>()) || s["skipped"].get<bool>()) << s.dump();
    skipped += s["skipped"].get<bool>() ? 1 : 0;
  }
  const double scale = steps.back().value("loss_scale", 1.0);
  if (precision == "fp16") {
    // Dynamic loss scaling starts at 2^16; overflowing steps are skipped and
    // halve it, so a scale below 2^16 shows the scaler at work.
    EXPECT_GE(scale, 1.0);
    EXPECT_LT(skipped, 20) << "most fp16 steps overflowed";
  } else {
    EXPECT_EQ(skipped, 0);
  }
  EXPECT_TRUE(ReadEvents(dir / "out" / "events.jsonl", "nan_alert").empty()) << "fp16 overflow is not a NaN alert";
  std::printf("tiny nf4 %s on CUDA: loss %.4f -> %.4f, vram_peak %.1f MB, tokens/s %.0f, skipped %d, loss scale %g\n",
              precision.c_str(), first, last, steps.back()["vram_peak"].get<double>() / 1e6,
              steps.back()["tokens_per_s"].get<double>(), skipped, scale);
  std::fflush(stdout);
  RunCmd("rm -rf " + dir.string());
}

INSTANTIATE_TEST_SUITE_P(Precisions, TrainerGpuTest, ::testing::Values("bf16", "fp16"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

}  // namespace

int main(int argc, char** argv) { return tune::gpu_test::RunGpuTests(argc, argv); }
