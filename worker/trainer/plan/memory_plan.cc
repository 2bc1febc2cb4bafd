#include "worker/trainer/plan/memory_plan.h"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace tune::plan {
namespace {

struct LinearShape {
  const char* name;
  int64_t in, out;
};

std::vector<LinearShape> LinearShapes(const model::LlamaConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const int64_t q = int64_t{c.num_attention_heads} * c.head_dim, kv = int64_t{c.num_key_value_heads} * c.head_dim;
  return {{"q_proj", H, q}, {"k_proj", H, kv}, {"v_proj", H, kv}, {"o_proj", q, H},
          {"gate_proj", H, I}, {"up_proj", H, I}, {"down_proj", I, H}};
}

bool IsTarget(const PlanInputs& in, const std::string& module) {
  return std::find(in.lora_targets.begin(), in.lora_targets.end(), module) != in.lora_targets.end();
}

// Whether the projections `group` run as one GEMM (LlamaForCausalLM::
// SetFusedProjections): LoRA on all or none of them, and no LoRA dropout on
// them (a group without LoRA fuses whatever the dropout).
bool FusesGroup(const PlanInputs& in, const std::vector<std::string>& group) {
  for (const std::string& m : group) {
    if (IsTarget(in, m) != IsTarget(in, group[0])) return false;
  }
  return !(in.lora_dropout > 0 && IsTarget(in, group[0]));
}

// Whether q/k/v run as one projection (llama.cc FusedProjection).
bool FusesQkv(const PlanInputs& in) { return FusesGroup(in, {"q_proj", "k_proj", "v_proj"}); }

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One LoRA tensor's AdamW states (AdamW::StateBytes, AdamWOptions defaults:
// 8-bit from 4096 elements, 256-element blocks).
int64_t StateBytesFor(int64_t numel, bool eight_bit) {
  if (!eight_bit || numel < 4096) return 8 * numel;
  const int64_t blocks = CeilDiv(numel, 256);
  return 2 * (blocks * 256 + 4 * blocks);
}

// LoRA parameters of one decoder layer.
int64_t LoraParamsPerLayer(const PlanInputs& in) {
  int64_t n = 0;
  for (const LinearShape& s : LinearShapes(in.model)) {
    if (IsTarget(in, s.name)) n += int64_t{in.lora_r} * (s.in + s.out);
  }
  return n;
}

// Bytes autograd keeps per token for a layer's attention: the kernel's saved
// inputs/outputs (q, k, v are the rotated/contiguous copies LayerForward
// makes) and, on the math path, the probabilities (heads x T per token).
int64_t AttentionBytesPerToken(const PlanInputs& in) {
  const model::LlamaConfig& c = in.model;
  const int64_t cb = in.ComputeBytes();
  const int64_t q = int64_t{c.num_attention_heads} * c.head_dim, kv = int64_t{c.num_key_value_heads} * c.head_dim;
  const int64_t T = in.seq_len;
  switch (in.attention) {
    case AttentionKernel::kSdpa:
      if (!in.packing) return cb * (q + 2 * kv) + cb * q + 4 * c.num_attention_heads;
      [[fallthrough]];  // a segment mask rules out grouped heads: K/V expanded
    case AttentionKernel::kSdpaExpandKv: {
      // Expanded K/V replace k and v; with packing the boolean mask becomes
      // an additive [B,1,T,T] bias in the compute dtype that is kept.
      const int64_t mask = in.packing ? cb * T : 0;
      return cb * (3 * q) + cb * q + 4 * c.num_attention_heads + mask;
    }
    case AttentionKernel::kMath: {
      // softmax keeps its fp32 result; the compute-dtype copy feeds the
      // second matmul (no copy when computing in fp32); the boolean mask is
      // kept by masked_fill.
      const int64_t probs = int64_t{c.num_attention_heads} * T * (4 + (cb == 4 ? 0 : cb));
      return cb * (q + 2 * kv) + probs + T;
    }
  }
  return 0;
}

// What the SDPA backward allocates per token beyond its inputs (q/k/v, the
// output, the output gradient): measured on the H200 with
// `bench/sdpa_backends.py --memory` as 45,184 bytes for Llama-3-8B shapes
// (cuDNN and flash alike, 2k to 344k tokens) = five [q] compute-dtype
// tensors (the output gradient made contiguous, dq, dk and dv at all query
// heads before the group sum, the output's contiguous copy), the summed dk and
// dv, and the fp32 per-head row sums.
int64_t SdpaBackwardBytesPerToken(const PlanInputs& in) {
  if (in.attention == AttentionKernel::kMath) return 0;  // MathAttentionTransientPerToken
  const model::LlamaConfig& c = in.model;
  const int64_t cb = in.ComputeBytes();
  const int64_t q = int64_t{c.num_attention_heads} * c.head_dim, kv = int64_t{c.num_key_value_heads} * c.head_dim;
  return 5 * cb * q + 2 * cb * kv + 4 * c.num_attention_heads;
}

// Transient attention buffers on the math path while a layer is
// differentiated: scores, masked scores, fp32 softmax input and the
// probability gradient (heads x T per token).
int64_t MathAttentionTransientPerToken(const PlanInputs& in) {
  if (in.attention != AttentionKernel::kMath) return 0;
  return int64_t{in.model.num_attention_heads} * in.seq_len * (in.ComputeBytes() + 8);
}

// Rows entering the vocabulary projection: every position but each
// sequence's last is at most supervised (prepare.cc shifts labels).
int64_t CrossEntropyRows(const PlanInputs& in, int micro) {
  return int64_t{micro} * std::max<int64_t>(1, in.seq_len - 1);
}

int64_t RoundUp(int64_t v, int64_t to) { return CeilDiv(v, to) * to; }

std::string Commas(int64_t v) {
  std::string s = std::to_string(v);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return s;
}

std::vector<int> DivisorsDescending(int n) {
  std::vector<int> d;
  for (int i = n; i >= 1; --i) {
    if (n % i == 0) d.push_back(i);
  }
  return d;
}

Checkpointing ParseMode(const std::string& mode) {
  if (mode == "off") return Checkpointing::kOff;
  if (mode == "offload") return Checkpointing::kOffload;
  if (mode == "selective") return Checkpointing::kSelective;
  return Checkpointing::kOn;
}

}  // namespace

