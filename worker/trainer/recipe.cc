#include "worker/trainer/recipe.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <ATen/record_function.h>
#include <torch/torch.h>
#include <torch/version.h>

#ifdef TUNE_TORCH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#endif

#include "worker/trainer/checkpoint/checkpoint.h"
#include "worker/trainer/checkpoint/state.h"
#include "worker/trainer/data/prepare.h"
#include "worker/trainer/data/tokenizer.h"
#include "worker/trainer/dist/communicator.h"
#include "worker/trainer/events.h"
#include "worker/trainer/export/peft_export.h"
#include "worker/trainer/logger.h"
#include "worker/trainer/model/llama.h"
#include "worker/trainer/model/llama_ops.h"
#include "worker/trainer/model/cuda_ops.h"
#include "worker/trainer/plan/memory_plan.h"
#include "worker/trainer/train/collate.h"
#include "worker/trainer/train/loss_scaler.h"
#include "worker/trainer/train/optimizer.h"
#include "worker/trainer/train/sampler.h"
#include "worker/trainer/train/schedule.h"
#include "worker/trainer/train/step_profiler.h"

namespace tune::train {
namespace {

namespace fs = std::filesystem;

std::atomic<bool> g_stop_requested{false};

extern "C" void HandleStopSignal(int) { g_stop_requested.store(true); }

void InstallSignalHandlers() {
  struct sigaction sa {};
  sa.sa_handler = HandleStopSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // blocking I/O in collectives resumes; the flag is read at step boundaries
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
}

// A failure whose `details` go into the error event next to the message.
class DetailedError : public std::runtime_error {
 public:
  DetailedError(const std::string& message, nlohmann::json details)
      : std::runtime_error(message), details_(std::move(details)) {}
  const nlohmann::json& details() const { return details_; }

 private:
  nlohmann::json details_;
};

// NaN policy exhausted (exit 4); details: the diagnosis.
class NanAbortError : public DetailedError {
 public:
  using DetailedError::DetailedError;
};

// Memory exhaustion that does not arrive as c10::OutOfMemoryError: cuBLAS
// handle/workspace creation (CUBLAS_STATUS_ALLOC_FAILED, "the resource
// allocation failed"), a CUDA allocation inside our kernels (cuda_ops reports
// the kernel's status text: "out of memory"), libtorch's CPU allocator
// ("DefaultCPUAllocator: not enough memory"). None is a sticky CUDA error, so
// the step can be redone. The one place that classifies these messages.
bool IsOutOfMemory(const c10::Error& e) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&e) != nullptr) return true;
  const std::string m = e.what_without_backtrace();
  return m.find("out of memory") != std::string::npos || m.find("not enough memory") != std::string::npos ||
         m.find("ALLOC_FAILED") != std::string::npos ||
         m.find("cudaErrorMemoryAllocation") != std::string::npos ||
         m.find("allocation failed") != std::string::npos;
}

// OOM with nothing left to step down to (exit 3); details: the plan that failed.
class OomExhaustedError : public DetailedError {
 public:
  using DetailedError::DetailedError;
};

// PYTORCH_CUDA_ALLOC_CONF is read once, at the caching allocator's first
// use, so this runs before any CUDA call. Expandable segments (torch >= 2.1)
// let a segment grow in place instead of leaving differently sized holes:
// the "phantom" OOM with plenty of reserved-but-free memory goes away. A
// user's own setting wins.
//
// With faults.gpu_memory_cap_gb the classic segment allocator is used: its
// memory-fraction limit is checked on every device allocation, which is what
// the cap relies on; expandable segments grow mappings in place.
void ConfigureCudaAllocator(bool memory_cap) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
  if (const char* user = std::getenv("PYTORCH_CUDA_ALLOC_CONF"); user != nullptr && *user != '\0') {
    LogInfo(std::string("PYTORCH_CUDA_ALLOC_CONF=") + user + " (user setting kept)");
    return;
  }
  const char* conf = memory_cap ? "expandable_segments:False" : "expandable_segments:True";
  setenv("PYTORCH_CUDA_ALLOC_CONF", conf, /*overwrite=*/0);
  LogInfo(std::string("PYTORCH_CUDA_ALLOC_CONF=") + conf + (memory_cap ? " (faults.gpu_memory_cap_gb)" : ""));
#else
  (void)memory_cap;
#endif
}

// Hands the caching allocator's free blocks back to the driver between
// phases (after load, after an OOM, before export): the next phase allocates
// differently shaped tensors, and cached blocks of the old shapes only fragment.
void ReleaseCachedMemory(const torch::Device& device) {
#ifdef TUNE_TORCH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#else
  (void)device;
#endif
}

struct VramStats {
  // peak: allocated bytes since the start. peak_active also counts freed
  // blocks still waiting for another stream's use (recordStream): well above
  // peak, they are memory reserved grew for that no tensor held.
  // peak_reserved: the most the allocator held at once since the start (the
  // load included), what a GPU of that size must have; `reserved` at a step's
  // end can be below it after an OOM step-down released the cache.
  double allocated = 0, reserved = 0, peak = 0, peak_active = 0, peak_reserved = 0;
};

VramStats ReadVram(const torch::Device& device) {
  VramStats v;
#ifdef TUNE_TORCH_CUDA
  if (device.is_cuda()) {
    // Index 0 of the stat arrays is the aggregate over pool types in every
    // torch version we build against (1.13 .. 2.x).
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device.index()));
    v.allocated = static_cast<double>(stats.allocated_bytes[0].current);
    v.reserved = static_cast<double>(stats.reserved_bytes[0].current);
    v.peak = static_cast<double>(stats.allocated_bytes[0].peak);
    v.peak_active = static_cast<double>(stats.active_bytes[0].peak);
    v.peak_reserved = static_cast<double>(stats.reserved_bytes[0].peak);
  }
#endif
  return v;
}

// One log line on how the caching allocator holds its reserved memory at
// `when`: per large segment, its runs of allocated (A), freed but waiting for
// another stream's use to finish (W: recordStream), and free (F) blocks in
// address order. Free runs between allocated ones are memory that reserved
// counts but no tensor uses: the fragmentation that the plan's reserved slack
// has to cover.
void LogAllocatorLayout(const torch::Device& device, const std::string& when) {
#ifdef TUNE_TORCH_CUDA
  if (!device.is_cuda()) return;
#if TORCH_VERSION_MAJOR >= 2
  const auto segments = c10::cuda::CUDACachingAllocator::snapshot().segments;
#else
  const auto segments = c10::cuda::CUDACachingAllocator::snapshot();
#endif
  auto mib = [](double bytes) { return std::to_string((static_cast<int64_t>(bytes) + (1 << 19)) >> 20); };
  int64_t small = 0;
  std::string layout;
  for (const auto& segment : segments) {
    if (!segment.is_large) {
      small += segment.total_size;
      continue;
    }
    layout += " [";
    bool first = true;
    int64_t run = 0;
    char run_state = 'F';
    auto flush = [&]() {
      if (run == 0) return;
      layout += std::string(first ? "" : " ") + run_state + mib(run);
      first = false;
    };
    for (const auto& block : segment.blocks) {
      const char state = block.allocated ? 'A' : block.active ? 'W' : 'F';
      if (run > 0 && state != run_state) {
        flush();
        run = 0;
      }
      run_state = state;
      run += block.size;
    }
    flush();
    layout += "]";
  }
  const VramStats vram = ReadVram(device);
  LogInfo("allocator " + when + ": " + mib(vram.reserved) + " MiB reserved, " + mib(vram.allocated) +
          " MiB allocated (peaks since the start: " + mib(vram.peak) + " allocated, " + mib(vram.peak_active) +
          " active), " + mib(small) + " MiB in small-block segments; large segments (MiB):" + layout);
#else
  (void)device;
#endif
}

