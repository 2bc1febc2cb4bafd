// Activation offload for gradient checkpointing (`gradient_checkpointing:
// offload`, and selective recompute where it keeps attention outputs, llama.h
// SetSelectiveRecompute): each checkpointed layer's input waits in pinned host
// memory between forward and backward instead of on the GPU.
//
// The copies run on a side CUDA stream so they overlap compute: in forward the
// device-to-host copy of layer i's input runs while layer i computes; in
// backward, taking layer i's input starts the host-to-device copy of layer
// i-1's input, which then overlaps layer i's recompute and backward. So at
// most two layer inputs are on the device at once. Gradients never pass
// through host memory (ops::Checkpoint returns x's gradient on the device).
#ifndef TUNE_WORKER_TRAINER_MODEL_OFFLOAD_H_
#define TUNE_WORKER_TRAINER_MODEL_OFFLOAD_H_

#include <torch/torch.h>

#include <memory>

#include "worker/trainer/model/llama_ops.h"

namespace tune::model {

// One per forward pass. Stashes made by the same offloader form a chain in
// creation (= layer) order, which is what backward prefetches along.
class HostOffloader {
 public:
  // `device`: where the inputs live and come back to. On a CPU device, or in a
  // build without CUDA, the stash copies synchronously (a correct fallback;
  // the model does not offload on CPU).
  explicit HostOffloader(torch::Device device);
  ~HostOffloader();
  std::shared_ptr<ops::ActivationStash> NewStash();

  struct State;  // the device, copy stream and chain end, shared with the stashes (offload.cc)

 private:
  std::shared_ptr<State> state_;
};

}  // namespace tune::model

#endif  // TUNE_WORKER_TRAINER_MODEL_OFFLOAD_H_