const char* CheckpointingName(Checkpointing c) {
  switch (c) {
    case Checkpointing::kOff: return "off";
    case Checkpointing::kOn: return "on";
    case Checkpointing::kOffload: return "offload";
    case Checkpointing::kSelective: return "selective";
  }
  return "on";
}

const char* AttentionKernelName(AttentionKernel k) {
  switch (k) {
    case AttentionKernel::kSdpa: return "sdpa";
    case AttentionKernel::kSdpaExpandKv: return "sdpa_expand_kv";
    case AttentionKernel::kMath: return "math";
  }
  return "sdpa";
}

AttentionKernel AttentionFor(int torch_major, int torch_minor) {
  if (torch_major < 2) return AttentionKernel::kMath;
  if (torch_major == 2 && torch_minor < 5) return AttentionKernel::kSdpaExpandKv;
  return AttentionKernel::kSdpa;
}

PlanInputs InputsFromSpec(const spec::JobSpec& spec, const model::LlamaConfig& model, const std::string& precision,
                          int world_size, bool cuda, AttentionKernel attention, int64_t free_bytes) {
  PlanInputs in;
  in.model = model;
  in.base = spec.quantization.base;
  in.double_quant = spec.quantization.double_quant;
  in.block_size = spec.quantization.block_size;
  in.lora_r = spec.lora.r;
  in.lora_targets = spec.lora.targets;
  in.lora_dropout = spec.lora.dropout;
  in.optimizer = spec.training.optimizer;
  in.precision = precision;
  in.seq_len = spec.dataset.max_seq_length;
  in.packing = spec.dataset.packing;
  in.effective_batch_size = spec.training.effective_batch_size;
  in.world_size = world_size;
  in.micro_batch_size = spec.training.micro_batch_size;
  in.checkpointing = spec.training.gradient_checkpointing;
  in.cuda = cuda;
  in.attention = attention;
  in.free_bytes = free_bytes;
  return in;
}

int64_t BaseWeightBytes(const PlanInputs& in) {
  const model::LlamaConfig& c = in.model;
  const int64_t cb = in.ComputeBytes(), H = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;
  int64_t bytes = V * H * cb + (2 * L + 1) * H * cb;  // embeddings + RMSNorm weights
  if (!c.tie_word_embeddings) bytes += V * H * cb;   // lm_head
  for (const LinearShape& s : LinearShapes(c)) {
    const int64_t numel = s.in * s.out;
    int64_t per_layer = 0;
    if (in.base == "nf4") {
      const int64_t blocks = CeilDiv(numel, in.block_size);
      per_layer = blocks * in.block_size / 2;  // two 4-bit codes a byte
      per_layer += in.double_quant ? blocks + 4 * CeilDiv(blocks, 256) + 4 : 4 * blocks;
    } else {
      per_layer = numel * cb;
    }
    bytes += L * per_layer;
  }
  return bytes;
}

int64_t LoraParameterCount(const PlanInputs& in) { return in.model.num_hidden_layers * LoraParamsPerLayer(in); }

int64_t OptimizerStateBytes(const PlanInputs& in) {
  const bool eight_bit = in.optimizer == "adamw_8bit";
  int64_t per_layer = 0;
  for (const LinearShape& s : LinearShapes(in.model)) {
    if (!IsTarget(in, s.name)) continue;
    per_layer += StateBytesFor(int64_t{in.lora_r} * s.in, eight_bit) + StateBytesFor(s.out * in.lora_r, eight_bit);
  }
  return in.model.num_hidden_layers * per_layer;
}

