// tune-train on a CUDA device: the tiny model trains in bf16 with an NF4 base and its loss
// falls; step events report VRAM. Skips (exit 77) without CUDA.
#include <torch/cuda.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace {

namespace fs = std::filesystem;

int RunCmd(const std::string& cmd) {
  int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
}

std::vector<nlohmann::json> ReadEvents(const fs::path& file, const std::string& type) {
  std::vector<nlohmann::json> out;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("type", "") == type) out.push_back(j);
  }
  return out;
}

TEST(TrainerGpuTest, TinyNf4Bf16LossFalls) {
  const std::string bin = TUNE_BIN_DIR;
  fs::path dir = fs::temp_directory_path() / ("trainer_gpu_test_" + std::to_string(::getpid()));
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
        << "training: {precision: bf16, effective_batch_size: 4, micro_batch_size: 4, learning_rate: 5.0e-3,\n"
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
  std::printf("tiny nf4 bf16 on CUDA: loss %.4f -> %.4f, vram_peak %.1f MB, tokens/s %.0f\n", first, last,
              steps.back()["vram_peak"].get<double>() / 1e6, steps.back()["tokens_per_s"].get<double>());
  std::fflush(stdout);
  RunCmd("rm -rf " + dir.string());
}

}  // namespace

int main(int argc, char** argv) {
  if (!torch::cuda::is_available()) {
    std::printf("no CUDA device: skipping GPU tests\n");
    return 77;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