// Appends to a bounded history (the NAN_ABORT diagnosis shows the last few).
void PushRecent(std::deque<double>* history, double value) {
  constexpr size_t kKeep = 10;
  history->push_back(value);
  while (history->size() > kKeep) history->pop_front();
}

std::string JoinNumbers(const std::deque<double>& values) {
  std::string out;
  for (double v : values) {
    if (!out.empty()) out += ", ";
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.4g", v);
    out += buf;
  }
  return "[" + out + "]";
}

// Per-step generator seed: the same for a step whatever happened before it,
// so resumed and rolled-back runs draw the same dropout masks.
uint64_t StepSeed(uint64_t seed, int64_t step, int rank) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(step + 1) +
               0xbf58476d1ce4e5b9ULL * static_cast<uint64_t>(rank + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return (z ^ (z >> 31)) & 0x7fffffffffffffffULL;
}

// Total and free memory of the device: cudaMemGetInfo on the current
// (cuda:LOCAL_RANK) device, or the host's RAM and MemAvailable on CPU.
struct DeviceMemory {
  int64_t total = 0;
  int64_t free = 0;
};

DeviceMemory QueryDeviceMemory(const torch::Device& device) {
#ifdef TUNE_TORCH_CUDA
  if (device.is_cuda()) {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) return {};
    return {static_cast<int64_t>(total_b), static_cast<int64_t>(free_b)};
  }
#endif
  return {static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGESIZE)),
          plan::HostMemAvailableBytes()};
}

std::string LoraWhere(const std::string& name) {
  // "model.layers.0.self_attn.q_proj.lora_A.weight" -> "layers.0.self_attn.q_proj.lora_A"
  std::string s = name;
  if (s.rfind("model.", 0) == 0) s = s.substr(6);
  const std::string suffix = ".weight";
  if (s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0) {
    s.resize(s.size() - suffix.size());
  }
  return s;
}

class Trainer {
 public:
  Trainer(TrainConfig cfg, EventSink* events, const TrainRunOptions& run)
      : cfg_(std::move(cfg)),
        events_(events),
        stop_after_(run.stop_after_step),
        profiler_(run.profile_first, run.profile_last, cfg_.dist.rank == 0 ? run.profile_out : ""),
        start_(Clock::now()) {}

  void Setup();
  // Returns kExitOk or kExitTerminated.
  int Train();

 private:
  using Clock = std::chrono::steady_clock;

  bool IsRoot() const { return cfg_.dist.rank == 0; }
  double Elapsed() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  void SetupDevice();
  // All ranks compute in the same dtype (precision auto may differ per GPU).
  void AgreeOnPrecision();
  void LoadData();
  void LoadModel();
  // Runs the memory planner (after the device and the data are known,
  // before the model takes memory) and applies its split to cfg_.
  void PlanMemory();
  void EmitPlan();
  void MaybeResume();
  void RestoreFrom(const CheckpointRef& ref);
  // Runs one step; false when the ranks agreed to stop before it.
  bool RunStep(int64_t step, bool* rolled_back);
  // After an OOM on any rank (all ranks call it, with the same state): frees
  // what the failed attempt held and steps the plan down one notch: halve the
  // micro-batch (grad_accum grows so the effective batch is unchanged), then
  // checkpointing, then activation offload. Throws OomExhaustedError when
  // nothing is left.
  void StepDownAfterOom(int64_t step, int attempt, int ranks_oom, const std::string& message);
  nlohmann::json CurrentPlan() const;
  std::string FirstNonFiniteGrad();
  void SaveCheckpoint();
  void Finish();
  ExampleView View(int64_t index) const;
  nlohmann::json RunInfo() const;

  TrainConfig cfg_;
  EventSink* events_;
  int stop_after_;
  StepProfiler profiler_;
  Clock::time_point start_;

  torch::Device device_ = torch::kCPU;
  torch::ScalarType dtype_ = torch::kFloat32;
  std::unique_ptr<Communicator> comm_;
  std::unique_ptr<data::Tokenizer> tokenizer_;
  data::PreparedDataset dataset_;
  int32_t pad_id_ = 0;
  int64_t longest_example_ = 0;
  std::shared_ptr<model::LlamaForCausalLM> model_;
  NamedTensors lora_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<StepSampler> sampler_;
  std::unique_ptr<LrSchedule> schedule_;
  int64_t max_steps_ = 0;
  TrainerState state_;
  int64_t last_checkpoint_step_ = -1;
  plan::PlanInputs plan_inputs_;  // what the plan was made from (OOM re-planning reuses it)
  plan::MemoryPlan plan_;
  std::set<int64_t> injected_nan_steps_;  // faults.nan_at_steps fire once per step
  std::set<int64_t> injected_oom_steps_;  // faults.oom_at_steps likewise
  LossScaler scaler_{false};              // enabled for fp16 compute
  // Last ~10 steps, for the NAN_ABORT diagnosis.
  std::deque<double> recent_losses_;
  std::deque<double> recent_grad_norms_;
};

