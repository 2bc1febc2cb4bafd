#include "worker/trainer/train/loss_scaler.h"

#include <stdexcept>

namespace tune::train {

LossScaler::LossScaler(bool enabled, LossScalerOptions options)
    : enabled_(enabled), options_(options), scale_(options.init_scale) {
  if (!(options_.init_scale > 0) || !(options_.growth_factor > 1) || !(options_.backoff_factor > 0) ||
      !(options_.backoff_factor < 1) || options_.growth_interval < 1 || !(options_.min_scale > 0)) {
    throw std::invalid_argument(
        "LossScaler: need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1, "
        "min_scale > 0");
  }
}

LossScaler::Outcome LossScaler::Update(bool overflow) {
  if (!enabled_) return Outcome::kApplied;
  if (!overflow) {
    if (++clean_steps_ >= options_.growth_interval) {
      scale_ *= options_.growth_factor;
      clean_steps_ = 0;
    }
    return Outcome::kApplied;
  }
  clean_steps_ = 0;
  scale_ *= options_.backoff_factor;
  if (scale_ < options_.min_scale) {
    // Keep the scale usable (>= min) for the steps after the NaN guard acts.
    scale_ = options_.min_scale;
    return Outcome::kCollapsed;
  }
  return Outcome::kSkipped;
}

void LossScaler::Reset(double scale) {
  if (!(scale > 0)) throw std::invalid_argument("LossScaler::Reset: scale must be > 0");
  scale_ = scale;
  clean_steps_ = 0;
}

}  // namespace tune::train
