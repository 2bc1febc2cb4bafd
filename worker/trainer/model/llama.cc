#include "worker/trainer/model/llama.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>

#include "worker/trainer/model/cuda_ops.h"
#include "worker/trainer/model/llama_ops.h"
#include "worker/trainer/model/safetensors.h"

namespace tune::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Keeps an NF4 weight reachable from an autograd node (saved_data holds IValues).
struct Nf4Holder : torch::CustomClassHolder {
  nf4::Nf4Tensor weight;
};

// The dense copy of an NF4 weight for one matmul: the fused CUDA kernel on
// bf16 CUDA weights (bit-identical to nf4::Dequantize), torch ops otherwise.
// The buffer comes from the caching allocator and dies with the matmul, so
// consecutive layers reuse the same block.
torch::Tensor DequantizeForMatmul(const nf4::Nf4Tensor& w, torch::ScalarType dtype) {
  if (dtype == torch::kBFloat16 && w.packed.is_cuda() && cuda_ops::Enabled()) {
    return cuda_ops::Nf4DequantizeInto(w, torch::empty({w.numel}, w.packed.options().dtype(torch::kBFloat16)));
  }
  return nf4::Dequantize(w, dtype);
}

// y = x @ dequant(W)^T. Only the quantised weight is kept for backward, where
// it is dequantised again: the full-precision copy lives only during each
// matmul. W is frozen, so no weight gradient is computed.
class Nf4MatmulFunction : public torch::autograd::Function<Nf4MatmulFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, c10::intrusive_ptr<Nf4Holder> w) {
    ctx->saved_data["w"] = c10::IValue::make_capsule(w);
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    torch::Tensor dense = DequantizeForMatmul(w->weight, x.scalar_type());
    return x.matmul(dense.t());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto capsule = ctx->saved_data["w"].toCapsule();
    const auto& w = static_cast<Nf4Holder*>(capsule.get())->weight;
    const auto dtype = static_cast<torch::ScalarType>(ctx->saved_data["dtype"].toInt());
    torch::Tensor dense = DequantizeForMatmul(w, dtype);
    return {grad_out[0].matmul(dense), torch::Tensor()};
  }
};

std::string LayerPrefix(int i) { return "model.layers." + std::to_string(i) + "."; }

std::string ModulePath(const std::string& module) {
  if (module == "gate_proj" || module == "up_proj" || module == "down_proj") return "mlp." + module;
  return "self_attn." + module;
}

void CheckShape(const torch::Tensor& t, const std::vector<int64_t>& want, const std::string& name) {
  if (t.sizes().vec() != want) {
    std::string w = "[", g = "[";
    for (auto d : want) w += std::to_string(d) + ",";
    for (auto d : t.sizes()) g += std::to_string(d) + ",";
    w.back() = ']';
    g.back() = ']';
    throw std::runtime_error("model weight \"" + name + "\" has shape " + g + " but config.json implies " + w);
  }
  if (!t.is_floating_point()) throw std::runtime_error("model weight \"" + name + "\" is not a floating-point tensor");
}

// t.to(device, dtype) that never aliases t: loaded tensors are views into
// an mmap that is unmapped once loading ends, so a no-op conversion must copy.
torch::Tensor OwnedCopy(const torch::Tensor& t, torch::Device device, torch::ScalarType dtype) {
  torch::Tensor r = t.to(device, dtype).contiguous();
  if (r.data_ptr() == t.data_ptr()) r = r.clone();
  return r;
}

}  // namespace

const std::vector<std::string>& LinearModuleNames() {
  static const std::vector<std::string> kNames = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"};
  return kNames;
}

