// The functional building blocks of the Llama decoder, exposed for tests and
// for the model in llama.cc. All follow Hugging Face transformers' Llama
// numerics (noted per function) so the same weights give the same logits.
#ifndef TUNE_WORKER_TRAINER_MODEL_LLAMA_OPS_H_
#define TUNE_WORKER_TRAINER_MODEL_LLAMA_OPS_H_

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <vector>

#include "worker/trainer/model/llama_config.h"

namespace tune::model::ops {

// RoPE inverse frequencies, fp32 [head_dim/2], computed with the same fp32
// tensor ops as HF's `_compute_default_rope_parameters` and, for
// rope_scaling type "llama3", `_compute_llama3_parameters`.
torch::Tensor RopeInvFreq(const LlamaConfig& config);

// cos/sin [B,T,head_dim] in `dtype` for int64 position_ids [B,T]: freqs
// computed in fp32, emb = cat(freqs, freqs) (HF convention), then cast.
std::pair<torch::Tensor, torch::Tensor> RopeCosSin(const torch::Tensor& inv_freq,
                                                    const torch::Tensor& position_ids,
                                                    torch::ScalarType dtype);

// x [B,heads,T,d] * cos + rotate_half(x) * sin with cos/sin [B,T,d]
// (rotate_half(x) = cat(-x2, x1)).
torch::Tensor ApplyRope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

// HF LlamaRMSNorm: variance in fp32, normalised x cast back to the input
// dtype, then multiplied by weight. `spare_cols` > 0 asks (on the fused CUDA
// path) for the result's rows to be followed by that many unused columns of
// the same buffer, for a folded projection's LoRA input (llama.cc); the torch
// path ignores it.
torch::Tensor RmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps, int64_t spare_cols = 0);

// Causal (optionally segment-restricted) GQA attention.
// q [B,Hq,T,d], k/v [B,Hkv,T,d] with Hq % Hkv == 0; segment_ids int64 [B,T]
// or undefined. Position t attends to s <= t with segment_ids equal (packing).
// Returns [B,Hq,T,d]. Scale 1/sqrt(d).
// On torch >= 2 uses at::scaled_dot_product_attention (is_causal without
// segments; a boolean mask with them; K/V expanded only when the kernel
// cannot group heads itself). On torch 1.13 (or force_math) computes
// softmax(QK^T * scale + mask) V exactly, softmax in fp32.
torch::Tensor Attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& segment_ids, bool force_math = false);

// Makes at::scaled_dot_product_attention try cuDNN's fused attention before
// flash, memory-efficient and math (torch >= 2.6; process-wide). On an H200
// cuDNN runs Llama-3-8B's causal GQA attention forward + backward 1.7-1.9x
// faster than the flash kernel (bench/sdpa_backends.py); SDPA still falls
// back in order when cuDNN declines a shape. Returns false (and changes
// nothing) on older torch.
bool PreferCudnnAttention();

// One block of memory per kind of tensor that all layers of one forward keep
// (KeptAttention::slab; the MLP node's input, llama.h MlpHalf). Kept tensors
// allocated one per layer, between each layer's larger transients, can leave
// holes the caching allocator cannot reuse for those transients (seq 8192 x 2:
// 2.4 GiB reserved beyond allocated); copied into slots of one block allocated
// at the first layer (for `layers` slots), they leave none. Costs one device
// copy of each kept tensor, and cuDNN's output and its copy coexist for a
// moment. The block lives until layer 0's backward, the last to run, has
// used its slot.
struct KeptAttentionSlab : torch::CustomClassHolder {
  explicit KeptAttentionSlab(int64_t layers) : layers(layers) {}
  // t's values in slot `slot` of `block` (allocated for `layers` tensors like
  // t on first use), with t's sizes and strides; t itself when its layout has
  // gaps or overlaps or does not match the block's.
  torch::Tensor Place(const torch::Tensor& t, torch::Tensor& block, int64_t slot) const;

