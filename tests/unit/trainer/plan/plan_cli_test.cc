// `tune-train plan` end to end: a generated tiny model directory, and a
// Llama-3-8B-shaped directory holding only config.json (no weights).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

namespace {

namespace fs = std::filesystem;

struct CmdResult {
  int code = -1;
  std::string out;  // stdout and stderr
};

CmdResult Shell(const std::string& cmd) {
  CmdResult r;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf{};
  size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = ::pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

class PlanCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("plan_cli_test_" + std::to_string(::getpid()));
    Shell("rm -rf " + dir_.string());
    fs::create_directories(dir_);
  }
  void TearDown() override { Shell("rm -rf " + dir_.string()); }

  std::string WriteJob(const std::string& model_dir, const std::string& extra) {
    const fs::path job = dir_ / "job.yaml";
    std::ofstream(job) << "name: plan-test\nmodel: " << model_dir << "\n"
                       << "dataset: {path: " << (dir_ / "absent.jsonl").string() << ", max_seq_length: 2048}\n"
                       << "quantization: {base: nf4, double_quant: true}\n"
                       << "lora: {r: 16, alpha: 16}\n"
                       << "training: {effective_batch_size: 16, optimizer: adamw_8bit" << extra << "}\n"
                       << "resources: {gpus: 1}\n";
    return job.string();
  }

  fs::path dir_;
  const std::string bin_ = std::string(TUNE_BIN_DIR) + "/tune-train";
};

TEST_F(PlanCliTest, TinyModelDirectory) {
  const std::string tok = std::string(TUNE_ASSETS_DIR) + "/llama3";
  if (!fs::exists(tok + "/tokenizer.json")) GTEST_SKIP() << "run scripts/fetch-assets.sh first";
  const fs::path model = dir_ / "tiny";
  ASSERT_EQ(Shell(bin_ + " init-model --preset tiny --tokenizer " + tok + " --out " + model.string()).code, 0);
  const std::string job = WriteJob(model.string(), "");
  const CmdResult r = Shell(bin_ + " plan --config " + job + " --gpu-memory-gb 8");
  EXPECT_EQ(r.code, 0) << r.out;
  for (const char* row : {"weights", "lora", "optimizer", "activations", "logits", "slack", "reserved", "fits:"}) {
    EXPECT_NE(r.out.find(row), std::string::npos) << row << " missing from:\n" << r.out;
  }
  std::printf("%s", r.out.c_str());
}

TEST_F(PlanCliTest, Llama3_8BConfigOnly) {
  const fs::path model = dir_ / "llama3-8b";
  fs::create_directories(model);
  std::ofstream(model / "config.json") << nlohmann::json{{"architectures", {"LlamaForCausalLM"}},
                                                         {"model_type", "llama"},
                                                         {"hidden_size", 4096},
                                                         {"intermediate_size", 14336},
                                                         {"num_hidden_layers", 32},
                                                         {"num_attention_heads", 32},
                                                         {"num_key_value_heads", 8},
                                                         {"vocab_size", 128256},
                                                         {"hidden_act", "silu"},
                                                         {"tie_word_embeddings", false}}
                                              .dump();
  const std::string job = WriteJob(model.string(), "");
  const CmdResult ok = Shell(bin_ + " plan --config " + job + " --gpu-memory-gb 24 --attention sdpa -o json");
  ASSERT_EQ(ok.code, 0) << ok.out;
  const nlohmann::json j = nlohmann::json::parse(ok.out);
  EXPECT_EQ(j["micro_batch_size"].get<int>() * j["grad_accum"].get<int>(), 16);
  EXPECT_TRUE(j["fits"].get<bool>());
  EXPECT_GT(j["breakdown"]["weights"].get<int64_t>(), int64_t{5} << 30);  // NF4 8B: 5.31 GiB

  const CmdResult text = Shell(bin_ + " plan --config " + job + " --gpu-memory-gb 80 --attention sdpa");
  EXPECT_EQ(text.code, 0) << text.out;
  EXPECT_NE(text.out.find("activations"), std::string::npos) << text.out;
  std::printf("%s", text.out.c_str());

  // 8 GiB fits only with offload (layer inputs and the embedding in host memory).
  const CmdResult eight = Shell(bin_ + " plan --config " + job + " --gpu-memory-gb 8 --attention sdpa");
  EXPECT_EQ(eight.code, 0) << eight.out;
  EXPECT_NE(eight.out.find("checkpointing offload"), std::string::npos) << eight.out;

  // 6 GiB: nothing fits -> non-zero exit naming the shortfall and a fix.
  const CmdResult small = Shell(bin_ + " plan --config " + job + " --gpu-memory-gb 6 --attention sdpa");
  EXPECT_EQ(small.code, 1) << small.out;
  EXPECT_NE(small.out.find("short by"), std::string::npos) << small.out;
  EXPECT_NE(small.out.find("GPU with at least"), std::string::npos) << small.out;
}

TEST_F(PlanCliTest, MissingConfigJsonIsAClearError) {
  fs::create_directories(dir_ / "empty");
  const std::string job = WriteJob((dir_ / "empty").string(), "");
  const CmdResult r = Shell(bin_ + " plan --config " + job + " --gpu-memory-gb 24");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("config.json"), std::string::npos) << r.out;
  const CmdResult usage = Shell(bin_ + " plan --config " + job);
  EXPECT_EQ(usage.code, 2) << usage.out;
  EXPECT_NE(usage.out.find("--gpu-memory-gb"), std::string::npos) << usage.out;
}

}  // namespace
