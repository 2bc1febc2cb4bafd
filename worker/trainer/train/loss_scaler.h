// Dynamic loss scaling for fp16 compute (the torch.cuda.amp.GradScaler rule).
//
// fp16 has a 5-bit exponent: small gradients underflow to zero. The loss is
// multiplied by `scale()` before backward so gradients live in fp16's range;
// the caller divides the gradients (and their norm) by the same scale before
// clipping and the optimizer step. Contract of one step:
//   1. backward of loss * scale();
//   2. Update(overflow) with overflow = "the global grad norm is non-finite";
//   3. on overflow the step is skipped (no optimizer update) and the scale
//      halves; after `growth_interval` clean steps in a row it doubles.
// Torch-free: a scalar state machine, unit-tested without libtorch.
#ifndef TUNE_WORKER_TRAINER_TRAIN_LOSS_SCALER_H_
#define TUNE_WORKER_TRAINER_TRAIN_LOSS_SCALER_H_

#include <cstdint>

namespace tune::train {

struct LossScalerOptions {
  double init_scale = 65536.0;  // 2^16
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
  // Below this scale an overflow is no longer "fp16 range" but a real
  // numeric blow-up: Update reports it as collapsed, and the caller hands
  // the step to the NaN guard instead of skipping it silently.
  double min_scale = 1.0;
};

class LossScaler {
 public:
  // `enabled` false (bf16/fp32): scale() is 1 and Update never skips.
  explicit LossScaler(bool enabled, LossScalerOptions options = {});

  enum class Outcome {
    kApplied,    // finite gradients: apply the update
    kSkipped,    // overflow: skip the update, the scale was lowered
    kCollapsed,  // overflow and the scale fell below min_scale: treat as NaN
  };

  bool enabled() const { return enabled_; }
  double scale() const { return enabled_ ? scale_ : 1.0; }
  int64_t clean_steps() const { return clean_steps_; }
  // Records one step's outcome and adjusts the scale (see the contract above).
  Outcome Update(bool overflow);
  // Restores a saved scale (resume / rollback); clean_steps restarts at 0.
  void Reset(double scale);

 private:
  bool enabled_;
  LossScalerOptions options_;
  double scale_;
  int64_t clean_steps_ = 0;
};

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_TRAIN_LOSS_SCALER_H_
