// Data-parallel communication for tune-train ranks.
//
// Rendezvous: a c10d TCPStore at MASTER_ADDR:MASTER_PORT (rank 0 hosts it).
// Backend: NCCL for CUDA tensors when this torch build has c10d NCCL
// (TUNE_HAVE_C10D_NCCL), otherwise Gloo (CPU; Gloo also handles CUDA tensors
// through host staging). World size 1 creates no process group and every
// collective is a no-op. Gloo binds to GLOO_SOCKET_IFNAME when set, to
// 127.0.0.1 when MASTER_ADDR is a loopback address, else to the interface of
// this host's name.
//
// All collectives are blocking and must be called by every rank in the same
// order (the training loop guarantees this: the stop flag is agreed upon
// at step boundaries via AllReduceSum).
#ifndef TUNE_WORKER_TRAINER_DIST_COMMUNICATOR_H_
#define TUNE_WORKER_TRAINER_DIST_COMMUNICATOR_H_

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "worker/trainer/config.h"

namespace tune::train {

class Communicator {
 public:
  // Connects all ranks. Throws std::runtime_error naming the address on
  // timeout/failure.
  static std::unique_ptr<Communicator> Create(const DistEnv& env, const torch::Device& device,
                                              std::chrono::milliseconds timeout = std::chrono::minutes(10));
  virtual ~Communicator() = default;

  int rank() const { return rank_; }
  int world_size() const { return world_; }
  std::string backend() const { return backend_; }

  // In-place SUM over ranks. `t` may live on any device; it is staged to the
  // backend's device when needed.
  virtual void AllReduceSum(torch::Tensor& t) = 0;
  // In-place SUM of many tensors (gradients), flattened into fp32 buckets of
  // about `bucket_bytes`, one collective per bucket. Undefined tensors are
  // not allowed (callers materialise zero grads first).
  void AllReduceSumBucketed(const std::vector<torch::Tensor>& tensors, int64_t bucket_bytes = 25 << 20);
  virtual void Barrier() = 0;

 protected:
  Communicator(int rank, int world, std::string backend) : rank_(rank), world_(world), backend_(std::move(backend)) {}

 private:
  int rank_;
  int world_;
  std::string backend_;
};

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_DIST_COMMUNICATOR_H_
