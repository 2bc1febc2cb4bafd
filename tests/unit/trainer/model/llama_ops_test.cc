// Llama building blocks against hand-computed / naive references: llama3 RoPE
// frequencies, RMSNorm, RoPE rotation, GQA attention with packing, chunked
// cross-entropy (value and grads), gradient checkpointing.
#include "worker/trainer/model/llama_ops.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "tests/unit/trainer/model/test_util.h"
#include "worker/trainer/model/offload.h"

namespace tune::model::ops {
namespace {

TEST(Rope, Llama3InvFreqMatchesHandComputation) {
  // Llama 3.1 8B: head_dim 128, theta 500000, factor 8, low 1, high 4, original 8192.
  LlamaConfig c;
  c.head_dim = 128;
  c.rope_theta = 500000;
  c.rope_scaling = RopeScaling{"llama3", 8.0, 1.0, 4.0, 8192};
  torch::Tensor got = RopeInvFreq(c);
  ASSERT_EQ(got.numel(), 64);
  ASSERT_EQ(got.scalar_type(), torch::kFloat32);
  int low = 0, high = 0, medium = 0;
  for (int i = 0; i < 64; ++i) {
    const double base = 1.0 / std::pow(500000.0, (2.0 * i) / 128.0);
    const double wavelen = 2 * M_PI / base;
    double want;
    if (wavelen < 8192.0 / 4) {  // high frequency: unchanged
      want = base;
      ++high;
    } else if (wavelen > 8192.0 / 1) {  // low frequency: divided by factor
      want = base / 8;
      ++low;
    } else {  // interpolated
      const double smooth = (8192.0 / wavelen - 1) / (4 - 1);
      want = (1 - smooth) * base / 8 + smooth * base;
      ++medium;
    }
    EXPECT_NEAR(got[i].item<double>(), want, want * 2e-6) << "i=" << i;
  }
  // All three regimes are exercised.
  EXPECT_GT(low, 0);
  EXPECT_GT(high, 0);
  EXPECT_GT(medium, 0);
  EXPECT_FLOAT_EQ(got[0].item<float>(), 1.0f);
}

TEST(Rope, NoScalingIsPlainTheta) {
  LlamaConfig c;
  c.head_dim = 8;
  c.rope_theta = 10000;
  torch::Tensor got = RopeInvFreq(c);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(got[i].item<double>(), std::pow(10000.0, -2.0 * i / 8), 1e-7);
}

TEST(Rope, RotationPairsFirstAndSecondHalves) {
  // HF rotate_half convention: dimension j pairs with j + d/2.
  torch::Tensor inv = torch::tensor({0.5f, 0.25f});
  torch::Tensor pos = torch::tensor({{3}}, torch::kInt64);
  auto [cos, sin] = RopeCosSin(inv, pos, torch::kFloat32);
  torch::Tensor x = torch::tensor({1.0f, 2.0f, 3.0f, 4.0f}).view({1, 1, 1, 4});
  torch::Tensor y = ApplyRope(x, cos, sin).view({4});
  for (int j = 0; j < 2; ++j) {
    const double th = 3 * (j == 0 ? 0.5 : 0.25);
    const double a = x.view({4})[j].item<double>(), b = x.view({4})[j + 2].item<double>();
    EXPECT_NEAR(y[j].item<double>(), a * std::cos(th) - b * std::sin(th), 1e-6);
    EXPECT_NEAR(y[j + 2].item<double>(), b * std::cos(th) + a * std::sin(th), 1e-6);
  }
}

TEST(RmsNorm, MatchesDefinition) {
  torch::manual_seed(0);
  torch::Tensor x = torch::randn({3, 5});
  torch::Tensor w = torch::randn({5});
  torch::Tensor y = RmsNorm(x, w, 1e-5);
  torch::Tensor want = x / torch::sqrt(x.pow(2).mean(-1, true) + 1e-5) * w;
  EXPECT_TRUE(torch::allclose(y, want, 1e-5, 1e-6));
  // bf16 input: normalised in fp32, result in bf16.
  torch::Tensor yb = RmsNorm(x.to(torch::kBFloat16), w.to(torch::kBFloat16), 1e-5);
  EXPECT_EQ(yb.scalar_type(), torch::kBFloat16);
}

// Naive attention in fp64 with explicit loops.
torch::Tensor NaiveAttention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& seg) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), d = q.size(3), Hkv = k.size(1);
  const int64_t g = Hq / Hkv;
  auto qd = q.to(torch::kFloat64), kd = k.to(torch::kFloat64), vd = v.to(torch::kFloat64);
  torch::Tensor out = torch::zeros({B, Hq, T, d}, torch::kFloat64);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t kh = h / g;
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> s;
        std::vector<int64_t> idx;
        for (int64_t u = 0; u <= t; ++u) {
          if (seg.defined() && seg[b][u].item<int64_t>() != seg[b][t].item<int64_t>()) continue;
          s.push_back((qd[b][h][t] * kd[b][kh][u]).sum().item<double>() / std::sqrt(static_cast<double>(d)));
          idx.push_back(u);
        }
        double mx = *std::max_element(s.begin(), s.end()), z = 0;
        for (double& e : s) z += (e = std::exp(e - mx));
        for (size_t i = 0; i < s.size(); ++i) out[b][h][t] += vd[b][kh][idx[i]] * (s[i] / z);
      }
    }
  }
  return out;
}

