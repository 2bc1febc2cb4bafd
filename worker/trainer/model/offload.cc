#include "worker/trainer/model/offload.h"

#include <algorithm>
#include <deque>
#include <limits>
#include <optional>
#include <utility>

#ifdef TUNE_TORCH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <map>
#include <mutex>
#endif

#include "worker/trainer/model/llama_config.h"

namespace tune::model {

torch::Tensor FetchBufferRing::Get(at::IntArrayRef sizes, const torch::TensorOptions& options) {
  torch::NoGradGuard no_grad;
  // (A device given without an index, as torch::kCUDA, matches any index.)
  const torch::Device want = options.device();
  auto free_match = [&](const torch::Tensor& b) {
    return b.sizes() == sizes && b.dtype() == options.dtype() && b.device().type() == want.type() &&
           (!want.has_index() || b.device().index() == want.index()) && b.storage().use_count() == 1;
  };
  torch::Tensor b;
  if (auto it = std::find_if(buffers_.begin(), buffers_.end(), free_match); it != buffers_.end()) {
    b = *it;
  } else {
    b = torch::empty(sizes, options);
    if (buffers_.size() >= capacity_) return b;
    buffers_.push_back(b);
  }
  return torch::empty({0}, b.options()).set_(b.storage(), 0, b.sizes(), b.strides());
}

struct HostOffloader::State {
  explicit State(torch::Device d) : device(d) {}
#ifdef TUNE_TORCH_CUDA
  ~State() { ReleaseAllOutgoing(); }  // stashes Put after their offloader ended, never taken
#endif
  torch::Device device;
  // Where fetches land: per layer an input and a companion, with the
  // previous layer's prefetched, so two of each in turn (and room for more).
  FetchBufferRing buffers{6};
  std::weak_ptr<ops::ActivationStash> last;  // the most recent stash (the next one's predecessor)
  int64_t layers_put = 0;                    // chained stashes Put so far (one per layer)
#ifdef TUNE_TORCH_CUDA
  std::optional<c10::cuda::CUDAStream> side;  // the copy stream (CUDA devices only)

  // A device tensor whose copy to the host may still run, the event recorded
  // after that copy, the stream that made the tensor (which waits for the copy
  // before the tensor is dropped), and the layer (layers_put) it belongs to.
  struct Outgoing {
    torch::Tensor src;
    std::shared_ptr<at::cuda::CUDAEvent> copied;
    c10::cuda::CUDAStream stream;
    int64_t layer = 0;
  };
  // Oldest first. Why the sources are held here rather than handed to the
  // allocator with recordStream: the allocator reuses a block freed that way
  // only once the host sees the copy finished, and the host runs many layers
  // ahead of the device in forward, so every layer's input (and companion)
  // would stay unusable until the device caught up, invisible to the
  // allocated-bytes figures: at seq 8192 selective reserved 5 GiB beyond its
  // allocated that way, 0.4 GiB with the sources held (bench/README.md,
  // tenth and eleventh sessions).
  std::deque<Outgoing> outgoing;

  // Releases the sources of layers before `keep_from` (all by default): the
  // stream that made each first waits for its copy, so memory freed now is
  // safe for anything queued there after this point (the allocator hands a
  // block out again only to the stream that allocated it), and the allocator
  // can hand it out at once.
  void ReleaseOutgoing(int64_t keep_from = std::numeric_limits<int64_t>::max()) {
    while (!outgoing.empty() && outgoing.front().layer < keep_from) {
      outgoing.front().copied->block(outgoing.front().stream);
      outgoing.pop_front();
    }
  }
  // All of them, for destructors: a device already in error (a forward
  // unwinding from it) runs nothing queued after this anyway.
  void ReleaseAllOutgoing() noexcept {
    try {
      ReleaseOutgoing();
    } catch (const c10::Error&) {
    }
  }
#endif
};

namespace {

#ifdef TUNE_TORCH_CUDA
// Pinned host blocks for layer inputs, sized by PinnedBlockBytes and reused
// from micro-batch to micro-batch (pinning is slow: ~25 ms per 128 MiB). A
// request takes the smallest idle block that is large enough, so micro-batches
// of varying length share the blocks of the longest; only when none is large
// enough is memory pinned, after unpinning the idle blocks that are too small
// (with one size per micro-batch they would only be smaller than later
// requests too; with selective's two sizes, inputs and q/k/v outputs, a
// longer micro-batch can unpin a block a later input could have used, which
// costs pinning time, not memory). Process-wide and never destroyed (blocks
// may outlive any one offloader).
class PinnedPool {
 public:
  struct Block {
    void* ptr = nullptr;
    int64_t bytes = 0;
    std::shared_ptr<at::cuda::CUDAEvent> last_use;  // the last copy that reads or writes it
  };

