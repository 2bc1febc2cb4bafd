#include "common/jobspec/job_spec.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

namespace tune::spec {
namespace {

namespace fs = std::filesystem;

// A model dir + dataset on disk so path checks can pass.
class JobSpecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("jobspec_test_" + std::to_string(::getpid()));
    fs::create_directories(dir_ / "model");
    std::ofstream(dir_ / "model" / "config.json") << R"({"architectures":["LlamaForCausalLM"],"model_type":"llama"})";
    std::ofstream(dir_ / "model" / "model.safetensors") << "x";
    std::ofstream(dir_ / "data.jsonl") << R"({"text":"hi"})" << "\n";
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::vector<SpecError> ParseAndValidate(const std::string& yaml, JobSpec* s) {
    auto errors = ParseJobSpec(yaml, s);
    if (!errors.empty()) return errors;
    ValidateOptions o;
    o.base_dir = dir_.string();
    return ValidateJobSpec(s, o);
  }
  fs::path dir_;
};

TEST_F(JobSpecTest, MinimalSpecGetsDefaultsAndAbsolutePaths) {
  JobSpec s;
  auto errors = ParseAndValidate("model: model\ndataset: {path: data.jsonl}\n", &s);
  ASSERT_TRUE(errors.empty()) << FormatErrors(errors);
  EXPECT_EQ(s.model, (dir_ / "model").string());
  EXPECT_EQ(s.dataset.path, (dir_ / "data.jsonl").string());
  EXPECT_EQ(s.output.dir, (dir_ / "runs" / "job").string());
  EXPECT_EQ(s.training.max_steps, 60);
  EXPECT_EQ(s.lora.targets.size(), 7u);
  EXPECT_EQ(s.resources.gpus, 1);  // neither gpus nor cpu_ranks: one GPU
}

TEST_F(JobSpecTest, FullDesignSpecParses) {
  const char* yaml = R"(name: llama3-support-bot
model: model
dataset:
  path: data.jsonl
  format: auto
  chat_template: auto
  train_on: completions
  max_seq_length: 2048
  packing: false
lora: {r: 16, alpha: 16, dropout: 0.0, targets: [q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj], rslora: false}
quantization: {base: nf4, double_quant: true, block_size: 64}
training:
  precision: auto
  effective_batch_size: 8
  micro_batch_size: auto
  learning_rate: 2.0e-4
  lr_scheduler: linear
  warmup_steps: 5
  max_steps: 60
  max_grad_norm: 1.0
  optimizer: adamw_8bit
  weight_decay: 0.01
  gradient_checkpointing: auto
  seed: 3407
  nan_policy: {skip_step: true, max_consecutive: 3, rollback: true, lr_backoff: 0.5}
checkpoint: {every_steps: 50, keep: 3}
output: {dir: runs/llama3-support-bot, merge: false}
resources: {gpus: 2}
priority: 0
)";
  JobSpec s;
  auto errors = ParseAndValidate(yaml, &s);
  ASSERT_TRUE(errors.empty()) << FormatErrors(errors);
  EXPECT_EQ(s.name, "llama3-support-bot");
  EXPECT_DOUBLE_EQ(s.training.learning_rate, 2.0e-4);
  EXPECT_EQ(s.training.micro_batch_size, 0);
  EXPECT_EQ(s.resources.gpus, 2);
  EXPECT_EQ(s.training.nan_policy.max_consecutive, 3);
}

TEST_F(JobSpecTest, EmitRoundTrips) {
  JobSpec s;
  ASSERT_TRUE(ParseAndValidate("model: model\ndataset: {path: data.jsonl}\ntraining: {learning_rate: 3.0e-4, "
                               "gradient_checkpointing: off}\nfaults: {nan_at_steps: [5, 6]}\n",
                               &s).empty());
  std::string yaml = EmitJobSpecYaml(s);
  JobSpec t;
  auto errors = ParseJobSpec(yaml, &t);
  ASSERT_TRUE(errors.empty()) << FormatErrors(errors) << yaml;
  EXPECT_EQ(EmitJobSpecYaml(t), yaml);
  EXPECT_DOUBLE_EQ(t.training.learning_rate, 3.0e-4);
  EXPECT_EQ(t.training.gradient_checkpointing, "off");
  EXPECT_EQ(t.faults.nan_at_steps, (std::vector<int>{5, 6}));
}

TEST_F(JobSpecTest, BadYamlNamesLine) {
  JobSpec s;
  auto errors = ParseJobSpec("model: x\ndataset: {path: [unclosed\n", &s);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].message.find("invalid YAML"), std::string::npos);
  EXPECT_GT(errors[0].line, 0);
}

