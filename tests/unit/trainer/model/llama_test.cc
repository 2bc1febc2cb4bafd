// LlamaForCausalLM: config parsing, loading, LoRA math and init, NF4 base,
// packing, gradient checkpointing, chunked loss, init-model.
#include "worker/trainer/model/llama.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "tests/unit/trainer/model/test_util.h"
#include "worker/trainer/model/safetensors.h"

namespace tune::model {
namespace {

using testing::BuildModel;
using testing::Fp32Options;
using testing::RandomizeLora;
using testing::RandomWeights;
using testing::SmallConfig;
using testing::TempDir;

std::string ErrorOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

TEST(LlamaConfig, ParsesLlama31Config) {
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}},
                      {"model_type", "llama"},
                      {"vocab_size", 128256},
                      {"hidden_size", 4096},
                      {"intermediate_size", 14336},
                      {"num_hidden_layers", 32},
                      {"num_attention_heads", 32},
                      {"num_key_value_heads", 8},
                      {"max_position_embeddings", 131072},
                      {"rms_norm_eps", 1e-5},
                      {"rope_theta", 500000.0},
                      {"rope_scaling",
                       {{"factor", 8.0},
                        {"low_freq_factor", 1.0},
                        {"high_freq_factor", 4.0},
                        {"original_max_position_embeddings", 8192},
                        {"rope_type", "llama3"}}},
                      {"tie_word_embeddings", false},
                      {"bos_token_id", 128000},
                      {"eos_token_id", {128001, 128008, 128009}},
                      {"torch_dtype", "bfloat16"}};
  LlamaConfig c = LlamaConfig::FromJson(j, "config.json");
  EXPECT_EQ(c.head_dim, 128);
  ASSERT_TRUE(c.rope_scaling.has_value());
  EXPECT_EQ(c.rope_scaling->factor, 8.0);
  EXPECT_EQ(c.rope_scaling->original_max_position_embeddings, 8192);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int>{128001, 128008, 128009}));
  EXPECT_EQ(c.NumParameters(), 8030261248);  // Llama 3.1 8B
  // Round trip through ToJson.
  LlamaConfig c2 = LlamaConfig::FromJson(c.ToJson(), "roundtrip");
  EXPECT_EQ(c2.ToJson(), c.ToJson());
  EXPECT_EQ(c.ToJson()["architectures"][0], "LlamaForCausalLM");
}

TEST(LlamaConfig, ClearErrors) {
  nlohmann::json base = SmallConfig().ToJson();
  auto with = [&](const std::string& k, const nlohmann::json& v) {
    nlohmann::json j = base;
    j[k] = v;
    return ErrorOf([&] { LlamaConfig::FromJson(j, "cfg.json"); });
  };
  EXPECT_NE(with("architectures", {"MistralForCausalLM"}).find("Llama models only"), std::string::npos);
  EXPECT_NE(with("model_type", "qwen2").find("model_type"), std::string::npos);
  EXPECT_NE(with("rope_scaling", {{"rope_type", "yarn"}, {"factor", 2.0}}).find("\"yarn\" is not supported"),
            std::string::npos);
  EXPECT_NE(with("num_key_value_heads", 3).find("multiple of num_key_value_heads"), std::string::npos);
  EXPECT_NE(with("hidden_size", -4).find("\"hidden_size\""), std::string::npos);
  nlohmann::json missing = base;
  missing.erase("vocab_size");
  EXPECT_NE(ErrorOf([&] { LlamaConfig::FromJson(missing, "cfg.json"); }).find("missing required field \"vocab_size\""),
            std::string::npos);
  nlohmann::json rs = base;
  rs["rope_scaling"].erase("original_max_position_embeddings");
  EXPECT_NE(ErrorOf([&] { LlamaConfig::FromJson(rs, "cfg.json"); }).find("original_max_position_embeddings"),
            std::string::npos);
  EXPECT_NE(ErrorOf([] { LlamaConfig::FromJsonFile("/nonexistent/config.json"); }).find("/nonexistent/config.json"),
            std::string::npos);
}

