#include "worker/trainer/model/llama_ops.h"

#include <torch/version.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <string>

#include "worker/trainer/model/cuda_ops.h"

// torch's cuDNN attention ops and the SDPA backend order (torch >= 2.6).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6)
#define TUNE_HAVE_CUDNN_ATTENTION 1
#else
#define TUNE_HAVE_CUDNN_ATTENTION 0
#endif

namespace tune::model::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kIgnoreIndex = -100;

// Set by PreferCudnnAttention: AttentionKeepingOutput calls cuDNN directly,
// so it runs only where SDPA would pick cuDNN too; set once SDPA (or cuDNN
// itself) declined such inputs, after which nothing is kept.
std::atomic<bool> cudnn_attention_preferred{false};
std::atomic<bool> keep_attention_declined{false};

#if TUNE_HAVE_CUDNN_ATTENTION
double AttentionScale(const torch::Tensor& q) { return 1.0 / std::sqrt(static_cast<double>(q.size(-1))); }
int64_t AsInt(int64_t v) { return v; }
int64_t AsInt(const c10::SymInt& v) { return v.expect_int(); }

// Attention whose forward already ran (a checkpoint's first pass): forward
// returns the kept output, backward is cuDNN's from the kept log-sum-exp.
class KeptAttentionFunction : public torch::autograd::Function<KeptAttentionFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, c10::intrusive_ptr<KeptAttention> kept) {
    // The node takes everything over: saved variables (the output as its own,
    // so no reference cycle), released when this backward ends (slab slots
    // are views: their block is freed after layer 0's backward); `kept`,
    // which the checkpoint's closure holds until the whole backward ends, is
    // left empty.
    torch::Tensor out = kept->out.detach();
    ctx->save_for_backward({q, k, v, out, kept->lse, kept->philox_seed, kept->philox_offset});
    ctx->saved_data["max_q"] = kept->max_q;
    ctx->saved_data["max_k"] = kept->max_k;
    *kept = KeptAttention();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const variable_list s = ctx->get_saved_variables();
    const torch::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3];
    torch::Tensor g = grad_out[0];
    if (!g.defined()) return {torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    // cuDNN reads the output's gradient in the output's layout.
    if (g.strides() != out.strides()) g = torch::empty_strided(out.sizes(), out.strides(), out.options()).copy_(g);
    auto [dq, dk, dv] = at::_scaled_dot_product_cudnn_attention_backward(
        g, q, k, v, out, /*logsumexp=*/s[4], /*philox_seed=*/s[5], /*philox_offset=*/s[6],
        /*attn_bias=*/torch::Tensor(), /*cum_seq_q=*/torch::Tensor(), /*cum_seq_k=*/torch::Tensor(),
        ctx->saved_data["max_q"].toInt(), ctx->saved_data["max_k"].toInt(), /*dropout_p=*/0.0, /*is_causal=*/true,
        AttentionScale(q));
    return {dq, dk, dv, torch::Tensor()};
  }
};
#endif

// Carries a std::function (and the input's stash, if any) through
// AutogradContext::saved_data (an IValue map).
struct FnHolder : torch::CustomClassHolder {
  std::function<torch::Tensor(const torch::Tensor&)> fn;
  std::shared_ptr<ActivationStash> stash;
};

torch::Tensor GeneratorState(torch::Device device) {
  const at::Generator& gen = at::globalContext().defaultGenerator(device);
  at::Generator g = gen;  // shares the implementation
  std::lock_guard<std::mutex> lock(g.mutex());
  return g.get_state();
}

void SetGeneratorState(torch::Device device, const torch::Tensor& state) {
  const at::Generator& gen = at::globalContext().defaultGenerator(device);
  at::Generator g = gen;
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_state(state);
}

// Restores a device's RNG state on scope exit.
class RngRestore {
 public:
  explicit RngRestore(torch::Device device) : device_(device), state_(GeneratorState(device)) {}
  ~RngRestore() { SetGeneratorState(device_, state_); }

 private:
  torch::Device device_;
  torch::Tensor state_;
};

class CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, c10::intrusive_ptr<FnHolder> holder, torch::Tensor x,
                               at::TensorList params) {
    ctx->saved_data["fn"] = c10::IValue::make_capsule(holder);
    ctx->saved_data["rng"] = GeneratorState(x.device());
    ctx->saved_data["x_requires_grad"] = x.requires_grad();
    std::vector<torch::Tensor> to_save;
    if (holder->stash) {
      holder->stash->Put(x);
    } else {
      to_save.push_back(x);
    }
    to_save.insert(to_save.end(), params.begin(), params.end());
    ctx->save_for_backward(to_save);
    torch::NoGradGuard no_grad;
    return holder->fn(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto holder = ctx->saved_data["fn"].toCapsule();
    auto* fn_holder = static_cast<FnHolder*>(holder.get());
    const bool x_requires_grad = ctx->saved_data["x_requires_grad"].toBool();
    variable_list saved = ctx->get_saved_variables();
    const bool stashed = fn_holder->stash != nullptr;
    torch::Tensor x = (stashed ? fn_holder->stash->Take() : saved[0]).detach().requires_grad_(x_requires_grad);
    std::vector<torch::Tensor> params(saved.begin() + (stashed ? 0 : 1), saved.end());

    torch::Tensor out;
    {
      // Replay the forward's random stream (LoRA dropout) and leave the
      // caller's stream where it was.
      RngRestore restore(x.device());
      SetGeneratorState(x.device(), ctx->saved_data["rng"].toTensor());
      torch::AutoGradMode enable(true);
      out = fn_holder->fn(x);
    }
    std::vector<torch::Tensor> inputs;
    std::vector<int> slot;  // index into the result for each input
    if (x_requires_grad) {
      inputs.push_back(x);
      slot.push_back(1);
    }
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].requires_grad()) {
        inputs.push_back(params[i]);
        slot.push_back(static_cast<int>(2 + i));
      }
    }
    variable_list result(2 + params.size());
    if (inputs.empty() || !out.requires_grad()) return result;
    torch::Tensor g = grad_out[0].defined() ? grad_out[0] : torch::zeros_like(out);
    variable_list grads = torch::autograd::grad({out}, inputs, {g}, /*retain_graph=*/false,
                                                /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < grads.size(); ++i) result[slot[i]] = grads[i];
    return result;
  }
};

