// Memory planner (DESIGN.md "The trainer", stage 1): predicts tune-train's
// peak device memory from config.json and the job spec, and chooses
// micro-batch / grad accumulation / checkpointing to fit a memory budget.
// Torch-free: it runs before any device memory is touched, and from
// `tune-train plan` on machines without a GPU or the weights.
//
// The model is an account of what this trainer actually allocates (not a
// generic QLoRA rule of thumb); each term names the code it mirrors:
//   * weights    — LlamaForCausalLM::BaseStorageBytes: embeddings (in host
//                  memory with offload and an untied head), lm_head
//                  (absent when tied) and RMSNorm weights in the compute
//                  dtype; the seven linears of every layer as NF4 (nibbles
//                  + fp32 absmax, or uint8 absmax + one fp32 scale per 256
//                  blocks + one fp32 offset with double quant), or dense in
//                  the compute dtype for base bf16.
//   * lora       — fp32 A and B of every target module, plus their fp32
//                  gradients (kept between steps: ZeroGrad zeroes in place).
//   * optimizer  — AdamW::StateBytes: fp32 m and v, or for adamw_8bit one
//                  uint8 code per element (padded to 256-element blocks) and
//                  one fp32 absmax per block for each of m and v; tensors
//                  under 4096 elements keep fp32 states.
//   * activations — tensors autograd keeps (llama.cc LayerForward,
//                  llama_ops.cc): per token and layer two RMSNorm fp32 inputs
//                  and their outputs, rotated q/k, v, the attention output
//                  (SDPA) and its reshaped copy, four [I] MLP tensors (gate,
//                  silu(gate), up, product), each LoRA A output; dropout
//                  masks when lora.dropout > 0; the math attention path adds
//                  fp32 + compute-dtype probabilities (heads x T per token).
//                  With checkpointing only each layer's input is kept, plus
//                  one layer's intermediates while it is recomputed; with
//                  offload the inputs live in host memory instead (two are
//                  on the device in backward: the current and the prefetched);
//                  selective keeps the residual stream after attention too
//                  (on long sequences also the attention output and its
//                  log-sum-exp, with the inputs in host memory,
//                  KeepsAttentionOutput).
//                  The MLP as one node (llama.cc MlpFunction: selective, or
//                  more than model::kMlpChunkAbove tokens with checkpointing)
//                  holds one chunk of its intermediates in backward.
//   * logits     — ChunkedCrossEntropySum's backward, 1024 rows at a time:
//                  a compute-dtype logits chunk, its fp32 copy and the fp32
//                  softmax are alive together (C++ temporaries live to the end
//                  of the statement); plus the selected hidden rows, their
//                  gradient, the final RMSNorm's fp32 input.
//   * transient  — Nf4MatmulFunction dequantises a whole weight per matmul:
//                  an int64 copy of the packed bytes and the fp32 values
//                  (8 bytes per element of the largest linear) coexist;
//                  plus the incoming gradient and one [I] input gradient of
//                  the layer being differentiated; in the attention half's
//                  backward the attention output's gradient and SDPA's own
//                  buffers (SdpaBackwardBytesPerToken, measured with
//                  bench/sdpa_backends.py --memory).
//   * workspace  — CUDA only: torch >= 2 allocates a 32 MiB cuBLAS workspace
//                  (Hopper default, shared with cuBLASLt) through the caching
//                  allocator per thread handle; forward runs on the main
//                  thread and backward on autograd's device thread: two.
//   * allreduce  — Communicator::AllReduceSumBucketed's fp32 bucket
//                  (world > 1); it exists only after backward. Then AdamW's
//                  fp32 denominators of every fp32-state tensor at once (the
//                  multi-tensor update), counted as transient when larger.
// The allocated peak is the largest of three phases: the cross-entropy
// backward, the backward of the last decoder layer, the all-reduce/optimizer.
// Calibration (H200, torch 2.11): the llama3-8b preset at seq 2048, micro 1,
// checkpointing on, NF4 double quant, adamw_8bit, LoRA r=16 all linears
// measures 7.57 GiB peak allocated with the torch ops (predicted 7.566 GiB)
// and 6.73 GiB with the fused kernels (predicted 6.73 GiB); with offload
// 5.28 GiB (predicted 5.28 GiB). Micro 8 with the fused kernels and fp32 AdamW:
// 13.14 GiB measured on vs 13.05 predicted, selective 17.06 vs 16.41; batch 1
// with offload at seq 131,072: 20.12 vs 20.18 GiB. Selective keeping attention
// outputs (fused AdamW): seq 8192 x 2 17.06 measured vs 17.66 predicted, seq
// 32,768 x 1 27.83 vs 28.92 GiB.
//
// Reserved memory = allocated x (1 + kFragmentation), see memory_plan.cc.
// Budget = free memory x safety margin (default 0.90). A plan fits when its
// predicted reserved memory is within the budget.
#ifndef TUNE_WORKER_TRAINER_PLAN_MEMORY_PLAN_H_
#define TUNE_WORKER_TRAINER_PLAN_MEMORY_PLAN_H_