TEST(Lora, ScalingAndRsLora) {
  LoraOptions o;
  o.r = 16;
  o.alpha = 32;
  EXPECT_DOUBLE_EQ(o.Scaling(), 2.0);
  o.rslora = true;
  EXPECT_DOUBLE_EQ(o.Scaling(), 8.0);  // alpha / sqrt(r)
}

TEST(Lora, InitLikePeftAndNames) {
  LlamaConfig c = SmallConfig();
  auto w = RandomWeights(c, 1);
  LoadOptions o = Fp32Options();
  o.lora.targets = {"v_proj", "q_proj", "down_proj"};
  auto m = BuildModel(c, w, o);
  auto params = m->LoraParameters();
  ASSERT_EQ(params.size(), 2u * 3 * 2);
  EXPECT_EQ(params[0].first, "model.layers.0.self_attn.q_proj.lora_A.weight");
  EXPECT_EQ(params[1].first, "model.layers.0.self_attn.q_proj.lora_B.weight");
  EXPECT_EQ(params[2].first, "model.layers.0.self_attn.v_proj.lora_A.weight");
  EXPECT_EQ(params[4].first, "model.layers.0.mlp.down_proj.lora_A.weight");
  EXPECT_EQ(params[11].first, "model.layers.1.mlp.down_proj.lora_B.weight");
  for (auto& [name, p] : params) {
    EXPECT_EQ(p.scalar_type(), torch::kFloat32) << name;
    EXPECT_TRUE(p.requires_grad()) << name;
    if (name.find("lora_B") != std::string::npos) {
      EXPECT_EQ(p.abs().sum().item<float>(), 0.0f) << name;
    } else {
      // kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
      const double bound = 1.0 / std::sqrt(static_cast<double>(p.size(1)));
      EXPECT_LE(p.abs().max().item<double>(), bound) << name;
      EXPECT_GT(p.abs().max().item<double>(), 0.8 * bound) << name;
    }
  }
  EXPECT_EQ(params[0].second.sizes(), (std::vector<int64_t>{4, 32}));  // [r, in]
  EXPECT_EQ(params[5].second.sizes(), (std::vector<int64_t>{32, 4}));  // down_proj B [out, r]
  EXPECT_EQ(m->NumLoraParameters(), 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4 + 4 * 40 + 32 * 4));
  // Same seed -> same A; different seed -> different A.
  auto m2 = BuildModel(c, w, o);
  EXPECT_TRUE(torch::equal(m2->LoraParameters()[0].second, params[0].second));
  o.seed = 8;
  auto m3 = BuildModel(c, w, o);
  EXPECT_FALSE(torch::equal(m3->LoraParameters()[0].second, params[0].second));
  // Unknown targets are rejected by name.
  o.lora.targets = {"qkv_proj"};
  EXPECT_NE(ErrorOf([&] { BuildModel(c, w, o); }).find("\"qkv_proj\""), std::string::npos);
}

TEST(Lora, LinearMath) {
  torch::manual_seed(2);
  LoadOptions o = Fp32Options();
  o.lora.r = 3;
  o.lora.alpha = 6;
  o.lora.dropout = 0.5;
  LinearWithLora lin;
  torch::Tensor W = torch::randn({5, 7});
  lin.SetBase(W, o);
  lin.EnableLora(o.lora, torch::kCPU, at::detail::createCPUGenerator(1));
  {
    torch::NoGradGuard ng;
    lin.lora_b().copy_(torch::randn({5, 3}));
  }
  torch::Tensor x = torch::randn({2, 4, 7});
  torch::Tensor y = lin.Forward(x, /*training=*/false);
  torch::Tensor want = x.matmul(W.t()) + x.matmul(lin.lora_a().t()).matmul(lin.lora_b().t()) * 2.0;
  EXPECT_TRUE(torch::allclose(y, want, 1e-5, 1e-5));
  // Training: dropout on the LoRA input only.
  torch::manual_seed(9);
  torch::Tensor yt = lin.Forward(x, true);
  torch::manual_seed(9);
  torch::Tensor xd = torch::dropout(x, 0.5, true);
  torch::Tensor want_t = x.matmul(W.t()) + xd.matmul(lin.lora_a().t()).matmul(lin.lora_b().t()) * 2.0;
  EXPECT_TRUE(torch::allclose(yt, want_t, 1e-5, 1e-5));
  // Gradients reach the fp32 LoRA params, never the base weight.
  yt.sum().backward();
  EXPECT_TRUE(lin.lora_a().grad().defined());
  EXPECT_TRUE(lin.lora_b().grad().defined());
  EXPECT_FALSE(lin.BaseWeight(torch::kFloat32).requires_grad());
}