// Sum of cross-entropies over rows (all rows valid: callers pre-select).
class ChunkedCeFunction : public torch::autograd::Function<ChunkedCeFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor hidden, torch::Tensor weight, torch::Tensor labels,
                               int64_t chunk) {
    ctx->save_for_backward({hidden, weight, labels});
    ctx->saved_data["chunk"] = chunk;
    torch::NoGradGuard no_grad;
    const int64_t n = hidden.size(0);
    torch::Tensor total = torch::zeros({}, hidden.options().dtype(torch::kFloat32));
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t e = std::min(n, s + chunk);
      torch::Tensor logits = hidden.slice(0, s, e).matmul(weight.t()).to(torch::kFloat32);
      torch::Tensor y = labels.slice(0, s, e).unsqueeze(1);
      torch::Tensor lse = torch::logsumexp(logits, 1);
      total += (lse - logits.gather(1, y).squeeze(1)).sum();
    }
    return total;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    variable_list saved = ctx->get_saved_variables();
    torch::Tensor hidden = saved[0], weight = saved[1], labels = saved[2];
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const bool need_h = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    torch::Tensor g = grad_out[0].to(torch::kFloat32);
    torch::NoGradGuard no_grad;
    const int64_t n = hidden.size(0);
    torch::Tensor grad_h = need_h ? torch::empty_like(hidden) : torch::Tensor();
    torch::Tensor grad_w = need_w ? torch::zeros(weight.sizes(), weight.options().dtype(torch::kFloat32)) : torch::Tensor();
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t e = std::min(n, s + chunk);
      torch::Tensor h = hidden.slice(0, s, e);
      // d(lse - logit_y)/dlogits = softmax - onehot(y).
      torch::Tensor p = torch::softmax(h.matmul(weight.t()).to(torch::kFloat32), 1);
      torch::Tensor y = labels.slice(0, s, e).unsqueeze(1);
      p.scatter_add_(1, y, torch::full({e - s, 1}, -1.0f, p.options()));
      p.mul_(g);
      torch::Tensor pc = p.to(hidden.scalar_type());
      if (need_h) grad_h.slice(0, s, e).copy_(pc.matmul(weight));
      if (need_w) grad_w.add_(pc.t().matmul(h).to(torch::kFloat32));
    }
    return {grad_h, need_w ? grad_w.to(weight.scalar_type()) : torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor RopeInvFreq(const LlamaConfig& config) {
  // HF: 1.0 / (base ** (arange(0, dim, 2, int64).float() / dim)), all fp32.
  const int64_t dim = config.head_dim;
  torch::Tensor exponent = torch::arange(0, dim, 2, torch::kInt64).to(torch::kFloat32) / static_cast<double>(dim);
  torch::Tensor inv_freq = 1.0 / torch::pow(config.rope_theta, exponent);
  if (!config.rope_scaling || config.rope_scaling->type != "llama3") return inv_freq;
  const RopeScaling& rs = *config.rope_scaling;
  const double old_context = rs.original_max_position_embeddings;
  const double low_freq_wavelen = old_context / rs.low_freq_factor;
  const double high_freq_wavelen = old_context / rs.high_freq_factor;
  torch::Tensor wavelen = 2 * M_PI / inv_freq;
  // Long wavelengths (low frequencies) are divided by factor, short ones kept.
  torch::Tensor scaled = torch::where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq);
  torch::Tensor smooth = (old_context / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
  torch::Tensor smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled;
  torch::Tensor is_medium = torch::logical_and(torch::logical_not(wavelen < high_freq_wavelen),
                                               torch::logical_not(wavelen > low_freq_wavelen));
  return torch::where(is_medium, smoothed, scaled);
}

std::pair<torch::Tensor, torch::Tensor> RopeCosSin(const torch::Tensor& inv_freq, const torch::Tensor& position_ids,
                                                    torch::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  torch::Tensor freqs = position_ids.to(torch::kFloat32).unsqueeze(-1) * inv_freq.to(position_ids.device());
  torch::Tensor emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

torch::Tensor ApplyRope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  // CUDA bf16: the fused kernel (bit-identical to the ops below).
  if (torch::Tensor fused = cuda_ops::TryApplyRope(x, cos, sin); fused.defined()) return fused;
  const int64_t half = x.size(-1) / 2;
  torch::Tensor x1 = x.slice(-1, 0, half), x2 = x.slice(-1, half);
  torch::Tensor rotated = torch::cat({-x2, x1}, -1);
  return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1);
}

torch::Tensor RmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps, int64_t spare_cols) {
  if (torch::Tensor fused = cuda_ops::TryRmsNorm(x, weight, eps, spare_cols); fused.defined()) return fused;
  torch::Tensor xf = x.to(torch::kFloat32);
  torch::Tensor var = xf.pow(2).mean(-1, /*keepdim=*/true);
  xf = xf * torch::rsqrt(var + eps);
  return weight * xf.to(x.scalar_type());
}

torch::Tensor CausalSegmentMask(const torch::Tensor& segment_ids, int64_t T, torch::Device device) {
  torch::Tensor causal = torch::ones({T, T}, torch::dtype(torch::kBool).device(device)).tril();
  if (!segment_ids.defined()) return causal.view({1, 1, T, T});
  torch::Tensor same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1);  // [B,T,T]
  return torch::logical_and(same, causal.unsqueeze(0)).unsqueeze(1);
}

bool PreferCudnnAttention() {
#if TUNE_HAVE_CUDNN_ATTENTION
  std::vector<int64_t> order{static_cast<int64_t>(at::SDPBackend::cudnn_attention)};
  for (at::SDPBackend b : at::globalContext().sDPPriorityOrder()) {
    if (b != at::SDPBackend::cudnn_attention) order.push_back(static_cast<int64_t>(b));
  }
  at::globalContext().setSDPPriorityOrder(order);
  cudnn_attention_preferred.store(true);
  return true;
#else
  return false;
#endif
}

