#include "worker/trainer/dist/communicator.h"

#include <cstdlib>
#include <stdexcept>

#ifdef TUNE_HAVE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/version.h>
#ifdef TUNE_HAVE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "worker/trainer/logger.h"

namespace tune::train {
namespace {

// torch 2.x split process groups into a ProcessGroup front and per-device Backends
// (ProcessGroupGloo/NCCL derive from Backend); 1.13 has only ProcessGroup.
#if TORCH_VERSION_MAJOR >= 2
using PgBase = c10d::Backend;
#else
using PgBase = c10d::ProcessGroup;
#endif

class LocalCommunicator : public Communicator {
 public:
  LocalCommunicator() : Communicator(0, 1, "none") {}
  void AllReduceSum(torch::Tensor&) override {}
  void Barrier() override {}
};

bool IsLoopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

class ProcessGroupCommunicator : public Communicator {
 public:
  ProcessGroupCommunicator(int rank, int world, std::string backend, c10::intrusive_ptr<PgBase> pg,
                           torch::Device device)
      : Communicator(rank, world, std::move(backend)), pg_(std::move(pg)), device_(device) {}

  void AllReduceSum(torch::Tensor& t) override {
    torch::NoGradGuard no_grad;
    // NCCL needs the tensor on this rank's GPU; Gloo is happiest with CPU.
    const bool stage = t.device() != device_ || !t.is_contiguous();
    std::vector<torch::Tensor> buf{stage ? t.to(device_).contiguous() : t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    pg_->allreduce(buf, opts)->wait();
    if (stage) t.copy_(buf[0]);
  }

  void Barrier() override {
    // An all-reduce of one value is a barrier that works on every backend.
    torch::Tensor one = torch::ones({1}, torch::TensorOptions().dtype(torch::kFloat32).device(device_));
    AllReduceSum(one);
  }

 private:
  c10::intrusive_ptr<PgBase> pg_;
  torch::Device device_;
};

}  // namespace

std::unique_ptr<Communicator> Communicator::Create(const DistEnv& env, const torch::Device& device,
                                                   std::chrono::milliseconds timeout) {
  if (env.world_size == 1) return std::make_unique<LocalCommunicator>();
  c10d::TCPStoreOptions store_opts;
  store_opts.port = static_cast<std::uint16_t>(env.master_port);
  store_opts.isServer = env.rank == 0;
  store_opts.numWorkers = static_cast<std::size_t>(env.world_size);
  store_opts.waitWorkers = true;
  store_opts.timeout = timeout;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, store_opts);
  } catch (const std::exception& e) {
    throw std::runtime_error("rendezvous at " + env.master_addr + ":" + std::to_string(env.master_port) +
                             " failed (rank " + std::to_string(env.rank) + " of " +
                             std::to_string(env.world_size) + "): " + e.what());
  }
  c10::intrusive_ptr<PgBase> pg;
  std::string backend;
#ifdef TUNE_HAVE_C10D_NCCL
  if (device.is_cuda()) {
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, env.rank, env.world_size, opts);
    backend = "nccl";
  }
#endif
  torch::Device comm_device = device;
#ifdef TUNE_HAVE_C10D_GLOO
  if (!pg) {
    auto opts = c10d::ProcessGroupGloo::Options::create();
    opts->timeout = timeout;
    if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname != nullptr && *ifname != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (IsLoopback(env.master_addr)) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, env.rank, env.world_size, opts);
    backend = "gloo";
    comm_device = torch::kCPU;
  }
#endif
  if (!pg) {
    // The PyTorch wheel ships no gloo headers; such builds have NCCL for GPU ranks only.
    throw std::runtime_error("no process-group backend for device " + device.str() +
                             " in this build (Gloo headers were not found at build time); "
                             "run multi-rank CPU jobs with a libtorch that ships Gloo");
  }
  LogInfo("process group ready: backend " + backend + ", rank " + std::to_string(env.rank) + "/" +
          std::to_string(env.world_size) + " via " + env.master_addr + ":" + std::to_string(env.master_port));
  auto comm = std::unique_ptr<Communicator>(
      new ProcessGroupCommunicator(env.rank, env.world_size, backend, pg, comm_device));
  return comm;
}

void Communicator::AllReduceSumBucketed(const std::vector<torch::Tensor>& tensors, int64_t bucket_bytes) {
  if (world_ == 1 || tensors.empty()) return;
  torch::NoGradGuard no_grad;
  const int64_t cap = std::max<int64_t>(1, bucket_bytes / 4);
  size_t i = 0;
  while (i < tensors.size()) {
    // Greedy buckets in parameter order; a tensor larger than the cap forms
    // its own bucket.
    size_t j = i;
    int64_t numel = 0;
    while (j < tensors.size() && (j == i || numel + tensors[j].numel() <= cap)) {
      numel += tensors[j].numel();
      ++j;
    }
    std::vector<torch::Tensor> flat;
    flat.reserve(j - i);
    for (size_t k = i; k < j; ++k) flat.push_back(tensors[k].detach().to(torch::kFloat32).reshape({-1}));
    torch::Tensor bucket = torch::cat(flat);
    AllReduceSum(bucket);
    int64_t off = 0;
    for (size_t k = i; k < j; ++k) {
      const int64_t n = tensors[k].numel();
      tensors[k].copy_(bucket.narrow(0, off, n).view(tensors[k].sizes()));
      off += n;
    }
    i = j;
  }
}

}  // namespace tune::train
