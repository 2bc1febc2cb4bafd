// LlamaForCausalLM for QLoRA training: frozen base (NF4 or compute-dtype),
// trainable fp32 LoRA adapters, per-layer gradient checkpointing, chunked
// cross-entropy. Weights come from a Hugging Face model directory.
//
// Parameter names follow HF (model.layers.N.self_attn.q_proj.weight, ...);
// LoRA parameters follow PEFT relative to the model
// (model.layers.N.self_attn.q_proj.lora_A.weight).
#ifndef TUNE_WORKER_TRAINER_MODEL_LLAMA_H_
#define TUNE_WORKER_TRAINER_MODEL_LLAMA_H_

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "worker/trainer/model/llama_config.h"
#include "worker/trainer/model/llama_ops.h"
#include "worker/trainer/model/nf4.h"

namespace tune::model {

struct LoraOptions {
  int r = 16;
  double alpha = 16, dropout = 0;
  // Module names among q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.
  std::vector<std::string> targets;
  bool rslora = false;
  // alpha / r, or alpha / sqrt(r) with rslora (PEFT).
  double Scaling() const;
};

struct LoadOptions {
  std::string base = "nf4";  // nf4 | bf16 (bf16 keeps base linears in compute dtype)
  bool double_quant = true;
  int block_size = 64;
  torch::Device device = torch::kCPU;
  torch::ScalarType compute_dtype = torch::kBFloat16;  // kFloat32 allowed (CPU exact tests)
  LoraOptions lora;
  // Load an untied input embedding into host memory (activation offload on a
  // GPU, see SetActivationOffload), so it never occupies the device.
  bool host_embedding = false;
  uint64_t seed = 0;  // LoRA A init (kaiming-uniform a=sqrt(5) like PEFT); B = 0
};

// The names of the seven Llama linear modules LoRA may target.
const std::vector<std::string>& LinearModuleNames();

// A frozen linear y = x W^T whose weight is held either in compute dtype or as
// NF4 (dequantised right before each matmul and again in backward; only the
// quantised form is kept alive), plus an optional LoRA branch
// (dropout(x) A^T B^T * scaling, A/B fp32 leaves cast to compute dtype). Base,
// LoRA and residual run as one autograd node whose GEMMs accumulate in place
// (llama.cc LoraLinearFunction); no weight gradient of W is ever computed.
class LinearWithLora {
 public:
  LinearWithLora() = default;
  // `weight` [out,in] any float dtype on any device.
  void SetBase(const torch::Tensor& weight, const LoadOptions& opts);
  // Creates A [r,in] (kaiming-uniform a=sqrt(5), from `gen`) and B [out,r] = 0.
  void EnableLora(const LoraOptions& lora, torch::Device device, at::Generator gen);
  // [residual +] x W^T [+ LoRA]; residual (optional) has the output's shape
  // and is added inside the GEMM (the decoder's residual connections).
  // root_only: the output is only the root of a checkpoint's backward (its
  // values are left unset; no GEMM runs but the LoRA input's). Ignored while
  // LoRA dropout is active.
  torch::Tensor Forward(const torch::Tensor& x, bool training, const torch::Tensor& residual = {},
                        bool root_only = false) const;
  // Re-homes the dense base weights of `group` (all dense, same input size)
  // as consecutive rows of one tensor, so their fused projection multiplies
  // by it in place (no per-call concatenation). NF4 weights need no such
  // step: they are dequantised into one buffer anyway.
  static void StackDense(const std::vector<LinearWithLora*>& group);
  // Base weight in `dtype` (dequantised if NF4).
  torch::Tensor BaseWeight(torch::ScalarType dtype) const;
  bool has_lora() const { return lora_a_.defined(); }
  int64_t lora_rank() const { return has_lora() ? lora_a_.size(0) : 0; }
  // LoRA dropout applies to this call (training with dropout > 0).
  bool LoraDropoutActive(bool training) const { return has_lora() && training && dropout_ > 0; }
  // Copies of A and B in `dtype` (autograd casts, so gradients reach the fp32
  // leaves), or `absent` twice without LoRA.
  std::pair<torch::Tensor, torch::Tensor> LoraCopies(torch::ScalarType dtype, const torch::Tensor& absent) const;
  torch::Tensor& lora_a() { return lora_a_; }
  torch::Tensor& lora_b() { return lora_b_; }
  double scaling() const { return scaling_; }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  bool quantized() const { return nf4_.has_value(); }
  // The base weight as held: NF4, or dense in the compute dtype (one is set).
  const std::optional<nf4::Nf4Tensor>& nf4_weight() const { return nf4_; }
  const torch::Tensor& dense_weight() const { return weight_; }
  int64_t StorageBytes() const;  // base weight bytes as held on device

