// What a training checkpoint holds and how it is (de)serialised. The atomic
// directory handling is checkpoint/checkpoint.h; this writes the files:
//   adapter.pt    LoRA tensors ("lora_<i>", order = meta.json lora_names)
//   optimizer.pt  AdamW state (train/optimizer.h)
//   rng.pt        CPU generator state (+ "cuda" when training on CUDA)
//   meta.json     step, data position, schedule, NaN counters, run facts
// meta.json is written last. The training loop reseeds torch's generators
// at every step from (seed, step, rank), which is what makes a resumed run
// (on any number of ranks) draw the same dropout masks; rng.pt is restored
// too so that code outside the step sees the same state as before the stop.
#ifndef TUNE_WORKER_TRAINER_CHECKPOINT_STATE_H_
#define TUNE_WORKER_TRAINER_CHECKPOINT_STATE_H_

#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "worker/trainer/train/optimizer.h"
#include "worker/trainer/train/sampler.h"

namespace tune::train {

constexpr int kCheckpointFormatVersion = 1;

struct TrainerState {
  int64_t step = 0;            // loop steps completed (skipped NaN steps included)
  DataPosition next_position;  // where step + 1 starts reading
  double lr_scale = 1.0;       // NaN-policy backoff applied to the schedule
  int64_t nan_total = 0;
  int64_t nan_consecutive = 0;
  int64_t rollbacks = 0;
  double last_loss = std::numeric_limits<double>::quiet_NaN();
};

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// Writes the four files into `dir` (an existing, empty temp dir). `run_info`
// is merged into meta.json (schedule, world size, seed...). Throws on I/O errors.
void WriteTrainingState(const std::string& dir, const NamedTensors& lora, const AdamW& optimizer,
                        const TrainerState& state, const nlohmann::json& run_info,
                        const torch::Device& device);

struct LoadedTrainingState {
  TrainerState state;
  NamedTensors lora;  // CPU fp32, names from meta.json
  nlohmann::json meta;
};

// Reads a checkpoint directory: loads the optimizer state into `optimizer`,
// restores the generator states, returns the rest. Throws std::runtime_error
// naming the file when something is missing or inconsistent.
LoadedTrainingState ReadTrainingState(const std::string& dir, AdamW* optimizer, const torch::Device& device);

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_CHECKPOINT_STATE_H_
