#include "worker/trainer/train/optimizer.h"

#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace tune::train {

AdamW::AdamW(std::vector<torch::Tensor> params, AdamWOptions options)
    : params_(std::move(params)), options_(options), states_(params_.size()) {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    const torch::Tensor& p = params_[i];
    if (p.scalar_type() != torch::kFloat32) {
      throw std::invalid_argument("AdamW: parameter " + std::to_string(i) + " is not fp32");
    }
    State& s = states_[i];
    s.quantized = UsesEightBit(p);
    torch::Tensor zeros = torch::zeros_like(p, torch::MemoryFormat::Contiguous);
    if (s.quantized) {
      s.mq = QuantizeBlockwise(zeros, Code(true, p.device()), options_.block);
      s.vq = QuantizeBlockwise(zeros, Code(false, p.device()), options_.block);
    } else {
      s.m = zeros;
      s.v = zeros.clone();
    }
  }
}

bool AdamW::UsesEightBit(const torch::Tensor& p) const {
  return options_.eight_bit && p.numel() >= options_.min_8bit_numel;
}

const torch::Tensor& AdamW::Code(bool is_signed, const torch::Device& device) const {
  torch::Tensor& code = is_signed ? signed_code_ : unsigned_code_;
  if (!code.defined() || code.device() != device) code = DynamicCodeTable(is_signed).to(device);
  return code;
}

void AdamW::Step(double lr) {
  torch::NoGradGuard no_grad;
  ++step_;
  const double b1 = options_.beta1, b2 = options_.beta2;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(step_));
  const double step_size = lr / bc1;
  const double bc2_sqrt = std::sqrt(bc2);
  // fp32 states: every parameter in one multi-tensor op per line of the
  // update (a few launches, not ~8 per tensor: the host, not the GPU, bounds
  // hundreds of small tensors); the same arithmetic, element by element.
  std::vector<torch::Tensor> ps, gs, ms, vs;
  for (size_t i = 0; i < params_.size(); ++i) {
    torch::Tensor& p = params_[i];
    const torch::Tensor& g = p.grad();
    if (!g.defined()) continue;
    State& s = states_[i];
    if (!s.quantized) {
      ps.push_back(p);
      gs.push_back(g);
      ms.push_back(s.m);
      vs.push_back(s.v);
      continue;
    }
    torch::Tensor m = DequantizeBlockwise(s.mq, Code(true, p.device()), p.sizes(), options_.block);
    torch::Tensor v = DequantizeBlockwise(s.vq, Code(false, p.device()), p.sizes(), options_.block);
    if (options_.weight_decay != 0) p.mul_(1.0 - lr * options_.weight_decay);
    m.mul_(b1).add_(g, 1.0 - b1);
    v.mul_(b2).addcmul_(g, g, 1.0 - b2);
    torch::Tensor denom = (v.sqrt() / bc2_sqrt).add_(options_.eps);
    p.addcdiv_(m, denom, -step_size);
    s.mq = QuantizeBlockwise(m, Code(true, p.device()), options_.block);
    s.vq = QuantizeBlockwise(v, Code(false, p.device()), options_.block);
  }
  if (ps.empty()) return;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
  if (ps[0].is_cuda() && std::all_of(ps.begin(), ps.end(), [](const torch::Tensor& p) { return p.is_contiguous(); })) {
    // torch's fused AdamW kernel (what torch.optim.AdamW(fused=True) runs):
    // the whole update in one pass over p, g, m, v, in fp32, with no
    // per-tensor temporaries. It reads the step count for the bias
    // corrections from a device tensor; every parameter shares one. It
    // takes only tensors laid out like their parameter (m and v are).
    for (torch::Tensor& g : gs) {
      if (!g.is_contiguous()) g = g.contiguous();
    }
    if (!fused_step_.defined() || fused_step_.device() != ps[0].device()) {
      fused_step_ = torch::zeros({}, ps[0].options());
    }
    fused_step_.fill_(static_cast<double>(step_));
    const std::vector<torch::Tensor> steps(ps.size(), fused_step_);
    torch::_fused_adamw_(ps, gs, ms, vs, /*max_exp_avg_sqs=*/{}, steps, lr, b1, b2, options_.weight_decay,
                         options_.eps, /*amsgrad=*/false, /*maximize=*/false);
    return;
  }