void Trainer::SetupDevice() {
  if (cfg_.use_cuda) {
    ConfigureCudaAllocator(cfg_.spec.faults.gpu_memory_cap_gb > 0);
    if (!torch::cuda::is_available()) {
      throw ConfigError("resources.gpus is " + std::to_string(cfg_.spec.resources.gpus) +
                        " but no CUDA device is usable (or this libtorch has no CUDA); use resources.cpu_ranks "
                        "to train on CPU");
    }
    // TUNE_DISABLE_CUDNN_ATTENTION=1 keeps torch's own order (flash first), for A/B runs.
    if (plan::PrefersCudnnAttention(TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR) && model::ops::PreferCudnnAttention()) {
      LogInfo("attention: SDPA with cuDNN first");
    }
    const int count = static_cast<int>(torch::cuda::device_count());
    if (cfg_.device_index >= count) {
      throw ConfigError("LOCAL_RANK=" + std::to_string(cfg_.device_index) + " but only " + std::to_string(count) +
                        " CUDA device(s) are visible");
    }
    device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(cfg_.device_index));
#ifdef TUNE_TORCH_CUDA
    // Every rank sees all of the attempt's GPUs; make cuda:LOCAL_RANK current
    // so runtime queries (cudaMemGetInfo) and the CUDA context land on it, not
    // on GPU 0.
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(cfg_.device_index));
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(cfg_.device_index));
    if (cfg_.spec.training.precision == "auto" && prop->major < 8) {
      // bf16 tensor cores start at sm_80; fp16 needs loss scaling.
      cfg_.compute_dtype = "fp16";
      cfg_.precision_note = "auto: fp16 with dynamic loss scaling (" + std::string(prop->name) +
                            " is sm_" + std::to_string(prop->major) + std::to_string(prop->minor) +
                            ", no bf16)";
      events_->EmitLog("warning", "training.precision auto: " + std::string(prop->name) +
                                      " has no bf16; training in fp16 with dynamic loss scaling");
    }
    if (const double cap_gb = cfg_.spec.faults.gpu_memory_cap_gb; cap_gb > 0) {
      // faults.gpu_memory_cap_gb: a testing aid that makes a big GPU behave
      // like a small one; the caching allocator raises a real OOM past it.
      constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;  // the cap is in GiB, as torch reports memory
      const double total = static_cast<double>(prop->totalGlobalMem);
      const double fraction = std::min(1.0, cap_gb * kGiB / total);
      // The caching allocator initialises lazily on the first allocation and
      // refuses setMemoryFraction before that ("Allocator not initialized").
      (void)torch::empty({1}, torch::TensorOptions().device(device_));
      c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction,
                                                         static_cast<c10::DeviceIndex>(cfg_.device_index));
      events_->EmitLog("info", "faults.gpu_memory_cap_gb: allocator capped at " + std::to_string(cap_gb) +
                                   " GiB (" + std::to_string(fraction) + " of " + std::to_string(total / kGiB) +
                                   " GiB)");
    }
#endif
  } else {
    device_ = torch::kCPU;
    at::set_num_threads(cfg_.cpu_threads);
    if (cfg_.spec.faults.gpu_memory_cap_gb > 0) {
      events_->EmitLog("info", "faults.gpu_memory_cap_gb is ignored on CPU ranks (it caps the CUDA allocator); "
                               "use faults.oom_at_steps to exercise OOM recovery on CPU");
    }
  }
  dtype_ = cfg_.compute_dtype == "bf16"   ? torch::kBFloat16
           : cfg_.compute_dtype == "fp16" ? torch::kHalf
                                          : torch::kFloat32;
  scaler_ = LossScaler(cfg_.compute_dtype == "fp16");
  LogInfo("device " + device_.str() + ", compute " + cfg_.compute_dtype + " (" + cfg_.precision_note + ")");
}

void Trainer::AgreeOnPrecision() {
  if (cfg_.dist.world_size == 1) return;
  // precision auto picks per GPU (fp16 below sm_80). Gradients of ranks with
  // and without a loss scale must not be summed: if any rank computes in
  // fp16, all do.
  torch::Tensor fp16 = torch::tensor({cfg_.compute_dtype == "fp16" ? 1.0 : 0.0}, torch::kFloat64);
  comm_->AllReduceSum(fp16);
  if (fp16.item<double>() > 0 && cfg_.compute_dtype != "fp16") {
    cfg_.compute_dtype = "fp16";
    cfg_.precision_note = "auto: fp16 with dynamic loss scaling because another rank's GPU has no bf16";
    dtype_ = torch::kHalf;
    scaler_ = LossScaler(true);
    events_->EmitLog("warning", "training.precision auto: another rank's GPU has no bf16; all ranks train in fp16 "
                                "with dynamic loss scaling");
  }
}

void Trainer::Setup() {
  // Checked first: a fresh run must not mix its checkpoints with an old run's.
  if (!cfg_.cli.resume) {
    if (const auto latest = LatestCheckpoint(cfg_.checkpoint_dir)) {
      throw ConfigError("output dir " + cfg_.output_dir + " already holds checkpoint " + latest->path +
                        "; pass --resume to continue that run, or set output.dir to a new directory");
    }
  }
  SetupDevice();
  comm_ = Communicator::Create(cfg_.dist, device_);
  AgreeOnPrecision();
  LoadData();
  PlanMemory();
  LoadModel();
  optimizer_ = std::make_unique<AdamW>(
      [&] {
        std::vector<torch::Tensor> params;
        for (auto& [name, t] : lora_) params.push_back(t);
        return params;
      }(),
      [&] {
        AdamWOptions o;
        o.weight_decay = cfg_.spec.training.weight_decay;
        o.eight_bit = cfg_.spec.training.optimizer == "adamw_8bit";
        return o;
      }());
  sampler_ = std::make_unique<StepSampler>(static_cast<int64_t>(dataset_.examples.size()),
                                           cfg_.spec.training.effective_batch_size,
                                           static_cast<uint64_t>(cfg_.spec.training.seed));
  max_steps_ = cfg_.spec.training.max_steps > 0 ? cfg_.spec.training.max_steps
                                                : sampler_->StepsForEpochs(cfg_.spec.training.epochs);
  schedule_ = std::make_unique<LrSchedule>(ParseScheduleKind(cfg_.spec.training.lr_scheduler),
                                           cfg_.spec.training.learning_rate, cfg_.spec.training.warmup_steps,
                                           max_steps_);
  EmitPlan();
  MaybeResume();
}

void Trainer::LoadData() {
  tokenizer_ = data::Tokenizer::FromDir(cfg_.spec.model);
  dataset_ = data::PrepareDataset(cfg_.spec, *tokenizer_);
  if (IsRoot()) events_->Emit("preflight", dataset_.preflight_report);
  if (dataset_.examples.empty()) throw data::DataError("the dataset has no trainable examples");
  pad_id_ = tokenizer_->pad_id().value_or(tokenizer_->eos_id() >= 0 ? tokenizer_->eos_id() : 0);
  for (const auto& e : dataset_.examples) {
    longest_example_ = std::max<int64_t>(longest_example_, static_cast<int64_t>(e.input_ids.size()));
  }
  LogInfo("dataset: " + std::to_string(dataset_.examples.size()) + " sequences, longest " +
          std::to_string(longest_example_) + " tokens");
}