bool CanKeepAttentionOutput(const torch::Tensor& x, int64_t head_dim) {
  return cudnn_attention_preferred.load() && !keep_attention_declined.load() && x.is_cuda() &&
         (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf) && CudnnAttentionHeadDim(head_dim);
}

torch::Tensor KeptAttentionSlab::Place(const torch::Tensor& t, torch::Tensor& block, int64_t slot) const {
  // Slots start on 128-element boundaries, as aligned as an allocation would
  // be for the kernels that read them (cuDNN's backward).
  const int64_t stride = (t.numel() + 127) / 128 * 128;
  if (slot < 0 || slot >= layers || !t.is_non_overlapping_and_dense()) return t;
  if (!block.defined()) block = torch::empty({layers * stride}, t.options());
  if (block.numel() != layers * stride || block.scalar_type() != t.scalar_type() || block.device() != t.device()) {
    return t;
  }
  return block.as_strided(t.sizes(), t.strides(), slot * stride).copy_(t);
}

torch::Tensor AttentionKeepingOutput(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                     const c10::intrusive_ptr<KeptAttention>& kept) {
#if TUNE_HAVE_CUDNN_ATTENTION
  if (!torch::GradMode::is_enabled()) {
    const double scale = AttentionScale(q);
    // Only where SDPA itself would run cuDNN on these inputs (it also weighs
    // the GPU, cuDNN's version and runtime switches) and the backward may be
    // nondeterministic. Otherwise, or should cuDNN still decline, nothing is
    // kept, now or later (said once), and the recompute runs Attention().
    const bool gqa = q.size(1) != k.size(1);
    std::string declined;
    if (at::globalContext().deterministicAlgorithms()) {
      declined = "deterministic algorithms are on";
    } else if (at::_fused_sdp_choice(q, k, v, std::nullopt, 0.0, /*is_causal=*/true, scale, gqa) !=
               static_cast<int64_t>(at::SDPBackend::cudnn_attention)) {
      declined = "SDPA does not pick cuDNN for these inputs";
    } else {
      try {
        auto res = at::_scaled_dot_product_cudnn_attention(q, k, v, /*attn_bias=*/std::nullopt,
                                                           /*compute_log_sumexp=*/true, /*dropout_p=*/0.0,
                                                           /*is_causal=*/true, /*return_debug_mask=*/false, scale);
        kept->out = std::get<0>(res);
        kept->lse = std::get<1>(res);
        if (kept->slab) {
          KeptAttentionSlab& slab = *kept->slab;
          kept->out = slab.Place(kept->out, slab.out, kept->slot);
          kept->lse = slab.Place(kept->lse, slab.lse, kept->slot);
        }
        kept->max_q = AsInt(std::get<4>(res));
        kept->max_k = AsInt(std::get<5>(res));
        kept->philox_seed = std::get<6>(res);
        kept->philox_offset = std::get<7>(res);
        return kept->out;
      } catch (const c10::OutOfMemoryError&) {
        throw;  // the trainer's OOM recovery handles it
      } catch (const c10::Error& e) {
        declined = std::string("cuDNN: ") + e.what_without_backtrace();
      }
    }
    *kept = KeptAttention();
    if (!keep_attention_declined.exchange(true)) {
      std::fprintf(stderr, "tune-train: selective recompute stops keeping attention outputs (%s)\n",
                   declined.c_str());
    }
  } else if (kept->out.defined()) {
    return KeptAttentionFunction::apply(q, k, v, kept);
  }
#endif
  return Attention(q, k, v, torch::Tensor());
}

torch::Tensor Attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& segment_ids, bool force_math) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), d = q.size(3), Hkv = k.size(1);
  if (Hq % Hkv != 0) throw std::invalid_argument("attention: query heads must be a multiple of key/value heads");
  const int64_t group = Hq / Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  auto expand_kv = [&](const torch::Tensor& t) {
    if (group == 1) return t;
    return t.unsqueeze(2).expand({B, Hkv, group, T, d}).reshape({B, Hq, T, d});  // HF repeat_kv
  };