namespace {

// AdamW's fp32 denominators, made for every fp32-state tensor at once by the
// multi-tensor update (train/optimizer.cc; not by torch's fused kernel).
int64_t AdamDenominatorBytes(const PlanInputs& in) {
  const bool eight_bit = in.optimizer == "adamw_8bit";
  int64_t per_layer = 0;
  for (const LinearShape& s : LinearShapes(in.model)) {
    if (!IsTarget(in, s.name)) continue;
    for (const int64_t n : {int64_t{in.lora_r} * s.in, s.out * in.lora_r}) {
      if (StateBytesFor(n, eight_bit) == 8 * n) per_layer += 4 * n;  // fp32 states
    }
  }
  return in.model.num_hidden_layers * per_layer;
}

bool IsMlpModule(const std::string& name) { return name == "gate_proj" || name == "up_proj" || name == "down_proj"; }

// What autograd keeps per token for the modules of one half of a layer
// (LayerForward = MlpHalf(AttentionHalf(x))): RMSNorm keeps its fp32 input
// (pow, mul) and 1/rms, the fused kernel its compute-dtype input and 1/rms;
// its output is kept only by a LoRA A matmul (the NF4 matmul keeps no
// activation); each LoRA A output is kept by B; dropout keeps its output and
// mask.
int64_t HalfBytesPerToken(const PlanInputs& in, bool mlp) {
  const model::LlamaConfig& c = in.model;
  const int64_t cb = in.ComputeBytes(), H = c.hidden_size, I = c.intermediate_size;
  const int64_t q = int64_t{c.num_attention_heads} * c.head_dim;
  int64_t b = (in.fused_kernels ? cb : 4) * H + 4;
  if (!mlp) {
    if (IsTarget(in, "q_proj") || IsTarget(in, "k_proj") || IsTarget(in, "v_proj")) b += cb * H;
    b += AttentionBytesPerToken(in);
    if (IsTarget(in, "o_proj")) b += cb * q;  // attention output, transposed copy
  } else {
    if (IsTarget(in, "gate_proj") || IsTarget(in, "up_proj")) b += cb * H;
    // silu keeps gate; the product keeps silu(gate) and up (fused: gate, up).
    b += (in.fused_kernels ? 2 : 3) * cb * I;
    if (IsTarget(in, "down_proj")) b += cb * I;
  }
  for (const LinearShape& s : LinearShapes(c)) {
    if (IsMlpModule(s.name) != mlp || !IsTarget(in, s.name)) continue;
    b += cb * in.lora_r;
    if (in.lora_dropout > 0) b += (cb + 1) * s.in;
  }
  return b;
}

// Compute-dtype copies of one layer's gate/up/down LoRA A and B, kept by the
// MLP node (llama.cc MlpFunction) until its backward.
int64_t MlpLoraCastBytes(const PlanInputs& in) {
  if (in.ComputeBytes() == 4) return 0;  // .to(fp32) of an fp32 leaf is the leaf
  int64_t n = 0;
  for (const LinearShape& s : LinearShapes(in.model)) {
    if (IsMlpModule(s.name) && IsTarget(in, s.name)) n += int64_t{in.lora_r} * (s.in + s.out);
  }
  return in.ComputeBytes() * n;
}

// The checkpointing the model really runs: selective falls back to whole
// layers while LoRA dropout is active, offload to on without CUDA.
Checkpointing EffectiveMode(const PlanInputs& in, Checkpointing ckpt) {
  if (ckpt == Checkpointing::kSelective && in.lora_dropout > 0) return Checkpointing::kOn;
  if ((!kActivationOffloadImplemented || !in.cuda) && ckpt == Checkpointing::kOffload) return Checkpointing::kOn;
  return ckpt;
}

// Whether the model runs each layer's MLP chunked (llama.cc MlpHalf): with
// checkpointing (`ckpt` as EffectiveMode gives it), no LoRA dropout, and more
// than model::kMlpChunkAbove tokens in the micro-batch.
bool MlpChunked(const PlanInputs& in, Checkpointing ckpt, int64_t tokens) {
  return ckpt != Checkpointing::kOff && in.lora_dropout == 0 && tokens > model::kMlpChunkAbove;
}

}  // namespace

int64_t LayerActivationBytesPerToken(const PlanInputs& in) {
  return HalfBytesPerToken(in, false) + HalfBytesPerToken(in, true);
}

namespace {
bool TorchAtLeast(int major, int minor, int want_major, int want_minor) {
  return major > want_major || (major == want_major && minor >= want_minor);
}
}  // namespace

bool PrefersCudnnAttention(int torch_major, int torch_minor) {
  const char* off = std::getenv("TUNE_DISABLE_CUDNN_ATTENTION");
  return TorchAtLeast(torch_major, torch_minor, 2, 6) && !(off != nullptr && std::string(off) == "1");
}

void SetTorchBuild(PlanInputs& in, int torch_major, int torch_minor) {
  in.cudnn_attention = in.cuda && PrefersCudnnAttention(torch_major, torch_minor);
  in.fused_adamw = in.cuda && TorchAtLeast(torch_major, torch_minor, 2, 1);
}

bool KeepsAttentionOutput(const PlanInputs& in) {
  return in.cuda && in.cudnn_attention && in.attention == AttentionKernel::kSdpa && in.ComputeBytes() == 2 &&
         !in.packing && in.lora_dropout == 0 && model::CudnnAttentionHeadDim(in.model.head_dim) &&
         in.seq_len > model::kKeepAttentionOutputAbove;
}

int64_t SavedActivationBytesPerToken(const PlanInputs& in, Checkpointing ckpt) {
  const int64_t L = in.model.num_hidden_layers, cb = in.ComputeBytes();
  switch (EffectiveMode(in, ckpt)) {
    case Checkpointing::kOff: return L * LayerActivationBytesPerToken(in);
    case Checkpointing::kOffload: return 0;
    case Checkpointing::kSelective:
      if (KeepsAttentionOutput(in)) {
        // The residual after attention, the attention output and its fp32
        // log-sum-exp (the layer input waits in host memory).
        const int64_t heads = in.model.num_attention_heads;
        return L * (int64_t{in.model.hidden_size} * cb + heads * in.model.head_dim * cb + heads * 4);
      }
      return 2 * L * int64_t{in.model.hidden_size} * cb;
    case Checkpointing::kOn: break;
  }
  return L * int64_t{in.model.hidden_size} * cb;
}