void Trainer::LoadModel() {
  model::LoadOptions opts;
  opts.base = cfg_.spec.quantization.base;
  opts.double_quant = cfg_.spec.quantization.double_quant;
  opts.block_size = cfg_.spec.quantization.block_size;
  opts.device = device_;
  opts.compute_dtype = dtype_;
  opts.lora.r = cfg_.spec.lora.r;
  opts.lora.alpha = cfg_.spec.lora.alpha;
  opts.lora.dropout = cfg_.spec.lora.dropout;
  opts.lora.targets = cfg_.spec.lora.targets;
  opts.lora.rslora = cfg_.spec.lora.rslora;
  opts.seed = static_cast<uint64_t>(cfg_.spec.training.seed);
  opts.host_embedding = cfg_.gradient_checkpointing && cfg_.activation_offload;  // see SetActivationOffload
  const auto t0 = Clock::now();
  model_ = model::LlamaForCausalLM::Load(cfg_.spec.model, opts);
  model_->SetGradientCheckpointing(cfg_.gradient_checkpointing);
  model_->SetActivationOffload(cfg_.gradient_checkpointing && cfg_.activation_offload);
  model_->SetSelectiveRecompute(cfg_.selective_recompute);
  model_->SetTraining(true);
  lora_ = model_->LoraParameters();
  if (lora_.empty()) throw ConfigError("lora.targets selects no module of the model; nothing would train");
  int64_t n = 0;
  for (const auto& [name, t] : lora_) n += t.numel();
  LogInfo("model loaded in " + std::to_string(std::chrono::duration<double>(Clock::now() - t0).count()) +
          " s: base " + cfg_.spec.quantization.base + ", " + std::to_string(lora_.size()) + " LoRA tensors, " +
          std::to_string(n) + " trainable parameters");
}

void Trainer::PlanMemory() {
  namespace fs = std::filesystem;
  const model::LlamaConfig config = model::LlamaConfig::FromJsonFile((fs::path(cfg_.spec.model) / "config.json").string());
  // Memory the planner may plan with; faults.gpu_memory_cap_gb caps the allocator, so the plan too.
  int64_t free_bytes = QueryDeviceMemory(device_).free;
  if (const double cap_gb = cfg_.spec.faults.gpu_memory_cap_gb; cfg_.use_cuda && cap_gb > 0) {
    free_bytes = std::min<int64_t>(free_bytes, static_cast<int64_t>(cap_gb * (1 << 30)));
  }
  // The ranks of one host share its RAM: CPU ranks each hold a whole model,
  // GPU ranks with offload their layer inputs and embedding (selective on
  // long sequences, the inputs and q/k/v outputs).
  const char* local = std::getenv("LOCAL_WORLD_SIZE");
  const long ranks_here = local != nullptr ? std::max(1L, std::strtol(local, nullptr, 10)) : 1L;
  int64_t host_free_bytes = plan::HostMemAvailableBytes() / ranks_here;
  if (!cfg_.use_cuda) free_bytes /= ranks_here;
  if (cfg_.dist.world_size > 1) {
    // Every rank must take the same split: plan for the rank with least memory.
    torch::Tensor all = torch::zeros({2, cfg_.dist.world_size}, torch::kFloat64);
    all[0][cfg_.dist.rank] = static_cast<double>(free_bytes);
    all[1][cfg_.dist.rank] = static_cast<double>(host_free_bytes);
    comm_->AllReduceSum(all);
    free_bytes = static_cast<int64_t>(all[0].min().item<double>());
    host_free_bytes = static_cast<int64_t>(all[1].min().item<double>());
  }
  plan_inputs_ = plan::InputsFromSpec(cfg_.spec, config, cfg_.compute_dtype, cfg_.dist.world_size, cfg_.use_cuda,
                                      plan::AttentionFor(TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR), free_bytes);
  plan_inputs_.fused_kernels = cfg_.use_cuda && dtype_ == torch::kBFloat16 && model::cuda_ops::Enabled();
  plan::SetTorchBuild(plan_inputs_, TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR);
  if (cfg_.use_cuda) plan_inputs_.host_free_bytes = host_free_bytes;
  // The longest example bounds every micro-batch's length (Collate pads to it).
  plan_inputs_.seq_len = std::max<int64_t>(1, std::min<int64_t>(longest_example_, cfg_.spec.dataset.max_seq_length));
  const bool any_auto = plan_inputs_.micro_batch_size <= 0 || plan_inputs_.checkpointing == "auto";
  if (cfg_.use_cuda) {
    plan_ = plan::ChoosePlan(plan_inputs_);
  } else {
    // CPU: today's split (TrainConfig: micro = effective / ranks, checkpointing
    // on from 1024 tokens) stays, the golden loss curves depend on it; the
    // planner only checks it, and re-plans auto fields when host memory is short.
    plan::PlanInputs today = plan_inputs_;
    today.micro_batch_size = cfg_.batch.micro_batch_size;
    today.checkpointing = !cfg_.gradient_checkpointing ? "off"
                          : cfg_.activation_offload  ? "offload"
                          : cfg_.selective_recompute ? "selective"
                                                     : "on";
    plan_ = plan::ChoosePlan(today);
    plan_.reason = "CPU default split (micro-batch = effective / ranks, checkpointing on from 1024 tokens)";
    if (!plan_.fits && any_auto) {
      plan::MemoryPlan replanned = plan::ChoosePlan(plan_inputs_);
      if (replanned.fits) {
        replanned.reason = "host memory (MemAvailable) is too small for the CPU default split; " + replanned.reason;
        plan_ = replanned;
      }
    }
  }
  cfg_.batch.micro_batch_size = plan_.micro_batch_size;
  cfg_.batch.grad_accum = plan_.grad_accum;
  cfg_.gradient_checkpointing = plan_.checkpointing != plan::Checkpointing::kOff;
  cfg_.activation_offload = plan_.checkpointing == plan::Checkpointing::kOffload;
  cfg_.selective_recompute = plan_.checkpointing == plan::Checkpointing::kSelective;
  if (!plan_.fits) {
    events_->EmitLog("warning", "memory plan does not fit: predicted " + plan::FormatBytes(plan_.breakdown.reserved) +
                                    " reserved vs a budget of " + plan::FormatBytes(plan_.budget_bytes) +
                                    " (" + plan_.ShortfallText() + "); " + plan_.fix +
                                    ". Training anyway: an OOM steps the plan down at run time");
  }
}

void Trainer::EmitPlan() {
  nlohmann::json event = {
      {"micro_batch_size", cfg_.batch.micro_batch_size},
      {"grad_accum", cfg_.batch.grad_accum},
      {"world_size", cfg_.dist.world_size},
      {"effective_batch_size", cfg_.spec.training.effective_batch_size},
      {"gradient_checkpointing", cfg_.gradient_checkpointing},
      {"checkpointing_mode", plan::CheckpointingName(plan_.checkpointing)},
      {"precision", cfg_.compute_dtype},
      {"device", device_.str()},
      {"predicted_peak_bytes", plan_.breakdown.peak_allocated},
      {"predicted_reserved_bytes", plan_.breakdown.reserved},
      {"breakdown", plan_.breakdown.ToJson()},
      {"free_bytes", plan_.free_bytes},
      {"budget_bytes", plan_.budget_bytes},
      {"fits", plan_.fits},
      {"reason", plan_.reason},
      {"seq_len", plan_inputs_.seq_len},
      {"attention", plan::AttentionKernelName(plan_inputs_.attention)},
      {"fused_kernels", plan_inputs_.fused_kernels},
      {"device_memory_bytes", QueryDeviceMemory(device_).total},
      {"max_steps", max_steps_},
      {"optimizer", cfg_.spec.training.optimizer},
      {"backend", comm_->backend()},
  };
  if (plan_.host_budget_bytes > 0) event["host_budget_bytes"] = plan_.host_budget_bytes;
  if (!plan_.fits) {
    event["shortfall_bytes"] = plan_.shortfall_bytes;
    if (plan_.host_shortfall_bytes > 0) event["host_shortfall_bytes"] = plan_.host_shortfall_bytes;
    event["fix"] = plan_.fix;
  }
  events_->Emit("plan", event);
  if (IsRoot()) {
    std::cout << max_steps_ << " steps on " << device_.str() << "\n" << plan::FormatPlan(plan_inputs_, plan_) << std::flush;
  }
}

