#include "worker/trainer/recipe.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/torch.h>

#ifdef TUNE_TORCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
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
#include "worker/trainer/train/collate.h"
#include "worker/trainer/train/optimizer.h"
#include "worker/trainer/train/sampler.h"
#include "worker/trainer/train/schedule.h"

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

class NanAbortError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Per-step generator seed: the same for a step whatever happened before it,
// so resumed and rolled-back runs draw the same dropout masks.
uint64_t StepSeed(uint64_t seed, int64_t step, int rank) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(step + 1) +
               0xbf58476d1ce4e5b9ULL * static_cast<uint64_t>(rank + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return (z ^ (z >> 31)) & 0x7fffffffffffffffULL;
}

struct VramStats {
  double allocated = 0, reserved = 0, peak = 0;
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
  }
#endif
  return v;
}

int64_t DeviceMemoryBytes(const torch::Device& device) {
#ifdef TUNE_TORCH_CUDA
  if (device.is_cuda()) {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) return static_cast<int64_t>(total_b);
    return 0;
  }
#endif
  return static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
}

// A first, deliberately simple memory estimate for the plan event (the
// memory planner of DESIGN.md stage 1 refines it): base weights as stored,
// LoRA params + grads + optimizer states, saved activations per token
// (all of a layer's intermediates without checkpointing, only the layer
// inputs plus one recomputed layer with it), one layer's attention scores on
// the math path, one chunk of fp32 logits with its gradient, and 10% slack.
int64_t EstimatePeakBytes(const model::LlamaConfig& c, int64_t base_bytes, int64_t lora_params,
                          int64_t optimizer_bytes, int micro, int64_t seq, bool checkpointing, int dtype_bytes) {
  const double tokens = static_cast<double>(micro) * static_cast<double>(seq);
  const double H = c.hidden_size, I = c.intermediate_size, L = c.num_hidden_layers;
  const double layer_full = tokens * (12.0 * H + 5.0 * I) * dtype_bytes;
  const double activations = checkpointing ? L * tokens * H * dtype_bytes + layer_full : L * layer_full;
  const double scores = 2.0 * micro * c.num_attention_heads * static_cast<double>(seq) * seq * dtype_bytes;
  const double logits = 3.0 * std::min<double>(tokens, 1024.0) * c.vocab_size * 4.0;
  const double total = static_cast<double>(base_bytes) + 8.0 * lora_params + optimizer_bytes + activations + scores + logits;
  return static_cast<int64_t>(total * 1.1);
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
  Trainer(TrainConfig cfg, EventSink* events, int stop_after_step)
      : cfg_(std::move(cfg)), events_(events), stop_after_(stop_after_step), start_(Clock::now()) {}

  void Setup();
  // Returns kExitOk or kExitTerminated.
  int Train();

 private:
  using Clock = std::chrono::steady_clock;

  bool IsRoot() const { return cfg_.dist.rank == 0; }
  double Elapsed() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  void SetupDevice();
  void LoadData();
  void LoadModel();
  void EmitPlan();
  void MaybeResume();
  void RestoreFrom(const CheckpointRef& ref);
  // Runs one step; false when the ranks agreed to stop before it.
  bool RunStep(int64_t step, bool* rolled_back);
  std::string FirstNonFiniteGrad();
  void SaveCheckpoint();
  void Finish();
  ExampleView View(int64_t index) const;
  nlohmann::json RunInfo() const;

  TrainConfig cfg_;
  EventSink* events_;
  int stop_after_;
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
  std::set<int64_t> injected_nan_steps_;  // faults.nan_at_steps fire once per step
};