TEST(Attention, MatchesNaiveOnOddSizesWithGqaAndPacking) {
  torch::manual_seed(3);
  const int64_t B = 2, T = 7, d = 5;
  torch::Tensor seg = torch::tensor({{0, 0, 0, 1, 1, 2, 2}, {5, 5, 5, 5, 5, 5, 9}}, torch::kInt64);
  for (int64_t hkv : {1, 3, 6}) {
    const int64_t hq = 6;
    torch::Tensor q = torch::randn({B, hq, T, d}), k = torch::randn({B, hkv, T, d}), v = torch::randn({B, hkv, T, d});
    for (bool force_math : {true, false}) {
      torch::Tensor got = Attention(q, k, v, {}, force_math);
      EXPECT_TRUE(torch::allclose(got.to(torch::kFloat64), NaiveAttention(q, k, v, {}), 1e-5, 1e-5))
          << "causal hkv=" << hkv << " math=" << force_math;
      torch::Tensor got_seg = Attention(q, k, v, seg, force_math);
      EXPECT_TRUE(torch::allclose(got_seg.to(torch::kFloat64), NaiveAttention(q, k, v, seg), 1e-5, 1e-5))
          << "packed hkv=" << hkv << " math=" << force_math;
    }
  }
}

// Off the cuDNN path (CPU, fp32) nothing is kept: AttentionKeepingOutput is
// Attention() in both passes of a checkpoint, with gradients, and `kept`
// stays empty.
TEST(Attention, KeepingOutputOffCudnnIsPlainAttention) {
  torch::manual_seed(4);
  const int64_t B = 2, hq = 4, hkv = 2, T = 9, d = 8;
  torch::Tensor q = torch::randn({B, hq, T, d}).requires_grad_(true);
  torch::Tensor k = torch::randn({B, hkv, T, d}).requires_grad_(true);
  torch::Tensor v = torch::randn({B, hkv, T, d}).requires_grad_(true);
  EXPECT_FALSE(CanKeepAttentionOutput(q, d));
  auto kept = c10::make_intrusive<KeptAttention>();
  {
    torch::NoGradGuard no_grad;  // a checkpoint's first pass
    EXPECT_TRUE(torch::equal(AttentionKeepingOutput(q, k, v, kept), Attention(q, k, v, {})));
  }
  EXPECT_FALSE(kept->out.defined());
  EXPECT_FALSE(kept->lse.defined());
  torch::Tensor g = torch::randn({B, hq, T, d});
  auto grads = torch::autograd::grad({AttentionKeepingOutput(q, k, v, kept)}, {q, k, v}, {g});
  auto want = torch::autograd::grad({Attention(q, k, v, {})}, {q, k, v}, {g});
  for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(torch::equal(grads[i], want[i])) << i;
}