nlohmann::json Trainer::RunInfo() const {
  return {{"max_steps", max_steps_},
          {"world_size", cfg_.dist.world_size},
          {"effective_batch_size", cfg_.spec.training.effective_batch_size},
          {"seed", cfg_.spec.training.seed},
          {"num_examples", dataset_.examples.size()},
          {"optimizer", cfg_.spec.training.optimizer},
          {"scheduler",
           {{"kind", ScheduleKindName(schedule_->kind())},
            {"base_lr", schedule_->base_lr()},
            {"warmup_steps", schedule_->warmup_steps()},
            {"total_steps", schedule_->total_steps()}}},
          // The split in use when the checkpoint was written (after any OOM
          // step-down). Informational only: the effective batch is what the
          // math depends on, so a resume starts from the planned split again
          // (it may run on a different GPU) and steps down anew if needed.
          {"batch_split", CurrentPlan()},
          {"job", cfg_.spec.name}};
}

void Trainer::RestoreFrom(const CheckpointRef& ref) {
  LoadedTrainingState loaded = ReadTrainingState(ref.path, optimizer_.get(), device_);
  const nlohmann::json& m = loaded.meta;
  auto expect = [&](const char* key, const nlohmann::json& want, const std::string& fix) {
    if (m.contains(key) && m.at(key) != want) {
      throw ConfigError("checkpoint " + ref.path + " was written with " + key + "=" + m.at(key).dump() +
                        " but this run has " + want.dump() + "; " + fix);
    }
  };
  expect("effective_batch_size", cfg_.spec.training.effective_batch_size,
         "resume with the same training.effective_batch_size or start a new output.dir");
  expect("seed", cfg_.spec.training.seed, "resume with the same training.seed or start a new output.dir");
  expect("num_examples", dataset_.examples.size(),
         "the dataset changed since the checkpoint; restore it or start a new output.dir");
  expect("optimizer", cfg_.spec.training.optimizer, "resume with the same training.optimizer");
  for (auto& [name, t] : loaded.lora) t = t.to(device_);
  model_->LoadLoraState(loaded.lora);
  state_ = loaded.state;
  const DataPosition expected = sampler_->PositionBeforeStep(state_.step + 1);
  if (expected.epoch != state_.next_position.epoch || expected.index != state_.next_position.index) {
    throw std::runtime_error("checkpoint " + ref.path + ": data position (epoch " +
                             std::to_string(state_.next_position.epoch) + ", index " +
                             std::to_string(state_.next_position.index) + ") does not match step " +
                             std::to_string(state_.step));
  }
  last_checkpoint_step_ = state_.step;
}

void Trainer::MaybeResume() {
  if (!cfg_.cli.resume) return;  // Setup refused existing checkpoints already
  const auto latest = LatestCheckpoint(cfg_.checkpoint_dir);
  if (!latest) {
    events_->EmitLog("info", "--resume: no checkpoint in " + cfg_.checkpoint_dir + "; starting at step 1");
    return;
  }
  RestoreFrom(*latest);
  events_->EmitLog("info", "resumed from " + latest->path + " at step " + std::to_string(state_.step) +
                               " (epoch " + std::to_string(state_.next_position.epoch) + ", index " +
                               std::to_string(state_.next_position.index) + ")");
}

ExampleView Trainer::View(int64_t index) const {
  const data::Example& e = dataset_.examples[static_cast<size_t>(index)];
  return ExampleView{&e.input_ids, &e.labels, &e.position_ids, &e.segment_ids};
}

nlohmann::json Trainer::CurrentPlan() const {
  return {{"micro_batch_size", cfg_.batch.micro_batch_size},
          {"grad_accum", cfg_.batch.grad_accum},
          {"world_size", cfg_.dist.world_size},
          {"effective_batch_size", cfg_.spec.training.effective_batch_size},
          {"gradient_checkpointing", cfg_.gradient_checkpointing},
          {"offload", cfg_.activation_offload},
          {"selective", cfg_.selective_recompute},
          {"precision", cfg_.compute_dtype},
          {"max_seq_length", cfg_.spec.dataset.max_seq_length},
          {"device", device_.str()}};
}

void Trainer::StepDownAfterOom(int64_t step, int attempt, int ranks_oom, const std::string& message) {
  optimizer_->ZeroGrad();
  ReleaseCachedMemory(device_);
  const nlohmann::json failed = CurrentPlan();
  const std::string text =
      message.empty() ? std::to_string(ranks_oom) + " other rank(s) ran out of memory" : message;
  BatchPlan& b = cfg_.batch;
  std::string change;
  if (b.micro_batch_size > 1) {
    // Largest micro-batch <= half that still divides this rank's share, so
    // micro x accum (and the effective batch) stays exact.
    const int per_rank = b.micro_batch_size * b.grad_accum;
    int micro = b.micro_batch_size / 2;
    while (per_rank % micro != 0) --micro;
    change = "micro-batch " + std::to_string(b.micro_batch_size) + " -> " + std::to_string(micro);
    b.micro_batch_size = micro;
    b.grad_accum = per_rank / micro;
  } else if (!cfg_.gradient_checkpointing) {
    cfg_.gradient_checkpointing = true;
    model_->SetGradientCheckpointing(true);
    change = "gradient checkpointing on";
  } else if (cfg_.selective_recompute && cfg_.spec.lora.dropout == 0) {
    // (With LoRA dropout the model already recomputes whole layers.)
    // Selective keeps one more [tokens, hidden] tensor per layer.
    cfg_.selective_recompute = false;
    model_->SetSelectiveRecompute(false);
    change = "selective recompute off (whole layers recomputed)";
  } else if (!cfg_.activation_offload && device_.is_cuda()) {  // offload moves device memory to the host
    cfg_.activation_offload = true;
    model_->SetActivationOffload(true);
    change = "activation offload on";
  } else {
    throw OomExhaustedError(
        "out of memory at step " + std::to_string(step) + " with the smallest plan left (micro-batch 1 x grad-accum " +
            std::to_string(b.grad_accum) + " x " + std::to_string(cfg_.dist.world_size) +
            " rank(s), gradient checkpointing on, " + (cfg_.activation_offload ? "activation offload on, " : "") +
            cfg_.compute_dtype +
            ", max_seq_length " + std::to_string(cfg_.spec.dataset.max_seq_length) + " on " + device_.str() +
            "): " + text +
            ". Lower dataset.max_seq_length, use quantization.base: nf4, lower lora.r, or use a GPU with more memory",
        {{"step", step}, {"plan", failed}});
  }
  if (IsRoot()) {
    // One event per recovery (all ranks take the same decision); the server
    // counts these into tune_oom_recoveries_total.
    events_->Emit("oom_recovered", {{"step", step},
                                    {"micro_batch_size", b.micro_batch_size},
                                    {"grad_accum", b.grad_accum},
                                    {"gradient_checkpointing", cfg_.gradient_checkpointing},
                                    {"offload", cfg_.activation_offload},
                                    {"selective", cfg_.selective_recompute},
                                    {"attempt", attempt},
                                    {"ranks_oom", ranks_oom},
                                    {"message", text}});
  }
  LogWarning("OOM at step " + std::to_string(step) + " on " + std::to_string(ranks_oom) + " rank(s): " + change +
             "; redoing the step (micro-batch " + std::to_string(b.micro_batch_size) + " x grad-accum " +
             std::to_string(b.grad_accum) + ")");
}

