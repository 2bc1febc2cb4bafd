#include "worker/trainer/model/llama_config.h"

#include <fstream>
#include <stdexcept>

namespace tune::model {
namespace {

using nlohmann::json;

[[noreturn]] void Fail(const std::string& source, const std::string& what) {
  throw std::runtime_error(source + ": " + what);
}

int RequireInt(const json& j, const char* field, const std::string& source) {
  if (!j.contains(field)) Fail(source, std::string("missing required field \"") + field + "\"");
  if (!j[field].is_number_integer()) Fail(source, std::string("field \"") + field + "\" must be an integer");
  const int64_t v = j[field].get<int64_t>();
  if (v <= 0 || v > (int64_t{1} << 30)) {
    Fail(source, std::string("field \"") + field + "\" must be a positive integer (got " + std::to_string(v) + ")");
  }
  return static_cast<int>(v);
}

double OptNumber(const json& j, const char* field, double def, const std::string& source) {
  if (!j.contains(field) || j[field].is_null()) return def;
  if (!j[field].is_number()) Fail(source, std::string("field \"") + field + "\" must be a number");
  return j[field].get<double>();
}

bool OptBool(const json& j, const char* field, bool def, const std::string& source) {
  if (!j.contains(field) || j[field].is_null()) return def;
  if (!j[field].is_boolean()) Fail(source, std::string("field \"") + field + "\" must be true or false");
  return j[field].get<bool>();
}

}  // namespace

LlamaConfig LlamaConfig::FromJsonFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) Fail(path, "cannot open (is this a Hugging Face model directory with config.json?)");
  json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    Fail(path, std::string("not valid JSON: ") + e.what());
  }
  return FromJson(j, path);
}