nlohmann::json Breakdown::ToJson() const {
  return {{"weights", weights},     {"lora", lora},           {"optimizer", optimizer},
          {"activations", activations}, {"logits", logits},   {"transient", transient},
          {"workspace", workspace}, {"allreduce", allreduce}, {"slack", slack},
          {"peak_allocated", peak_allocated}, {"reserved", reserved}, {"peak_phase", peak_phase},
          {"host", host}};
}

namespace {
Breakdown PlanForTokens(const PlanInputs& in, int micro, Checkpointing ckpt);
}  // namespace

Breakdown PlanFor(const PlanInputs& in, int micro, Checkpointing ckpt) {
  if (micro <= 0) throw PlanError("micro_batch_size must be > 0");
  Breakdown b = PlanForTokens(in, micro, ckpt);
  // Collate pads a micro-batch to its own longest example, so micro-batches
  // may be shorter than micro x seq_len; one at or just under
  // kMlpChunkAbove tokens runs its MLP unchunked and can need more than the
  // longest (chunked) one. Plan for the larger of the two.
  const int64_t N = int64_t{micro} * in.seq_len;
  if (MlpChunked(in, EffectiveMode(in, ckpt), N)) {
    PlanInputs shorter = in;
    shorter.seq_len = std::max<int64_t>(1, model::kMlpChunkAbove / micro);
    Breakdown s = PlanForTokens(shorter, micro, ckpt);
    if (s.peak_allocated > b.peak_allocated) {
      s.host = b.host;  // host blocks are sized for the longest
      b = s;
    }
  }
  return b;
}

