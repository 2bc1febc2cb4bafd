// InitModel: writes a randomly initialised Llama in Hugging Face layout.
#include <ATen/CPUGeneratorImpl.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>

#include "worker/trainer/model/llama.h"
#include "worker/trainer/model/safetensors.h"

namespace tune::model {
namespace {

namespace fs = std::filesystem;

// Shards are cut before a tensor would push the current one past this size
// (HF's save_pretrained default is 5 GB; the issue asks for 2 GB).
constexpr uint64_t kShardBytes = 2ull * 1000 * 1000 * 1000;

struct Spec {
  std::string name;
  std::vector<int64_t> shape;
  bool is_norm;
};

std::vector<Spec> TensorSpecs(const LlamaConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t q = int64_t{c.num_attention_heads} * c.head_dim, kv = int64_t{c.num_key_value_heads} * c.head_dim;
  std::vector<Spec> s;
  s.push_back({"model.embed_tokens.weight", {V, H}, false});
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    s.push_back({p + "input_layernorm.weight", {H}, true});
    s.push_back({p + "self_attn.q_proj.weight", {q, H}, false});
    s.push_back({p + "self_attn.k_proj.weight", {kv, H}, false});
    s.push_back({p + "self_attn.v_proj.weight", {kv, H}, false});
    s.push_back({p + "self_attn.o_proj.weight", {H, q}, false});
    s.push_back({p + "post_attention_layernorm.weight", {H}, true});
    s.push_back({p + "mlp.gate_proj.weight", {I, H}, false});
    s.push_back({p + "mlp.up_proj.weight", {I, H}, false});
    s.push_back({p + "mlp.down_proj.weight", {H, I}, false});
  }
  s.push_back({"model.norm.weight", {H}, true});
  if (!c.tie_word_embeddings) s.push_back({"lm_head.weight", {V, H}, false});
  return s;
}

void WriteJson(const fs::path& path, const nlohmann::json& j) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) throw std::runtime_error("init-model: cannot write " + tmp.string());
    out << j.dump(2) << "\n";
    if (!out) throw std::runtime_error("init-model: write failed: " + tmp.string());
  }
  fs::rename(tmp, path);
}

}  // namespace

LlamaConfig PresetConfig(const std::string& preset) {
  LlamaConfig c;
  // Both presets use Llama 3's tokenizer ids and rope settings (3.1 scaling).
  c.vocab_size = 128256;
  c.rope_theta = 500000.0;
  c.rms_norm_eps = 1e-5;
  c.bos_token_id = 128000;
  c.eos_token_ids = {128001};
  c.rope_scaling = RopeScaling{"llama3", 8.0, 1.0, 4.0, 8192};
  c.torch_dtype = "bfloat16";
  if (preset == "tiny") {
    c.hidden_size = 64;
    c.intermediate_size = 192;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 16;
    c.max_position_embeddings = 131072;
    c.tie_word_embeddings = true;
  } else if (preset == "llama3-8b") {
    c.hidden_size = 4096;
    c.intermediate_size = 14336;
    c.num_hidden_layers = 32;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 8;
    c.head_dim = 128;
    c.max_position_embeddings = 131072;
    c.tie_word_embeddings = false;
  } else {
    throw std::runtime_error("init-model: unknown preset \"" + preset +
                             "\" (use tiny, llama3-8b, or a path to a config.json)");
  }
  return c;
}