TEST(Attention, SlabPlacesEachLayersTensorInItsSlot) {
  // Three layers' outputs in the layout cuDNN returns ([B, T, H, d] memory
  // viewed as [B, H, T, d]) share one block, each in its slot (starting on
  // a 128-element boundary), with its own sizes and strides and its values.
  const int64_t B = 2, H = 3, T = 5, d = 4, layers = 3, slot = 128;  // 120 elements, slots of 128
  KeptAttentionSlab slab(layers);
  std::vector<torch::Tensor> placed, want;
  for (int64_t i = 0; i < layers; ++i) {
    want.push_back(torch::randn({B, T, H, d}).transpose(1, 2));
    placed.push_back(slab.Place(want.back(), slab.out, i));
  }
  ASSERT_EQ(slab.out.numel(), layers * slot);
  for (int64_t i = 0; i < layers; ++i) {
    EXPECT_TRUE(torch::equal(placed[i], want[i])) << i;
    EXPECT_EQ(placed[i].strides(), want[i].strides()) << i;
    EXPECT_TRUE(placed[i].is_alias_of(slab.out)) << i;
    EXPECT_EQ(placed[i].storage_offset(), i * slot) << i;
  }
  // What cannot share the block is kept as it is: a view with gaps, another
  // size or dtype, a slot out of range.
  torch::Tensor gappy = torch::randn({B, H, T, 2 * d}).narrow(3, 0, d);
  EXPECT_TRUE(slab.Place(gappy, slab.out, 0).is_same(gappy));
  torch::Tensor other = torch::randn({B, H, T + 1, d});
  EXPECT_TRUE(slab.Place(other, slab.out, 1).is_same(other));
  torch::Tensor f64 = want[0].to(torch::kDouble);
  EXPECT_TRUE(slab.Place(f64, slab.out, 1).is_same(f64));
  EXPECT_TRUE(slab.Place(want[0], slab.out, layers).is_same(want[0]));
  EXPECT_TRUE(torch::equal(placed[1], want[1]));  // untouched by the refusals
}

TEST(Attention, MaskShape) {
  torch::Tensor seg = torch::tensor({{0, 0, 1}}, torch::kInt64);
  torch::Tensor m = CausalSegmentMask(seg, 3, torch::kCPU);
  ASSERT_EQ(m.sizes(), (std::vector<int64_t>{1, 1, 3, 3}));
  torch::Tensor want = torch::tensor({{1, 0, 0}, {1, 1, 0}, {0, 0, 1}}, torch::kBool);
  EXPECT_TRUE(torch::equal(m[0][0], want));
}

TEST(ChunkedCrossEntropy, EqualsFullCrossEntropyValueAndGrads) {
  torch::manual_seed(4);
  const int64_t V = 11, H = 5;
  torch::Tensor h0 = torch::randn({2, 7, H}, torch::kFloat64).to(torch::kFloat32);
  torch::Tensor w0 = torch::randn({V, H});
  torch::Tensor labels = torch::randint(0, V, {2, 7}, torch::kInt64);
  labels[0][0] = -100;
  labels[0][3] = -100;
  labels[1][6] = -100;
  for (int64_t chunk : {1, 3, 4, 100}) {
    torch::Tensor h = h0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true);
    torch::Tensor loss = ChunkedCrossEntropySum(h, w, labels, chunk);
    loss.backward();
    torch::Tensor h2 = h0.clone().requires_grad_(true), w2 = w0.clone().requires_grad_(true);
    torch::Tensor logits = h2.matmul(w2.t()).view({-1, V});
    torch::Tensor ref = torch::nn::functional::cross_entropy(
        logits, labels.view({-1}),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum).ignore_index(-100));
    ref.backward();
    EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-4) << chunk;
    EXPECT_TRUE(torch::allclose(h.grad(), h2.grad(), 1e-5, 1e-5)) << chunk;
    EXPECT_TRUE(torch::allclose(w.grad(), w2.grad(), 1e-5, 1e-5)) << chunk;
    // Masked positions get exactly zero gradient.
    EXPECT_EQ(h.grad()[0][3].abs().sum().item<float>(), 0.0f);
  }
}

TEST(ChunkedCrossEntropy, AllMaskedIsZeroAndFrozenWeightGetsNoGrad) {
  torch::Tensor h = torch::randn({1, 3, 4}).requires_grad_(true);
  torch::Tensor w = torch::randn({6, 4});
  torch::Tensor loss = ChunkedCrossEntropySum(h, w, torch::full({1, 3}, -100, torch::kInt64), 2);
  EXPECT_EQ(loss.item<float>(), 0.0f);
  loss.backward();
  EXPECT_EQ(h.grad().abs().sum().item<float>(), 0.0f);
  EXPECT_THROW(ChunkedCrossEntropySum(h, w, torch::full({1, 3}, 6, torch::kInt64), 2), std::invalid_argument);
}

