// The training recipe of tune-train, in the order it runs (llm.c style):
//
//   Setup      spec + environment -> device, process group, tokenizer,
//              dataset (preflight event), model with LoRA, batch plan (plan
//              event), optimizer, LR schedule, resume from the newest
//              complete checkpoint (--resume).
//   TrainLoop  per step: agree on the step's supervised-token count (and on
//              stopping) across ranks, forward/backward each micro-batch with
//              loss = LossSum / global count (x the fp16 loss scale),
//              all-reduce the loss with an "OOM on some rank" flag (any OOM:
//              every rank steps the plan down and redoes the step, see
//              README "Runtime recovery"), all-reduce LoRA grads, unscale,
//              global grad norm, NaN guard, clip, AdamW, step event,
//              checkpoint.
//   Finish     final checkpoint, PEFT adapter export (+ merged model), done.
//
// Exit codes and error events follow docs/events.md: 0 finished, 2 bad
// command line/spec (INVALID_SPEC), 3 OOM, 4 NaN policy exhausted
// (NAN_ABORT), 5 dataset preflight (DATA), 1 crash (CRASH), 143 stopped by
// SIGTERM at a step boundary (after a checkpoint, so --resume continues).
#ifndef TUNE_WORKER_TRAINER_RECIPE_H_
#define TUNE_WORKER_TRAINER_RECIPE_H_

#include <cstdint>
#include <stdexcept>
#include <string>

#include "worker/trainer/config.h"

namespace tune::train {

enum ExitCode : int {
  kExitOk = 0,
  kExitCrash = 1,
  kExitInvalidSpec = 2,
  kExitOom = 3,
  kExitNanAbort = 4,
  kExitData = 5,
  kExitTerminated = 143,  // 128 + SIGTERM
};

// Extra options of `tune-train train` beyond CliOptions.
struct TrainRunOptions {
  CliOptions cli;
  // > 0: stop cleanly after this step (checkpoint, no export, exit 0). An
  // operations/testing aid: "train 20 of the 40 steps now, --resume later".
  int stop_after_step = 0;
  // --profile-steps A[-B] --profile-out FILE: profile steps A..B on rank 0
  // (train/step_profiler.h). Empty: off.
  int64_t profile_first = 0, profile_last = 0;
  std::string profile_out;
};

// Runs a whole training job; never throws. Installs SIGTERM/SIGINT handlers
// that request a stop at the next step boundary.
int RunTraining(const TrainRunOptions& options);

// Asks a running RunTraining to stop at the next step boundary (signal-safe).
void RequestStop();

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_RECIPE_H_
