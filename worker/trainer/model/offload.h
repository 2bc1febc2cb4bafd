// Activation offload for gradient checkpointing (`gradient_checkpointing:
// offload`, and selective recompute where it keeps attention outputs, llama.h
// SetSelectiveRecompute): each checkpointed layer's input waits in pinned host
// memory between forward and backward instead of on the GPU (with selective,
// its q/k/v projection output too, as the input's companion; the last layer's
// stay on the GPU).
//
// The copies run on a side CUDA stream so they overlap compute: in forward the
// device-to-host copy of layer i's input runs while layer i computes; in
// backward, taking layer i's input starts the host-to-device copy of layer
// i-1's input (and its companion), which then overlaps layer i's recompute
// and backward. So in backward at most two layer inputs (and companions) are
// on the device at once. Gradients never pass through host memory
// (ops::Checkpoint returns x's gradient on the device).
//
// In forward, a copy's device source is held until the layer after next has
// been Put, or the offloader ends, and then freed behind a wait of the stream
// that made it on the copy: memory the caching allocator can reuse at once,
// where a recordStream'd free stays unusable until the host sees the copy
// done, and the host runs many layers ahead of the device.
#ifndef TUNE_WORKER_TRAINER_MODEL_OFFLOAD_H_
#define TUNE_WORKER_TRAINER_MODEL_OFFLOAD_H_

#include <torch/torch.h>

#include <memory>
#include <vector>

#include "worker/trainer/model/llama_ops.h"

namespace tune::model {

// Device buffers that backward's fetches reuse (offload and selective alike).
// A fetched layer input lives from its prefetch, one layer early, until its
// layer's backward ends; allocated fresh per layer it would land between that
// layer's transients, and freed behind the copy stream's use (recordStream)
// the allocator could not reuse it until the host saw that copy done. The
// ring's buffers are allocated once per backward and taken in turn. Measured
// (bench/README.md, tenth session), it did not lower selective's reserved
// memory at seq 8192 (the forward's copies were the cause, eleventh session)
// and holds 0.3 GiB more.
class FetchBufferRing {
 public:
  explicit FetchBufferRing(size_t capacity) : capacity_(capacity) {}
  // A tensor of `sizes` and `options` whose memory no other tensor uses: a
  // ring buffer no tensor handed out earlier still refers to, else a new one
  // (kept in the ring while it has fewer than `capacity` buffers). Each call
  // returns a new tensor object on the buffer's storage (its own version
  // counter and autograd state, not a view). Memory reuse is ordered on the
  // host only: the caller orders it on the device (offload.cc).
  torch::Tensor Get(at::IntArrayRef sizes, const torch::TensorOptions& options);
  // Drops the ring's references (tensors handed out keep their memory).
  void Clear() { buffers_.clear(); }
  size_t size() const { return buffers_.size(); }

 private:
  size_t capacity_;
  std::vector<torch::Tensor> buffers_;
};

// One per forward pass. Stashes made by NewStash form a chain in creation
// (= layer) order, which is what backward prefetches along.
class HostOffloader {
 public:
  // `device`: where the inputs live and come back to. On a CPU device, or in a
  // build without CUDA, the stash copies synchronously (a correct fallback;
  // the model does not offload on CPU).
  explicit HostOffloader(torch::Device device);
  // Releases the device sources of copies still held (the two latest layers
  // put), each behind a wait of the stream that made it on its copy.
  ~HostOffloader();
  // `stay_on_device`: Put keeps the tensor where it is and Take hands it back
  // (no copies), while the stash still takes its place in the chain (taking
  // it prefetches its predecessor). For the last layer, whose backward comes
  // first: its input would be fetched back right away, with nothing to
  // overlap the copy.
  std::shared_ptr<ops::ActivationStash> NewStash(bool stay_on_device = false);
  // A stash outside the chain that is fetched whenever `with` (made by
  // NewStash of this offloader) is, and stays on the device when `with` does:
  // a second tensor of the same layer, which backward needs right after
  // `with`'s (selective recompute keeps the layer's q/k/v projection output
  // this way). So while a layer's backward runs, the previous layer's input
  // and its companion both come over.
  std::shared_ptr<ops::ActivationStash> NewCompanion(const std::shared_ptr<ops::ActivationStash>& with);

  struct State;  // the device, copy stream and chain end, shared with the stashes (offload.cc)

 private:
  std::shared_ptr<State> state_;
};

}  // namespace tune::model

#endif  // TUNE_WORKER_TRAINER_MODEL_OFFLOAD_H_