void Trainer::SetupDevice() {
  if (cfg_.use_cuda) {
    if (!torch::cuda::is_available()) {
      throw ConfigError("resources.gpus is " + std::to_string(cfg_.spec.resources.gpus) +
                        " but no CUDA device is usable (or this libtorch has no CUDA); use resources.cpu_ranks "
                        "to train on CPU");
    }
    const int count = static_cast<int>(torch::cuda::device_count());
    if (cfg_.device_index >= count) {
      throw ConfigError("LOCAL_RANK=" + std::to_string(cfg_.device_index) + " but only " + std::to_string(count) +
                        " CUDA device(s) are visible");
    }
    device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(cfg_.device_index));
  } else {
    device_ = torch::kCPU;
    at::set_num_threads(cfg_.cpu_threads);
  }
  dtype_ = cfg_.compute_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  LogInfo("device " + device_.str() + ", compute " + cfg_.compute_dtype + " (" + cfg_.precision_note + ")");
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
  LoadData();
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
  const auto t0 = Clock::now();
  model_ = model::LlamaForCausalLM::Load(cfg_.spec.model, opts);
  model_->SetGradientCheckpointing(cfg_.gradient_checkpointing);
  model_->SetTraining(true);
  lora_ = model_->LoraParameters();
  if (lora_.empty()) throw ConfigError("lora.targets selects no module of the model; nothing would train");
  int64_t n = 0;
  for (const auto& [name, t] : lora_) n += t.numel();
  LogInfo("model loaded in " + std::to_string(std::chrono::duration<double>(Clock::now() - t0).count()) +
          " s: base " + cfg_.spec.quantization.base + ", " + std::to_string(lora_.size()) + " LoRA tensors, " +
          std::to_string(n) + " trainable parameters");
}

void Trainer::EmitPlan() {
  int64_t lora_params = 0;
  for (const auto& [name, t] : lora_) lora_params += t.numel();
  const int dtype_bytes = dtype_ == torch::kFloat32 ? 4 : 2;
  const int64_t seq = std::min<int64_t>(longest_example_, cfg_.spec.dataset.max_seq_length);
  nlohmann::json plan = {
      {"micro_batch_size", cfg_.batch.micro_batch_size},
      {"grad_accum", cfg_.batch.grad_accum},
      {"world_size", cfg_.dist.world_size},
      {"effective_batch_size", cfg_.spec.training.effective_batch_size},
      {"gradient_checkpointing", cfg_.gradient_checkpointing},
      {"precision", cfg_.compute_dtype},
      {"device", device_.str()},
      {"predicted_peak_bytes",
       EstimatePeakBytes(model_->config(), model_->BaseStorageBytes(), lora_params, optimizer_->StateBytes(),
                         cfg_.batch.micro_batch_size, seq, cfg_.gradient_checkpointing, dtype_bytes)},
      {"device_memory_bytes", DeviceMemoryBytes(device_)},
      {"max_steps", max_steps_},
      {"optimizer", cfg_.spec.training.optimizer},
      {"backend", comm_->backend()},
  };
  events_->Emit("plan", plan);
  if (IsRoot()) {
    std::cout << "plan: micro-batch " << cfg_.batch.micro_batch_size << " x grad-accum " << cfg_.batch.grad_accum
              << " x " << cfg_.dist.world_size << " rank(s) = " << cfg_.spec.training.effective_batch_size
              << ", " << max_steps_ << " steps, " << cfg_.compute_dtype << " on " << device_.str()
              << ", checkpointing " << (cfg_.gradient_checkpointing ? "on" : "off") << std::endl;
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
  torch::manual_seed(StepSeed(static_cast<uint64_t>(cfg_.spec.training.seed), step, rank));

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

  optimizer_->ZeroGrad();
  const bool inject = std::find(cfg_.spec.faults.nan_at_steps.begin(), cfg_.spec.faults.nan_at_steps.end(),
                                static_cast<int>(step)) != cfg_.spec.faults.nan_at_steps.end() &&
                      injected_nan_steps_.insert(step).second;
  double local_loss_sum = 0;
  const bool packing = cfg_.spec.dataset.packing;
  bool first = true;
  for (const std::vector<int64_t>& micro : MicroBatches(shard, cfg_.batch.micro_batch_size)) {
    std::vector<ExampleView> rows;
    for (int64_t i : micro) rows.push_back(View(i));
    MicroBatch mb = Collate(rows, pad_id_, device_, packing);
    torch::Tensor hidden = model_->ForwardHidden(mb.input_ids, mb.position_ids, mb.segment_ids);
    torch::Tensor loss_sum = model_->LossSum(hidden, mb.labels);
    if (inject && first) {
      // faults.nan_at_steps: poison the loss so the guard sees what a real
      // numeric blow-up looks like (NaN loss and NaN gradients).
      loss_sum = loss_sum * std::numeric_limits<float>::quiet_NaN();
    }
    first = false;
    (loss_sum / global_supervised).backward();
    local_loss_sum += loss_sum.detach().to(torch::kCPU, torch::kFloat64).item<double>();
  }

  torch::Tensor loss_t = torch::tensor({local_loss_sum}, torch::kFloat64);
  comm_->AllReduceSum(loss_t);
  const double loss = loss_t.item<double>() / global_supervised;

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
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> norms;
    norms.reserve(grads.size());
    for (const torch::Tensor& g : grads) norms.push_back(g.to(torch::kFloat32).norm(2));
    grad_norm = torch::stack(norms).norm(2).item<double>();
  }

  const double lr = schedule_->LrForStep(step) * state_.lr_scale;
  const spec::NanPolicySpec& policy = cfg_.spec.training.nan_policy;
  bool skipped = false;
  if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
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
      throw NanAbortError("non-finite " + where + " at step " + std::to_string(step) + " after " +
                          std::to_string(state_.nan_consecutive) +
                          " consecutive bad step(s); lower training.learning_rate, check the data, or use "
                          "quantization.base: bf16");
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
    torch::NoGradGuard no_grad;
    const double max_norm = cfg_.spec.training.max_grad_norm;
    if (max_norm > 0) {
      // torch.nn.utils.clip_grad_norm_: scale by max/(norm+1e-6) when below 1.
      const double coef = max_norm / (grad_norm + 1e-6);
      if (coef < 1.0) {
        for (torch::Tensor& g : grads) g.mul_(coef);
      }
    }
    optimizer_->Step(lr);
    state_.nan_consecutive = 0;
  }

  state_.step = step;
  state_.next_position = sampler_->PositionBeforeStep(step + 1);
  if (!skipped) state_.last_loss = loss;

  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const double tokens_per_s = seconds > 0 ? global_tokens / seconds : 0;
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
                           {"elapsed", Elapsed()},
                           {"skipped", skipped}});
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
  int64_t step = state_.step + 1;
  while (step <= max_steps_) {
    bool rolled_back = false;
    if (!RunStep(step, &rolled_back)) {
      if (state_.step > 0) SaveCheckpoint();
      events_->EmitLog("info", "stop requested (SIGTERM/SIGINT): stopped before step " + std::to_string(step) +
                                   "; --resume continues from step " + std::to_string(state_.step + 1));
      return kExitTerminated;
    }
    if (rolled_back) {
      step = state_.step + 1;
      continue;
    }
    const int every = cfg_.spec.checkpoint.every_steps;
    if ((every > 0 && step % every == 0) || step == max_steps_ || step == stop_after_) SaveCheckpoint();
    if (step == stop_after_ && step < max_steps_) {
      events_->EmitLog("info", "--stop-after-step " + std::to_string(step) + " reached; --resume continues");
      return kExitOk;
    }
    ++step;
  }
  SaveCheckpoint();
  Finish();
  return kExitOk;
}