#endif
  if (options_.weight_decay != 0) torch::_foreach_mul_(ps, 1.0 - lr * options_.weight_decay);
  torch::_foreach_mul_(ms, b1);
  torch::_foreach_add_(ms, gs, 1.0 - b1);
  torch::_foreach_mul_(vs, b2);
  torch::_foreach_addcmul_(vs, gs, gs, 1.0 - b2);
  std::vector<torch::Tensor> denom = torch::_foreach_sqrt(vs);
  torch::_foreach_div_(denom, bc2_sqrt);
  torch::_foreach_add_(denom, options_.eps);
  torch::_foreach_addcdiv_(ps, ms, denom, -step_size);
}

void AdamW::ZeroGrad() {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> grads;
  for (torch::Tensor& p : params_) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  if (!grads.empty()) torch::_foreach_zero_(grads);
}

int64_t AdamW::StateBytes() const {
  int64_t bytes = 0;
  for (const State& s : states_) {
    if (s.quantized) {
      bytes += s.mq.codes.numel() + s.vq.codes.numel() + 4 * (s.mq.absmax.numel() + s.vq.absmax.numel());
    } else {
      bytes += 4 * (s.m.numel() + s.v.numel());
    }
  }
  return bytes;
}

torch::Tensor AdamW::FirstMoment(size_t i) const {
  const State& s = states_.at(i);
  return s.quantized ? DequantizeBlockwise(s.mq, Code(true, params_[i].device()), params_[i].sizes(), options_.block)
                     : s.m;
}

torch::Tensor AdamW::SecondMoment(size_t i) const {
  const State& s = states_.at(i);
  return s.quantized
             ? DequantizeBlockwise(s.vq, Code(false, params_[i].device()), params_[i].sizes(), options_.block)
             : s.v;
}

void AdamW::Save(torch::serialize::OutputArchive& archive) const {
  archive.write("adamw_step", torch::tensor({step_}, torch::kInt64));
  archive.write("adamw_num_params", torch::tensor({static_cast<int64_t>(params_.size())}, torch::kInt64));
  for (size_t i = 0; i < states_.size(); ++i) {
    const State& s = states_[i];
    const std::string k = "adamw_" + std::to_string(i) + "_";
    if (s.quantized) {
      archive.write(k + "m_codes", s.mq.codes.cpu());
      archive.write(k + "m_absmax", s.mq.absmax.cpu());
      archive.write(k + "v_codes", s.vq.codes.cpu());
      archive.write(k + "v_absmax", s.vq.absmax.cpu());
    } else {
      archive.write(k + "m", s.m.cpu());
      archive.write(k + "v", s.v.cpu());
    }
  }
}

void AdamW::Load(torch::serialize::InputArchive& archive) {
  torch::NoGradGuard no_grad;
  torch::Tensor step, num;
  archive.read("adamw_step", step);
  archive.read("adamw_num_params", num);
  if (num.item<int64_t>() != static_cast<int64_t>(params_.size())) {
    throw std::runtime_error("optimizer state has " + std::to_string(num.item<int64_t>()) +
                             " parameters but the model has " + std::to_string(params_.size()) +
                             " LoRA tensors (was lora.r/targets changed since the checkpoint?)");
  }
  for (size_t i = 0; i < states_.size(); ++i) {
    State& s = states_[i];
    const torch::Tensor& p = params_[i];
    const std::string k = "adamw_" + std::to_string(i) + "_";
    auto read = [&](const std::string& key, int64_t expect_numel) {
      torch::Tensor t;
      if (!archive.try_read(key, t)) {
        throw std::runtime_error("optimizer state lacks '" + key +
                                 "' (the checkpoint was written with another optimizer setting)");
      }
      if (t.numel() != expect_numel) {
        throw std::runtime_error("optimizer state '" + key + "' has " + std::to_string(t.numel()) +
                                 " values, expected " + std::to_string(expect_numel));
      }
      return t.to(p.device());
    };
    if (s.quantized) {
      const int64_t nblocks = s.mq.absmax.numel();
      s.mq.codes = read(k + "m_codes", nblocks * options_.block);
      s.mq.absmax = read(k + "m_absmax", nblocks);
      s.vq.codes = read(k + "v_codes", nblocks * options_.block);
      s.vq.absmax = read(k + "v_absmax", nblocks);
    } else {
      s.m = read(k + "m", p.numel()).view(p.sizes()).contiguous();
      s.v = read(k + "v", p.numel()).view(p.sizes()).contiguous();
    }
  }
  step_ = step.item<int64_t>();
}

}  // namespace tune::train
