// Helpers shared by the model unit tests: temp dirs and tiny random models.
#ifndef TUNE_TESTS_UNIT_TRAINER_MODEL_TEST_UTIL_H_
#define TUNE_TESTS_UNIT_TRAINER_MODEL_TEST_UTIL_H_

#include <ftw.h>
#include <unistd.h>

#include <torch/torch.h>

#include <cstdio>

#include <filesystem>
#include <map>
#include <random>
#include <string>

#include "worker/trainer/model/llama.h"

namespace tune::model::testing {

// A fresh empty directory under the system temp dir, removed on destruction.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() /
            ("tune_model_test_" + std::to_string(::getpid()) + "_" + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    // nftw rather than std::filesystem::remove_all: pip builds of libtorch
    // 2.x export their own (broken) copy of that symbol, which crashed here.
    ::nftw(
        path_.c_str(),
        [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
        FTW_DEPTH | FTW_PHYS);
  }
  std::string path() const { return path_.string(); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// A small Llama: odd vocab, GQA (4 heads over 2 kv heads), llama3 rope scaling.
inline LlamaConfig SmallConfig(bool tied = false) {
  LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 32;
  c.intermediate_size = 40;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000;
  c.rope_scaling = RopeScaling{"llama3", 8.0, 1.0, 4.0, 64};
  c.tie_word_embeddings = tied;
  c.eos_token_ids = {1};
  c.bos_token_id = 0;
  return c;
}

// Random weights for `c` (normal 0.1 std for matrices, around 1 for norms).
inline std::map<std::string, torch::Tensor> RandomWeights(const LlamaConfig& c, uint64_t seed) {
  torch::manual_seed(seed);
  std::map<std::string, torch::Tensor> w;
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  w["model.embed_tokens.weight"] = torch::randn({V, H});
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    w[p + "input_layernorm.weight"] = 1 + 0.1 * torch::randn({H});
    w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch::randn({H});
    w[p + "self_attn.q_proj.weight"] = 0.2 * torch::randn({q, H});
    w[p + "self_attn.k_proj.weight"] = 0.2 * torch::randn({kv, H});
    w[p + "self_attn.v_proj.weight"] = 0.2 * torch::randn({kv, H});
    w[p + "self_attn.o_proj.weight"] = 0.2 * torch::randn({H, q});
    w[p + "mlp.gate_proj.weight"] = 0.2 * torch::randn({I, H});
    w[p + "mlp.up_proj.weight"] = 0.2 * torch::randn({I, H});
    w[p + "mlp.down_proj.weight"] = 0.2 * torch::randn({H, I});
  }
  w["model.norm.weight"] = 1 + 0.1 * torch::randn({H});
  if (!c.tie_word_embeddings) w["lm_head.weight"] = 0.2 * torch::randn({V, H});
  return w;
}

inline std::shared_ptr<LlamaForCausalLM> BuildModel(const LlamaConfig& c,
                                                    const std::map<std::string, torch::Tensor>& w,
                                                    const LoadOptions& opts) {
  return LlamaForCausalLM::FromTensors(c, [&](const std::string& n) { return w.at(n); }, opts);
}

inline LoadOptions Fp32Options(const std::string& base = "bf16") {
  LoadOptions o;
  o.base = base;
  o.compute_dtype = torch::kFloat32;
  o.lora.r = 4;
  o.lora.alpha = 8;
  o.lora.targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  o.seed = 7;
  return o;
}

// Gives every LoRA B a random value so adapters change the output.
inline void RandomizeLora(LlamaForCausalLM& m, uint64_t seed) {
  torch::manual_seed(seed);
  std::vector<std::pair<std::string, torch::Tensor>> state;
  for (auto& [name, p] : m.LoraParameters()) state.emplace_back(name, 0.1 * torch::randn(p.sizes()));
  m.LoadLoraState(state);
}

}  // namespace tune::model::testing

#endif  // TUNE_TESTS_UNIT_TRAINER_MODEL_TEST_UTIL_H_