namespace {

Breakdown PlanForTokens(const PlanInputs& in, int micro, Checkpointing ckpt) {
  ckpt = EffectiveMode(in, ckpt);
  const model::LlamaConfig& c = in.model;
  const int64_t cb = in.ComputeBytes(), H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t L = c.num_hidden_layers;
  const int64_t N = int64_t{micro} * in.seq_len;
  const int64_t R = CrossEntropyRows(in, micro);
  const int64_t lora_params = LoraParameterCount(in);

  Breakdown b;
  b.weights = BaseWeightBytes(in);
  // Offload keeps an untied input embedding in host memory (SetActivationOffload).
  if (ckpt == Checkpointing::kOffload && !c.tie_word_embeddings) b.weights -= V * H * cb;
  b.lora = 8 * lora_params;  // fp32 params + fp32 grads
  b.optimizer = OptimizerStateBytes(in);
  // The fused path's GEMM + residual (cuda_ops::AddMm) takes one more
  // workspace of the same size from the caching allocator for each call.
  b.workspace = in.cuda ? (kCublasWorkspaces + (in.fused_kernels ? 1 : 0)) * kCublasWorkspaceBytes : 0;
  const int64_t persistent = b.weights + b.lora + b.optimizer + b.workspace;

  // Compute-dtype copies of LoRA A/B made in every forward and kept by the
  // LoRA matmuls (none when computing in fp32: .to() returns the tensor).
  const int64_t casts_per_layer = cb == 4 ? 0 : cb * LoraParamsPerLayer(in);
  const int64_t layer = LayerActivationBytesPerToken(in) * N;
  const bool keeps_attention = ckpt == Checkpointing::kSelective && KeepsAttentionOutput(in);
  const int64_t model_saved = SavedActivationBytesPerToken(in, ckpt) * N +
                              (ckpt == Checkpointing::kOff         ? casts_per_layer * L
                               : ckpt == Checkpointing::kSelective ? MlpLoraCastBytes(in) * L
                                                                   : 0);

  // Phase A: cross-entropy backward (everything the model saved, the final
  // RMSNorm's fp32 input, the normed hidden states, selected rows + their
  // gradient, one chunk: compute-dtype logits, fp32 logits, fp32 softmax).
  const int64_t chunk = std::min<int64_t>(R, kCrossEntropyChunk);
  // Fused: one bf16 [chunk, V] buffer, rewritten in place with dlogits.
  const int64_t chunk_bytes = in.fused_kernels ? chunk * V * cb : chunk * V * (cb == 4 ? 8 : cb + 8);
  // Selective keeping attention outputs sends a fused q/k/v's output to the
  // host beside the layer input, except the last layer's: both stay on the
  // device for its backward, which comes first (llama.cc ForwardHidden).
  const int64_t qkv_cols = (int64_t{c.num_attention_heads} + 2 * c.num_key_value_heads) * c.head_dim;
  const int64_t qkv_output = keeps_attention && FusesQkv(in) ? N * qkv_cols * cb : 0;
  const int64_t last_layer_kept = keeps_attention ? N * H * cb + qkv_output : 0;
  const int64_t ce_act = model_saved + last_layer_kept + N * H * ((in.fused_kernels ? cb : 4) + cb);
  const int64_t ce_logits = 2 * R * H * cb + chunk_bytes;

  // Phase B: backward of the last decoder layer (with checkpointing: its
  // recomputed intermediates on top of all layer inputs).
  // Dense copies of NF4 weights (llama.cc FrozenWeight): one at a time, the
  // largest matmul weight, q/k/v and gate/up stacked when they fuse. With
  // checkpointing (not offload) the weights the recompute dequantises wait for
  // their backward: q/k/v/o from the attention half's, gate/up/down from the
  // MLP's (the MLP node keeps gate/up while down's is dequantised).
  int64_t dequant = 0, kept_attn = 0, kept_mlp = 0;
  if (in.base == "nf4") {
    const int64_t qd = int64_t{c.num_attention_heads} * c.head_dim, kvd = int64_t{c.num_key_value_heads} * c.head_dim;
    const int64_t qkv = FusesQkv(in) ? H * (qd + 2 * kvd) : H * qd;
    const int64_t gate_up = FusesGroup(in, {"gate_proj", "up_proj"}) ? 2 * H * I : H * I;
    // The fused kernel writes bf16 directly (into each member's rows of a
    // stacked group). The torch path holds int64 packed indices + fp32 values
    // of one member, and the group's buffer in the compute dtype.
    auto group_bytes = [&](int64_t elems, int64_t largest_member) {
      if (in.fused_kernels) return 2 * elems;
      return elems == largest_member ? 8 * elems : cb * elems + 8 * largest_member;
    };
    dequant = std::max({group_bytes(qkv, qd * H), group_bytes(qd * H, qd * H), group_bytes(gate_up, I * H),
                        group_bytes(I * H, I * H)});
    if (ckpt == Checkpointing::kOn || ckpt == Checkpointing::kSelective) {
      kept_attn = cb * H * (2 * qd + 2 * kvd);
      kept_mlp = cb * 3 * H * I;
    }
  }
  // With offload (and selective keeping attention outputs) layer inputs wait
  // in host memory: the layer's input comes back to the device for the
  // recompute, and the previous layer's is already being prefetched (offload.h).
  // Selective keeping attention outputs sends a fused q/k/v's output along
  // (llama.h AttentionHalf): it comes back with its layer's input (the last
  // layer's two stay and count as the first pair fetched).
  const bool inputs_on_host = ckpt == Checkpointing::kOffload || keeps_attention;
  const int64_t fetched = inputs_on_host ? 2 * (N * H * cb + qkv_output) : 0;
  const int64_t math = MathAttentionTransientPerToken(in) * N;
  int64_t layer_act = model_saved + fetched + (ckpt == Checkpointing::kOff ? 0 : layer + casts_per_layer) + math;
  // (Whole-layer recompute: at down's backward every weight of the layer waits.)
  int64_t layer_transient = std::max(dequant, kept_attn + kept_mlp) + N * cb * (H + I);
  // With checkpointing (and no LoRA dropout) the MLP runs as one node
  // (MlpFunction), which a layer recompute skips; its backward holds one
  // chunk's recomputed MLP (model::kMlpChunkTokens above kMlpChunkAbove
  // tokens, else all), the chunk's [I] input gradient, the incoming gradient
  // and its own [N, H] output gradient.
  const bool mlp_node = ckpt != Checkpointing::kOff && in.lora_dropout == 0;
  // With checkpointing the recomputed layer's output is the root of its
  // backward and stays alive until that ends.
  const int64_t root = ckpt == Checkpointing::kOff ? 0 : N * cb * H;
  layer_act += root;
  if (mlp_node) {
    const int64_t C = N > model::kMlpChunkAbove ? model::kMlpChunkTokens : N;
    const int64_t attn = HalfBytesPerToken(in, false) * N;
    // (This layer's MLP LoRA copies are among model_saved's with selective,
    // among casts_per_layer's inside a layer recompute.)
    const int64_t mlp_phase = C * HalfBytesPerToken(in, true);
    if (ckpt == Checkpointing::kSelective) {
      // The MLP node's backward, then the attention half's recompute and
      // backward; both on top of what every layer keeps (and the fetched
      // inputs; the recomputed half's attention output is then counted once
      // more than it exists where it is kept).
      const int64_t attn_phase = attn + casts_per_layer + N * cb * H;
      layer_act = model_saved + fetched + math + std::max(mlp_phase, attn_phase);
    } else {
      // Inside the layer's recompute: the attention half's activations and
      // the node's input r wait while the node differentiates chunk by chunk.
      layer_act = model_saved + fetched + attn + N * cb * H + casts_per_layer + mlp_phase + math + root;
    }
    // Inside a layer recompute q/k/v/o wait too.
    const int64_t weights = ckpt == Checkpointing::kSelective ? kept_mlp : kept_attn + kept_mlp;
    layer_transient = std::max(dequant, weights) + 2 * N * cb * H + C * cb * I;
  }
  if (ckpt != Checkpointing::kOff) {
    // The attention half's backward, once the MLP's is done: its recomputed
    // activations minus o_proj's input (freed by o_proj's backward), the
    // incoming gradient, the recomputed layer output, the attention output's
    // gradient and SDPA's backward buffers. At long contexts, where the MLP
    // runs chunked, this is the layer's peak.
    const int64_t q_bytes = cb * int64_t{c.num_attention_heads} * c.head_dim;  // one token's attention output
    const int64_t o_input = IsTarget(in, "o_proj") ? q_bytes : 0;
    const int64_t kept = model_saved + fetched;
    const int64_t attn_act = kept + casts_per_layer + math +
                             N * (HalfBytesPerToken(in, false) - o_input + 2 * cb * H);
    const int64_t attn_transient = std::max(dequant, kept_attn) + N * (q_bytes + SdpaBackwardBytesPerToken(in));
    if (attn_act + attn_transient > layer_act + layer_transient) {
      layer_act = attn_act;
      layer_transient = attn_transient;
    }
  }

  // Phase C: gradient all-reduce bucket (activations are gone by then).
  int64_t largest_lora = 0;
  for (const LinearShape& s : LinearShapes(c)) {
    if (IsTarget(in, s.name)) largest_lora = std::max(largest_lora, int64_t{in.lora_r} * std::max(s.in, s.out));
  }
  const int64_t bucket = in.world_size > 1 ? std::max<int64_t>(int64_t{25} << 20, 4 * largest_lora) : 0;

  // Then the optimizer's denominators (the bucket is gone by then).
  const int64_t denom = in.fused_adamw ? 0 : AdamDenominatorBytes(in);
  const int64_t a = ce_act + ce_logits, l = layer_act + layer_transient, o = std::max(bucket, denom);
  if (a >= l && a >= o) {
    b.activations = ce_act;
    b.logits = ce_logits;
    b.peak_phase = "cross_entropy_backward";
  } else if (l >= o) {
    b.activations = layer_act;
    b.transient = layer_transient;
    b.peak_phase = "layer_backward";
  } else {
    (bucket >= denom ? b.allreduce : b.transient) = o;
    b.peak_phase = "optimizer";
  }
  b.peak_allocated = persistent + b.activations + b.logits + b.transient + b.allreduce;
  if (inputs_on_host) {
    // Pinned blocks per layer input and q/k/v output (offload.cc; selective
    // keeps the last layer's on the device), and offload's untied embedding.
    const int64_t host_layers = keeps_attention ? L - 1 : L;
    b.host = host_layers * model::PinnedBlockBytes(N * H * cb) +
             (qkv_output > 0 ? host_layers * model::PinnedBlockBytes(qkv_output) : 0) +
             (ckpt == Checkpointing::kOffload && !c.tie_word_embeddings ? V * H * cb : 0);
  }
  b.reserved = RoundUp(static_cast<int64_t>(std::ceil(static_cast<double>(b.peak_allocated) * (1.0 + kFragmentation))),
                       int64_t{2} << 20);
  b.slack = b.reserved - b.peak_allocated;
  return b;
}

}  // namespace

