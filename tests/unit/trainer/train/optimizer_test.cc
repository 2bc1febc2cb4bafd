// AdamW against steps computed by hand (scalar arithmetic in double).
#include "worker/trainer/train/optimizer.h"

#include <cmath>

#include <gtest/gtest.h>

namespace tune::train {
namespace {

struct Ref {  // one scalar parameter under AdamW
  double p, m = 0, v = 0;
  int t = 0;
  void Step(double g, double lr, double wd, double b1 = 0.9, double b2 = 0.999, double eps = 1e-8) {
    ++t;
    p *= 1 - lr * wd;
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    const double mhat_scale = 1 - std::pow(b1, t);
    const double denom = std::sqrt(v) / std::sqrt(1 - std::pow(b2, t)) + eps;
    p -= lr / mhat_scale * m / denom;
  }
};

TEST(AdamWTest, FirstStepMovesByLrTimesSign) {
  // With bias correction the first update is lr * g/|g| (up to eps), plus decay.
  torch::Tensor p = torch::tensor({1.0f, -2.0f, 0.5f}).requires_grad_(true);
  AdamWOptions o;
  o.weight_decay = 0.0;
  AdamW opt({p}, o);
  p.mutable_grad() = torch::tensor({0.3f, -4.0f, 0.0f});
  opt.Step(0.1);
  EXPECT_NEAR(p[0].item<float>(), 0.9f, 1e-6);
  EXPECT_NEAR(p[1].item<float>(), -1.9f, 1e-6);
  EXPECT_NEAR(p[2].item<float>(), 0.5f, 1e-7);  // zero grad: no move
  EXPECT_EQ(opt.step_count(), 1);
}

TEST(AdamWTest, MatchesHandComputedStepsWithDecay) {
  const std::vector<double> grads = {0.5, -0.25, 1.0, 0.125, -2.0};
  const std::vector<double> lrs = {1e-2, 2e-2, 2e-2, 1e-2, 5e-3};
  Ref a{0.7}, b{-1.3};
  torch::Tensor p = torch::tensor({0.7f, -1.3f}).requires_grad_(true);
  AdamWOptions o;
  o.weight_decay = 0.1;
  AdamW opt({p}, o);
  for (size_t s = 0; s < grads.size(); ++s) {
    p.mutable_grad() = torch::tensor({static_cast<float>(grads[s]), static_cast<float>(-3 * grads[s])});
    opt.Step(lrs[s]);
    a.Step(grads[s], lrs[s], 0.1);
    b.Step(-3 * grads[s], lrs[s], 0.1);
    EXPECT_NEAR(p[0].item<float>(), a.p, 1e-6) << "step " << s + 1;
    EXPECT_NEAR(p[1].item<float>(), b.p, 1e-6) << "step " << s + 1;
  }
  EXPECT_NEAR(opt.FirstMoment(0)[0].item<float>(), a.m, 1e-7);
  EXPECT_NEAR(opt.SecondMoment(0)[1].item<float>(), b.v, 1e-7);
}

TEST(AdamWTest, ParamsWithoutGradStayAndZeroGradClears) {
  torch::Tensor p = torch::ones({2}).requires_grad_(true);
  torch::Tensor q = torch::ones({2}).requires_grad_(true);
  AdamW opt({p, q}, AdamWOptions{});
  p.mutable_grad() = torch::ones({2});
  opt.Step(0.1);
  EXPECT_TRUE(torch::equal(q, torch::ones({2})));
  opt.ZeroGrad();
  EXPECT_EQ(p.grad().abs().sum().item<float>(), 0.0f);
}

TEST(AdamWTest, EightBitTracksFp32AndRoundTripsThroughSave) {
  torch::manual_seed(0);
  torch::Tensor init = torch::randn({64, 128});
  torch::Tensor p32 = init.clone().requires_grad_(true);
  torch::Tensor p8 = init.clone().requires_grad_(true);
  AdamWOptions o32, o8;
  o8.eight_bit = true;
  AdamW a32({p32}, o32), a8({p8}, o8);
  for (int s = 0; s < 20; ++s) {
    torch::Tensor g = torch::randn({64, 128}) * 0.1 + 0.01 * s;
    p32.mutable_grad() = g.clone();
    p8.mutable_grad() = g.clone();
    a32.Step(1e-3);
    a8.Step(1e-3);
  }
  // Moments of the 8-bit optimizer stay close to the exact ones. Each step
  // requantises m with an error of up to ~0.7% of its block's absmax and the
  // errors decay with beta1, so they settle at a few percent at worst and far
  // less on average.
  const double m_err = (a8.FirstMoment(0) - a32.FirstMoment(0)).abs().max().item<double>();
  const double m_max = a32.FirstMoment(0).abs().max().item<double>();
  EXPECT_LT(m_err, 0.05 * m_max);
  const double m_rel_l2 = ((a8.FirstMoment(0) - a32.FirstMoment(0)).norm() / a32.FirstMoment(0).norm()).item<double>();
  EXPECT_LT(m_rel_l2, 0.025);
  const double v_rel_l2 =
      ((a8.SecondMoment(0) - a32.SecondMoment(0)).norm() / a32.SecondMoment(0).norm()).item<double>();
  EXPECT_LT(v_rel_l2, 0.01);
  const double drift = (p8 - p32).abs().max().item<double>();
  EXPECT_LT(drift, 2e-3);  // 20 steps of lr 1e-3 move each weight <= 0.02
  EXPECT_GT((p8 - init).abs().max().item<double>(), 1e-3);  // it did train

  torch::serialize::OutputArchive out;
  a8.Save(out);
  std::stringstream buf;
  out.save_to(buf);
  torch::Tensor p_copy = p8.detach().clone().requires_grad_(true);
  AdamW restored({p_copy}, o8);
  torch::serialize::InputArchive in;
  in.load_from(buf);
  restored.Load(in);
  EXPECT_EQ(restored.step_count(), 20);
  EXPECT_TRUE(torch::equal(restored.FirstMoment(0), a8.FirstMoment(0)));
  EXPECT_TRUE(torch::equal(restored.SecondMoment(0), a8.SecondMoment(0)));
  torch::Tensor g = torch::randn({64, 128});
  p8.mutable_grad() = g.clone();
  p_copy.mutable_grad() = g.clone();
  a8.Step(1e-3);
  restored.Step(1e-3);
  EXPECT_TRUE(torch::equal(p8, p_copy));  // resume continues exactly
}

TEST(AdamWTest, LoadRejectsMismatchedState) {
  torch::Tensor p = torch::ones({4}).requires_grad_(true);
  AdamW a({p}, AdamWOptions{});
  torch::serialize::OutputArchive out;
  a.Save(out);
  std::stringstream buf;
  out.save_to(buf);
  torch::Tensor q1 = torch::ones({4}).requires_grad_(true), q2 = torch::ones({4}).requires_grad_(true);
  AdamW b({q1, q2}, AdamWOptions{});
  torch::serialize::InputArchive in;
  in.load_from(buf);
  EXPECT_THROW(b.Load(in), std::runtime_error);
}

}  // namespace
}  // namespace tune::train
