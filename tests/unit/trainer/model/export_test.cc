// PEFT adapter export, our loader for it, and the merged-model export.
//
// The format PEFT expects (checked below), from peft's save_pretrained for a
// LoraConfig on LlamaForCausalLM:
//   adapter_config.json — a JSON object with at least
//       "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": <int>,
//       "lora_alpha": <number>, "lora_dropout": <number>,
//       "target_modules": [<module names>], "use_rslora": <bool>,
//       "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
//       "base_model_name_or_path": <string>, "modules_to_save": null
//   adapter_model.safetensors — one tensor per LoRA matrix, fp32, named
//       base_model.model.model.layers.<N>.self_attn.<q|k|v|o>_proj.lora_<A|B>.weight
//       base_model.model.model.layers.<N>.mlp.<gate|up|down>_proj.lora_<A|B>.weight
//   with lora_A [r, in_features] and lora_B [out_features, r]; no adapter
//   name (".default") in the keys; metadata {"format": "pt"}.
#include "worker/trainer/export/peft_export.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <regex>

#include "tests/unit/trainer/model/test_util.h"
#include "worker/trainer/model/safetensors.h"

namespace tune::exporter {
namespace {

using model::LlamaConfig;
using model::LlamaForCausalLM;
using model::LoadOptions;
using model::testing::BuildModel;
using model::testing::Fp32Options;
using model::testing::RandomizeLora;
using model::testing::RandomWeights;
using model::testing::SmallConfig;
using model::testing::TempDir;

// Writes a base model directory (fp32 weights, config.json).
void WriteBaseModel(const LlamaConfig& c, const std::map<std::string, torch::Tensor>& w, const std::string& dir) {
  std::vector<std::pair<std::string, torch::Tensor>> v(w.begin(), w.end());
  model::safetensors::SaveFile(dir + "/model.safetensors", v);
  std::ofstream(dir + "/config.json") << c.ToJson().dump(2);
  std::ofstream(dir + "/generation_config.json") << R"({"bos_token_id": 0, "eos_token_id": 1})";
}

torch::Tensor LogitsOf(LlamaForCausalLM& m, const torch::Tensor& ids) {
  torch::NoGradGuard ng;
  torch::Tensor pos = torch::arange(ids.size(1), torch::kInt64).repeat({ids.size(0), 1});
  return m.Logits(m.ForwardHidden(ids, pos));
}

TEST(PeftExport, AdapterFormatAndReloadReproducesLogits) {
  TempDir base, out;
  LlamaConfig c = SmallConfig();
  auto w = RandomWeights(c, 20);
  WriteBaseModel(c, w, base.path());
  LoadOptions o = Fp32Options("nf4");
  o.lora.r = 4;
  o.lora.alpha = 16;
  o.lora.dropout = 0.05;
  o.lora.targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  auto m = LlamaForCausalLM::Load(base.path(), o);
  RandomizeLora(*m, 21);
  m->SetTraining(false);
  spec::JobSpec spec;
  spec.name = "export-test";
  ExportPeftAdapter(*m, spec, base.path(), out.path());

  // adapter_config.json fields.
  nlohmann::json cfg;
  std::ifstream(out / "adapter_config.json") >> cfg;
  EXPECT_EQ(cfg["peft_type"], "LORA");
  EXPECT_EQ(cfg["task_type"], "CAUSAL_LM");
  EXPECT_EQ(cfg["r"], 4);
  EXPECT_EQ(cfg["lora_alpha"], 16.0);
  EXPECT_DOUBLE_EQ(cfg["lora_dropout"].get<double>(), 0.05);
  EXPECT_EQ(cfg["use_rslora"], false);
  EXPECT_EQ(cfg["bias"], "none");
  EXPECT_EQ(cfg["fan_in_fan_out"], false);
  EXPECT_EQ(cfg["inference_mode"], true);
  EXPECT_EQ(cfg["base_model_name_or_path"], base.path());
  EXPECT_TRUE(cfg["modules_to_save"].is_null());
  EXPECT_EQ(cfg["target_modules"].size(), 7u);

  // Keys, dtypes, shapes.
  auto f = model::safetensors::File::Open(out / "adapter_model.safetensors");
  EXPECT_EQ(f->metadata().at("format"), "pt");
  const std::regex key(
      R"(base_model\.model\.model\.layers\.(\d+)\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.lora_(A|B)\.weight)");
  EXPECT_EQ(f->tensors().size(), 2u * 7 * 2);
  for (const auto& t : f->tensors()) {
    EXPECT_TRUE(std::regex_match(t.name, key)) << t.name;
    EXPECT_EQ(t.dtype, "F32") << t.name;
  }
  EXPECT_EQ(f->Info("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape,
            (std::vector<int64_t>{4, 32}));
  EXPECT_EQ(f->Info("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight").shape,
            (std::vector<int64_t>{16, 4}));
  EXPECT_EQ(f->Info("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight").shape,
            (std::vector<int64_t>{4, 40}));

  // Our loader reproduces the logits in a fresh model (different LoRA seed).
  o.seed = 999;
  auto m2 = LlamaForCausalLM::Load(base.path(), o);
  m2->SetTraining(false);
  torch::Tensor ids = torch::randint(0, c.vocab_size, {2, 7}, torch::kInt64);
  EXPECT_FALSE(torch::allclose(LogitsOf(*m, ids), LogitsOf(*m2, ids), 1e-4, 1e-4));
  LoadPeftAdapter(*m2, out.path());
  EXPECT_TRUE(torch::equal(LogitsOf(*m, ids), LogitsOf(*m2, ids)));
}

TEST(PeftExport, LoaderRejectsMismatches) {
  TempDir base, out;
  LlamaConfig c = SmallConfig();
  auto w = RandomWeights(c, 22);
  WriteBaseModel(c, w, base.path());
  LoadOptions o = Fp32Options();
  o.lora.targets = {"q_proj", "v_proj"};
  auto m = LlamaForCausalLM::Load(base.path(), o);
  ExportPeftAdapter(*m, spec::JobSpec{}, base.path(), out.path());
  auto err = [&](LoadOptions lo) {
    auto other = LlamaForCausalLM::Load(base.path(), lo);
    try {
      LoadPeftAdapter(*other, out.path());
    } catch (const std::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  LoadOptions r8 = o;
  r8.lora.r = 8;
  EXPECT_NE(err(r8).find("r is 4"), std::string::npos) << err(r8);
  LoadOptions tg = o;
  tg.lora.targets = {"q_proj"};
  EXPECT_NE(err(tg).find("target_modules"), std::string::npos) << err(tg);
  LoadOptions rs = o;
  rs.lora.rslora = true;
  EXPECT_NE(err(rs).find("use_rslora"), std::string::npos) << err(rs);
  // A missing tensor is named.
  auto f = model::safetensors::File::Open(out / "adapter_model.safetensors");
  std::vector<std::pair<std::string, torch::Tensor>> kept;
  for (const auto& t : f->tensors()) {
    if (t.name != "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight") kept.emplace_back(t.name, f->Get(t.name));
  }
  f.reset();
  model::safetensors::SaveFile(out / "adapter_model.safetensors", kept);
  EXPECT_NE(err(o).find("model.layers.1.self_attn.v_proj.lora_B.weight"), std::string::npos) << err(o);
}

TEST(MergedExport, MergedModelMatchesAdaptedModel) {
  TempDir base, out;
  LlamaConfig c = SmallConfig(/*tied=*/true);
  auto w = RandomWeights(c, 23);
  WriteBaseModel(c, w, base.path());
  LoadOptions o = Fp32Options("bf16");
  o.lora.rslora = true;
  auto m = LlamaForCausalLM::Load(base.path(), o);
  RandomizeLora(*m, 24);
  m->SetTraining(false);
  ExportMergedModel(*m, spec::JobSpec{}, base.path(), out.path());
  EXPECT_TRUE(std::filesystem::exists(out / "generation_config.json"));
  nlohmann::json cfg;
  std::ifstream(out / "config.json") >> cfg;
  EXPECT_EQ(cfg["torch_dtype"], "bfloat16");
  auto f = model::safetensors::File::Open(out / "model.safetensors");
  for (const auto& t : f->tensors()) EXPECT_EQ(t.dtype, "BF16") << t.name;
  // Untargeted tensors are the base in bf16.
  EXPECT_TRUE(torch::equal(f->Get("model.norm.weight"), w.at("model.norm.weight").to(torch::kBFloat16)));
  // Targeted: W + scaling * B @ A.
  auto& lin = m->layers()[1].up_proj;
  torch::Tensor want = (w.at("model.layers.1.mlp.up_proj.weight") +
                        lin.lora_b().detach().matmul(lin.lora_a().detach()) * o.lora.Scaling())
                           .to(torch::kBFloat16);
  EXPECT_TRUE(torch::equal(f->Get("model.layers.1.mlp.up_proj.weight"), want));
  // The merged model without adapters gives (bf16-rounded) the same logits.
  LoadOptions plain = Fp32Options("bf16");
  plain.lora.targets = {};
  auto merged = LlamaForCausalLM::Load(out.path(), plain);
  torch::Tensor ids = torch::randint(0, c.vocab_size, {1, 6}, torch::kInt64);
  torch::Tensor a = LogitsOf(*m, ids), b = LogitsOf(*merged, ids);
  EXPECT_LT((a - b).abs().max().item<float>(), 0.05 * a.abs().max().item<float>());
  // From the quantised base instead: uses the dequantised NF4 weights.
  LoadOptions q = Fp32Options("nf4");
  q.lora.rslora = true;
  auto mq = LlamaForCausalLM::Load(base.path(), q);
  RandomizeLora(*mq, 24);
  TempDir out2;
  ExportMergedModel(*mq, spec::JobSpec{}, base.path(), out2.path(), /*from_quantized_base=*/true);
  auto f2 = model::safetensors::File::Open(out2 / "model.safetensors");
  auto& lq = mq->layers()[0].q_proj;
  torch::Tensor want_q = (lq.BaseWeight(torch::kFloat32) + lq.lora_b().detach().matmul(lq.lora_a().detach()) *
                                                               q.lora.Scaling())
                             .to(torch::kBFloat16);
  EXPECT_TRUE(torch::equal(f2->Get("model.layers.0.self_attn.q_proj.weight"), want_q));
}

}  // namespace
}  // namespace tune::exporter