nlohmann::json MemoryPlan::ToJson() const {
  nlohmann::json j = {{"micro_batch_size", micro_batch_size},
                      {"grad_accum", grad_accum},
                      {"gradient_checkpointing", CheckpointingName(checkpointing)},
                      {"predicted_peak_bytes", breakdown.peak_allocated},
                      {"predicted_reserved_bytes", breakdown.reserved},
                      {"free_bytes", free_bytes},
                      {"budget_bytes", budget_bytes},
                      {"fits", fits},
                      {"breakdown", breakdown.ToJson()},
                      {"reason", reason}};
  if (host_budget_bytes > 0) j["host_budget_bytes"] = host_budget_bytes;
  if (!fits) {
    j["shortfall_bytes"] = shortfall_bytes;
    if (host_shortfall_bytes > 0) j["host_shortfall_bytes"] = host_shortfall_bytes;
    j["fix"] = fix;
  }
  return j;
}

MemoryPlan ChoosePlan(const PlanInputs& in) {
  const int world = in.world_size, effective = in.effective_batch_size;
  if (world <= 0) throw PlanError("world size must be > 0");
  if (effective <= 0) throw PlanError("training.effective_batch_size must be > 0");
  if (effective % world != 0) {
    throw PlanError("training.effective_batch_size (" + std::to_string(effective) +
                    ") must be divisible by the number of ranks (" + std::to_string(world) + "); choose a multiple of " +
                    std::to_string(world));
  }
  const int per_rank = effective / world;
  if (in.micro_batch_size > 0 && per_rank % in.micro_batch_size != 0) {
    throw PlanError("training.micro_batch_size (" + std::to_string(in.micro_batch_size) +
                    ") must divide effective_batch_size / ranks (" + std::to_string(per_rank) +
                    "); change micro_batch_size or effective_batch_size");
  }
  MemoryPlan plan;
  plan.free_bytes = in.free_bytes;
  plan.budget_bytes = static_cast<int64_t>(static_cast<double>(in.free_bytes) * in.safety_margin);
  plan.host_budget_bytes = static_cast<int64_t>(static_cast<double>(in.host_free_bytes) * in.safety_margin);
  auto host_fits = [&](const Breakdown& b) { return in.host_free_bytes <= 0 || b.host <= plan.host_budget_bytes; };
  auto fits = [&](const Breakdown& b) { return b.reserved <= plan.budget_bytes && host_fits(b); };
  auto take = [&](int micro, Checkpointing ckpt, const std::string& reason) {
    plan.micro_batch_size = micro;
    plan.grad_accum = per_rank / micro;
    plan.checkpointing = ckpt;
    plan.breakdown = PlanFor(in, micro, ckpt);
    plan.fits = fits(plan.breakdown);
    plan.reason = reason;
    return plan;
  };
  // Largest micro-batch (a divisor of the per-rank batch) that fits, or 0.
  auto largest_fitting = [&](Checkpointing ckpt) {
    for (int m : DivisorsDescending(per_rank)) {
      if (in.micro_batch_size > 0 && m != in.micro_batch_size) continue;
      if (fits(PlanFor(in, m, ckpt))) return m;
    }
    return 0;
  };
  const bool ckpt_auto = in.checkpointing == "auto";
  const bool micro_auto = in.micro_batch_size <= 0;
  std::vector<Checkpointing> modes;
  if (ckpt_auto) {
    modes = {Checkpointing::kOff, Checkpointing::kOn};
    if (kActivationOffloadImplemented) modes.push_back(Checkpointing::kOffload);
  } else {
    modes = {ParseMode(in.checkpointing)};
  }
  const std::string given = micro_auto ? "" : "micro_batch_size " + std::to_string(in.micro_batch_size) + " as given";
  const std::string ckpt_given = ckpt_auto ? "" : "checkpointing " + in.checkpointing + " as given";
  for (Checkpointing mode : modes) {
    const int m = largest_fitting(mode);
    if (m == 0) continue;
    // Without checkpointing, a small micro-batch is slower than recomputing
    // with a larger one; require a reasonable micro-batch first.
    if (ckpt_auto && micro_auto && mode == Checkpointing::kOff &&
        m < std::min(per_rank, kMinMicroWithoutCheckpointing) && modes.size() > 1) {
      continue;
    }
    std::string why;
    if (!micro_auto && !ckpt_auto) {
      why = given + ", " + ckpt_given + "; fits the budget";
    } else if (!ckpt_auto) {
      why = ckpt_given + "; micro-batch " + std::to_string(m) + " is the largest divisor of " +
            std::to_string(per_rank) + " that fits";
    } else if (!micro_auto) {
      why = given + "; checkpointing " + CheckpointingName(mode) +
            (mode == Checkpointing::kOff ? " (fastest) fits" : " because it does not fit without");
    } else if (mode == Checkpointing::kOff) {
      why = "fits without checkpointing (fastest) with micro-batch " + std::to_string(m);
    } else {
      why = "checkpointing " + std::string(CheckpointingName(mode)) +
            " (without it no micro-batch >= " + std::to_string(std::min(per_rank, kMinMicroWithoutCheckpointing)) +
            " fits); micro-batch " + std::to_string(m) + " is the largest that fits";
    }
    return take(m, mode, why);
  }

  // Nothing fits: report the most frugal choice (explicit values honoured).
  const int micro = micro_auto ? 1 : in.micro_batch_size;
  const Checkpointing mode = ckpt_auto ? (kActivationOffloadImplemented ? Checkpointing::kOffload : Checkpointing::kOn)
                                       : ParseMode(in.checkpointing);
  take(micro, mode, "nothing fits the budget; this is the smallest plan" +
                        std::string(micro_auto && ckpt_auto ? "" : " with the values given"));
  plan.shortfall_bytes = std::max<int64_t>(0, plan.breakdown.reserved - plan.budget_bytes);
  if (!host_fits(plan.breakdown)) plan.host_shortfall_bytes = plan.breakdown.host - plan.host_budget_bytes;
  // Fixes, most specific first; each is checked with the planner.
  std::vector<std::string> fixes;
  if (!micro_auto || !ckpt_auto) {
    PlanInputs relaxed = in;
    relaxed.micro_batch_size = 0;
    relaxed.checkpointing = "auto";
    // The smallest plan auto may reach: offload where it exists (CUDA).
    const Breakdown best =
        PlanFor(relaxed, 1, kActivationOffloadImplemented && in.cuda ? Checkpointing::kOffload : Checkpointing::kOn);
    if (fits(best)) fixes.push_back("set training.micro_batch_size: auto and gradient_checkpointing: auto");
  }
  for (int64_t seq = in.seq_len / 2; seq >= 128; seq /= 2) {
    PlanInputs shorter = in;
    shorter.seq_len = seq;
    if (fits(PlanFor(shorter, micro, mode))) {
      fixes.push_back("lower dataset.max_seq_length to " + std::to_string(seq));
      break;
    }
  }
  if (in.base != "nf4") fixes.push_back("use quantization.base: nf4");
  if (in.optimizer != "adamw_8bit") fixes.push_back("use training.optimizer: adamw_8bit");
  if (plan.shortfall_bytes > 0) {
    const int64_t need = static_cast<int64_t>(std::ceil(static_cast<double>(plan.breakdown.reserved) / in.safety_margin));
    fixes.push_back("use a GPU with at least " + FormatBytes(need + (in.cuda ? kCudaContextBytes : 0)) +
                    (in.cuda ? " of memory" : " of free memory") +
                    " (more GPUs do not help: data parallel keeps a full model on each)");
  }
  if (plan.host_shortfall_bytes > 0) {
    const int64_t need = static_cast<int64_t>(std::ceil(static_cast<double>(plan.breakdown.host) / in.safety_margin));
    const bool selective = plan.checkpointing == Checkpointing::kSelective;
    fixes.push_back("give each rank at least " + FormatBytes(need) + " of available host memory (" +
                    (selective ? std::string("selective keeps the layer inputs") +
                                     (FusesQkv(in) ? " and q/k/v outputs" : "") +
                                     " there on sequences over " +
                                     std::to_string(model::kKeepAttentionOutputAbove) + " tokens"
                               : std::string("offload keeps the layer inputs and the embedding there")) +
                    "; MemAvailable is shared by the ranks of a node)");
    if (selective && fits(PlanFor(in, micro, Checkpointing::kOn))) {
      fixes.push_back("use training.gradient_checkpointing: on (nothing in host memory)");
    }
  }
  std::string fix;
  for (const std::string& f : fixes) fix += (fix.empty() ? "" : "; or ") + f;
  plan.fix = fix;
  return plan;
}