TEST_F(JobSpecTest, UnknownKeyNamesPathAndAllowedKeys) {
  JobSpec s;
  auto errors = ParseJobSpec("model: x\ntraining:\n  max_stepz: 5\n", &s);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "training.max_stepz");
  EXPECT_EQ(errors[0].line, 3);
  EXPECT_NE(errors[0].message.find("max_steps"), std::string::npos);
  EXPECT_EQ(errors[0].ToString("job.yaml").rfind("job.yaml:3: training.max_stepz: unknown key", 0), 0u);
}

TEST_F(JobSpecTest, WrongTypeNamesField) {
  JobSpec s;
  auto errors = ParseJobSpec("model: x\ntraining: {max_steps: many}\nlora: {targets: q_proj}\n", &s);
  ASSERT_EQ(errors.size(), 2u);
  EXPECT_EQ(errors[0].path, "training.max_steps");
  EXPECT_NE(errors[0].message.find("whole number"), std::string::npos);
  EXPECT_EQ(errors[1].path, "lora.targets");
}

TEST_F(JobSpecTest, NegativeStepsAndMissingModelAreValidationErrors) {
  JobSpec s;
  auto errors = ParseAndValidate("model: nope\ndataset: {path: data.jsonl}\ntraining:\n  max_steps: -5\n", &s);
  ASSERT_EQ(errors.size(), 2u) << FormatErrors(errors);
  EXPECT_EQ(errors[0].path, "model");
  EXPECT_NE(errors[0].message.find("does not exist"), std::string::npos);
  EXPECT_EQ(errors[1].path, "training.max_steps");
  EXPECT_EQ(errors[1].line, 4);
  EXPECT_NE(errors[1].message.find("got -5"), std::string::npos);
}

TEST_F(JobSpecTest, NonLlamaModelRejected) {
  std::ofstream(dir_ / "model" / "config.json") << R"({"model_type":"gpt2"})";
  JobSpec s;
  auto errors = ParseAndValidate("model: model\ndataset: {path: data.jsonl}\n", &s);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].message.find("not a Llama model"), std::string::npos);
}

TEST_F(JobSpecTest, BatchMustDivideAcrossRanks) {
  JobSpec s;
  auto errors = ParseAndValidate(
      "model: model\ndataset: {path: data.jsonl}\nresources: {cpu_ranks: 3}\ntraining: {effective_batch_size: 8}\n", &s);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "training.effective_batch_size");
  JobSpec t;
  errors = ParseAndValidate(
      "model: model\ndataset: {path: data.jsonl}\nresources: {gpus: 2, cpu_ranks: 2}\n", &t);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "resources");
}

TEST_F(JobSpecTest, EnumsAndRangesChecked) {
  JobSpec s;
  auto errors = ParseAndValidate(
      "model: model\ndataset: {path: data.jsonl, format: csv}\nquantization: {base: int8, block_size: 60}\n"
      "lora: {r: 0, targets: [q_proj, lm_head]}\ntraining: {learning_rate: 0}\n", &s);
  std::set<std::string> paths;
  for (const auto& e : errors) paths.insert(e.path);
  EXPECT_EQ(paths, (std::set<std::string>{"dataset.format", "quantization.base", "quantization.block_size",
                                          "lora.r", "lora.targets", "training.learning_rate"}))
      << FormatErrors(errors);
}

TEST_F(JobSpecTest, PreTokenizedFormatAccepted) {
  JobSpec s;
  auto errors = ParseAndValidate("model: model\ndataset: {path: data.jsonl, format: tokens, packing: true}\n", &s);
  EXPECT_TRUE(errors.empty()) << FormatErrors(errors);
  EXPECT_EQ(s.dataset.format, "tokens");
  JobSpec round;
  ASSERT_TRUE(ParseJobSpec(EmitJobSpecYaml(s), &round).empty());
  EXPECT_EQ(round.dataset.format, "tokens");

  JobSpec bad;
  errors = ParseAndValidate("model: model\ndataset: {path: data.jsonl, format: token_ids}\n", &bad);
  ASSERT_EQ(errors.size(), 1u) << FormatErrors(errors);
  EXPECT_EQ(errors[0].path, "dataset.format");
  EXPECT_NE(errors[0].message.find("tokens"), std::string::npos) << errors[0].message;
}

TEST_F(JobSpecTest, EmptyAndNonMappingDocuments) {
  JobSpec s;
  EXPECT_EQ(ParseJobSpec("", &s).size(), 1u);
  auto errors = ParseJobSpec("- a\n- b\n", &s);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].message.find("mapping"), std::string::npos);
}

TEST_F(JobSpecTest, OutputDirMayNotEscape) {
  JobSpec s;
  auto errors = ParseAndValidate("model: model\ndataset: {path: data.jsonl}\noutput: {dir: ../../etc}\n", &s);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "output.dir");
}

}  // namespace
}  // namespace tune::spec