  static PinnedPool& Get() {
    static auto* pool = new PinnedPool();
    return *pool;
  }

  Block Take(int64_t bytes) {
    bytes = PinnedBlockBytes(bytes);
    Block b;
    std::vector<Block> stale;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = idle_.lower_bound(bytes);
      if (it != idle_.end()) {
        b = it->second;
        idle_.erase(it);
      } else {
        // Every idle block is smaller than this request.
        for (auto& [size, blk] : idle_) stale.push_back(blk);
        idle_.clear();
      }
    }
    for (Block& s : stale) {
      if (s.last_use) s.last_use->synchronize();
      cudaFreeHost(s.ptr);
    }
    if (b.ptr != nullptr) {
      if (b.last_use) b.last_use->synchronize();  // long done: the copy ran a step ago
      b.last_use.reset();
      return b;
    }
    const cudaError_t err = cudaHostAlloc(&b.ptr, static_cast<size_t>(bytes), cudaHostAllocDefault);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free error state
      TORCH_CHECK(false, "activation offload: cannot pin ", bytes, " bytes of host memory for a layer input (",
                  cudaGetErrorString(err),
                  "); give the process more host memory, lower dataset.max_seq_length, or use "
                  "gradient_checkpointing: on");
    }
    b.bytes = bytes;
    return b;
  }

  void Give(Block b) {
    if (b.ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    idle_.emplace(b.bytes, std::move(b));
  }

 private:
  std::mutex mu_;
  std::multimap<int64_t, Block> idle_;
};
#endif

class HostStash : public ops::ActivationStash {
 public:
  HostStash(std::shared_ptr<HostOffloader::State> state, std::weak_ptr<HostStash> prev, bool stay)
      : state_(std::move(state)), prev_(std::move(prev)), stay_(stay) {}
#ifdef TUNE_TORCH_CUDA
  ~HostStash() override { ReleaseBlock(); }
#endif

  void Put(const torch::Tensor& x) override {
    // Like a saved tensor: an in-place write to x before backward is an error
    // (the copy may not have read it yet, and the recompute would differ).
    version_.emplace(x.unsafeGetTensorImpl()->version_counter());
    saved_version_ = x._version();
    if (chained_) {
      ++state_->layers_put;
#ifdef TUNE_TORCH_CUDA
      // A new layer: the sources of those before the previous one go
      // (State::outgoing).
      state_->ReleaseOutgoing(state_->layers_put - 1);
#endif
    }
    torch::Tensor src = x.detach().contiguous();
    if (stay_) {
      device_ = src;  // Take() hands it back; nothing to fetch
      return;
    }
#ifdef TUNE_TORCH_CUDA
    if (src.is_cuda()) {
      TORCH_CHECK(state_->side.has_value(), "activation offload: a CUDA tensor in a stash made for ",
                  state_->device.str());
      block_ = PinnedPool::Get().Take(src.numel() * src.element_size());
      // A view of the block; the block itself goes back to the pool (ReleaseBlock).
      host_ = torch::from_blob(block_.ptr, src.sizes(), src.options().device(torch::kCPU));
      const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream(src.device().index());
      const c10::cuda::CUDAStream& side = *state_->side;
      at::cuda::CUDAEvent ready;
      ready.record(main);  // x is complete once main reaches this point
      ready.block(side);
      {
        c10::cuda::CUDAStreamGuard guard(side);
        host_.copy_(src, /*non_blocking=*/true);
      }
      block_.last_use = std::make_shared<at::cuda::CUDAEvent>();
      block_.last_use->record(side);
      // x must not be reused before the side stream has read it: its source
      // is held until the layer after next (two layers of compute for the
      // copy to finish) or the forward's end, and released behind a wait on
      // main (State::outgoing).
      state_->outgoing.push_back({std::move(src), block_.last_use, main, state_->layers_put});
      return;
    }
#endif
    host_ = torch::empty(src.sizes(), src.options().device(torch::kCPU));
    host_.copy_(src);
  }

  torch::Tensor Take() override {
    TORCH_CHECK(host_.defined() || device_.defined(),
                "activation offload: a layer input was taken twice (a second backward through the same graph, "
                "retain_graph, is not supported with gradient_checkpointing: offload, or selective on long sequences)");
    TORCH_CHECK(version_.has_value() && version_->current_version() == saved_version_,
                "activation offload: a checkpointed layer input was modified in place after the forward pass");
#ifdef TUNE_TORCH_CUDA
    // Backward has begun (normally the offloader's end already released them).
    state_->ReleaseOutgoing();
#endif
    Fetch();
    torch::Tensor out = std::move(device_);
#ifdef TUNE_TORCH_CUDA
    if (fetched_.has_value()) fetched_->block(c10::cuda::getCurrentCUDAStream(out.device().index()));
#endif
    // Bring the previous layer's input over while this layer recomputes; the
    // first layer's is the last fetch of this backward.
    if (auto prev = prev_.lock()) {
      prev->Fetch();
    } else if (chained_) {
      state_->buffers.Clear();
    }
    return out;
  }

