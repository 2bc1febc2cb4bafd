#include "worker/trainer/config.h"

#include <gtest/gtest.h>

namespace tune::train {
namespace {

TrainConfig FromYaml(const std::string& yaml, DistEnv env = {}) {
  return TrainConfig::FromYaml(yaml, "job.yaml", "/base", /*check_paths=*/false, CliOptions{}, env);
}

TEST(ConfigTest, PlanBatchSplits) {
  EXPECT_EQ(PlanBatch(8, 0, 1).micro_batch_size, 8);
  EXPECT_EQ(PlanBatch(8, 0, 1).grad_accum, 1);
  EXPECT_EQ(PlanBatch(8, 0, 2).micro_batch_size, 4);
  auto p = PlanBatch(8, 2, 2);
  EXPECT_EQ(p.micro_batch_size, 2);
  EXPECT_EQ(p.grad_accum, 2);
  EXPECT_THROW(PlanBatch(6, 4, 1), ConfigError);  // 6 % 4
  EXPECT_THROW(PlanBatch(7, 0, 2), ConfigError);  // 7 % 2
  try {
    PlanBatch(12, 5, 1);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("micro_batch_size"), std::string::npos);
  }
}

TEST(ConfigTest, CheckpointingAuto) {
  EXPECT_FALSE(ResolveGradientCheckpointing("auto", 512, false));
  EXPECT_TRUE(ResolveGradientCheckpointing("auto", 1024, false));
  EXPECT_TRUE(ResolveGradientCheckpointing("auto", 128, true));
  EXPECT_FALSE(ResolveGradientCheckpointing("off", 4096, true));
  EXPECT_TRUE(ResolveGradientCheckpointing("on", 16, false));
}

TEST(ConfigTest, CpuAutoPrecisionFallsBackToFp32ExplicitBf16Honoured) {
  auto cfg = FromYaml("model: /m\ndataset: {path: /d.jsonl, max_seq_length: 256}\n");
  EXPECT_FALSE(cfg.use_cuda);
  EXPECT_EQ(cfg.compute_dtype, "fp32");
  EXPECT_NE(cfg.precision_note.find("auto"), std::string::npos);
  EXPECT_FALSE(cfg.gradient_checkpointing);
  auto bf = FromYaml("model: /m\ndataset: {path: /d.jsonl}\ntraining: {precision: bf16}\n");
  EXPECT_EQ(bf.compute_dtype, "bf16");
  EXPECT_THROW(FromYaml("model: /m\ndataset: {path: /d.jsonl}\ntraining: {precision: fp16}\n"), ConfigError);
}

TEST(ConfigTest, Fp16IsAGpuModeWithLossScaling) {
  try {
    FromYaml("model: /m\ndataset: {path: /d.jsonl}\ntraining: {precision: fp16}\n");
    FAIL() << "fp16 on CPU ranks must be refused";
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("training.precision"), std::string::npos) << msg;
    EXPECT_NE(msg.find("use bf16 or fp32"), std::string::npos) << msg;
  }
  auto gpu = FromYaml("model: /m\ndataset: {path: /d.jsonl}\ntraining: {precision: fp16}\nresources: {gpus: 1}\n");
  EXPECT_EQ(gpu.compute_dtype, "fp16");
  EXPECT_NE(gpu.precision_note.find("loss scaling"), std::string::npos);
}

TEST(ConfigTest, OffloadImpliesCheckpointing) {
  auto off = FromYaml("model: /m\ndataset: {path: /d.jsonl}\ntraining: {gradient_checkpointing: offload}\n");
  EXPECT_TRUE(off.gradient_checkpointing);
  EXPECT_TRUE(off.activation_offload);
  auto on = FromYaml("model: /m\ndataset: {path: /d.jsonl}\ntraining: {gradient_checkpointing: on}\n");
  EXPECT_TRUE(on.gradient_checkpointing);
  EXPECT_FALSE(on.activation_offload);
}

TEST(ConfigTest, OutputPathsDerived) {
  auto cfg = FromYaml("name: j1\nmodel: /m\ndataset: {path: /d.jsonl}\noutput: {dir: /tmp/out1}\n");
  EXPECT_EQ(cfg.output_dir, "/tmp/out1");
  EXPECT_EQ(cfg.checkpoint_dir, "/tmp/out1/checkpoints");
  EXPECT_EQ(cfg.events_path, "/tmp/out1/events.jsonl");
}

TEST(ConfigTest, SpecErrorsNameTheField) {
  try {
    FromYaml("model: /m\ndataset: {path: /d.jsonl}\ntraining: {max_stepz: 3}\n");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("max_stepz"), std::string::npos) << e.what();
  }
}

TEST(ConfigTest, WorldSplitsBatch) {
  DistEnv env;
  env.world_size = 2;
  env.rank = 1;
  auto cfg = FromYaml("model: /m\ndataset: {path: /d.jsonl}\ntraining: {effective_batch_size: 8, micro_batch_size: 2}\n"
                      "resources: {cpu_ranks: 2}\n",
                      env);
  EXPECT_EQ(cfg.batch.micro_batch_size, 2);
  EXPECT_EQ(cfg.batch.grad_accum, 2);
}

}  // namespace
}  // namespace tune::train