void InitModel(const std::string& preset, const std::string& tokenizer_dir, const std::string& out_dir, uint64_t seed,
               const std::string& dtype) {
  LlamaConfig config;
  if (preset == "tiny" || preset == "llama3-8b") {
    config = PresetConfig(preset);
  } else if (fs::is_regular_file(preset)) {
    config = LlamaConfig::FromJsonFile(preset);
  } else {
    throw std::runtime_error("init-model: --preset \"" + preset +
                             "\" is neither tiny, llama3-8b nor an existing config.json file");
  }
  torch::ScalarType st;
  if (dtype == "bf16" || dtype == "bfloat16") {
    st = torch::kBFloat16;
    config.torch_dtype = "bfloat16";
  } else if (dtype == "fp32" || dtype == "float32") {
    st = torch::kFloat32;
    config.torch_dtype = "float32";
  } else {
    throw std::runtime_error("init-model: dtype must be bf16 or fp32 (got \"" + dtype + "\")");
  }
  const fs::path tok(tokenizer_dir);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
    if (!fs::is_regular_file(tok / f)) {
      throw std::runtime_error("init-model: --tokenizer " + tokenizer_dir + " lacks " + f +
                               " (point it at a Llama 3 tokenizer directory)");
    }
  }
  // The tiny preset's frozen head (hidden 64, tied std-0.02 embeddings) can
  // only produce logits within about +-1.3 behind a final RMSNorm of weight 1,
  // so no adapter could move its loss far from ln(128256) = 11.8 and a demo
  // would show a flat curve. A final-norm weight of 16 (exact in bf16) gives
  // the head the logit range a trained model has; the step-1 loss is then
  // about 15.7, and LoRA can fit data.
  const float final_norm = preset == "tiny" ? 16.0f : 1.0f;
  const fs::path out(out_dir);
  fs::create_directories(out);

  // Plan shards from shapes alone so file names can carry the shard count.
  const std::vector<Spec> specs = TensorSpecs(config);
  const uint64_t elem = c10::elementSize(st);
  std::vector<std::vector<size_t>> shards(1);
  uint64_t cur = 0, total = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    uint64_t bytes = elem;
    for (auto d : specs[i].shape) bytes *= static_cast<uint64_t>(d);
    if (cur > 0 && cur + bytes > kShardBytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(i);
    cur += bytes;
    total += bytes;
  }
  // Remove leftovers of an earlier init with a different layout.
  for (const auto& e : fs::directory_iterator(out)) {
    const std::string n = e.path().filename().string();
    if (n == "model.safetensors.index.json" ||
        (n.rfind("model", 0) == 0 && e.path().extension() == ".safetensors")) {
      // POSIX unlink, not fs::remove: pip builds of libtorch 2.x export their
      // own copies of std::filesystem removal symbols (remove_all crashed).
      ::unlink(e.path().c_str());
    }
  }

  at::Generator gen = at::detail::createCPUGenerator(seed);
  std::map<std::string, std::string> weight_map;
  const size_t n = shards.size();
  for (size_t s = 0; s < n; ++s) {
    std::string file = "model.safetensors";
    if (n > 1) {
      char buf[64];
      std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", s + 1, n);
      file = buf;
    }
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    for (size_t i : shards[s]) {
      const Spec& sp = specs[i];
      torch::Tensor t;
      if (sp.is_norm) {
        t = torch::full(sp.shape, sp.name == "model.norm.weight" ? final_norm : 1.0f, torch::kFloat32);
      } else {
        t = torch::empty(sp.shape, torch::kFloat32);
        t.normal_(0.0, 0.02, gen);  // HF initializer_range
      }
      tensors.emplace_back(sp.name, t.to(st));  // the fp32 draw is freed here
      weight_map[sp.name] = file;
    }
    safetensors::SaveFile((out / file).string(), tensors, {{"format", "pt"}});
  }
  if (n > 1) safetensors::SaveIndex((out / "model.safetensors.index.json").string(), total, weight_map);

  WriteJson(out / "config.json", config.ToJson());
  nlohmann::json gen_cfg = {{"_from_model_config", true}, {"bos_token_id", config.bos_token_id}};
  if (config.eos_token_ids.size() == 1) {
    gen_cfg["eos_token_id"] = config.eos_token_ids[0];
  } else {
    gen_cfg["eos_token_id"] = config.eos_token_ids;
  }
  WriteJson(out / "generation_config.json", gen_cfg);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}) {
    if (fs::is_regular_file(tok / f)) {
      fs::copy_file(tok / f, out / f, fs::copy_options::overwrite_existing);
    }
  }
}

}  // namespace tune::model
