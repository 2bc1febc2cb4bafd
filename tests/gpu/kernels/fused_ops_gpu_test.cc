// The trainer's fused CUDA path (model/cuda_ops, kernels/) against its torch
// path on the same CUDA bf16 inputs: op by op, then the tiny model's forward
// and backward (loss and LoRA gradients) with TUNE_DISABLE_FUSED_KERNELS
// toggled in-process. Exits 77 without a CUDA device; skips when this
// tune-train was built without the kernels.
#include <torch/cuda.h>
#include <torch/torch.h>

#include <gtest/gtest.h>

#include "tests/gpu/gpu_test_util.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "worker/trainer/model/cuda_ops.h"
#include "worker/trainer/model/llama.h"
#include "worker/trainer/model/llama_ops.h"
#include "worker/trainer/model/nf4.h"

namespace tune::model {
namespace {

const torch::TensorOptions kBf16 = torch::dtype(torch::kBFloat16).device(torch::kCUDA);

// Sets TUNE_DISABLE_FUSED_KERNELS for a scope.
class TorchPathScope {
 public:
  TorchPathScope() { setenv("TUNE_DISABLE_FUSED_KERNELS", "1", 1); }
  ~TorchPathScope() { unsetenv("TUNE_DISABLE_FUSED_KERNELS"); }
};

class FusedOpsGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_ops::Compiled()) GTEST_SKIP() << "built without the CUDA kernels (TUNE_WITH_CUDA / CUDA libtorch)";
    unsetenv("TUNE_DISABLE_FUSED_KERNELS");
  }
};

// Max |a - b| relative to max |b|.
double RelErr(const torch::Tensor& a, const torch::Tensor& b) {
  const double scale = b.abs().max().item<double>();
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>() / std::max(scale, 1e-30);
}

TEST_F(FusedOpsGpuTest, Nf4DequantizeIntoIsBitIdentical) {
  torch::manual_seed(1);
  for (bool dq : {true, false}) {
    auto q = nf4::Quantize(torch::randn({333, 129}, kBf16), 64, dq);  // numel not a multiple of 64
    torch::Tensor scratch = torch::empty({333 * 129 + 100}, kBf16);
    torch::Tensor got = cuda_ops::Nf4DequantizeInto(q, scratch);
    torch::Tensor want = nf4::Dequantize(q, torch::kBFloat16);
    EXPECT_TRUE(torch::equal(got, want)) << "double quant " << dq;
  }
}

TEST_F(FusedOpsGpuTest, AddMmMatchesTorchAddmm) {
  torch::manual_seed(3);
  // K with LoRA columns appended (4096 + 32, as a folding projection's
  // input), odd sizes, and an x whose rows are spaced wider (a column view).
  for (const auto& [n, m, k, pad] : std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
           {300, 4096, 4128, 0}, {37, 61, 83, 0}, {64, 128, 256, 16}}) {
    SCOPED_TRACE(std::to_string(n) + "x" + std::to_string(m) + "x" + std::to_string(k));
    torch::Tensor x = torch::randn({n, k + pad}, kBf16).narrow(1, 0, k);
    torch::Tensor w = torch::randn({m, k}, kBf16) / std::sqrt(static_cast<double>(k));
    torch::Tensor r = torch::randn({n, m}, kBf16);
    const torch::Tensor r_before = r.clone();
    ASSERT_TRUE(cuda_ops::AddMmApplies(r, x, w));
    torch::Tensor got = cuda_ops::AddMm(r, x, w);
    torch::Tensor want = torch::addmm(r, x, w.t());
    // Against the fp32 product: one bf16 rounding of an fp32 sum, so within
    // an ulp of the exact value (1/128 relative) plus the fp32 sums' own
    // error. torch's bf16 addmm may reduce in lower precision (cuBLAS
    // split-K), so it is held to the looser bound only.
    const torch::Tensor exact = torch::addmm(r.to(torch::kFloat32), x.to(torch::kFloat32), w.to(torch::kFloat32).t());
    const torch::Tensor bound = exact.abs() * (1.0 / 128) + 1e-4;
    EXPECT_TRUE(((got.to(torch::kFloat32) - exact).abs() <= bound).all().item<bool>())
        << "max excess " << ((got.to(torch::kFloat32) - exact).abs() - bound).max().item<double>();
    EXPECT_LE(RelErr(want, exact), 1e-2);
    EXPECT_TRUE(torch::equal(r, r_before));
    EXPECT_FALSE(got.is_alias_of(r));
    TorchPathScope torch_path;
    EXPECT_FALSE(cuda_ops::AddMmApplies(r, x, w));
    EXPECT_TRUE(torch::equal(cuda_ops::AddMm(r, x, w), want));
  }
  // Layouts it declines (torch::addmm runs): a transposed x, a residual with
  // rows spaced wider, fp32.
  torch::Tensor x = torch::randn({40, 32}, kBf16), w = torch::randn({24, 32}, kBf16);
  torch::Tensor r = torch::randn({40, 24}, kBf16);
  EXPECT_FALSE(cuda_ops::AddMmApplies(r, torch::randn({32, 40}, kBf16).t(), w));
  EXPECT_FALSE(cuda_ops::AddMmApplies(torch::randn({40, 30}, kBf16).narrow(1, 0, 24), x, w));
  EXPECT_FALSE(cuda_ops::AddMmApplies(r.to(torch::kFloat32), x.to(torch::kFloat32), w.to(torch::kFloat32)));
}

