#include "worker/trainer/train/schedule.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace tune::train {

ScheduleKind ParseScheduleKind(const std::string& name) {
  if (name == "linear") return ScheduleKind::kLinear;
  if (name == "cosine") return ScheduleKind::kCosine;
  if (name == "constant") return ScheduleKind::kConstant;
  throw std::invalid_argument("training.lr_scheduler: unknown schedule '" + name +
                              "'; use linear, cosine or constant");
}

std::string ScheduleKindName(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kLinear: return "linear";
    case ScheduleKind::kCosine: return "cosine";
    case ScheduleKind::kConstant: return "constant";
  }
  return "?";
}

LrSchedule::LrSchedule(ScheduleKind kind, double base_lr, int64_t warmup_steps, int64_t total_steps)
    : kind_(kind), base_lr_(base_lr), warmup_(std::max<int64_t>(0, warmup_steps)), total_(total_steps) {}

double LrSchedule::Multiplier(int64_t k) const {
  if (k < warmup_) return static_cast<double>(k) / static_cast<double>(std::max<int64_t>(1, warmup_));
  const double span = static_cast<double>(std::max<int64_t>(1, total_ - warmup_));
  switch (kind_) {
    case ScheduleKind::kConstant:
      return 1.0;
    case ScheduleKind::kLinear:
      return std::max(0.0, static_cast<double>(total_ - k) / span);
    case ScheduleKind::kCosine: {
      const double progress = static_cast<double>(k - warmup_) / span;
      return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
    }
  }
  return 1.0;
}

}  // namespace tune::train