std::string Trainer::FirstNonFiniteGrad() {
  for (auto& [name, t] : lora_) {
    const torch::Tensor& g = t.grad();
    if (g.defined() && !torch::isfinite(g).all().item<bool>()) return LoraWhere(name);
  }
  return "grad_norm";
}

bool Trainer::RunStep(int64_t step, bool* rolled_back) {
  *rolled_back = false;
  const auto t0 = Clock::now();
  const int rank = cfg_.dist.rank, world = cfg_.dist.world_size;

  const std::vector<int64_t> shard = RankShard(sampler_->StepIndices(step), rank, world);
  double local_supervised = 0, local_tokens = 0;
  for (int64_t i : shard) {
    local_supervised += static_cast<double>(CountSupervised(View(i)));
    local_tokens += static_cast<double>(dataset_.examples[static_cast<size_t>(i)].input_ids.size());
  }
  // One collective agrees on the global supervised-token count (the loss
  // normaliser, needed before any backward) and on whether any rank was asked
  // to stop, so all ranks leave the loop at the same step boundary.
  torch::Tensor agree = torch::tensor({local_supervised, local_tokens, g_stop_requested.load() ? 1.0 : 0.0},
                                      torch::kFloat64);
  comm_->AllReduceSum(agree);
  if (agree[2].item<double>() > 0) return false;
  const double global_supervised = agree[0].item<double>();
  const double global_tokens = agree[1].item<double>();
  if (global_supervised <= 0) {
    throw data::DataError("step " + std::to_string(step) + " has no supervised token on any rank");
  }

  auto listed = [step](const std::vector<int>& steps) {
    return std::find(steps.begin(), steps.end(), static_cast<int>(step)) != steps.end();
  };
  const bool inject = listed(cfg_.spec.faults.nan_at_steps) && injected_nan_steps_.insert(step).second;
  const bool inject_oom = listed(cfg_.spec.faults.oom_at_steps) && injected_oom_steps_.insert(step).second;
  const bool packing = cfg_.spec.dataset.packing;
  double loss = 0;
  // Attempts of this step: an OOM on any rank redoes the whole step, from
  // zero grads and the step's own seed, with a smaller plan.
  for (int attempt = 1;; ++attempt) {
    torch::manual_seed(StepSeed(static_cast<uint64_t>(cfg_.spec.training.seed), step, rank));
    optimizer_->ZeroGrad();
    double local_loss_sum = 0;
    std::string oom_message;
    try {
      bool first = true;
      for (const std::vector<int64_t>& micro : MicroBatches(shard, cfg_.batch.micro_batch_size)) {
        // The RECORD_USER_SCOPEs name the step's phases in --profile-steps
        // reports (what the host did while the device waited).
        std::vector<ExampleView> rows;
        for (int64_t i : micro) rows.push_back(View(i));
        MicroBatch mb;
        {
          RECORD_USER_SCOPE("tune::collate");
          mb = Collate(rows, pad_id_, device_, packing);
        }
        torch::Tensor hidden;
        {
          RECORD_USER_SCOPE("tune::forward");
          hidden = model_->ForwardHidden(mb.input_ids, mb.position_ids, mb.segment_ids);
        }
        if (inject_oom && attempt == 1 && first) {
          // faults.oom_at_steps: the error type the CUDA caching allocator
          // throws, raised with the forward's activations alive, so recovery
          // runs exactly the path a real OOM takes.
          C10_THROW_ERROR(OutOfMemoryError, "CUDA out of memory (injected by faults.oom_at_steps at step " +
                                                std::to_string(step) + ", micro-batch " +
                                                std::to_string(cfg_.batch.micro_batch_size) + ")");
        }
        torch::Tensor loss_sum;
        {
          RECORD_USER_SCOPE("tune::loss");
          loss_sum = model_->LossSum(hidden, mb.labels);
        }
        if (inject && first) {
          // faults.nan_at_steps: poison the loss so the guard sees what a real
          // numeric blow-up looks like (NaN loss and NaN gradients).
          loss_sum = loss_sum * std::numeric_limits<float>::quiet_NaN();
        }
        // The loss's graph keeps what it needs (its own copy of the rows);
        // holding the final hidden states through backward would cost one
        // more [tokens, hidden] tensor at the peak.
        hidden = torch::Tensor();
        if (first && step == max_steps_ && IsRoot()) {
          LogAllocatorLayout(device_, "before the last step's first backward");
        }
        first = false;
        // fp16: scaled so small gradients survive; unscaled after the all-reduce.
        {
          RECORD_USER_SCOPE("tune::backward");
          (loss_sum * (scaler_.scale() / global_supervised)).backward();
        }
        RECORD_USER_SCOPE("tune::read_loss");
        local_loss_sum += loss_sum.detach().to(torch::kCPU, torch::kFloat64).item<double>();
      }
    } catch (const c10::Error& e) {
      // c10::OutOfMemoryError (the caching allocator) or an allocation failure
      // reported as a CUDA/cuBLAS error; anything else is not ours to retry.
      if (!IsOutOfMemory(e)) throw;
      // The failed micro-batch's tensors are gone with the unwound scope; the
      // remaining micro-batches are skipped and this rank goes straight to
      // the collective below so no rank waits for it.
      oom_message = e.what_without_backtrace();
      LogWarning("out of memory at step " + std::to_string(step) + " (attempt " + std::to_string(attempt) +
                 "): " + oom_message);
    }
    // One all-reduce carries the loss and the "some rank ran out of memory"
    // count, before the gradient all-reduce that a failed rank cannot join.
    torch::Tensor loss_t = torch::tensor({local_loss_sum, oom_message.empty() ? 0.0 : 1.0}, torch::kFloat64);
    comm_->AllReduceSum(loss_t);
    const int ranks_oom = static_cast<int>(loss_t[1].item<double>());
    if (ranks_oom == 0) {
      loss = loss_t[0].item<double>() / global_supervised;
      break;
    }
    StepDownAfterOom(step, attempt, ranks_oom, oom_message);
  }

  std::vector<torch::Tensor> grads;
  grads.reserve(lora_.size());
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, t] : lora_) {
      if (!t.grad().defined()) t.mutable_grad() = torch::zeros_like(t);
      grads.push_back(t.grad());
    }
  }
  // The loss is already normalised by the global count, so gradients sum.
  comm_->AllReduceSumBucketed(grads);
  double grad_norm = 0;
  {
    RECORD_USER_SCOPE("tune::grad_norm");
    torch::NoGradGuard no_grad;
    // Multi-tensor ops: a few launches for hundreds of LoRA tensors (fp32).
    grad_norm = torch::stack(torch::_foreach_norm(grads, 2)).norm(2).item<double>();
    if (scaler_.enabled()) {
      // Unscale before clipping and the update: max_grad_norm is about the
      // true gradient. The loss sum was never scaled.
      const double inv = 1.0 / scaler_.scale();
      torch::_foreach_mul_(grads, inv);
      grad_norm *= inv;
    }
  }
  PushRecent(&recent_losses_, loss);
  PushRecent(&recent_grad_norms_, grad_norm);

  const double lr = schedule_->LrForStep(step) * state_.lr_scale;
  const double loss_scale = scaler_.scale();  // the scale this step ran with
  const spec::NanPolicySpec& policy = cfg_.spec.training.nan_policy;
  bool skipped = false;
  // fp16 overflow (finite loss, non-finite gradients) is the loss scaler's
  // business: lower the scale and skip, no NaN alert, unless the scale has
  // collapsed, which means the numbers themselves blew up.
  bool overflow_skip = false;
  if (scaler_.enabled() && std::isfinite(loss) && !std::isfinite(grad_norm)) {
    overflow_skip = scaler_.Update(/*overflow=*/true) == LossScaler::Outcome::kSkipped;
  }
  if (overflow_skip) {
    skipped = true;
    optimizer_->ZeroGrad();
    LogWarning("fp16 gradient overflow at step " + std::to_string(step) + ": step skipped, loss scale " +
               std::to_string(loss_scale) + " -> " + std::to_string(scaler_.scale()));
  } else if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
    skipped = true;
    const std::string where = !std::isfinite(loss) ? "loss" : FirstNonFiniteGrad();
    optimizer_->ZeroGrad();
    ++state_.nan_total;
    ++state_.nan_consecutive;
    std::string action = "skip";
    std::optional<CheckpointRef> rollback_to;
    if (!policy.skip_step) {
      action = "abort";
    } else if (state_.nan_consecutive >= policy.max_consecutive) {
      rollback_to = LatestCheckpoint(cfg_.checkpoint_dir);
      action = policy.rollback && rollback_to && state_.rollbacks < policy.max_rollbacks ? "rollback" : "abort";
    }
    events_->Emit("nan_alert", {{"step", step},
                                {"where", where},
                                {"consecutive", state_.nan_consecutive},
                                {"total", state_.nan_total},
                                {"action", action}});
    LogWarning("non-finite " + where + " at step " + std::to_string(step) + " (" +
               std::to_string(state_.nan_consecutive) + " in a row, " + std::to_string(state_.nan_total) +
               " total): " + action);
    if (action == "abort") {
      const std::string advice =
          state_.rollbacks > 0
              ? "the NaNs outlived " + std::to_string(state_.rollbacks) +
                    " rollback(s) with a lower learning rate: check the data around these steps, lower "
                    "training.learning_rate further, or use quantization.base: bf16"
              : "lower training.learning_rate or training.max_grad_norm, check the data, or use "
                "quantization.base: bf16";
      const nlohmann::json details = {
          {"step", step},
          {"where", where},
          {"lr", lr},
          {"lr_scale", state_.lr_scale},
          {"precision", cfg_.compute_dtype},
          {"loss_scale", loss_scale},
          {"rollbacks", state_.rollbacks},
          {"max_rollbacks", policy.max_rollbacks},
          {"consecutive", state_.nan_consecutive},
          {"nan_total", state_.nan_total},
          {"recent_losses", std::vector<double>(recent_losses_.begin(), recent_losses_.end())},
          {"recent_grad_norms", std::vector<double>(recent_grad_norms_.begin(), recent_grad_norms_.end())},
          {"advice", advice}};
      char lr_buf[64];
      std::snprintf(lr_buf, sizeof(lr_buf), "lr %.3g (%.3g x schedule)", lr, state_.lr_scale);
      throw NanAbortError("non-finite " + where + " at step " + std::to_string(step) + " after " +
                              std::to_string(state_.nan_consecutive) + " consecutive bad step(s) and " +
                              std::to_string(state_.rollbacks) + " rollback(s) (" + std::to_string(state_.nan_total) +
                              " NaN steps in all); " + lr_buf + ", precision " + cfg_.compute_dtype +
                              (scaler_.enabled() ? ", loss scale " + std::to_string(loss_scale) : "") +
                              "; last losses " + JoinNumbers(recent_losses_) + ", last grad norms " +
                              JoinNumbers(recent_grad_norms_) + ". " + advice,
                          details);
    }
    if (action == "rollback") {
      const TrainerState before = state_;
      RestoreFrom(*rollback_to);
      state_.lr_scale = before.lr_scale * policy.lr_backoff;
      state_.nan_total = before.nan_total;
      state_.nan_consecutive = 0;
      state_.rollbacks = before.rollbacks + 1;
      events_->EmitLog("warning", "rolled back to " + rollback_to->path + " (step " + std::to_string(state_.step) +
                                      "), learning rate scaled to " + std::to_string(state_.lr_scale) + "x");
      *rolled_back = true;
      return true;
    }
  } else {
    RECORD_USER_SCOPE("tune::optimizer");
    torch::NoGradGuard no_grad;
    const double max_norm = cfg_.spec.training.max_grad_norm;
    if (max_norm > 0) {
      // torch.nn.utils.clip_grad_norm_: scale by max/(norm+1e-6) when below 1.
      const double coef = max_norm / (grad_norm + 1e-6);
      if (coef < 1.0) torch::_foreach_mul_(grads, coef);
    }
    optimizer_->Step(lr);
    scaler_.Update(/*overflow=*/false);
    state_.nan_consecutive = 0;
  }

  state_.step = step;
  state_.next_position = sampler_->PositionBeforeStep(step + 1);
  if (!skipped) state_.last_loss = loss;

  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const double tokens_per_s = seconds > 0 ? global_tokens / seconds : 0;
  RECORD_USER_SCOPE("tune::report");
  const VramStats vram = ReadVram(device_);
  const int log_every = std::max(1, cfg_.spec.training.log_every_steps);
  if (step % log_every == 0 || step == 1 || step == max_steps_ || skipped) {
    events_->Emit("step", {{"step", step},
                           {"max_steps", max_steps_},
                           {"loss", loss},
                           {"lr", lr},
                           {"grad_norm", grad_norm},
                           {"tokens", static_cast<int64_t>(global_supervised)},
                           {"tokens_per_s", tokens_per_s},
                           {"vram_allocated", vram.allocated},
                           {"vram_reserved", vram.reserved},
                           {"vram_peak", vram.peak},
                           {"vram_reserved_peak", vram.peak_reserved},
                           {"elapsed", Elapsed()},
                           {"skipped", skipped},
                           {"loss_scale", loss_scale},
                           {"micro_batch_size", cfg_.batch.micro_batch_size},
                           {"grad_accum", cfg_.batch.grad_accum}});
    if (IsRoot()) {
      std::cout << FormatProgressLine(static_cast<long>(step), static_cast<long>(max_steps_), loss, lr, grad_norm,
                                      tokens_per_s, vram.allocated)
                << (skipped ? " (skipped)" : "") << std::endl;
    }
  }
  return true;
}