LlamaConfig LlamaConfig::FromJson(const json& j, const std::string& source) {
  if (!j.is_object()) Fail(source, "config must be a JSON object");
  // Architecture: accept LlamaForCausalLM (and model_type llama); reject the
  // rest by name so a Mistral/Qwen/... directory fails with a clear reason.
  if (j.contains("architectures")) {
    if (!j["architectures"].is_array()) Fail(source, "field \"architectures\" must be a list");
    bool ok = false;
    std::string got;
    for (const auto& a : j["architectures"]) {
      if (!a.is_string()) continue;
      got += (got.empty() ? "" : ", ") + a.get<std::string>();
      if (a.get<std::string>() == "LlamaForCausalLM") ok = true;
    }
    if (!ok) {
      Fail(source, "architectures is [" + got +
                       "]; tune-train supports Llama models only (architectures: [\"LlamaForCausalLM\"])");
    }
  }
  if (j.contains("model_type")) {
    if (!j["model_type"].is_string() || j["model_type"].get<std::string>() != "llama") {
      Fail(source, "model_type is " + j["model_type"].dump() + "; only \"llama\" is supported");
    }
  } else if (!j.contains("architectures")) {
    Fail(source, "missing \"model_type\" and \"architectures\"; expected model_type \"llama\"");
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu") {
    Fail(source, "hidden_act is " + j["hidden_act"].dump() + "; Llama uses \"silu\"");
  }

  LlamaConfig c;
  c.vocab_size = RequireInt(j, "vocab_size", source);
  c.hidden_size = RequireInt(j, "hidden_size", source);
  c.intermediate_size = RequireInt(j, "intermediate_size", source);
  c.num_hidden_layers = RequireInt(j, "num_hidden_layers", source);
  c.num_attention_heads = RequireInt(j, "num_attention_heads", source);
  c.num_key_value_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                              ? RequireInt(j, "num_key_value_heads", source)
                              : c.num_attention_heads;
  if (j.contains("head_dim") && !j["head_dim"].is_null()) {
    c.head_dim = RequireInt(j, "head_dim", source);
  } else {
    if (c.hidden_size % c.num_attention_heads != 0) {
      Fail(source, "hidden_size " + std::to_string(c.hidden_size) + " is not divisible by num_attention_heads " +
                       std::to_string(c.num_attention_heads) + " (set head_dim explicitly)");
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  c.max_position_embeddings = j.contains("max_position_embeddings") ? RequireInt(j, "max_position_embeddings", source) : 8192;
  c.rms_norm_eps = OptNumber(j, "rms_norm_eps", 1e-6, source);
  c.rope_theta = OptNumber(j, "rope_theta", 10000.0, source);
  c.tie_word_embeddings = OptBool(j, "tie_word_embeddings", false, source);
  c.attention_bias = OptBool(j, "attention_bias", false, source);
  c.mlp_bias = OptBool(j, "mlp_bias", false, source);
  if (j.contains("bos_token_id") && j["bos_token_id"].is_number_integer()) c.bos_token_id = j["bos_token_id"].get<int>();
  if (j.contains("eos_token_id")) {
    const json& e = j["eos_token_id"];
    if (e.is_number_integer()) {
      c.eos_token_ids = {e.get<int>()};
    } else if (e.is_array()) {
      for (const auto& x : e) {
        if (!x.is_number_integer()) Fail(source, "eos_token_id list must hold integers");
        c.eos_token_ids.push_back(x.get<int>());
      }
    } else if (!e.is_null()) {
      Fail(source, "eos_token_id must be an integer or a list of integers");
    }
  }
  if (j.contains("torch_dtype") && j["torch_dtype"].is_string()) c.torch_dtype = j["torch_dtype"].get<std::string>();
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    const json& r = j["rope_scaling"];
    if (!r.is_object()) Fail(source, "rope_scaling must be an object or null");
    RopeScaling s;
    if (r.contains("rope_type") && r["rope_type"].is_string()) {
      s.type = r["rope_type"].get<std::string>();
    } else if (r.contains("type") && r["type"].is_string()) {
      s.type = r["type"].get<std::string>();
    } else {
      Fail(source, "rope_scaling needs a string \"rope_type\" (or \"type\")");
    }
    if (s.type == "default") {
      // Same as no scaling.
    } else if (s.type == "llama3") {
      const std::string rs = source + ": rope_scaling";
      if (!r.contains("factor")) Fail(rs, "missing \"factor\"");
      s.factor = OptNumber(r, "factor", 1.0, rs);
      s.low_freq_factor = OptNumber(r, "low_freq_factor", 1.0, rs);
      s.high_freq_factor = OptNumber(r, "high_freq_factor", 4.0, rs);
      if (!r.contains("original_max_position_embeddings")) Fail(rs, "missing \"original_max_position_embeddings\"");
      s.original_max_position_embeddings = RequireInt(r, "original_max_position_embeddings", rs);
      if (s.factor <= 0 || s.low_freq_factor <= 0 || s.high_freq_factor <= s.low_freq_factor) {
        Fail(rs, "needs factor > 0 and high_freq_factor > low_freq_factor > 0");
      }
      c.rope_scaling = s;
    } else {
      Fail(source, "rope_scaling type \"" + s.type + "\" is not supported (supported: llama3, default)");
    }
  }
  c.Validate(source);
  return c;
}

void LlamaConfig::Validate(const std::string& source) const {
  if (vocab_size <= 0 || hidden_size <= 0 || intermediate_size <= 0 || num_hidden_layers <= 0 ||
      num_attention_heads <= 0 || num_key_value_heads <= 0 || head_dim <= 0) {
    Fail(source, "all sizes (vocab_size, hidden_size, intermediate_size, num_hidden_layers, "
                 "num_attention_heads, num_key_value_heads, head_dim) must be positive");
  }
  if (num_attention_heads % num_key_value_heads != 0) {
    Fail(source, "num_attention_heads " + std::to_string(num_attention_heads) +
                     " must be a multiple of num_key_value_heads " + std::to_string(num_key_value_heads));
  }
  if (head_dim % 2 != 0) Fail(source, "head_dim must be even for rotary embeddings (got " + std::to_string(head_dim) + ")");
  if (!(rms_norm_eps > 0)) Fail(source, "rms_norm_eps must be > 0");
  if (!(rope_theta > 0)) Fail(source, "rope_theta must be > 0");
  if (attention_bias) Fail(source, "attention_bias: true is not supported (Llama has no attention biases)");
  if (mlp_bias) Fail(source, "mlp_bias: true is not supported (Llama has no MLP biases)");
}

nlohmann::json LlamaConfig::ToJson() const {
  json j = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"attention_bias", false},
      {"attention_dropout", 0.0},
      {"bos_token_id", bos_token_id},
      {"hidden_act", "silu"},
      {"hidden_size", hidden_size},
      {"head_dim", head_dim},
      {"initializer_range", 0.02},
      {"intermediate_size", intermediate_size},
      {"max_position_embeddings", max_position_embeddings},
      {"mlp_bias", false},
      {"num_attention_heads", num_attention_heads},
      {"num_hidden_layers", num_hidden_layers},
      {"num_key_value_heads", num_key_value_heads},
      {"pretraining_tp", 1},
      {"rms_norm_eps", rms_norm_eps},
      {"rope_theta", rope_theta},
      {"tie_word_embeddings", tie_word_embeddings},
      {"torch_dtype", torch_dtype},
      {"use_cache", true},
      {"vocab_size", vocab_size},
  };
  if (eos_token_ids.size() == 1) {
    j["eos_token_id"] = eos_token_ids[0];
  } else if (!eos_token_ids.empty()) {
    j["eos_token_id"] = eos_token_ids;
  }
  if (rope_scaling) {
    j["rope_scaling"] = {{"rope_type", rope_scaling->type},
                         {"factor", rope_scaling->factor},
                         {"low_freq_factor", rope_scaling->low_freq_factor},
                         {"high_freq_factor", rope_scaling->high_freq_factor},
                         {"original_max_position_embeddings", rope_scaling->original_max_position_embeddings}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  return j;
}

int64_t LlamaConfig::NumParameters() const {
  const int64_t h = hidden_size, v = vocab_size, i = intermediate_size;
  const int64_t q = int64_t{num_attention_heads} * head_dim, kv = int64_t{num_key_value_heads} * head_dim;
  const int64_t per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
  return v * h * (tie_word_embeddings ? 1 : 2) + num_hidden_layers * per_layer + h;
}

}  // namespace tune::model