TEST(Checkpoint, GradientsEqualDirectComputationIncludingDropout) {
  torch::manual_seed(5);
  torch::Tensor w1 = torch::randn({6, 4}).requires_grad_(true);
  torch::Tensor w2 = torch::randn({4, 6}).requires_grad_(true);
  torch::Tensor x0 = torch::randn({3, 4});
  auto fn = [&](const torch::Tensor& x) {
    return torch::linear(torch::dropout(torch::tanh(torch::linear(x, w1)), 0.5, true), w2);
  };
  // Direct.
  torch::manual_seed(42);
  torch::Tensor xa = x0.clone().requires_grad_(true);
  fn(xa).pow(2).sum().backward();
  torch::Tensor g1 = w1.grad().clone(), g2 = w2.grad().clone(), gx = xa.grad().clone();
  w1.mutable_grad().reset();
  w2.mutable_grad().reset();
  // Checkpointed: same seed before the forward; the backward replays the
  // dropout mask even though the RNG advanced in between.
  torch::manual_seed(42);
  torch::Tensor xb = x0.clone().requires_grad_(true);
  torch::Tensor y = Checkpoint(fn, xb, {w1, w2});
  torch::rand({100});  // disturb the global RNG before backward
  at::Generator gen = at::globalContext().defaultGenerator(torch::kCPU);
  const torch::Tensor rng_before = gen.get_state();
  y.pow(2).sum().backward();
  // Backward restored the caller's RNG stream.
  EXPECT_TRUE(torch::equal(gen.get_state(), rng_before));
  EXPECT_TRUE(torch::equal(w1.grad(), g1));
  EXPECT_TRUE(torch::equal(w2.grad(), g2));
  EXPECT_TRUE(torch::equal(xb.grad(), gx));
  torch::manual_seed(42);
  torch::Tensor yc = Checkpoint(fn, x0, {w1, w2});  // input without grad: params still get grads
  EXPECT_TRUE(yc.requires_grad());
}

// A stash holds the input instead of the autograd graph (activation
// offload); chained stashes are taken in reverse order with the previous one
// prefetched. Gradients match the plain checkpoint and the direct run.
class CountingStash : public ActivationStash {
 public:
  explicit CountingStash(std::shared_ptr<ActivationStash> inner) : inner_(std::move(inner)) {}
  void Put(const torch::Tensor& x) override {
    ++puts;
    inner_->Put(x);
  }
  torch::Tensor Take() override {
    ++takes;
    return inner_->Take();
  }
  int puts = 0, takes = 0;

 private:
  std::shared_ptr<ActivationStash> inner_;
};

TEST(Checkpoint, StashedInputsGiveTheSameGradients) {
  torch::manual_seed(6);
  torch::Tensor w1 = torch::randn({5, 5}).requires_grad_(true);
  torch::Tensor w2 = torch::randn({5, 5}).requires_grad_(true);
  torch::Tensor x0 = torch::randn({3, 5});
  auto f1 = [&](const torch::Tensor& x) { return torch::tanh(torch::linear(x, w1)) + x; };
  auto f2 = [&](const torch::Tensor& x) { return torch::sigmoid(torch::linear(x, w2)) * x; };
  auto grads = [&](int mode) {  // 0 direct, 1 checkpoint, 2 checkpoint + stash
    w1.mutable_grad().reset();
    w2.mutable_grad().reset();
    torch::Tensor x = x0.clone().requires_grad_(true);
    torch::Tensor y;
    if (mode == 0) {
      y = f2(f1(x));
    } else if (mode == 1) {
      y = Checkpoint(f2, Checkpoint(f1, x, {w1}), {w2});
    } else {
      HostOffloader offloader(torch::kCPU);
      auto s1 = std::make_shared<CountingStash>(offloader.NewStash());
      auto s2 = std::make_shared<CountingStash>(offloader.NewStash());
      y = Checkpoint(f2, Checkpoint(f1, x, {w1}, s1), {w2}, s2);
      EXPECT_EQ(s1->puts + s2->puts, 2);
      y.pow(2).sum().backward();
      EXPECT_EQ(s1->takes + s2->takes, 2);
      return std::vector<torch::Tensor>{w1.grad().clone(), w2.grad().clone(), x.grad().clone()};
    }
    y.pow(2).sum().backward();
    return std::vector<torch::Tensor>{w1.grad().clone(), w2.grad().clone(), x.grad().clone()};
  };
  auto direct = grads(0), ckpt = grads(1), stashed = grads(2);
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(torch::allclose(direct[i], ckpt[i], 1e-6, 1e-7)) << i;
    EXPECT_TRUE(torch::equal(ckpt[i], stashed[i])) << i;
  }
}

TEST(Checkpoint, StashRefusesInPlaceWritesAndASecondBackward) {
  torch::Tensor w = torch::randn({4, 4}).requires_grad_(true);
  auto f = [&](const torch::Tensor& x) { return torch::tanh(torch::linear(x, w)); };
  HostOffloader offloader(torch::kCPU);
  torch::Tensor h = torch::randn({2, 4}).requires_grad_(true) * 2;
  torch::Tensor y = Checkpoint(f, h, {w}, offloader.NewStash());
  h.add_(1);  // the stashed input changes before backward, as a saved tensor would
  EXPECT_ANY_THROW(y.sum().backward());

  torch::Tensor y2 = Checkpoint(f, torch::randn({2, 4}), {w}, offloader.NewStash());
  y2.sum().backward({}, /*retain_graph=*/true);
  EXPECT_ANY_THROW(y2.sum().backward());  // the input was handed back once already
}