void Trainer::SaveCheckpoint() {
  if (state_.step == last_checkpoint_step_) return;
  last_checkpoint_step_ = state_.step;
  if (!IsRoot()) return;  // adapter and optimizer states are identical on every rank
  const auto t0 = Clock::now();
  const std::string path =
      CommitCheckpoint(cfg_.checkpoint_dir, state_.step, cfg_.spec.checkpoint.keep, [&](const std::string& dir) {
        WriteTrainingState(dir, lora_, *optimizer_, state_, RunInfo(), device_);
      });
  events_->Emit("checkpoint", {{"step", state_.step}, {"path", path}});
  LogInfo("checkpoint " + path + " written in " +
          std::to_string(std::chrono::duration<double>(Clock::now() - t0).count()) + " s");
}

void Trainer::Finish() {
  if (!IsRoot()) return;
  ReleaseCachedMemory(device_);  // the export materialises fp32 copies
  exporter::ExportPeftAdapter(*model_, cfg_.spec, cfg_.spec.model, cfg_.adapter_dir);
  LogInfo("adapter exported to " + cfg_.adapter_dir);
  if (cfg_.spec.output.merge) {
    const std::string merged = (fs::path(cfg_.output_dir) / "merged").string();
    exporter::ExportMergedModel(*model_, cfg_.spec, cfg_.spec.model, merged);
    LogInfo("merged model written to " + merged);
  }
  events_->Emit("done", {{"step", state_.step},
                         {"loss", state_.last_loss},
                         {"output_dir", cfg_.output_dir},
                         {"adapter_dir", cfg_.adapter_dir}});
}

