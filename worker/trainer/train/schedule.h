// Learning-rate schedules with linear warmup, matching Hugging Face
// transformers' get_{linear,cosine,constant}_schedule_with_warmup: the LR used
// by the optimizer step number s (1-based) is base_lr * Multiplier(s - 1), so
// with warmup the very first step uses LR 0, exactly as HF's Trainer does.
//   linear:   m(k) = k/W for k < W, else max(0, (T-k)/max(1, T-W))
//   cosine:   m(k) = k/W for k < W, else max(0, 0.5(1+cos(pi * (k-W)/max(1, T-W))))
//   constant: m(k) = k/W for k < W, else 1
// (W = warmup_steps, T = total steps, k = scheduler step, 0-based.)
#ifndef TUNE_WORKER_TRAINER_TRAIN_SCHEDULE_H_
#define TUNE_WORKER_TRAINER_TRAIN_SCHEDULE_H_

#include <cstdint>
#include <string>

namespace tune::train {

enum class ScheduleKind { kLinear, kCosine, kConstant };

// "linear" | "cosine" | "constant"; throws std::invalid_argument otherwise.
ScheduleKind ParseScheduleKind(const std::string& name);
std::string ScheduleKindName(ScheduleKind kind);

class LrSchedule {
 public:
  LrSchedule(ScheduleKind kind, double base_lr, int64_t warmup_steps, int64_t total_steps);

  // Multiplier after `scheduler_step` scheduler steps (0-based).
  double Multiplier(int64_t scheduler_step) const;
  // LR for optimizer step `step` (1-based): base_lr * Multiplier(step - 1).
  double LrForStep(int64_t step) const { return base_lr_ * Multiplier(step - 1); }

  ScheduleKind kind() const { return kind_; }
  double base_lr() const { return base_lr_; }
  int64_t warmup_steps() const { return warmup_; }
  int64_t total_steps() const { return total_; }

 private:
  ScheduleKind kind_;
  double base_lr_;
  int64_t warmup_;
  int64_t total_;
};

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_TRAIN_SCHEDULE_H_