TEST_F(FusedOpsGpuTest, OpsMatchTorchPath) {
  torch::manual_seed(2);
  // RMSNorm forward/backward.
  torch::Tensor x = torch::randn({3, 7, 4097}, kBf16).requires_grad_(true);
  torch::Tensor w = (torch::rand({4097}, kBf16) + 0.5);
  torch::Tensor dy = torch::randn({3, 7, 4097}, kBf16);
  auto run_norm = [&](bool fused) {
    std::unique_ptr<TorchPathScope> scope = fused ? nullptr : std::make_unique<TorchPathScope>();
    x.mutable_grad().reset();
    torch::Tensor y = ops::RmsNorm(x, w, 1e-5);
    y.backward(dy);
    return std::make_pair(y.detach(), x.grad().clone());
  };
  auto [y_f, dx_f] = run_norm(true);
  auto [y_t, dx_t] = run_norm(false);
  EXPECT_LT(RelErr(y_f, y_t), 1.6e-2);
  EXPECT_LT(RelErr(dx_f, dx_t), 1.6e-2);
  // An output gradient whose rows are spaced wider than the hidden size (the
  // folded gate/up's dx is a column view of [dx | g B]) is read in place.
  torch::Tensor wide_dy = torch::randn({21, 4097 + 31}, kBf16);
  dy = wide_dy.narrow(1, 0, 4097).view({3, 7, 4097});
  ASSERT_FALSE(dy.is_contiguous());
  auto [ys_f, dxs_f] = run_norm(true);
  auto [ys_t, dxs_t] = run_norm(false);
  EXPECT_LT(RelErr(dxs_f, dxs_t), 1.6e-2);
  EXPECT_TRUE(torch::equal(dxs_f, (run_norm(true).second)));  // deterministic

  // RoPE on a transposed projection view, forward bit-identical, backward too.
  torch::Tensor proj = torch::randn({2, 9, 4, 64}, kBf16);
  torch::Tensor q = proj.transpose(1, 2).requires_grad_(true);
  auto pos = torch::arange(9, torch::kInt64).repeat({2, 1}).to(torch::kCUDA);
  LlamaConfig cfg = PresetConfig("tiny");
  cfg.head_dim = 64;
  auto [cos, sin] = ops::RopeCosSin(ops::RopeInvFreq(cfg).to(torch::kCUDA), pos, torch::kBFloat16);
  torch::Tensor g = torch::randn({2, 4, 9, 64}, kBf16);
  auto run_rope = [&](bool fused) {
    std::unique_ptr<TorchPathScope> scope = fused ? nullptr : std::make_unique<TorchPathScope>();
    q.mutable_grad().reset();
    torch::Tensor out = ops::ApplyRope(q, cos, sin);
    out.backward(g);
    return std::make_pair(out.detach(), q.grad().clone());
  };
  auto [r_f, dr_f] = run_rope(true);
  auto [r_t, dr_t] = run_rope(false);
  EXPECT_TRUE(torch::equal(r_f, r_t));
  EXPECT_TRUE(torch::equal(dr_f, dr_t));

  // SwiGLU on halves of a fused gate/up output.
  torch::Tensor fused_gu = torch::randn({5, 2 * 1000}, kBf16).requires_grad_(true);
  torch::Tensor dh = torch::randn({5, 1000}, kBf16);
  auto run_swiglu = [&](bool fused) {
    std::unique_ptr<TorchPathScope> scope = fused ? nullptr : std::make_unique<TorchPathScope>();
    fused_gu.mutable_grad().reset();
    torch::Tensor h = cuda_ops::SwiGlu(fused_gu.slice(1, 0, 1000), fused_gu.slice(1, 1000));
    h.backward(dh);
    return std::make_pair(h.detach(), fused_gu.grad().clone());
  };
  auto [h_f, dg_f] = run_swiglu(true);
  auto [h_t, dg_t] = run_swiglu(false);
  EXPECT_LT(RelErr(h_f, h_t), 1.6e-2);
  EXPECT_LT(RelErr(dg_f, dg_t), 1.6e-2);

  // Chunked linear + cross-entropy with ignored labels, odd vocab and chunk.
  torch::Tensor hid = torch::randn({4, 33, 256}, kBf16).requires_grad_(true);
  torch::Tensor head = torch::randn({1003, 256}, kBf16) * 0.06;
  torch::Tensor labels = torch::randint(0, 1003, {4, 33}, torch::kInt64);
  labels.index_put_({torch::indexing::Slice(), torch::indexing::Slice(0, 5)}, -100);
  auto run_ce = [&](bool fused) {
    std::unique_ptr<TorchPathScope> scope = fused ? nullptr : std::make_unique<TorchPathScope>();
    hid.mutable_grad().reset();
    torch::Tensor loss = ops::ChunkedCrossEntropySum(hid, head, labels, 37);
    (loss * 0.5).backward();
    return std::make_pair(loss.item<double>(), hid.grad().clone());
  };
  auto [l_f, dh_f] = run_ce(true);
  auto [l_t, dh_t] = run_ce(false);
  EXPECT_NEAR(l_f, l_t, 1e-3 * std::abs(l_t));
  EXPECT_LT(RelErr(dh_f, dh_t), 2e-2);
}