 private:
  int64_t in_ = 0, out_ = 0;
  torch::ScalarType compute_dtype_ = torch::kBFloat16;
  torch::Tensor weight_;               // compute dtype, requires_grad=false
  std::optional<nf4::Nf4Tensor> nf4_;  // or NF4
  torch::Tensor lora_a_, lora_b_;      // fp32 leaves requiring grad
  double scaling_ = 0, dropout_ = 0;
};

struct DecoderLayer {
  torch::Tensor input_layernorm, post_attention_layernorm;  // [H], compute dtype
  LinearWithLora q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
  LinearWithLora* Linear(const std::string& name);  // by module name; nullptr if unknown
};

class LlamaForCausalLM : public torch::nn::Module {
 public:
  // Streams safetensors tensor by tensor (quantising base linears as they
  // load). Throws std::runtime_error with clear messages (missing tensors,
  // shape mismatches, unknown LoRA targets, bad options).
  static std::shared_ptr<LlamaForCausalLM> Load(const std::string& model_dir,
                                                const LoadOptions& opts);
  // Builds from a config and a tensor source `get(name)` (tests, export).
  static std::shared_ptr<LlamaForCausalLM> FromTensors(
      const LlamaConfig& config, const std::function<torch::Tensor(const std::string&)>& get,
      const LoadOptions& opts);

  const LlamaConfig& config() const { return config_; }
  const LoadOptions& options() const { return opts_; }

  // input_ids, position_ids: int64 [B,T]; segment_ids: int64 [B,T] or
  // undefined (packing: attention only within equal ids, causal).
  // Returns final-norm hidden states [B,T,H] in compute dtype.
  torch::Tensor ForwardHidden(const torch::Tensor& input_ids, const torch::Tensor& position_ids,
                              const torch::Tensor& segment_ids = {});
  // Sum of token cross-entropies over labels != -100 (fp32 scalar), computed
  // in chunks of `chunk_tokens` tokens so full fp32 logits are never
  // materialised. labels are already shifted (labels[b,t] is the target for
  // position t).
  torch::Tensor LossSum(const torch::Tensor& hidden, const torch::Tensor& labels,
                        int64_t chunk_tokens = 1024);
  // Full logits [B,T,V] in fp32 (tests / eval on small inputs).
  torch::Tensor Logits(const torch::Tensor& hidden);
  void SetGradientCheckpointing(bool on) { checkpointing_ = on; }
  bool gradient_checkpointing() const { return checkpointing_; }
  // With checkpointing on a GPU: each checkpointed layer's input waits in
  // pinned host memory (model/offload.h: copies on a side stream, prefetched
  // one layer ahead in backward), and an untied input embedding table stays
  // in host memory (rows gathered there, then copied). On CPU the inputs are
  // host memory already and nothing moves.
  void SetActivationOffload(bool on);
  bool activation_offload() const { return offload_; }
  bool embedding_on_host() const;
  // Selective recompute (`gradient_checkpointing: selective`), with
  // checkpointing on and offload off: only each layer's attention half is
  // checkpointed; its MLP half runs as one node that keeps its input (the
  // residual stream after attention) and in backward recomputes the gate and
  // up projections but not the down projection's output. One more [tokens,
  // hidden] tensor per layer is kept than with plain checkpointing (whose
  // recompute skips down's forward too, the MLP being the same node there),
  // and the attention recompute skips o_proj's GEMMs: its output is not
  // needed. With LoRA dropout active the layer is checkpointed whole instead.
  // On sequences longer than kKeepAttentionOutputAbove without packing, where
  // cuDNN attention runs (ops::CanKeepAttentionOutput), each checkpoint also
  // keeps its attention output (all layers' in one block, the MLP nodes'
  // inputs in another), and each layer's input and, when q/k/v fuse, its q/k/v
  // projection output wait in pinned host memory (model/offload.h, as with
  // offload; the two come back together, one layer ahead; the last layer's
  // stay on the device). So the recompute runs no attention forward, no
  // o_proj and no q/k/v GEMM: only RMSNorm, RoPE and the LoRA A product. The
  // device holds per layer the residual after attention and the attention
  // output (as many bytes for Llama) plus the log-sum-exp: what it held when
  // the input stayed there instead (and the last layer's input and q/k/v
  // output).
  void SetSelectiveRecompute(bool on) { selective_ = on; }
  bool selective_recompute() const { return selective_; }
  void SetTraining(bool on) { training_ = on; }  // LoRA dropout on/off
  // Fused projections (default on): q/k/v, and gate/up, each run as one GEMM
  // on their stacked weights, with their LoRA A's stacked and B's
  // block-diagonal, when their LoRA settings agree (all or none targeted) and
  // no LoRA dropout is active; one backward GEMM gives the input gradient of
  // the whole group. The LoRA parameters and their names stay per module.
  // Off: one GEMM per projection (tests compare the two).
  void SetFusedProjections(bool on) { fused_projections_ = on; }
  bool fused_projections() const { return fused_projections_; }