TEST(HostOffloader, CompanionComesBackWithTheStashItFollows) {
  HostOffloader offloader(torch::kCPU);
  auto input = offloader.NewStash();
  auto qkv = offloader.NewCompanion(input);
  torch::Tensor x = torch::randn({3, 4}), y = torch::randn({3, 7});
  input->Put(x);
  qkv->Put(y);
  // Taking the input brings the companion over too; each comes back once, equal.
  EXPECT_TRUE(torch::equal(input->Take(), x));
  EXPECT_TRUE(torch::equal(qkv->Take(), y));
  EXPECT_ANY_THROW(qkv->Take());
  // Only a stash of an offloader can have a companion.
  auto foreign = std::make_shared<CountingStash>(offloader.NewStash());
  EXPECT_ANY_THROW(offloader.NewCompanion(foreign));
  HostOffloader other(torch::kCPU);
  EXPECT_ANY_THROW(offloader.NewCompanion(other.NewStash()));
}

TEST(HostOffloader, AStayingStashHandsBackItsOwnTensor) {
  HostOffloader offloader(torch::kCPU);
  auto first = offloader.NewStash();
  auto last = offloader.NewStash(/*stay_on_device=*/true);
  auto companion = offloader.NewCompanion(last);
  torch::Tensor x0 = torch::randn({2, 3}), x1 = torch::randn({2, 3}), y1 = torch::randn({2, 5});
  first->Put(x0);
  last->Put(x1);
  companion->Put(y1);
  // No copy: the same memory comes back.
  EXPECT_EQ(last->Take().data_ptr(), x1.data_ptr());
  EXPECT_EQ(companion->Take().data_ptr(), y1.data_ptr());
  EXPECT_TRUE(torch::equal(first->Take(), x0));
  EXPECT_ANY_THROW(last->Take());
  // Like a saved tensor, a staying input written in place before backward is an error.
  auto stays = offloader.NewStash(/*stay_on_device=*/true);
  torch::Tensor x2 = torch::randn({2, 3});
  stays->Put(x2);
  x2.add_(1);
  EXPECT_ANY_THROW(stays->Take());
}

TEST(FetchBufferRing, ReusesABufferOnlyOnceNothingRefersToIt) {
  FetchBufferRing ring(2);
  const auto opts = torch::TensorOptions().dtype(torch::kBFloat16);
  torch::Tensor a = ring.Get({4, 6}, opts);
  void* first = a.data_ptr();
  torch::Tensor b = ring.Get({4, 6}, opts);  // a is still alive: another buffer
  EXPECT_NE(b.data_ptr(), first);
  EXPECT_EQ(ring.size(), 2u);
  torch::Tensor view = a.narrow(0, 1, 2);
  a = torch::Tensor();
  torch::Tensor c = ring.Get({4, 6}, opts);  // a's view still refers to a's buffer
  EXPECT_NE(c.data_ptr(), first);
  EXPECT_EQ(ring.size(), 2u);                // full: c's buffer is not kept
  view = torch::Tensor();
  torch::Tensor d = ring.Get({4, 6}, opts);
  EXPECT_EQ(d.data_ptr(), first);
  // A fresh tensor each time: not a view, with a version counter of its own.
  EXPECT_FALSE(d.is_view());
  EXPECT_EQ(d.sizes(), torch::IntArrayRef({4, 6}));
  EXPECT_EQ(d.scalar_type(), torch::kBFloat16);
  const auto b_version = b._version(), d_version = d._version();
  d.fill_(1);
  EXPECT_EQ(b._version(), b_version);
  EXPECT_EQ(d._version(), d_version + 1);
  // Other shapes and dtypes get buffers of their own.
  EXPECT_NE(ring.Get({6, 4}, opts).data_ptr(), first);
  d = torch::Tensor();
  EXPECT_NE(ring.Get({4, 6}, torch::TensorOptions().dtype(torch::kFloat32)).data_ptr(), first);
  // Cleared, the ring hands out new memory; tensors handed out keep theirs.
  ring.Clear();
  EXPECT_EQ(ring.size(), 0u);
  b.fill_(2);
  EXPECT_TRUE(torch::equal(b, torch::full({4, 6}, 2, opts)));
}

}  // namespace
}  // namespace tune::model::ops