// The tiny preset (or `c`) with random bf16 weights, NF4 base and LoRA (r 8)
// on every linear with nonzero B, on the GPU.
std::shared_ptr<LlamaForCausalLM> TinyNf4Model(const LlamaConfig& c = PresetConfig("tiny")) {
  torch::manual_seed(3);
  auto get = [&](const std::string& name) -> torch::Tensor {
    const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
    const int64_t Q = c.num_attention_heads * c.head_dim, KV = c.num_key_value_heads * c.head_dim;
    auto ends = [&](const char* s) {
      return name.size() >= strlen(s) && name.compare(name.size() - strlen(s), strlen(s), s) == 0;
    };
    if (ends("norm.weight")) return torch::rand({H}, kBf16) + 0.5;
    if (ends("embed_tokens.weight") || ends("lm_head.weight")) return torch::randn({V, H}, kBf16) * 0.02;
    if (ends("k_proj.weight") || ends("v_proj.weight")) return torch::randn({KV, H}, kBf16) * 0.02;
    if (ends("q_proj.weight")) return torch::randn({Q, H}, kBf16) * 0.02;
    if (ends("o_proj.weight")) return torch::randn({H, Q}, kBf16) * 0.02;
    if (ends("down_proj.weight")) return torch::randn({H, I}, kBf16) * 0.02;
    return torch::randn({I, H}, kBf16) * 0.02;
  };
  LoadOptions o;
  o.device = torch::kCUDA;
  o.lora.r = 8;
  o.lora.targets = LinearModuleNames();
  auto m = LlamaForCausalLM::FromTensors(c, get, o);
  torch::NoGradGuard no_grad;
  for (auto& [n, p] : m->LoraParameters()) {
    if (n.find("lora_B") != std::string::npos) p.normal_(0, 0.05);  // B = 0 would zero A's grads
  }
  return m;
}

// Names of the ops (aten) and CUDA kernels `fn` ran, with their counts.
std::map<std::string, int> EventsRun(const std::function<void()>& fn) {
  namespace kp = torch::autograd::profiler;
  namespace pi = torch::profiler::impl;
  const pi::ProfilerConfig config(pi::ProfilerState::KINETO, false, false);
  const std::set<pi::ActivityType> both{pi::ActivityType::CPU, pi::ActivityType::CUDA};
  kp::prepareProfiler(config, both);
  kp::enableProfiler(config, both);
  fn();
  torch::cuda::synchronize();
  const std::unique_ptr<kp::ProfilerResult> result = kp::disableProfiler();
  std::map<std::string, int> names;
  for (const auto& e : result->events()) ++names[e.name()];
  return names;
}

// A batch of two rows of T random tokens: ids, positions, next-token labels.
struct TinyBatch {
  torch::Tensor ids, pos, labels;
  TinyBatch(const LlamaConfig& c, int64_t T)
      : ids(torch::randint(0, c.vocab_size, {2, T}, torch::kInt64)),
        pos(torch::arange(T, torch::kInt64).repeat({2, 1})),
        labels(torch::roll(ids, -1, 1)) {}
};