  bool MadeBy(const std::shared_ptr<HostOffloader::State>& state) const { return state_ == state; }
  bool stays() const { return stay_; }

  // Makes `c` this stash's companion (taken out of the chain's end role).
  void SetCompanion(const std::shared_ptr<HostStash>& c) {
    companion_ = c;
    c->chained_ = false;
  }

 private:
  // Starts the copy back to the device (once), then the companion's.
  void Fetch() {
    FetchOwn();
    if (auto c = companion_.lock()) c->Fetch();
  }

  void FetchOwn() {
    if (device_.defined() || !host_.defined()) return;
#ifdef TUNE_TORCH_CUDA
    if (state_->device.is_cuda()) {
      const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream(state_->device.index());
      const c10::cuda::CUDAStream& side = *state_->side;
      // Allocated on main (or a ring buffer main has used), written on side:
      // the memory may still be read by work queued on main, so side first
      // waits for main's queue.
      device_ = state_->buffers.Get(host_.sizes(), host_.options().device(state_->device).pinned_memory(false));
      at::cuda::CUDAEvent queued;
      queued.record(main);
      queued.block(side);
      {
        c10::cuda::CUDAStreamGuard guard(side);
        device_.copy_(host_, /*non_blocking=*/true);  // after this stash's own host copy (same stream)
      }
      c10::cuda::CUDACachingAllocator::recordStream(device_.storage().data_ptr(), side);
      fetched_.emplace();
      fetched_->record(side);
      host_ = torch::Tensor();
      block_.last_use = std::make_shared<at::cuda::CUDAEvent>();
      block_.last_use->record(side);  // the pool waits for this copy before reusing the block
      ReleaseBlock();
      return;
    }
#endif
    device_ = host_.to(state_->device);
    host_ = torch::Tensor();
  }

#ifdef TUNE_TORCH_CUDA
  void ReleaseBlock() {
    host_ = torch::Tensor();
    PinnedPool::Get().Give(std::move(block_));
    block_ = PinnedPool::Block();
  }
  PinnedPool::Block block_;  // CUDA: the pinned memory host_ views
#endif
  std::shared_ptr<HostOffloader::State> state_;
  std::weak_ptr<HostStash> prev_;
  std::weak_ptr<HostStash> companion_;  // fetched with this one (HostOffloader::NewCompanion)
  bool chained_ = true;                  // made by NewStash (false: a companion)
  bool stay_ = false;                    // the tensor stays on its device (NewStash's stay_on_device)
  torch::Tensor host_, device_;
  std::optional<c10::VariableVersion> version_;  // x's counter (shared, not x's storage)
  uint32_t saved_version_ = 0;
#ifdef TUNE_TORCH_CUDA
  std::optional<at::cuda::CUDAEvent> fetched_;
#endif
};

}  // namespace

HostOffloader::HostOffloader(torch::Device device) : state_(std::make_shared<State>(device)) {
#ifdef TUNE_TORCH_CUDA
  if (device.is_cuda()) state_->side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index());
#endif
}

HostOffloader::~HostOffloader() {
#ifdef TUNE_TORCH_CUDA
  // The forward is over (llama.cc ForwardHidden's offloader): the copies
  // still held (the two latest layers put) started a layer or more ago, so
  // this wait is normally free, and the cross-entropy that follows gets their
  // memory.
  state_->ReleaseAllOutgoing();
#endif
}

std::shared_ptr<ops::ActivationStash> HostOffloader::NewStash(bool stay_on_device) {
  auto prev = std::static_pointer_cast<HostStash>(state_->last.lock());
  auto stash = std::make_shared<HostStash>(state_, prev, stay_on_device);
  state_->last = stash;
  return stash;
}

std::shared_ptr<ops::ActivationStash> HostOffloader::NewCompanion(const std::shared_ptr<ops::ActivationStash>& with) {
  auto owner = std::dynamic_pointer_cast<HostStash>(with);
  TORCH_CHECK(owner != nullptr && owner->MadeBy(state_),
              "activation offload: a companion stash needs a stash of the same offloader");
  auto stash = std::make_shared<HostStash>(state_, std::weak_ptr<HostStash>(), owner->stays());
  owner->SetCompanion(stash);
  return stash;
}

}  // namespace tune::model
