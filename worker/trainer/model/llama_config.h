// LlamaConfig: the subset of a Hugging Face Llama config.json the trainer uses.
#ifndef TUNE_WORKER_TRAINER_MODEL_LLAMA_CONFIG_H_
#define TUNE_WORKER_TRAINER_MODEL_LLAMA_CONFIG_H_

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace tune::model {

// Long micro-batches: with checkpointing, a micro-batch of more than
// kMlpChunkAbove tokens runs each layer's MLP as one node over chunks of
// kMlpChunkTokens tokens (llama.cc MlpFunction), so the [tokens, intermediate]
// tensors of the layer being recomputed never exist whole. It costs one more
// gate/up GEMM per layer (their recompute inside the node's backward), small
// next to attention at such lengths. Here, not in llama.h, because the
// torch-free memory planner mirrors both values.
inline constexpr int64_t kMlpChunkTokens = 16384;
inline constexpr int64_t kMlpChunkAbove = 65536;

// Selective recompute on sequences longer than kKeepAttentionOutputAbove:
// each layer's checkpoint also keeps its attention output (and the kernel's
// log-sum-exp), so the recompute runs no attention forward, while its input
// and q/k/v output wait in pinned host memory, so the device holds as much as
// before but for the last layer's two (llama.cc ForwardHidden, llama_ops.h
// AttentionKeepingOutput). The attention forward it saves costs ~2 x seq x
// hidden FLOPs per token and layer; the host copies ((hidden + q/k/v width) x
// dtype bytes per token and layer each way) overlap compute. Below the
// threshold the saving shrinks with the sequence (seq 4096: ~3% of a
// Llama-3-8B step) and has not been weighed against the copies. It needs
// cuDNN's fused attention (CUDA, torch >= 2.6, bf16/fp16) and no packing.
// Here because the torch-free memory planner mirrors it.
inline constexpr int64_t kKeepAttentionOutputAbove = 4096;
// Head sizes cuDNN's fused attention takes: multiples of 8 up to 128.
inline constexpr bool CudnnAttentionHeadDim(int64_t head_dim) { return head_dim % 8 == 0 && head_dim <= 128; }

// Bytes of pinned host memory activation offload (offload.cc) holds for a
// layer input of `bytes`: rounded up to a size class of 1/8 of a power of two
// (at most 12.5% more), so inputs of nearby lengths share blocks across steps.
// torch's own pinned allocator rounds up to a whole power of two, which at long
// contexts doubles the host memory (a 2.8 GB input took 4 GiB). Here because
// the torch-free memory planner counts the same bytes.
inline int64_t PinnedBlockBytes(int64_t bytes) {
  if (bytes <= (int64_t{2} << 20)) return int64_t{2} << 20;
  int64_t pow2 = 1;
  while (pow2 * 2 <= bytes) pow2 *= 2;
  const int64_t step = pow2 / 8;
  return (bytes + step - 1) / step * step;
}

struct RopeScaling {
  std::string type;  // only "llama3" is supported (Llama 3.1+); others are rejected
  double factor = 1, low_freq_factor = 1, high_freq_factor = 4;
  int original_max_position_embeddings = 8192;
};

struct LlamaConfig {
  int vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_hidden_layers = 0,
      num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0;
  int max_position_embeddings = 8192;
  double rms_norm_eps = 1e-5, rope_theta = 10000.0;
  std::optional<RopeScaling> rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false, mlp_bias = false;  // must be false (Llama 3); checked
  int bos_token_id = 128000;
  std::vector<int> eos_token_ids;  // config.json eos_token_id: int or list
  std::string torch_dtype = "bfloat16";

  // Parses config.json. Throws std::runtime_error naming the file and field:
  // non-Llama architectures / model_type, missing or non-positive sizes,
  // heads not dividing hidden size, kv heads not dividing heads, unsupported
  // rope_scaling types, hidden_act other than silu.
  static LlamaConfig FromJsonFile(const std::string& path);
  // Same from parsed JSON; `source` names the origin in errors.
  static LlamaConfig FromJson(const nlohmann::json& j, const std::string& source);
  // HF-style config.json content ("architectures": ["LlamaForCausalLM"], ...).
  nlohmann::json ToJson() const;
  // Total parameters including embeddings and (untied) lm_head.
  int64_t NumParameters() const;
  // Checks internal consistency (what FromJson checks); throws.
  void Validate(const std::string& source) const;
};

}  // namespace tune::model

#endif  // TUNE_WORKER_TRAINER_MODEL_LLAMA_CONFIG_H_