int CountContaining(const std::map<std::string, int>& names, const std::string& part) {
  int n = 0;
  for (const auto& [name, count] : names) {
    if (name.find(part) != std::string::npos) n += count;
  }
  return n;
}

TEST_F(FusedOpsGpuTest, TinyModelLossAndLoraGradsMatchTorchPath) {
  LlamaConfig c = PresetConfig("tiny");
  auto m = TinyNf4Model();
  TinyBatch b(c, 48);
  torch::Tensor &ids = b.ids, &pos = b.pos, &labels = b.labels;
  labels.index_put_({torch::indexing::Slice(), torch::indexing::Slice(0, 6)}, -100);
  auto run = [&](bool fused) {
    std::unique_ptr<TorchPathScope> scope = fused ? nullptr : std::make_unique<TorchPathScope>();
    for (auto& [n, p] : m->LoraParameters()) p.mutable_grad().reset();
    torch::Tensor loss = m->LossSum(m->ForwardHidden(ids, pos), labels, 29);
    loss.backward();
    std::vector<torch::Tensor> grads;
    for (auto& [n, p] : m->LoraParameters()) grads.push_back(p.grad().clone());
    return std::make_pair(loss.item<double>(), grads);
  };
  // NF4 base: the fused path folds gate/up's LoRA B into the dequantised
  // weight; with checkpointing the recompute keeps that wide weight for its
  // backward. Each mode against the torch path.
  for (const char* mode : {"off", "on", "selective"}) {
    SCOPED_TRACE(std::string("checkpointing ") + mode);
    m->SetGradientCheckpointing(std::string(mode) != "off");
    m->SetSelectiveRecompute(std::string(mode) == "selective");
    auto [loss_f, g_f] = run(true);
    auto [loss_t, g_t] = run(false);
    std::printf("tiny model loss (checkpointing %s): fused %.6f, torch %.6f\n", mode, loss_f, loss_t);
    EXPECT_NEAR(loss_f, loss_t, 2e-3 * std::abs(loss_t));
    auto names = m->LoraParameters();
    for (size_t i = 0; i < g_f.size(); ++i) {
      // bf16 activations: per-op differences of an ulp compound through two
      // layers; 5% of each gradient's scale still catches any wrong formula.
      EXPECT_LT(RelErr(g_f[i], g_t[i]), 5e-2) << names[i].first;
    }
  }
}

// The kernel path really folds LoRA into the NF4 weights (gate/up's B beside
// W in forward, down's A below W in backward: one GEMM each instead of a base
// GEMM plus a LoRA addmm_), and the MLP node's backward writes the SwiGLU
// activation from its backward kernel instead of recomputing it.
TEST_F(FusedOpsGpuTest, FoldedLoraAndSwiGluBackwardWithForwardRun) {
  LlamaConfig c = PresetConfig("tiny");
  auto m = TinyNf4Model();
  TinyBatch b(c, 40);
  auto step = [&] { m->LossSum(m->ForwardHidden(b.ids, b.pos), b.labels, 29).backward(); };
  m->SetGradientCheckpointing(false);
  const auto fused = EventsRun(step);
  std::map<std::string, int> torch_path;
  {
    TorchPathScope scope;
    torch_path = EventsRun(step);
  }
  const int layers = c.num_hidden_layers;
  std::printf("aten::addmm_ calls: kernel path %d, torch path %d\n", CountContaining(fused, "aten::addmm_"),
              CountContaining(torch_path, "aten::addmm_"));
  // Per layer, in the tiny shapes: the LoRA adds of q/k/v (128 rows > 64
  // inputs) and gate/up (384 > 64) in forward and down's dx add (192 inputs >
  // 64 rows) in backward.
  EXPECT_EQ(CountContaining(fused, "aten::addmm_"), CountContaining(torch_path, "aten::addmm_") - 3 * layers);
  m->SetGradientCheckpointing(true);
  const auto node = EventsRun(step);
  // The MLP node's backward: one SwiGLU backward kernel that also writes the
  // activation per layer, and the only SwiGLU forwards are the forward pass's.
  EXPECT_EQ(CountContaining(node, "SwiGluBwdKernel<8, true"), layers);
  EXPECT_EQ(CountContaining(node, "SwiGluBwdKernel<8, false"), 0);
  EXPECT_EQ(CountContaining(node, "SwiGluFwdKernel"), layers);
  m->SetGradientCheckpointing(false);
}