int Trainer::Train() {
  ReleaseCachedMemory(device_);  // load/quantisation temporaries
  int64_t step = state_.step + 1;
  while (step <= max_steps_) {
    bool rolled_back = false;
    profiler_.BeforeStep(step, cfg_.use_cuda);
    if (!RunStep(step, &rolled_back)) {
      profiler_.Finish(cfg_.use_cuda);
      if (state_.step > 0) SaveCheckpoint();
      events_->EmitLog("info", "stop requested (SIGTERM/SIGINT): stopped before step " + std::to_string(step) +
                                   "; --resume continues from step " + std::to_string(state_.step + 1));
      return kExitTerminated;
    }
    const bool final_step = !rolled_back && (step == max_steps_ || step == stop_after_);
    profiler_.AfterStep(step, cfg_.use_cuda, final_step);
    if (rolled_back) {
      step = state_.step + 1;
      continue;
    }
    const int every = cfg_.spec.checkpoint.every_steps;
    if ((every > 0 && step % every == 0) || final_step) SaveCheckpoint();
    if (step == stop_after_ && step < max_steps_) {
      events_->EmitLog("info", "--stop-after-step " + std::to_string(step) + " reached; --resume continues");
      return kExitOk;
    }
    ++step;
  }
  if (IsRoot()) LogAllocatorLayout(device_, "at the end of training");
  SaveCheckpoint();
  Finish();
  return kExitOk;
}

// Emits an `error` event (when a sink exists) and logs it. `details` (an
// object: the NAN_ABORT diagnosis, the plan that ran out of memory) is merged
// into the event.
int Fail(EventSink* events, const char* reason, const std::string& message, int code,
         const nlohmann::json& details = nullptr) {
  LogError(std::string(reason) + ": " + message);
  if (events != nullptr) {
    nlohmann::json payload = {{"reason", reason}, {"message", message}};
    if (details.is_object()) payload.update(details);
    events->Emit("error", payload);
  }
  return code;
}

}  // namespace

void RequestStop() { g_stop_requested.store(true); }

int RunTraining(const TrainRunOptions& options) {
  InstallSignalHandlers();
  std::unique_ptr<EventSink> events;
  std::optional<TrainConfig> cfg;
  try {
    const DistEnv env = DistEnv::FromEnvironment();
    SetLogRank(env.rank);
    // Until output.dir is known, errors can only go to --events-fd.
    events = std::make_unique<EventSink>(env.rank, options.cli.events_fd, "");
    cfg = TrainConfig::Load(options.cli, env);
    std::error_code ec;
    fs::create_directories(cfg->output_dir, ec);
    if (ec) throw ConfigError("cannot create output.dir " + cfg->output_dir + ": " + ec.message());
    events = std::make_unique<EventSink>(env.rank, options.cli.events_fd, cfg->events_path);
  } catch (const ConfigError& e) {
    return Fail(events.get(), "INVALID_SPEC", e.what(), kExitInvalidSpec);
  } catch (const std::exception& e) {
    return Fail(events.get(), "INVALID_SPEC", e.what(), kExitInvalidSpec);
  }
  try {
    Trainer trainer(*cfg, events.get(), options);
    trainer.Setup();
    return trainer.Train();
  } catch (const ConfigError& e) {
    return Fail(events.get(), "INVALID_SPEC", e.what(), kExitInvalidSpec);
  } catch (const data::DataError& e) {
    if (!e.report().is_null() && cfg->dist.rank == 0) events->Emit("preflight", e.report());
    return Fail(events.get(), "DATA", e.what(), kExitData);
  } catch (const NanAbortError& e) {
    return Fail(events.get(), "NAN_ABORT", e.what(), kExitNanAbort, {{"diagnosis", e.details()}});
  } catch (const OomExhaustedError& e) {
    return Fail(events.get(), "OOM", e.what(), kExitOom, e.details());
  } catch (const c10::OutOfMemoryError& e) {
    return Fail(events.get(), "OOM", e.what_without_backtrace(), kExitOom);
  } catch (const c10::Error& e) {
    return Fail(events.get(), "CRASH", e.what_without_backtrace(), kExitCrash);
  } catch (const std::exception& e) {
    return Fail(events.get(), "CRASH", e.what(), kExitCrash);
  }
}

}  // namespace tune::train