  // LoRA parameters in a fixed order (layer, then module in
  // LinearModuleNames() order, A before B) with PEFT-style names relative to
  // the model, e.g. "model.layers.0.self_attn.q_proj.lora_A.weight"
  // (fp32, requires_grad). The tensors are the live parameters.
  std::vector<std::pair<std::string, torch::Tensor>> LoraParameters();
  // Copies adapter weights in by the same names. Every LoRA parameter must be
  // present with its exact shape; unknown names are errors.
  void LoadLoraState(const std::vector<std::pair<std::string, torch::Tensor>>& state);
  int64_t NumLoraParameters();

  // Accessors for export.
  std::vector<DecoderLayer>& layers() { return layers_; }
  const torch::Tensor& embed_tokens() const { return embed_; }
  const torch::Tensor& final_norm() const { return norm_; }
  const torch::Tensor& lm_head() const { return lm_head_; }  // == embed when tied
  // Bytes of base weights as stored on device (NF4 packed + absmax, or dense).
  int64_t BaseStorageBytes() const;

 private:
  LlamaForCausalLM(LlamaConfig config, LoadOptions opts);
  torch::Tensor Embed(const torch::Tensor& input_ids) const;
  // One decoder layer; with checkpointing its MLP runs as the node.
  // root_only (a checkpoint's recompute): the output is only the root of the
  // backward, so work that only produces its value is skipped (the MLP
  // node's forward; o_proj's GEMMs when the attention half is the output).
  torch::Tensor LayerForward(DecoderLayer& layer, const torch::Tensor& x, const torch::Tensor& cos,
                             const torch::Tensor& sin, const torch::Tensor& segment_ids, bool root_only = false);
  // x + o_proj(attention(rope(q/k/v_proj(rmsnorm(x))))). `kept` (selective
  // recompute on long sequences): the attention output this half's checkpoint
  // keeps (llama_ops.h AttentionKeepingOutput). `kept_qkv` (the same): where
  // the fused q/k/v projection's output waits between the checkpoint's first
  // pass and its recompute, which then runs no q/k/v GEMM; unused when q/k/v
  // do not fuse.
  torch::Tensor AttentionHalf(DecoderLayer& layer, const torch::Tensor& x, const torch::Tensor& cos,
                              const torch::Tensor& sin, const torch::Tensor& segment_ids, bool root_only = false,
                              const c10::intrusive_ptr<ops::KeptAttention>& kept = {},
                              const std::shared_ptr<ops::ActivationStash>& kept_qkv = nullptr);
  // r + down(swiglu(gate(n), up(n))), n = rmsnorm(r): as one node
  // (llama.cc MlpFunction, in kMlpChunkTokens chunks above kMlpChunkAbove
  // tokens) when `as_node` (checkpointing: selective, or on/offload, where the
  // layer recompute then skips the MLP's forward); plain autograd ops
  // otherwise or while LoRA dropout is active. `slab` (selective recompute
  // on long sequences): the node keeps its copy of r in the slab's
  // `residual` block, slot `slot`, so that no kept tensor is allocated between
  // a layer's transient ones.
  torch::Tensor MlpHalf(DecoderLayer& layer, const torch::Tensor& r, bool as_node, bool root_only = false,
                        const c10::intrusive_ptr<ops::KeptAttentionSlab>& slab = {}, int64_t slot = 0);
  bool MlpNodeApplies() const;
  // Offload set on a GPU (on CPU the inputs are host memory already: "on").
  bool OffloadsActivations() const { return offload_ && opts_.device.is_cuda(); }

  LlamaConfig config_;
  LoadOptions opts_;
  torch::Tensor embed_, norm_, lm_head_;
  std::vector<DecoderLayer> layers_;
  torch::Tensor inv_freq_;  // fp32 on device
  bool checkpointing_ = false;
  bool offload_ = false;
  bool selective_ = false;
  bool fused_projections_ = true;
  bool training_ = true;
};

// Random-init model in HF layout: config.json, model.safetensors (sharded as
// model-0000i-of-0000n.safetensors + model.safetensors.index.json above 2 GB),
// tokenizer.json + tokenizer_config.json copied from tokenizer_dir (plus
// special_tokens_map.json when present), generation_config.json.
// preset: "tiny" (vocab 128256, hidden 64, 2 layers, 4 heads, 2 kv heads,
// intermediate 192, tied embeddings, rope_theta 500000), "llama3-8b" (Llama 3.1
// 8B shapes with llama3 rope scaling), or a path to a config.json (CUSTOM).
// Init: normal(0, 0.02) for embeddings and linears, 1.0 for norms (tiny: 16 for
// the final norm, so its frozen head has a trained model's logit range). dtype:
// "bf16" | "fp32". Streams shard by shard: host memory peaks near one shard.
// Deterministic in `seed`. Throws std::runtime_error.
void InitModel(const std::string& preset, const std::string& tokenizer_dir,
               const std::string& out_dir, uint64_t seed, const std::string& dtype = "bf16");
// The config a preset name stands for (throws for unknown presets).
LlamaConfig PresetConfig(const std::string& preset);

}  // namespace tune::model

#endif  // TUNE_WORKER_TRAINER_MODEL_LLAMA_H_
