// AdamW with decoupled weight decay and bias correction, fp32 states or
// block-wise 8-bit states (train/quant8.h).
//
// Update for each parameter p with gradient g at step t (1-based, counting
// only applied updates; skipped NaN steps do not advance t):
//   p <- p * (1 - lr * wd)
//   m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// which is torch.optim.AdamW's formula. In 8-bit mode m and v are kept
// quantised between steps (dequantised, updated in fp32, requantised);
// tensors smaller than min_8bit_numel keep fp32 states because quantising
// them saves nothing worth the error. fp32 states on CUDA with torch >= 2.1 run
// torch's fused AdamW kernel (one launch per ~hundred tensors instead of a
// chain of multi-tensor ops); elsewhere the same formula in multi-tensor ops.
#ifndef TUNE_WORKER_TRAINER_TRAIN_OPTIMIZER_H_
#define TUNE_WORKER_TRAINER_TRAIN_OPTIMIZER_H_

#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include "worker/trainer/train/quant8.h"

namespace tune::train {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  bool eight_bit = false;
  int64_t min_8bit_numel = 4096;
  int64_t block = 256;
};

class AdamW {
 public:
  // `params`: fp32 leaf tensors (their .grad() is read by Step()).
  AdamW(std::vector<torch::Tensor> params, AdamWOptions options);

  // One update with learning rate `lr`. Parameters without a gradient are
  // left alone (their state does not move).
  void Step(double lr);
  // Sets every defined gradient to zero.
  void ZeroGrad();

  int64_t step_count() const { return step_; }
  const AdamWOptions& options() const { return options_; }
  // Bytes held by optimizer states (for the plan/reporting).
  int64_t StateBytes() const;

  // State (step + moments) under keys "adamw_*". Load checks that the
  // parameter count and shapes match and throws std::runtime_error otherwise.
  void Save(torch::serialize::OutputArchive& archive) const;
  void Load(torch::serialize::InputArchive& archive);

  // Dequantised (or plain) moments of parameter i, for tests.
  torch::Tensor FirstMoment(size_t i) const;
  torch::Tensor SecondMoment(size_t i) const;

 private:
  struct State {
    bool quantized = false;
    torch::Tensor m, v;           // fp32 mode
    Quantized8 mq, vq;            // 8-bit mode
  };
  bool UsesEightBit(const torch::Tensor& p) const;
  const torch::Tensor& Code(bool is_signed, const torch::Device& device) const;

  std::vector<torch::Tensor> params_;
  AdamWOptions options_;
  std::vector<State> states_;
  int64_t step_ = 0;
  mutable torch::Tensor signed_code_, unsigned_code_;
  torch::Tensor fused_step_;  // fp32 step count on the device (torch >= 2.1 fused CUDA update)
};

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_TRAIN_OPTIMIZER_H_