// Selective recompute on a sequence longer than kKeepAttentionOutputAbove:
// each layer keeps cuDNN's attention output from its first pass, so the
// recompute runs no attention forward (one per layer in the step instead of
// two), its input and its fused q/k/v output go to pinned host memory and back
// (two copies each way per layer but the last; the recompute takes q/k/v's
// output back instead of running the GEMM), and loss and LoRA gradients match
// whole-layer checkpointing, which runs the same cuDNN kernels. At the
// threshold selective keeps the residual after attention and the input on the
// device, as before.
TEST_F(FusedOpsGpuTest, SelectiveKeepsAttentionOutputOnLongSequences) {
  if (!ops::PreferCudnnAttention()) GTEST_SKIP() << "torch < 2.6: no cuDNN attention";
  LlamaConfig c = PresetConfig("tiny");
  c.hidden_size = 256;  // head size 64, as cuDNN attention and Llama use
  c.head_dim = 64;
  c.intermediate_size = 512;
  auto m = TinyNf4Model(c);
  const int layers = c.num_hidden_layers;
  const std::string fwd = "aten::_scaled_dot_product_cudnn_attention", bwd = fwd + "_backward";
  auto count = [](const std::map<std::string, int>& events, const std::string& name) {
    auto it = events.find(name);
    return it == events.end() ? 0 : it->second;
  };
  for (const int64_t T : {kKeepAttentionOutputAbove + 40, kKeepAttentionOutputAbove}) {
    SCOPED_TRACE("T " + std::to_string(T));
    TinyBatch b(c, T);
    struct Result {
      double loss = 0;
      std::vector<torch::Tensor> grads;
      std::map<std::string, int> events;
    };
    auto run = [&](bool selective) {
      m->SetGradientCheckpointing(true);
      m->SetSelectiveRecompute(selective);
      for (auto& [n, p] : m->LoraParameters()) p.mutable_grad().reset();
      Result r;
      r.events = EventsRun([&] {
        torch::Tensor loss = m->LossSum(m->ForwardHidden(b.ids, b.pos), b.labels, 1024);
        loss.backward();
        r.loss = loss.item<double>();
      });
      for (auto& [n, p] : m->LoraParameters()) r.grads.push_back(p.grad().clone());
      return r;
    };
    const Result on = run(false), sel = run(true);
    const bool keeps = T > kKeepAttentionOutputAbove;
    std::printf("T %ld: cuDNN attention forwards %d (on) / %d (selective), backwards %d / %d; loss %.6f / %.6f\n",
                static_cast<long>(T), count(on.events, fwd), count(sel.events, fwd), count(on.events, bwd),
                count(sel.events, bwd), on.loss, sel.loss);
    EXPECT_EQ(count(on.events, fwd), 2 * layers);
    EXPECT_EQ(count(sel.events, fwd), keeps ? layers : 2 * layers);
    EXPECT_EQ(count(on.events, bwd), layers);
    EXPECT_EQ(count(sel.events, bwd), layers);
    // Differences against "on": torch itself copies small results to pinned
    // memory too (nonzero's count, .item()), the same in both runs.
    const std::string to_host = "Device -> Pinned", to_device = "Pinned -> Device";
    std::printf("T %ld: copies to pinned host memory %d (on) / %d (selective), back %d / %d\n",
                static_cast<long>(T), CountContaining(on.events, to_host), CountContaining(sel.events, to_host),
                CountContaining(on.events, to_device), CountContaining(sel.events, to_device));
    // Per layer but the last (whose stay on the device): its input and its
    // fused q/k/v projection's output.
    const int copies = keeps ? 2 * (layers - 1) : 0;
    EXPECT_EQ(CountContaining(sel.events, to_host) - CountContaining(on.events, to_host), copies);
    EXPECT_EQ(CountContaining(sel.events, to_device) - CountContaining(on.events, to_device), copies);
    EXPECT_NEAR(sel.loss, on.loss, 1e-5 * std::abs(on.loss));
    auto names = m->LoraParameters();
    for (size_t i = 0; i < on.grads.size(); ++i) EXPECT_LT(RelErr(sel.grads[i], on.grads[i]), 2e-2) << names[i].first;
  }
  m->SetSelectiveRecompute(false);
  m->SetGradientCheckpointing(false);
}

}  // namespace
}  // namespace tune::model

int main(int argc, char** argv) { return tune::gpu_test::RunGpuTests(argc, argv); }