TEST(Llama, ZeroLoraBLeavesOutputUnchanged) {
  LlamaConfig c = SmallConfig();
  auto w = RandomWeights(c, 3);
  LoadOptions none = Fp32Options();
  none.lora.targets = {};
  auto base = BuildModel(c, w, none);
  auto lora = BuildModel(c, w, Fp32Options());
  torch::Tensor ids = torch::randint(0, c.vocab_size, {2, 6}, torch::kInt64);
  torch::Tensor pos = torch::arange(6, torch::kInt64).repeat({2, 1});
  torch::NoGradGuard ng;
  EXPECT_TRUE(torch::allclose(base->ForwardHidden(ids, pos), lora->ForwardHidden(ids, pos), 1e-6, 1e-6));
}

TEST(Llama, PackedSegmentsEqualSeparateSequences) {
  LlamaConfig c = SmallConfig();
  auto m = BuildModel(c, RandomWeights(c, 4), Fp32Options());
  RandomizeLora(*m, 5);
  m->SetTraining(false);
  torch::NoGradGuard ng;
  torch::Tensor a = torch::tensor({{3, 9, 27, 1}}, torch::kInt64);
  torch::Tensor b = torch::tensor({{30, 2, 17}}, torch::kInt64);
  torch::Tensor ha = m->ForwardHidden(a, torch::arange(4, torch::kInt64).view({1, 4}));
  torch::Tensor hb = m->ForwardHidden(b, torch::arange(3, torch::kInt64).view({1, 3}));
  torch::Tensor packed = torch::cat({a, b}, 1);
  torch::Tensor pos = torch::tensor({{0, 1, 2, 3, 0, 1, 2}}, torch::kInt64);
  torch::Tensor seg = torch::tensor({{1, 1, 1, 1, 2, 2, 2}}, torch::kInt64);
  torch::Tensor hp = m->ForwardHidden(packed, pos, seg);
  EXPECT_TRUE(torch::allclose(hp.slice(1, 0, 4), ha, 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(hp.slice(1, 4, 7), hb, 1e-5, 1e-5));
  // Without segment ids the second sequence sees the first: results differ.
  torch::Tensor hn = m->ForwardHidden(packed, pos);
  EXPECT_FALSE(torch::allclose(hn.slice(1, 4, 7), hb, 1e-3, 1e-3));
}

TEST(Llama, Nf4BaseEqualsDenseModelOfDequantisedWeights) {
  LlamaConfig c = SmallConfig(/*tied=*/true);
  auto w = RandomWeights(c, 6);
  LoadOptions q = Fp32Options("nf4");
  q.block_size = 64;
  q.double_quant = true;
  auto mq = BuildModel(c, w, q);
  // Same model with every base linear replaced by its NF4 round trip.
  auto w2 = w;
  for (auto& [name, t] : w2) {
    if (name.find("_proj") != std::string::npos) t = nf4::Dequantize(nf4::Quantize(t, 64, true));
  }
  auto md = BuildModel(c, w2, Fp32Options("bf16"));
  RandomizeLora(*mq, 7);
  RandomizeLora(*md, 7);
  torch::Tensor ids = torch::randint(0, c.vocab_size, {2, 5}, torch::kInt64);
  torch::Tensor pos = torch::arange(5, torch::kInt64).repeat({2, 1});
  torch::Tensor lq = mq->Logits(mq->ForwardHidden(ids, pos));
  torch::Tensor ld = md->Logits(md->ForwardHidden(ids, pos));
  EXPECT_TRUE(torch::allclose(lq, ld, 1e-4, 1e-4));
  EXPECT_TRUE(mq->layers()[0].q_proj.quantized());
  EXPECT_LT(mq->BaseStorageBytes(), md->BaseStorageBytes());
  // And NF4 gradients w.r.t. LoRA match the dense model's.
  torch::Tensor labels = torch::randint(0, c.vocab_size, {2, 5}, torch::kInt64);
  mq->LossSum(mq->ForwardHidden(ids, pos), labels, 3).backward();
  md->LossSum(md->ForwardHidden(ids, pos), labels, 3).backward();
  auto pq = mq->LoraParameters(), pd = md->LoraParameters();
  for (size_t i = 0; i < pq.size(); ++i) {
    EXPECT_TRUE(torch::allclose(pq[i].second.grad(), pd[i].second.grad(), 1e-4, 1e-5)) << pq[i].first;
  }
}

TEST(Llama, LossSumEqualsCrossEntropyOfLogits) {
  LlamaConfig c = SmallConfig();
  auto m = BuildModel(c, RandomWeights(c, 8), Fp32Options());
  torch::Tensor ids = torch::randint(0, c.vocab_size, {2, 9}, torch::kInt64);
  torch::Tensor pos = torch::arange(9, torch::kInt64).repeat({2, 1});
  torch::Tensor labels = torch::randint(0, c.vocab_size, {2, 9}, torch::kInt64);
  labels.slice(1, 0, 3).fill_(-100);
  torch::NoGradGuard ng;
  torch::Tensor h = m->ForwardHidden(ids, pos);
  torch::Tensor ref = torch::nn::functional::cross_entropy(
      m->Logits(h).view({-1, c.vocab_size}), labels.view({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum).ignore_index(-100));
  EXPECT_NEAR(m->LossSum(h, labels, 4).item<double>(), ref.item<double>(), 1e-4);
}

TEST(Llama, GradientCheckpointingGivesEqualGrads) {
  for (const std::string base : {"bf16", "nf4"}) {
    LlamaConfig c = SmallConfig();
    auto w = RandomWeights(c, 10);
    LoadOptions o = Fp32Options(base);
    o.lora.dropout = 0.2;  // the recompute must replay the dropout masks
    auto m = BuildModel(c, w, o);
    RandomizeLora(*m, 11);
    m->SetTraining(true);
    torch::Tensor ids = torch::randint(0, c.vocab_size, {2, 6}, torch::kInt64);
    torch::Tensor pos = torch::arange(6, torch::kInt64).repeat({2, 1});
    torch::Tensor labels = torch::randint(0, c.vocab_size, {2, 6}, torch::kInt64);
    auto run = [&](bool ckpt) {
      m->SetGradientCheckpointing(ckpt);
      for (auto& [n, p] : m->LoraParameters()) p.mutable_grad().reset();
      torch::manual_seed(123);
      torch::Tensor loss = m->LossSum(m->ForwardHidden(ids, pos), labels, 5);
      loss.backward();
      std::vector<torch::Tensor> g;
      for (auto& [n, p] : m->LoraParameters()) g.push_back(p.grad().clone());
      return std::make_pair(loss.item<double>(), g);
    };
    auto [l0, g0] = run(false);
    auto [l1, g1] = run(true);
    EXPECT_EQ(l0, l1) << base;
    for (size_t i = 0; i < g0.size(); ++i) {
      EXPECT_TRUE(torch::allclose(g0[i], g1[i], 1e-6, 1e-7)) << base << " param " << i;
      EXPECT_GT(g0[i].abs().sum().item<double>(), 0) << base << " param " << i;
    }
  }
}

// Loss and LoRA gradients of one forward/backward, with the model's
// checkpointing as set by `configure`.
std::pair<double, std::vector<torch::Tensor>> LossAndGrads(LlamaForCausalLM& m, const torch::Tensor& ids,
                                                           const torch::Tensor& labels,
                                                           const std::function<void()>& configure) {
  configure();
  const int64_t B = ids.size(0), T = ids.size(1);
  torch::Tensor pos = torch::arange(T, torch::kInt64).repeat({B, 1});
  for (auto& [n, p] : m.LoraParameters()) p.mutable_grad().reset();
  torch::manual_seed(123);
  torch::Tensor loss = m.LossSum(m.ForwardHidden(ids, pos), labels, 4096);
  loss.backward();
  std::vector<torch::Tensor> g;
  for (auto& [n, p] : m.LoraParameters()) g.push_back(p.grad().clone());
  return {loss.item<double>(), g};
}

void ExpectSameGrads(const std::pair<double, std::vector<torch::Tensor>>& want,
                     const std::pair<double, std::vector<torch::Tensor>>& got, double rtol, const std::string& what) {
  EXPECT_NEAR(want.first, got.first, rtol * std::abs(want.first)) << what;
  ASSERT_EQ(want.second.size(), got.second.size()) << what;
  for (size_t i = 0; i < want.second.size(); ++i) {
    // Relative to the whole tensor: summation order moves single elements
    // near zero by more than rtol of themselves.
    const double err = (want.second[i] - got.second[i]).norm().item<double>();
    const double ref = want.second[i].norm().item<double>();
    EXPECT_LE(err, rtol * ref) << what << " param " << i << ": |diff| " << err << " vs |grad| " << ref;
    EXPECT_GT(want.second[i].abs().sum().item<double>(), 0) << what << " param " << i;
  }
}

// A SmallConfig model with `o` (weights and adapters from `seed`) on one
// random [B, T] batch: without checkpointing, with whole layers recomputed,
// and with selective recompute.
struct ThreeModes {
  std::pair<double, std::vector<torch::Tensor>> plain, full, selective;
};
ThreeModes RunThreeModes(const LoadOptions& o, uint64_t seed, int64_t B, int64_t T) {
  LlamaConfig c = SmallConfig();
  auto model = BuildModel(c, RandomWeights(c, seed), o);
  LlamaForCausalLM& m = *model;
  RandomizeLora(m, seed + 1);
  torch::Tensor ids = torch::randint(0, c.vocab_size, {B, T}, torch::kInt64);
  torch::Tensor labels = torch::randint(0, c.vocab_size, {B, T}, torch::kInt64);
  ThreeModes r;
  r.plain = LossAndGrads(m, ids, labels, [&] { m.SetGradientCheckpointing(false); });
  r.full = LossAndGrads(m, ids, labels, [&] {
    m.SetGradientCheckpointing(true);
    m.SetSelectiveRecompute(false);
  });
  r.selective = LossAndGrads(m, ids, labels, [&] { m.SetSelectiveRecompute(true); });
  return r;
}

TEST(Llama, SelectiveRecomputeGivesEqualGrads) {
  const std::vector<std::vector<std::string>> target_sets = {
      {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
      {"q_proj", "v_proj", "down_proj"},  // no LoRA on gate/up: absent inputs of the MLP node
      {"k_proj", "o_proj"}};              // no LoRA in the MLP at all
  for (const std::string base : {"bf16", "nf4"}) {
    for (const auto& targets : target_sets) {
      LoadOptions o = Fp32Options(base);
      o.lora.targets = targets;
      const std::string what = base + " " + targets.front() + ".." + targets.back();
      const ThreeModes r = RunThreeModes(o, 20, 3, 7);
      ExpectSameGrads(r.plain, r.full, 1e-5, what + " full");
      ExpectSameGrads(r.plain, r.selective, 1e-5, what + " selective");
    }
  }
  // LoRA dropout: the layer is checkpointed whole, so the masks replay.
  LoadOptions o = Fp32Options("nf4");
  o.lora.dropout = 0.2;
  const ThreeModes r = RunThreeModes(o, 22, 2, 6);
  ExpectSameGrads(r.plain, r.selective, 1e-5, "dropout");
}

// The aten ops `fn` runs (torch's profiler; CPU ops).
std::set<std::string> OpsRun(const std::function<void()>& fn) {
  namespace kp = torch::autograd::profiler;
  namespace pi = torch::profiler::impl;
  const pi::ProfilerConfig config(pi::ProfilerState::KINETO, false, false);
  const std::set<pi::ActivityType> cpu{pi::ActivityType::CPU};
  kp::prepareProfiler(config, cpu);
  kp::enableProfiler(config, cpu);
  fn();
  const std::unique_ptr<kp::ProfilerResult> result = kp::disableProfiler();
  std::set<std::string> ops;
  for (const auto& e : result->events()) ops.insert(e.name());
  return ops;
}

// Fused q/k/v and gate/up projections (the default: one GEMM per group on
// stacked weights, LoRA A's stacked and B's block-diagonal) give the loss and
// LoRA gradients of one GEMM per projection, with and without recompute, and
// for target sets where a group cannot fuse (LoRA on some members only).
TEST(Llama, FusedProjectionsGiveEqualGrads) {
  const std::vector<std::vector<std::string>> target_sets = {
      {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
      {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"},
      {"q_proj", "v_proj", "down_proj"}};  // q/k/v unfused (no LoRA on k); gate/up fused, no LoRA
  for (const std::string base : {"bf16", "nf4"}) {
    for (const auto& targets : target_sets) {
      LoadOptions o = Fp32Options(base);
      o.lora.targets = targets;
      LlamaConfig c = SmallConfig();
      auto model = BuildModel(c, RandomWeights(c, 30), o);
      LlamaForCausalLM& m = *model;
      RandomizeLora(m, 31);
      torch::Tensor ids = torch::randint(0, c.vocab_size, {3, 7}, torch::kInt64);
      torch::Tensor labels = torch::randint(0, c.vocab_size, {3, 7}, torch::kInt64);
      const auto unfused = LossAndGrads(m, ids, labels, [&] {
        m.SetFusedProjections(false);
        m.SetGradientCheckpointing(false);
      });
      const std::string what = base + " " + std::to_string(targets.size()) + " targets";
      struct Mode {
        const char* name;
        bool ckpt, selective;
      };
      for (const Mode mode : {Mode{"plain", false, false}, Mode{"full", true, false}, Mode{"selective", true, true}}) {
        const auto fused = LossAndGrads(m, ids, labels, [&] {
          m.SetFusedProjections(true);
          m.SetGradientCheckpointing(mode.ckpt);
          m.SetSelectiveRecompute(mode.selective);
        });
        ExpectSameGrads(unfused, fused, 1e-5, what + " " + mode.name);
      }
      // The fused path really ran: the stacked LoRA B (block_diag) and the
      // split of q/k/v appear only there. (In the third set only gate/up
      // fuse, without LoRA: neither op; its gradients are checked above.)
      auto ops = [&](bool fused) {
        return OpsRun([&] {
          LossAndGrads(m, ids, labels, [&] {
            m.SetFusedProjections(fused);
            m.SetGradientCheckpointing(false);
          });
        });
      };
      const std::set<std::string> on = ops(true), off = ops(false);
      const bool qkv_lora = targets.size() != 3;
      EXPECT_EQ(on.count("aten::block_diag") == 1, qkv_lora) << what;
      EXPECT_EQ(on.count("aten::split_with_sizes") == 1, qkv_lora) << what;
      EXPECT_FALSE(off.count("aten::block_diag") || off.count("aten::split_with_sizes")) << what;
    }
  }
}

TEST(Llama, LongMicroBatchChunksTheMlpWithEqualGrads) {
  // 520 x 128 = 66,560 tokens: above kMlpChunkAbove, so with checkpointing
  // every MLP runs as a node over 16,384-token chunks plus a 1,024-token tail.
  static_assert(kMlpChunkAbove < 520 * 128 && (520 * 128) % kMlpChunkTokens != 0);
  LoadOptions o = Fp32Options("nf4");
  o.lora.targets = {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  const ThreeModes r = RunThreeModes(o, 24, 520, 128);
  // Sums over 66k tokens in a different order: fp32 rounding, not math.
  ExpectSameGrads(r.plain, r.full, 1e-4, "checkpointing, chunked MLP");
  ExpectSameGrads(r.plain, r.selective, 1e-4, "selective, chunked MLP");
}

TEST(Llama, LoraTrainingReducesLoss) {
  LlamaConfig c = SmallConfig();
  auto m = BuildModel(c, RandomWeights(c, 12), Fp32Options("nf4"));
  std::vector<torch::Tensor> params;
  for (auto& [n, p] : m->LoraParameters()) params.push_back(p);
  torch::optim::Adam opt(params, torch::optim::AdamOptions(1e-2));
  torch::Tensor ids = torch::randint(0, c.vocab_size, {1, 8}, torch::kInt64);
  torch::Tensor pos = torch::arange(8, torch::kInt64).view({1, 8});
  torch::Tensor labels = torch::roll(ids, -1, 1);
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    opt.zero_grad();
    torch::Tensor loss = m->LossSum(m->ForwardHidden(ids, pos), labels, 4) / 8;
    loss.backward();
    opt.step();
    if (step == 0) first = loss.item<double>();
    last = loss.item<double>();
  }
  EXPECT_LT(last, 0.5 * first);
}

TEST(Llama, LoadErrorsNameTheTensor) {
  TempDir dir;
  LlamaConfig c = SmallConfig();
  auto w = RandomWeights(c, 13);
  std::ofstream(dir / "config.json") << c.ToJson().dump();
  auto save = [&](const std::map<std::string, torch::Tensor>& ws) {
    std::vector<std::pair<std::string, torch::Tensor>> v(ws.begin(), ws.end());
    safetensors::SaveFile(dir / "model.safetensors", v);
  };
  auto missing = w;
  missing.erase("model.layers.1.mlp.up_proj.weight");
  save(missing);
  EXPECT_NE(ErrorOf([&] { LlamaForCausalLM::Load(dir.path(), Fp32Options()); })
                .find("\"model.layers.1.mlp.up_proj.weight\""),
            std::string::npos);
  auto bad = w;
  bad["model.layers.0.self_attn.k_proj.weight"] = torch::zeros({3, 32});
  save(bad);
  const std::string err = ErrorOf([&] { LlamaForCausalLM::Load(dir.path(), Fp32Options()); });
  EXPECT_NE(err.find("model.layers.0.self_attn.k_proj.weight"), std::string::npos) << err;
  EXPECT_NE(err.find("[16,32]"), std::string::npos) << err;
  save(w);
  auto m = LlamaForCausalLM::Load(dir.path(), Fp32Options("nf4"));
  EXPECT_EQ(m->config().num_hidden_layers, 2);
  LoadOptions o = Fp32Options();
  o.base = "int3";
  EXPECT_NE(ErrorOf([&] { LlamaForCausalLM::Load(dir.path(), o); }).find("nf4 or bf16"), std::string::npos);
}

TEST(InitModel, TinyWritesALoadableDeterministicDirectory) {
  TempDir a, b, d;
  const std::string tok = std::string(TUNE_ASSETS_DIR) + "/llama3";
  if (!std::filesystem::exists(tok + "/tokenizer.json")) GTEST_SKIP() << "run scripts/fetch-assets.sh first";
  InitModel("tiny", tok, a.path(), 42);
  InitModel("tiny", tok, b.path(), 42);
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                        "generation_config.json"}) {
    EXPECT_TRUE(std::filesystem::exists(a / f)) << f;
  }
  EXPECT_FALSE(std::filesystem::exists(a / "model.safetensors.index.json"));
  LlamaConfig c = LlamaConfig::FromJsonFile(a / "config.json");
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  nlohmann::json raw;
  std::ifstream(a / "config.json") >> raw;
  EXPECT_EQ(raw["architectures"][0], "LlamaForCausalLM");
  EXPECT_EQ(raw["model_type"], "llama");
  // Deterministic in the seed.
  auto fa = safetensors::File::Open(a / "model.safetensors");
  auto fb = safetensors::File::Open(b / "model.safetensors");
  for (const auto& t : fa->tensors()) {
    EXPECT_EQ(t.dtype, "BF16");
    EXPECT_TRUE(torch::equal(fa->View(t.name), fb->View(t.name))) << t.name;
  }
  EXPECT_FALSE(fa->Has("lm_head.weight"));
  torch::Tensor emb = fa->Get("model.embed_tokens.weight").to(torch::kFloat32);
  EXPECT_NEAR(emb.std().item<double>(), 0.02, 0.001);
  // The tiny preset's final norm is 16 (see init_model.cc), the layers' norms 1.
  EXPECT_TRUE(torch::equal(fa->Get("model.norm.weight").to(torch::kFloat32), torch::full({64}, 16.0f)));
  EXPECT_TRUE(torch::equal(fa->Get("model.layers.0.input_layernorm.weight").to(torch::kFloat32), torch::ones({64})));
  InitModel("tiny", tok, d.path(), 43);
  auto fd = safetensors::File::Open(d / "model.safetensors");
  EXPECT_FALSE(torch::equal(fa->View("model.embed_tokens.weight"), fd->View("model.embed_tokens.weight")));

  // Loads (NF4, bf16 compute) and runs.
  LoadOptions o;
  o.lora.targets = {"q_proj", "v_proj"};
  auto m = LlamaForCausalLM::Load(a.path(), o);
  torch::Tensor ids = torch::tensor({{128000, 9906, 1917}}, torch::kInt64);
  torch::Tensor pos = torch::arange(3, torch::kInt64).view({1, 3});
  torch::Tensor h = m->ForwardHidden(ids, pos);
  EXPECT_EQ(h.scalar_type(), torch::kBFloat16);
  torch::Tensor loss = m->LossSum(h, torch::tensor({{9906, 1917, 0}}, torch::kInt64), 2);
  EXPECT_TRUE(std::isfinite(loss.item<double>()));
  // Random init: logits are about normal with std sigma = 16 (final norm) x
  // 0.02 (embedding std) x sqrt(64) (hidden) = 2.56, so the expected loss per
  // token is about ln(vocab) + sigma^2 / 2 = 11.76 + 3.28.
  const double sigma = 16.0 * 0.02 * std::sqrt(64.0);
  EXPECT_NEAR(loss.item<double>() / 3, std::log(128256.0) + sigma * sigma / 2, 1.0);
}

TEST(InitModel, CustomConfigAndErrors) {
  TempDir dir, out;
  const std::string tok = std::string(TUNE_ASSETS_DIR) + "/llama3";
  if (!std::filesystem::exists(tok + "/tokenizer.json")) GTEST_SKIP() << "run scripts/fetch-assets.sh first";
  LlamaConfig c = SmallConfig(/*tied=*/false);
  std::ofstream(dir / "my_config.json") << c.ToJson().dump();
  InitModel(dir / "my_config.json", tok, out.path(), 1, "fp32");
  auto f = safetensors::File::Open(out / "model.safetensors");
  EXPECT_TRUE(f->Has("lm_head.weight"));
  EXPECT_EQ(f->Info("lm_head.weight").dtype, "F32");
  auto m = LlamaForCausalLM::Load(out.path(), Fp32Options());
  EXPECT_EQ(m->config().vocab_size, 37);
  EXPECT_NE(ErrorOf([&] { InitModel("llama9", tok, out.path(), 1); }).find("neither tiny, llama3-8b"),
            std::string::npos);
  EXPECT_NE(ErrorOf([&] { InitModel("tiny", dir.path(), out.path(), 1); }).find("lacks tokenizer.json"),
            std::string::npos);
  EXPECT_NE(ErrorOf([&] { InitModel("tiny", tok, out.path(), 1, "int8"); }).find("bf16 or fp32"), std::string::npos);
  // The 8B preset describes Llama 3.1 8B.
  LlamaConfig big = PresetConfig("llama3-8b");
  EXPECT_EQ(big.NumParameters(), 8030261248);
  EXPECT_FALSE(big.tie_word_embeddings);
}

}  // namespace
}  // namespace tune::model