  int64_t layers;
  torch::Tensor out, lse;   // the blocks, flat: attention outputs and log-sum-exps
  torch::Tensor residual;   // the MLP nodes' inputs (the residual stream after attention)
};

// The attention output a checkpointed layer keeps for its recompute
// (selective recompute above model::kKeepAttentionOutputAbove tokens): filled
// by the layer's first, no-grad pass of AttentionKeepingOutput; the recompute
// hands `out` over to its autograd node, whose backward reads `lse` and the
// rest. With `slab` set, `out` and `lse` are placed in its slot `slot`.
struct KeptAttention : torch::CustomClassHolder {
  torch::Tensor out, lse, philox_seed, philox_offset;
  int64_t max_q = 0, max_k = 0;
  c10::intrusive_ptr<KeptAttentionSlab> slab;
  int64_t slot = 0;
};

// Whether AttentionKeepingOutput may run on queries of `head_dim` in x's
// dtype and device: this process prefers cuDNN attention
// (PreferCudnnAttention() returned true), x is CUDA bf16/fp16 and head_dim a
// multiple of 8 up to 128.
bool CanKeepAttentionOutput(const torch::Tensor& x, int64_t head_dim);

// Causal GQA attention as Attention() without segments, through cuDNN's fused
// kernel, keeping its output in `kept`. With grad mode off (a checkpoint's
// first pass) it computes the output and log-sum-exp and stores both; with
// grad mode on and `kept` filled (the recompute) it returns the stored output
// without computing, and its backward runs cuDNN's backward from the stored
// tensors; otherwise it is Attention(). Should cuDNN decline the inputs in
// the first pass, nothing is kept and the recompute runs Attention().
// Precondition: CanKeepAttentionOutput(q, q.size(-1)).
torch::Tensor AttentionKeepingOutput(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                     const c10::intrusive_ptr<KeptAttention>& kept);

// Boolean [B,1,T,T] mask: true where attention is allowed.
torch::Tensor CausalSegmentMask(const torch::Tensor& segment_ids, int64_t T, torch::Device device);

// Sum over positions with labels != -100 of -log_softmax(hidden @ weight^T)[label],
// fp32 scalar. hidden [..., H] (compute dtype), weight [V, H], labels int64
// with hidden's leading shape. Processes `chunk_tokens` rows at a time; the
// custom backward recomputes each chunk's logits, so memory never holds more
// than one chunk of [chunk, V] logits (forward or backward). Gradient flows to
// hidden, and to weight when weight requires grad.
torch::Tensor ChunkedCrossEntropySum(const torch::Tensor& hidden, const torch::Tensor& weight,
                                     const torch::Tensor& labels, int64_t chunk_tokens);

// Where a checkpoint keeps its input between forward and backward when not on
// the device (activation offload, model/offload.h). Put() is called once in
// forward with the input; Take() once in backward and returns a tensor equal
// to it on its original device. The gradient never passes through a stash.
class ActivationStash {
 public:
  virtual ~ActivationStash() = default;
  virtual void Put(const torch::Tensor& x) = 0;
  virtual torch::Tensor Take() = 0;
};

// Gradient checkpointing: runs fn(x) without building a graph and keeps only
// x (in `stash` when given, else as a saved tensor); in backward re-runs fn
// with grad enabled (restoring the RNG state of x's device first, so dropout
// masks repeat) and backpropagates into x and `params` (which must be the
// leaves fn uses that need grads). Output equals fn(x); gradients equal those
// of running fn(x) directly, and x's gradient stays on x's device.
torch::Tensor Checkpoint(const std::function<torch::Tensor(const torch::Tensor&)>& fn,
                         const torch::Tensor& x, const std::vector<torch::Tensor>& params,
                         std::shared_ptr<ActivationStash> stash = nullptr);

}  // namespace tune::model::ops

#endif  // TUNE_WORKER_TRAINER_MODEL_LLAMA_OPS_H_