#include <nlohmann/json.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/jobspec/job_spec.h"
#include "worker/trainer/model/llama_config.h"

namespace tune::plan {

// Bad planner input (e.g. effective batch not divisible by the world size):
// the message names the field and the fix.
class PlanError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// kSelective (model SetSelectiveRecompute): each layer keeps its input and
// the residual stream after attention; only the attention half and the gate/up
// projections are recomputed. On long sequences (KeepsAttentionOutput) it
// also keeps the attention output, moves the input to pinned host memory, and
// recomputes only q/k/v and gate/up. Never chosen by "auto" (it trades memory
// for speed only when asked).
enum class Checkpointing { kOff, kOn, kOffload, kSelective };
const char* CheckpointingName(Checkpointing c);  // "off" | "on" | "offload" | "selective"

// The attention kernel LayerForward reaches (llama_ops.cc Attention).
enum class AttentionKernel {
  kSdpa,          // torch >= 2.5: SDPA with native grouped K/V heads
  kSdpaExpandKv,  // torch 2.0 .. 2.4, or packing: SDPA on K/V expanded to all heads
  kMath,          // torch 1.x: explicit scores, probabilities kept for backward
};
const char* AttentionKernelName(AttentionKernel k);  // "sdpa" | "sdpa_expand_kv" | "math"
// The kernel a torch build reaches (callers pass TORCH_VERSION_MAJOR/MINOR).
AttentionKernel AttentionFor(int torch_major, int torch_minor);

// Activation offload (llama.cc ForwardHidden + offload.h, CUDA only): each
// checkpointed layer's input waits in pinned host memory, so the device keeps
// no layer inputs, only the one fetched back for the layer being recomputed
// and the next one being prefetched; an untied input embedding stays in host
// memory too. On CPU "offload" is "on".
inline constexpr bool kActivationOffloadImplemented = true;

// Rows of [chunk, vocab] logits ChunkedCrossEntropySum materialises
// (LlamaForCausalLM::LossSum's default chunk_tokens).
inline constexpr int64_t kCrossEntropyChunk = 1024;
// torch >= 2 cuBLAS workspace on sm90 (32 MiB) and how many exist at once.
inline constexpr int64_t kCublasWorkspaceBytes = int64_t{32} << 20;
inline constexpr int kCublasWorkspaces = 2;
// Fraction of allocated memory the caching allocator keeps reserved on top
// (block rounding to 2 MiB segments; blocks freed by one micro-batch shape
// that the next, differently sized one cannot reuse).
inline constexpr double kFragmentation = 0.10;
// Default share of free memory a plan may use; the rest covers memory
// outside torch's allocator (NCCL buffers, cuDNN/cuBLAS handles, other
// processes' growth) and the prediction's error.
inline constexpr double kDefaultSafetyMargin = 0.90;
// `tune-train plan --gpu-memory-gb N`: the CUDA context of the process takes
// this much of the card before the allocator sees any of it.
inline constexpr int64_t kCudaContextBytes = int64_t{512} << 20;
// Without checkpointing a plan must reach at least this micro-batch (or the
// whole per-rank batch) to be preferred over checkpointing on: small
// micro-batches waste more GPU time than the recomputation costs.
inline constexpr int kMinMicroWithoutCheckpointing = 4;

struct PlanInputs {
  model::LlamaConfig model;
  std::string base = "nf4";  // nf4 | bf16 (dense in the compute dtype)
  bool double_quant = true;
  int block_size = 64;
  int lora_r = 16;
  std::vector<std::string> lora_targets = {"q_proj", "k_proj", "v_proj", "o_proj",
                                           "gate_proj", "up_proj", "down_proj"};
  double lora_dropout = 0.0;
  std::string optimizer = "adamw_8bit";  // adamw | adamw_8bit
  std::string precision = "bf16";        // bf16 | fp16 | fp32 (resolved, not "auto")
  int64_t seq_len = 2048;                // tokens per sequence (max_seq_length or the longest example)
  bool packing = false;
  int effective_batch_size = 8;
  int world_size = 1;
  int micro_batch_size = 0;              // 0 = choose
  std::string checkpointing = "auto";    // auto | on | off | offload | selective
  bool cuda = true;
  AttentionKernel attention = AttentionKernel::kSdpa;
  // The fused CUDA kernels (model/cuda_ops.h) run: CUDA, bf16 compute, kernels
  // compiled in and not disabled. They keep less: RMSNorm saves its bf16
  // input and 1/rms, SwiGLU saves gate and up only, NF4 dequantises straight
  // to bf16, cross-entropy holds one bf16 [chunk, vocab] buffer.
  bool fused_kernels = false;
  // What the torch build runs (SetTorchBuild): SDPA tries cuDNN first, which
  // selective's long-sequence mode needs (KeepsAttentionOutput); AdamW's fp32
  // update is torch's fused kernel, which makes no denominators.
  bool cudnn_attention = true;
  bool fused_adamw = false;
  int64_t free_bytes = 0;                // free device memory (CPU: MemAvailable)
  // CUDA: host memory this rank may use (MemAvailable / ranks on the node);
  // offload plans must also fit it. 0 = not checked.
  int64_t host_free_bytes = 0;
  double safety_margin = kDefaultSafetyMargin;