std::string FormatBytes(int64_t bytes) {
  char buf[64];
  const double b = static_cast<double>(bytes);
  if (bytes >= (int64_t{1} << 30)) {
    std::snprintf(buf, sizeof(buf), "%.2f GiB", b / (1 << 30));
  } else if (bytes >= (int64_t{1} << 20)) {
    std::snprintf(buf, sizeof(buf), "%.1f MiB", b / (1 << 20));
  } else if (bytes >= 1024) {
    std::snprintf(buf, sizeof(buf), "%.1f KiB", b / 1024);
  } else {
    std::snprintf(buf, sizeof(buf), "%" PRId64 " B", bytes);
  }
  return buf;
}

std::string FormatPlan(const PlanInputs& in, const MemoryPlan& plan) {
  const Breakdown& b = plan.breakdown;
  std::ostringstream o;
  auto row = [&](const char* name, int64_t v, const std::string& note) {
    char buf[48];
    std::snprintf(buf, sizeof(buf), "  %-13s %12s", name, FormatBytes(v).c_str());
    o << buf << (note.empty() ? "" : "  " + note) << "\n";
  };
  o << "plan: micro-batch " << plan.micro_batch_size << " x grad-accum " << plan.grad_accum << " x "
    << in.world_size << " rank(s) = " << in.effective_batch_size << ", checkpointing "
    << CheckpointingName(plan.checkpointing) << ", " << in.precision << ", seq " << in.seq_len << ", attention "
    << AttentionKernelName(in.attention) << (in.fused_kernels ? ", fused kernels" : "") << "\n";
  const std::string quant = in.base == "nf4" ? "nf4, block " + std::to_string(in.block_size) +
                                                   (in.double_quant ? ", double quant" : "")
                                             : "dense " + in.precision;
  row("weights", b.weights, "(" + quant + ")");
  row("lora", b.lora, "(" + Commas(LoraParameterCount(in)) + " params r=" + std::to_string(in.lora_r) + ", fp32 + grads)");
  row("optimizer", b.optimizer, "(" + in.optimizer + ")");
  row("activations", b.activations, "(" + FormatBytes(SavedActivationBytesPerToken(in, plan.checkpointing)) +
                                        " per token kept across layers)");
  row("logits", b.logits, "(cross-entropy, " + std::to_string(kCrossEntropyChunk) + "-row chunks)");
  row("transient", b.transient, "(dequantised weight + layer gradients)");
  row("workspace", b.workspace, in.cuda ? "(cuBLAS)" : "");
  row("allreduce", b.allreduce, "");
  row("= allocated", b.peak_allocated, "peak in " + b.peak_phase);
  char pct[16];
  std::snprintf(pct, sizeof(pct), "%.0f%%", kFragmentation * 100);
  row("+ slack", b.slack, std::string("(allocator fragmentation, ") + pct + ")");
  row("= reserved", b.reserved, "");
  char margin[16];
  std::snprintf(margin, sizeof(margin), "%.0f%%", in.safety_margin * 100);
  row("budget", plan.budget_bytes, std::string("(") + margin + " of " + FormatBytes(plan.free_bytes) + " free)");
  if (b.host > 0) {
    const bool embedding = plan.checkpointing == Checkpointing::kOffload && !in.model.tie_word_embeddings;
    const bool qkv = plan.checkpointing == Checkpointing::kSelective && FusesQkv(in);
    row("host", b.host, std::string("(pinned layer inputs") + (embedding ? " + embedding" : "") +
                            (qkv ? " + q/k/v outputs" : "") + "; " +
                            (plan.host_budget_bytes > 0 ? "budget " + FormatBytes(plan.host_budget_bytes)
                                                        : std::string("host memory not checked")) +
                            ")");
  }
  if (plan.fits) {
    o << "fits: " << plan.reason << "\n";
  } else {
    o << "DOES NOT FIT: " << plan.ShortfallText() << " (" << plan.reason << ")\n"
      << "fix: " << plan.fix << "\n";
  }
  return o.str();
}

std::string MemoryPlan::ShortfallText() const {
  std::string s;
  if (shortfall_bytes > 0 || host_shortfall_bytes == 0) s = "device memory short by " + FormatBytes(shortfall_bytes);
  if (host_shortfall_bytes > 0) {
    s += (s.empty() ? "" : ", ") + std::string("host memory short by ") + FormatBytes(host_shortfall_bytes);
  }
  return s;
}

int64_t HostMemAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024;
  }
  return 0;
}

}  // namespace tune::plan
