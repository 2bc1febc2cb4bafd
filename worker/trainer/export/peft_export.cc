#include "worker/trainer/export/peft_export.h"

#include <cmath>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>

#include "worker/trainer/model/safetensors.h"

namespace tune::exporter {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr uint64_t kShardBytes = 2ull * 1000 * 1000 * 1000;

void WriteJson(const fs::path& path, const json& j) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) throw std::runtime_error("export: cannot write " + tmp.string());
    out << j.dump(2) << "\n";
    out.flush();
    if (!out) throw std::runtime_error("export: write failed: " + tmp.string());
  }
  fs::rename(tmp, path);
}

json ReadJson(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path.string() + ": cannot open");
  json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    throw std::runtime_error(path.string() + ": not valid JSON: " + e.what());
  }
  return j;
}

// "model.layers.3.self_attn.q_proj.weight" -> (3, "q_proj"); (-1, "") otherwise.
std::pair<int, std::string> ParseLinearName(const std::string& name) {
  const std::string prefix = "model.layers.";
  const std::string suffix = ".weight";
  if (name.rfind(prefix, 0) != 0 || name.size() < suffix.size() ||
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
    return {-1, ""};
  }
  const size_t dot = name.find('.', prefix.size());
  if (dot == std::string::npos) return {-1, ""};
  int layer = -1;
  try {
    layer = std::stoi(name.substr(prefix.size(), dot - prefix.size()));
  } catch (...) {
    return {-1, ""};
  }
  const std::string rest = name.substr(dot + 1, name.size() - suffix.size() - dot - 1);
  for (const auto& mod : model::LinearModuleNames()) {
    if (rest == "self_attn." + mod || rest == "mlp." + mod) return {layer, mod};
  }
  return {-1, ""};
}

}  // namespace

json PeftAdapterConfig(const model::LlamaForCausalLM& m, const std::string& base_model_dir) {
  const model::LoraOptions& lora = m.options().lora;
  // Fields of peft.LoraConfig (PEFT >= 0.7, which introduced use_rslora).
  // Only keys every such version knows are written, so older PEFT releases
  // that reject unknown keys still load the file.
  return json{
      {"alpha_pattern", json::object()},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", base_model_dir},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"loftq_config", json::object()},
      {"lora_alpha", lora.alpha},
      {"lora_dropout", lora.dropout},
      {"modules_to_save", nullptr},
      {"peft_type", "LORA"},
      {"r", lora.r},
      {"rank_pattern", json::object()},
      {"revision", nullptr},
      {"target_modules", lora.targets},
      {"task_type", "CAUSAL_LM"},
      {"use_rslora", lora.rslora},
  };
}

void ExportPeftAdapter(model::LlamaForCausalLM& m, const spec::JobSpec& spec, const std::string& base_model_dir,
                       const std::string& out_dir) {
  auto params = m.LoraParameters();
  if (params.empty()) throw std::runtime_error("export: the model has no LoRA parameters (empty lora.targets?)");
  fs::create_directories(out_dir);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  tensors.reserve(params.size());
  for (const auto& [name, p] : params) {
    tensors.emplace_back(kPeftKeyPrefix + name, p.detach().to(torch::kCPU, torch::kFloat32));
  }
  // "format": "pt" is what safetensors.torch.save_file and PEFT write.
  model::safetensors::SaveFile((fs::path(out_dir) / "adapter_model.safetensors").string(), tensors,
                               {{"format", "pt"}, {"tune_job", spec.name}});
  WriteJson(fs::path(out_dir) / "adapter_config.json", PeftAdapterConfig(m, base_model_dir));
}