#if TORCH_VERSION_MAJOR >= 2
  if (!force_math) {
    if (!segment_ids.defined()) {
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 5
      // Flash/cuDNN group heads themselves: no K/V copy.
      return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, {}, /*enable_gqa=*/group > 1);
#else
      return at::scaled_dot_product_attention(q, expand_kv(k), expand_kv(v), {}, 0.0, /*is_causal=*/true);
#endif
    }
    // An arbitrary mask rules out flash; the memory-efficient kernel takes it
    // but not grouped heads, so K/V are expanded here.
    torch::Tensor mask = CausalSegmentMask(segment_ids, T, q.device());
    return at::scaled_dot_product_attention(q, expand_kv(k), expand_kv(v), mask, 0.0, /*is_causal=*/false);
  }
#endif
  (void)expand_kv;
  // Exact math (HF eager): scores in compute dtype, softmax in fp32. Query
  // heads are grouped by their K/V head so K/V are broadcast, not copied.
  torch::Tensor qg = q.reshape({B, Hkv, group, T, d});
  torch::Tensor scores = torch::matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale;  // [B,Hkv,g,T,T]
  torch::Tensor mask = CausalSegmentMask(segment_ids, T, q.device()).unsqueeze(2);     // [B|1,1,1,T,T]
  scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<float>::infinity());
  torch::Tensor probs = torch::softmax(scores, -1, torch::kFloat32).to(q.scalar_type());
  return torch::matmul(probs, v.unsqueeze(2)).reshape({B, Hq, T, d});
}

torch::Tensor ChunkedCrossEntropySum(const torch::Tensor& hidden, const torch::Tensor& weight,
                                     const torch::Tensor& labels, int64_t chunk_tokens) {
  if (chunk_tokens <= 0) throw std::invalid_argument("cross-entropy: chunk_tokens must be > 0");
  const int64_t H = hidden.size(-1);
  if (labels.numel() * H != hidden.numel()) {
    throw std::invalid_argument("cross-entropy: labels shape must match hidden states without the last dim");
  }
  torch::Tensor h2 = hidden.reshape({-1, H});
  torch::Tensor l1 = labels.reshape({-1}).to(hidden.device(), torch::kInt64);
  // Only supervised rows enter the vocabulary projection: masked prompt
  // tokens cost nothing. index_select's backward scatters the grads back.
  torch::Tensor rows = (l1 != kIgnoreIndex).nonzero().squeeze(1);
  if (rows.numel() == 0) return (h2.sum() * 0).to(torch::kFloat32);  // keeps the graph connected
  torch::Tensor ys = l1.index_select(0, rows);
  const int64_t V = weight.size(0);
  if ((ys < 0).any().item<bool>() || (ys >= V).any().item<bool>()) {
    throw std::invalid_argument("cross-entropy: a label is outside [0, vocab_size=" + std::to_string(V) +
                                ") and is not -100");
  }
  torch::Tensor hs = h2.index_select(0, rows);
  // CUDA bf16 with a frozen head: fused GEMM + online logsumexp, bf16 logits only.
  if (torch::Tensor fused = cuda_ops::TryLinearCrossEntropySum(hs, weight, ys, chunk_tokens); fused.defined()) {
    return fused;
  }
  return ChunkedCeFunction::apply(hs, weight, ys, chunk_tokens);
}

torch::Tensor Checkpoint(const std::function<torch::Tensor(const torch::Tensor&)>& fn, const torch::Tensor& x,
                         const std::vector<torch::Tensor>& params, std::shared_ptr<ActivationStash> stash) {
  auto holder = c10::make_intrusive<FnHolder>();
  holder->fn = fn;
  holder->stash = std::move(stash);
  return CheckpointFunction::apply(holder, x, at::TensorList(params));
}

}  // namespace tune::model::ops