double LoraOptions::Scaling() const {
  return rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

// ---------------------------------------------------------------- LinearWithLora

void LinearWithLora::SetBase(const torch::Tensor& weight, const LoadOptions& opts) {
  torch::NoGradGuard no_grad;
  out_ = weight.size(0);
  in_ = weight.size(1);
  compute_dtype_ = opts.compute_dtype;
  if (opts.base == "nf4") {
    nf4_ = nf4::Quantize(weight.to(opts.device), opts.block_size, opts.double_quant);
    weight_ = torch::Tensor();
  } else {
    weight_ = OwnedCopy(weight, opts.device, opts.compute_dtype);
    nf4_.reset();
  }
}

void LinearWithLora::EnableLora(const LoraOptions& lora, torch::Device device, at::Generator gen) {
  // PEFT: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> bound = gain * sqrt(3 / fan_in)
  // with gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), i.e. bound = 1 / sqrt(in).
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
  torch::Tensor a = torch::empty({lora.r, in_}, torch::kFloat32);
  a.uniform_(-bound, bound, gen);
  lora_a_ = a.to(device).set_requires_grad(true);
  lora_b_ = torch::zeros({out_, lora.r}, torch::dtype(torch::kFloat32).device(device)).set_requires_grad(true);
  scaling_ = lora.Scaling();
  dropout_ = lora.dropout;
}

torch::Tensor LinearWithLora::Forward(const torch::Tensor& x, bool training) const {
  torch::Tensor y;
  if (nf4_) {
    auto holder = c10::make_intrusive<Nf4Holder>();
    holder->weight = *nf4_;  // shares the tensors
    y = Nf4MatmulFunction::apply(x, holder);
  } else {
    y = torch::linear(x, weight_);
  }
  if (lora_a_.defined()) {
    torch::Tensor h = (training && dropout_ > 0) ? torch::dropout(x, dropout_, /*train=*/true) : x;
    torch::Tensor a = lora_a_.to(x.scalar_type()), b = lora_b_.to(x.scalar_type());
    y = y + torch::linear(torch::linear(h, a), b) * scaling_;
  }
  return y;
}

int64_t LinearWithLora::StorageBytes() const {
  if (nf4_) return nf4_->StorageBytes();
  return weight_.defined() ? weight_.numel() * weight_.element_size() : 0;
}

torch::Tensor LinearWithLora::BaseWeight(torch::ScalarType dtype) const {
  torch::NoGradGuard no_grad;
  if (nf4_) return nf4::Dequantize(*nf4_, dtype);
  return weight_.to(dtype);
}

LinearWithLora* DecoderLayer::Linear(const std::string& name) {
  if (name == "q_proj") return &q_proj;
  if (name == "k_proj") return &k_proj;
  if (name == "v_proj") return &v_proj;
  if (name == "o_proj") return &o_proj;
  if (name == "gate_proj") return &gate_proj;
  if (name == "up_proj") return &up_proj;
  if (name == "down_proj") return &down_proj;
  return nullptr;
}

// ---------------------------------------------------------------- LlamaForCausalLM

LlamaForCausalLM::LlamaForCausalLM(LlamaConfig config, LoadOptions opts)
    : config_(std::move(config)), opts_(std::move(opts)) {}

std::shared_ptr<LlamaForCausalLM> LlamaForCausalLM::Load(const std::string& model_dir, const LoadOptions& opts) {
  namespace fs = std::filesystem;
  const LlamaConfig config = LlamaConfig::FromJsonFile((fs::path(model_dir) / "config.json").string());
  auto reader = safetensors::Reader::OpenDir(model_dir);
  auto get = [&](const std::string& name) -> torch::Tensor {
    if (!reader->Has(name)) {
      throw std::runtime_error(model_dir + ": weights lack tensor \"" + name +
                               "\" (is this a complete Llama checkpoint matching config.json?)");
    }
    return reader->View(name);
  };
  return FromTensors(config, get, opts);
}

std::shared_ptr<LlamaForCausalLM> LlamaForCausalLM::FromTensors(
    const LlamaConfig& config, const std::function<torch::Tensor(const std::string&)>& get,
    const LoadOptions& opts) {
  if (opts.base != "nf4" && opts.base != "bf16") {
    throw std::runtime_error("quantization.base must be nf4 or bf16 (got \"" + opts.base + "\")");
  }
  if (opts.compute_dtype != torch::kBFloat16 && opts.compute_dtype != torch::kFloat32 &&
      opts.compute_dtype != torch::kFloat16) {
    throw std::runtime_error("compute dtype must be bf16, fp16 or fp32");
  }
  if (opts.base == "nf4" && (opts.block_size <= 0 || opts.block_size % 2 != 0)) {
    throw std::runtime_error("quantization.block_size must be a positive even number (got " +
                             std::to_string(opts.block_size) + ")");
  }
  const auto& all = LinearModuleNames();
  std::set<std::string> targets;
  for (const auto& t : opts.lora.targets) {
    if (std::find(all.begin(), all.end(), t) == all.end()) {
      throw std::runtime_error("lora.targets: unknown module \"" + t +
                               "\" (choose from q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)");
    }
    targets.insert(t);
  }
  if (!targets.empty() && opts.lora.r <= 0) throw std::runtime_error("lora.r must be > 0");
  config.Validate("config");

  std::shared_ptr<LlamaForCausalLM> m(new LlamaForCausalLM(config, opts));
  // Canonical module order (PEFT stores target_modules as a set).
  m->opts_.lora.targets.clear();
  for (const auto& t : all) {
    if (targets.count(t)) m->opts_.lora.targets.push_back(t);
  }
  torch::NoGradGuard no_grad;
  const auto cdt = opts.compute_dtype;
  const int64_t H = config.hidden_size, I = config.intermediate_size, V = config.vocab_size;
  const int64_t q_dim = int64_t{config.num_attention_heads} * config.head_dim;
  const int64_t kv_dim = int64_t{config.num_key_value_heads} * config.head_dim;
  auto dense = [&](const std::string& name, const std::vector<int64_t>& shape) {
    torch::Tensor t = get(name);
    CheckShape(t, shape, name);
    return OwnedCopy(t, opts.device, cdt);
  };
  m->embed_ = dense("model.embed_tokens.weight", {V, H});
  m->layers_.resize(config.num_hidden_layers);
  std::map<std::string, std::vector<int64_t>> shapes = {
      {"q_proj", {q_dim, H}},    {"k_proj", {kv_dim, H}}, {"v_proj", {kv_dim, H}}, {"o_proj", {H, q_dim}},
      {"gate_proj", {I, H}},     {"up_proj", {I, H}},     {"down_proj", {H, I}}};
  for (int i = 0; i < config.num_hidden_layers; ++i) {
    DecoderLayer& layer = m->layers_[i];
    const std::string p = LayerPrefix(i);
    layer.input_layernorm = dense(p + "input_layernorm.weight", {H});
    layer.post_attention_layernorm = dense(p + "post_attention_layernorm.weight", {H});
    for (const auto& mod : all) {
      const std::string name = p + ModulePath(mod) + ".weight";
      torch::Tensor w = get(name);
      CheckShape(w, shapes[mod], name);
      layer.Linear(mod)->SetBase(w, opts);
    }
  }
  m->norm_ = dense("model.norm.weight", {H});
  if (config.tie_word_embeddings) {
    m->lm_head_ = m->embed_;
  } else {
    m->lm_head_ = dense("lm_head.weight", {V, H});
  }
  m->inv_freq_ = ops::RopeInvFreq(config).to(opts.device);

  // LoRA A init from a CPU generator seeded by opts.seed: the same seed gives
  // the same adapters on every device and rank.
  at::Generator gen = at::detail::createCPUGenerator(opts.seed);
  for (int i = 0; i < config.num_hidden_layers; ++i) {
    for (const auto& mod : m->opts_.lora.targets) {
      LinearWithLora* lin = m->layers_[i].Linear(mod);
      lin->EnableLora(m->opts_.lora, opts.device, gen);
      std::string base = "layers_" + std::to_string(i) + "_" + mod;
      m->register_parameter(base + "_lora_A", lin->lora_a());
      m->register_parameter(base + "_lora_B", lin->lora_b());
    }
  }
  return m;
}

torch::Tensor LlamaForCausalLM::LayerForward(DecoderLayer& layer, const torch::Tensor& x, const torch::Tensor& cos,
                                             const torch::Tensor& sin, const torch::Tensor& segment_ids) {
  const int64_t B = x.size(0), T = x.size(1);
  const int64_t hq = config_.num_attention_heads, hkv = config_.num_key_value_heads, d = config_.head_dim;
  const double eps = config_.rms_norm_eps;
  torch::Tensor h = ops::RmsNorm(x, layer.input_layernorm, eps);
  torch::Tensor q = layer.q_proj.Forward(h, training_).view({B, T, hq, d}).transpose(1, 2);
  torch::Tensor k = layer.k_proj.Forward(h, training_).view({B, T, hkv, d}).transpose(1, 2);
  torch::Tensor v = layer.v_proj.Forward(h, training_).view({B, T, hkv, d}).transpose(1, 2);
  q = ops::ApplyRope(q, cos, sin);
  k = ops::ApplyRope(k, cos, sin);
  torch::Tensor a = ops::Attention(q, k, v.contiguous(), segment_ids);
  a = a.transpose(1, 2).reshape({B, T, hq * d});
  torch::Tensor r = x + layer.o_proj.Forward(a, training_);
  h = ops::RmsNorm(r, layer.post_attention_layernorm, eps);
  torch::Tensor mlp = layer.down_proj.Forward(
      cuda_ops::SwiGlu(layer.gate_proj.Forward(h, training_), layer.up_proj.Forward(h, training_)), training_);
  return r + mlp;
}

torch::Tensor LlamaForCausalLM::ForwardHidden(const torch::Tensor& input_ids, const torch::Tensor& position_ids,
                                              const torch::Tensor& segment_ids) {
  if (input_ids.dim() != 2 || input_ids.scalar_type() != torch::kInt64) {
    throw std::invalid_argument("ForwardHidden: input_ids must be int64 [B,T]");
  }
  if (!position_ids.defined() || position_ids.sizes() != input_ids.sizes()) {
    throw std::invalid_argument("ForwardHidden: position_ids must be int64 [B,T] like input_ids");
  }
  if (segment_ids.defined() && segment_ids.sizes() != input_ids.sizes()) {
    throw std::invalid_argument("ForwardHidden: segment_ids must be [B,T] like input_ids");
  }
  const torch::Device dev = opts_.device;
  torch::Tensor ids = input_ids.to(dev);
  torch::Tensor pos = position_ids.to(dev, torch::kInt64);
  torch::Tensor seg = segment_ids.defined() ? segment_ids.to(dev, torch::kInt64) : torch::Tensor();
  torch::Tensor h = torch::embedding(embed_, ids);
  auto [cos, sin] = ops::RopeCosSin(inv_freq_, pos, opts_.compute_dtype);
  const bool checkpoint = checkpointing_ && torch::GradMode::is_enabled();
  for (auto& layer : layers_) {
    if (!checkpoint) {
      h = LayerForward(layer, h, cos, sin, seg);
      continue;
    }
    std::vector<torch::Tensor> params;
    for (const auto& mod : LinearModuleNames()) {
      LinearWithLora* lin = layer.Linear(mod);
      if (lin->has_lora()) {
        params.push_back(lin->lora_a());
        params.push_back(lin->lora_b());
      }
    }
    DecoderLayer* lp = &layer;
    // Captured by value: the closure runs again during backward.
    auto fn = [this, lp, cos = cos, sin = sin, seg](const torch::Tensor& x) {
      return LayerForward(*lp, x, cos, sin, seg);
    };
    if (offload_ && h.is_cuda()) {
      // The checkpoint saves its input; hand it a host copy and let the
      // layer fetch it back. Both copies are ordered on the current stream.
      torch::Tensor host =
          torch::empty(h.sizes(), h.options().device(torch::kCPU).pinned_memory(true).requires_grad(false));
      host.copy_(h, /*non_blocking=*/true);
      // ops::Checkpoint replays the RNG of its input's device, the host here;
      // LoRA dropout draws on `dev`, so its state is kept and replayed here.
      auto rng = std::make_shared<torch::Tensor>();
      auto fetch = [this, lp, cos = cos, sin = sin, seg, dev, rng](const torch::Tensor& x) {
        at::Generator gen = at::globalContext().defaultGenerator(dev);
        if (!torch::GradMode::is_enabled()) {  // the forward pass
          std::lock_guard<std::mutex> lock(gen.mutex());
          *rng = gen.get_state();
          return LayerForward(*lp, x.to(dev, /*non_blocking=*/true), cos, sin, seg);
        }
        torch::Tensor caller;  // the recompute in backward
        {
          std::lock_guard<std::mutex> lock(gen.mutex());
          caller = gen.get_state();
          gen.set_state(*rng);
        }
        torch::Tensor out = LayerForward(*lp, x.to(dev, /*non_blocking=*/true), cos, sin, seg);
        std::lock_guard<std::mutex> lock(gen.mutex());
        gen.set_state(caller);
        return out;
      };
      h = ops::Checkpoint(fetch, host, params);
      continue;
    }
    h = ops::Checkpoint(fn, h, params);
  }
  return ops::RmsNorm(h, norm_, config_.rms_norm_eps);
}

torch::Tensor LlamaForCausalLM::LossSum(const torch::Tensor& hidden, const torch::Tensor& labels,
                                        int64_t chunk_tokens) {
  return ops::ChunkedCrossEntropySum(hidden, lm_head_, labels, chunk_tokens);
}

torch::Tensor LlamaForCausalLM::Logits(const torch::Tensor& hidden) {
  return hidden.matmul(lm_head_.t()).to(torch::kFloat32);
}

std::vector<std::pair<std::string, torch::Tensor>> LlamaForCausalLM::LoraParameters() {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (int i = 0; i < config_.num_hidden_layers; ++i) {
    for (const auto& mod : LinearModuleNames()) {
      LinearWithLora* lin = layers_[i].Linear(mod);
      if (!lin->has_lora()) continue;
      const std::string p = LayerPrefix(i) + ModulePath(mod);
      out.emplace_back(p + ".lora_A.weight", lin->lora_a());
      out.emplace_back(p + ".lora_B.weight", lin->lora_b());
    }
  }
  return out;
}

void LlamaForCausalLM::LoadLoraState(const std::vector<std::pair<std::string, torch::Tensor>>& state) {
  std::map<std::string, torch::Tensor> by_name;
  for (const auto& [name, t] : state) {
    if (!by_name.emplace(name, t).second) throw std::runtime_error("LoRA state has duplicate entry \"" + name + "\"");
  }
  auto params = LoraParameters();
  std::set<std::string> known;
  for (auto& [name, p] : params) {
    known.insert(name);
    auto it = by_name.find(name);
    if (it == by_name.end()) throw std::runtime_error("LoRA state lacks \"" + name + "\"");
    if (it->second.sizes() != p.sizes()) {
      throw std::runtime_error("LoRA state entry \"" + name + "\" has shape " + c10::str(it->second.sizes()) +
                               ", the model expects " + c10::str(p.sizes()) + " (different r or model?)");
    }
  }
  for (const auto& [name, t] : by_name) {
    if (!known.count(name)) {
      throw std::runtime_error("LoRA state entry \"" + name + "\" matches no LoRA parameter of this model "
                               "(different lora.targets or layer count?)");
    }
  }
  torch::NoGradGuard no_grad;
  for (auto& [name, p] : params) p.copy_(by_name[name]);
}

int64_t LlamaForCausalLM::NumLoraParameters() {
  int64_t n = 0;
  for (auto& [name, p] : LoraParameters()) n += p.numel();
  return n;
}

int64_t LlamaForCausalLM::BaseStorageBytes() const {
  int64_t b = embed_.numel() * embed_.element_size() + norm_.numel() * norm_.element_size();
  if (!config_.tie_word_embeddings) b += lm_head_.numel() * lm_head_.element_size();
  for (const auto& layer : layers_) {
    b += (layer.input_layernorm.numel() + layer.post_attention_layernorm.numel()) * layer.input_layernorm.element_size();
    for (const auto& mod : LinearModuleNames()) {
      auto* lin = const_cast<DecoderLayer&>(layer).Linear(mod);
      b += lin->StorageBytes();
    }
  }
  return b;
}

}  // namespace tune::model