void LoadPeftAdapter(model::LlamaForCausalLM& m, const std::string& dir) {
  const fs::path cfg_path = fs::path(dir) / "adapter_config.json";
  const json cfg = ReadJson(cfg_path);
  const std::string src = cfg_path.string();
  auto field = [&](const char* name) -> const json& {
    if (!cfg.contains(name)) throw std::runtime_error(src + ": missing field \"" + name + "\"");
    return cfg[name];
  };
  if (field("peft_type") != "LORA") {
    throw std::runtime_error(src + ": peft_type is " + cfg["peft_type"].dump() + ", only \"LORA\" adapters are supported");
  }
  const model::LoraOptions& lora = m.options().lora;
  if (!field("r").is_number_integer() || cfg["r"].get<int>() != lora.r) {
    throw std::runtime_error(src + ": r is " + cfg["r"].dump() + " but the model was built with lora.r " +
                             std::to_string(lora.r));
  }
  if (!field("lora_alpha").is_number() || std::abs(cfg["lora_alpha"].get<double>() - lora.alpha) > 1e-9) {
    throw std::runtime_error(src + ": lora_alpha is " + cfg["lora_alpha"].dump() +
                             " but the model was built with lora.alpha " + std::to_string(lora.alpha));
  }
  const bool rslora = cfg.contains("use_rslora") && cfg["use_rslora"].is_boolean() && cfg["use_rslora"].get<bool>();
  if (rslora != lora.rslora) {
    throw std::runtime_error(src + ": use_rslora is " + std::string(rslora ? "true" : "false") +
                             " but the model was built with lora.rslora " + (lora.rslora ? "true" : "false"));
  }
  if (!field("target_modules").is_array()) {
    throw std::runtime_error(src + ": target_modules must be a list of module names (regex strings are not supported)");
  }
  std::set<std::string> want(lora.targets.begin(), lora.targets.end()), got;
  for (const auto& t : cfg["target_modules"]) {
    if (!t.is_string()) throw std::runtime_error(src + ": target_modules must hold strings");
    got.insert(t.get<std::string>());
  }
  if (want != got) {
    std::string g, w;
    for (const auto& x : got) g += (g.empty() ? "" : ",") + x;
    for (const auto& x : want) w += (w.empty() ? "" : ",") + x;
    throw std::runtime_error(src + ": target_modules [" + g + "] differ from the model's lora.targets [" + w + "]");
  }
  if (cfg.contains("bias") && cfg["bias"] != "none") {
    throw std::runtime_error(src + ": bias " + cfg["bias"].dump() + " is not supported (only \"none\")");
  }
  if (cfg.contains("fan_in_fan_out") && cfg["fan_in_fan_out"] == true) {
    throw std::runtime_error(src + ": fan_in_fan_out: true is not supported for Llama");
  }

  const fs::path weights = fs::path(dir) / "adapter_model.safetensors";
  if (!fs::exists(weights)) {
    throw std::runtime_error(weights.string() + ": not found (adapter_model.bin pickles are not supported; save with safetensors)");
  }
  auto file = model::safetensors::File::Open(weights.string());
  std::vector<std::pair<std::string, torch::Tensor>> state;
  const std::string prefix = kPeftKeyPrefix;
  for (const auto& info : file->tensors()) {
    std::string name = info.name;
    if (name.rfind(prefix, 0) != 0) {
      throw std::runtime_error(weights.string() + ": key \"" + name + "\" does not start with \"" + prefix + "\"");
    }
    name = name.substr(prefix.size());
    // PEFT strips the adapter name when saving; tolerate files that kept it.
    for (const char* ab : {".lora_A", ".lora_B"}) {
      const std::string with = std::string(ab) + ".default.weight";
      const size_t pos = name.find(with);
      if (pos != std::string::npos) name = name.substr(0, pos) + ab + ".weight";
    }
    state.emplace_back(name, file->Get(info.name).to(torch::kFloat32));
  }
  try {
    m.LoadLoraState(state);
  } catch (const std::exception& e) {
    throw std::runtime_error(weights.string() + ": " + e.what());
  }
}

void ExportMergedModel(model::LlamaForCausalLM& m, const spec::JobSpec& spec, const std::string& base_model_dir,
                       const std::string& out_dir, bool from_quantized_base) {
  const fs::path base(base_model_dir), out(out_dir);
  auto reader = model::safetensors::Reader::OpenDir(base_model_dir);
  fs::create_directories(out);
  const double scaling = m.options().lora.Scaling();

  // Plan bf16 shards.
  const std::vector<std::string> names = reader->Names();
  std::vector<std::vector<std::string>> shards(1);
  uint64_t cur = 0, total = 0;
  for (const auto& name : names) {
    uint64_t bytes = 2;
    for (auto d : reader->Info(name).shape) bytes *= static_cast<uint64_t>(d);
    if (cur > 0 && cur + bytes > kShardBytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(name);
    cur += bytes;
    total += bytes;
  }
  for (const auto& e : fs::directory_iterator(out)) {
    const std::string n = e.path().filename().string();
    if (n == "model.safetensors.index.json" || (n.rfind("model", 0) == 0 && e.path().extension() == ".safetensors")) {
      // POSIX unlink, not fs::remove: pip builds of libtorch 2.x export their
      // own copies of std::filesystem removal symbols (remove_all crashed).
      ::unlink(e.path().c_str());
    }
  }
  torch::NoGradGuard no_grad;
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
    for (const auto& name : shards[s]) {
      auto [layer, mod] = ParseLinearName(name);
      model::LinearWithLora* lin = nullptr;
      if (layer >= 0 && layer < static_cast<int>(m.layers().size())) lin = m.layers()[layer].Linear(mod);
      torch::Tensor t;
      if (lin != nullptr && lin->has_lora()) {
        torch::Tensor w = from_quantized_base ? lin->BaseWeight(torch::kFloat32).cpu()
                                              : reader->View(name).to(torch::kFloat32);
        torch::Tensor delta = lin->lora_b().detach().cpu().matmul(lin->lora_a().detach().cpu()) * scaling;
        t = (w + delta).to(torch::kBFloat16);
      } else {
        t = reader->View(name).to(torch::kBFloat16);
      }
      tensors.emplace_back(name, t);
      weight_map[name] = file;
    }
    model::safetensors::SaveFile((out / file).string(), tensors, {{"format", "pt"}, {"tune_job", spec.name}});
  }
  if (n > 1) model::safetensors::SaveIndex((out / "model.safetensors.index.json").string(), total, weight_map);

  json cfg = ReadJson(base / "config.json");
  cfg["torch_dtype"] = "bfloat16";
  WriteJson(out / "config.json", cfg);
  for (const char* f : {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}) {
    if (fs::is_regular_file(base / f)) fs::copy_file(base / f, out / f, fs::copy_options::overwrite_existing);
  }
}

}  // namespace tune::exporter