// Emits an `error` event (when a sink exists) and logs it.
int Fail(EventSink* events, const char* reason, const std::string& message, int code) {
  LogError(std::string(reason) + ": " + message);
  if (events != nullptr) events->Emit("error", {{"reason", reason}, {"message", message}});
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
    Trainer trainer(*cfg, events.get(), options.stop_after_step);
    trainer.Setup();
    return trainer.Train();
  } catch (const ConfigError& e) {
    return Fail(events.get(), "INVALID_SPEC", e.what(), kExitInvalidSpec);
  } catch (const data::DataError& e) {
    if (!e.report().is_null() && cfg->dist.rank == 0) events->Emit("preflight", e.report());
    return Fail(events.get(), "DATA", e.what(), kExitData);
  } catch (const NanAbortError& e) {
    return Fail(events.get(), "NAN_ABORT", e.what(), kExitNanAbort);
  } catch (const c10::OutOfMemoryError& e) {
    return Fail(events.get(), "OOM", e.what_without_backtrace(), kExitOom);
  } catch (const c10::Error& e) {
    return Fail(events.get(), "CRASH", e.what_without_backtrace(), kExitCrash);
  } catch (const std::exception& e) {
    return Fail(events.get(), "CRASH", e.what(), kExitCrash);
  }
}

}  // namespace tune::train