  int ComputeBytes() const { return precision == "fp32" ? 4 : 2; }
};

// Fills PlanInputs from a validated spec. `precision` is the resolved compute
// dtype ("bf16" | "fp16" | "fp32"); seq_len = dataset.max_seq_length.
PlanInputs InputsFromSpec(const spec::JobSpec& spec, const model::LlamaConfig& model, const std::string& precision,
                          int world_size, bool cuda, AttentionKernel attention, int64_t free_bytes);

// Whether tune-train puts cuDNN first in SDPA on CUDA with this torch
// (recipe.cc, llama_ops.h PreferCudnnAttention): torch >= 2.6, unless
// TUNE_DISABLE_CUDNN_ATTENTION=1 (kept for A/B runs).
bool PrefersCudnnAttention(int torch_major, int torch_minor);
// Sets cudnn_attention and fused_adamw (torch >= 2.1) for a CUDA plan on this
// torch (callers pass TORCH_VERSION_MAJOR/MINOR); both false without CUDA.
void SetTorchBuild(PlanInputs& in, int torch_major, int torch_minor);

// Bytes of the frozen base model as stored (BaseStorageBytes).
int64_t BaseWeightBytes(const PlanInputs& in);
// Trainable LoRA parameters: sum over layers and targets of r x (in + out).
int64_t LoraParameterCount(const PlanInputs& in);
// AdamW state bytes for the LoRA tensors (AdamW::StateBytes).
int64_t OptimizerStateBytes(const PlanInputs& in);
// Bytes autograd keeps per token for one decoder layer when it runs with
// grad (the whole layer; the input itself is not included).
int64_t LayerActivationBytesPerToken(const PlanInputs& in);
// Bytes kept per token across the whole model between forward and backward:
// L x LayerActivationBytesPerToken without checkpointing, L x hidden x dtype
// (the layer inputs) with it, twice that with selective (where
// KeepsAttentionOutput: the residual after attention, the attention output and
// its log-sum-exp, fp32 per head; the inputs are in host memory), 0 with
// offload on CUDA.
int64_t SavedActivationBytesPerToken(const PlanInputs& in, Checkpointing ckpt);
// Whether selective recompute keeps each layer's attention output besides the
// residual after attention, with the layer input in pinned host memory
// (model::kKeepAttentionOutputAbove): CUDA, SDPA with grouped heads and cuDNN
// first, 16-bit compute, no packing, no LoRA dropout, a head size cuDNN takes
// (a multiple of 8 up to 128), sequences over the threshold. Breakdown::host
// then counts the inputs. Should cuDNN decline the shapes at run time the
// model keeps no attention output (and from the next forward on, the inputs
// stay on the device: the short-sequence form), whose plan is smaller: this
// plan errs on the safe side.
bool KeepsAttentionOutput(const PlanInputs& in);

// Peak composition of one (micro-batch, checkpointing) choice. All bytes.
struct Breakdown {
  int64_t weights = 0;
  int64_t lora = 0;         // params + grads
  int64_t optimizer = 0;
  int64_t activations = 0;  // saved tensors (+ attention buffers) at the peak phase
  int64_t logits = 0;       // cross-entropy buffers at the peak phase
  int64_t transient = 0;    // dequantised weight copy + layer gradient buffers at the peak phase
  int64_t workspace = 0;
  int64_t allreduce = 0;
  int64_t peak_allocated = 0;  // sum of the above: predicted torch max_memory_allocated
  int64_t slack = 0;           // allocator fragmentation on top of allocated
  int64_t reserved = 0;        // peak_allocated + slack
  std::string peak_phase;      // "cross_entropy_backward" | "layer_backward" | "optimizer"
  // Host memory the plan holds (not device memory, not in the sums above):
  // with offload on CUDA the pinned layer inputs (L x tokens x hidden) and an
  // untied input embedding; with selective where KeepsAttentionOutput, the
  // inputs and (when q/k/v fuse) the q/k/v projection outputs.
  int64_t host = 0;
  nlohmann::json ToJson() const;
};

// Predicts the peak for a given split. The runtime's OOM re-planning calls
// this after halving the micro-batch or changing checkpointing. Above
// model::kMlpChunkAbove tokens per micro-batch it is the larger of that plan
// and one for a micro-batch of exactly kMlpChunkAbove tokens (micro-batches
// are padded only to their own longest example, and at the threshold the MLP
// runs unchunked).
Breakdown PlanFor(const PlanInputs& in, int micro_batch_size, Checkpointing ckpt);

struct MemoryPlan {
  int micro_batch_size = 0;
  int grad_accum = 0;
  Checkpointing checkpointing = Checkpointing::kOn;
  Breakdown breakdown;
  int64_t free_bytes = 0;
  int64_t budget_bytes = 0;  // free x safety margin
  int64_t host_budget_bytes = 0;  // host_free_bytes x safety margin (0 = not checked)
  bool fits = false;             // device and (when checked) host memory
  int64_t shortfall_bytes = 0;  // reserved - budget when it does not fit
  int64_t host_shortfall_bytes = 0;  // host - host budget when the host memory does not fit
  std::string reason;           // why this split (one sentence)
  std::string fix;              // when it does not fit: what would make it fit
  // "device memory short by 1.20 GiB", "host memory short by ...", or both.
  std::string ShortfallText() const;
  nlohmann::json ToJson() const;
};

// Chooses (or, for explicit values, checks) the split; never throws for
// "does not fit" (fits=false, shortfall and fix say why). Throws PlanError
// when the batch fields cannot multiply to effective_batch_size.
MemoryPlan ChoosePlan(const PlanInputs& in);

// Human-readable plan (multi-line) for `tune-train plan` and the trainer log.
std::string FormatPlan(const PlanInputs& in, const MemoryPlan& plan);
// "7.57 GiB" / "512.0 MiB".
std::string FormatBytes(int64_t bytes);

// MemAvailable of /proc/meminfo in bytes, 0 when unreadable.
int64_t HostMemAvailableBytes();

}  // namespace tune::plan

#endif  // TUNE_WORKER_TRAINER_PLAN_MEMORY_PLAN_H_
