#include "common/jobspec/job_spec.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

namespace tune::spec {
namespace {

namespace fs = std::filesystem;

const std::set<std::string> kLoraTargets = {"q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"};

std::string Join(const std::set<std::string>& s) {
  std::string out;
  for (const auto& v : s) out += (out.empty() ? "" : ", ") + v;
  return out;
}

std::string Child(const std::string& path, const std::string& key) {
  return path.empty() ? key : path + "." + key;
}

std::string NodeKind(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Null: return "empty";
    default: return "'" + n.Scalar() + "'";
  }
}

// Reads one YAML document into a JobSpec, collecting every error.
class Reader {
 public:
  Reader(JobSpec* spec, std::vector<SpecError>* errors) : spec_(spec), errors_(errors) {}

  void Error(const YAML::Node& n, const std::string& path, const std::string& msg) {
    errors_->push_back({path, n.IsDefined() ? n.Mark().line + 1 : 0, msg});
  }

  // Visits the keys of a mapping; unknown keys are errors.
  void Map(const YAML::Node& n, const std::string& path,
           const std::map<std::string, std::function<void(const YAML::Node&, const std::string&)>>& fields) {
    if (!n.IsMap()) {
      if (n.IsNull()) return;  // "section:" with nothing under it keeps the defaults
      Error(n, path, "must be a mapping (key: value lines), got " + NodeKind(n));
      return;
    }
    for (const auto& kv : n) {
      std::string key = kv.first.Scalar();
      std::string p = Child(path, key);
      auto it = fields.find(key);
      if (it == fields.end()) {
        std::set<std::string> known;
        for (const auto& f : fields) known.insert(f.first);
        errors_->push_back({p, kv.first.Mark().line + 1,
                            "unknown key '" + key + "'; allowed here: " + Join(known)});
        continue;
      }
      spec_->source_lines[p] = kv.first.Mark().line + 1;
      it->second(kv.second, p);
    }
  }

  auto Str(std::string* out) {
    return [this, out](const YAML::Node& n, const std::string& p) {
      if (!n.IsScalar()) { Error(n, p, "must be a string, got " + NodeKind(n)); return; }
      *out = n.Scalar();
    };
  }
  auto Bool(bool* out) {
    return [this, out](const YAML::Node& n, const std::string& p) {
      bool v;
      if (!n.IsScalar() || !YAML::convert<bool>::decode(n, v)) {
        Error(n, p, "must be true or false, got " + NodeKind(n));
        return;
      }
      *out = v;
    };
  }
  template <typename T>
  auto Int(T* out) {
    return [this, out](const YAML::Node& n, const std::string& p) {
      long long v = 0;
      if (!n.IsScalar() || !ParseInt(n.Scalar(), &v)) {
        Error(n, p, "must be a whole number, got " + NodeKind(n));
        return;
      }
      if (v < static_cast<long long>(std::numeric_limits<T>::min()) ||
          v > static_cast<long long>(std::numeric_limits<T>::max())) {
        Error(n, p, "number out of range: " + n.Scalar());
        return;
      }
      *out = static_cast<T>(v);
    };
  }
  auto Double(double* out) {
    return [this, out](const YAML::Node& n, const std::string& p) {
      double v = 0;
      if (!n.IsScalar() || !ParseDouble(n.Scalar(), &v)) {
        Error(n, p, "must be a number, got " + NodeKind(n));
        return;
      }
      *out = v;
    };
  }
  auto StrList(std::vector<std::string>* out) {
    return [this, out](const YAML::Node& n, const std::string& p) {
      if (!n.IsSequence()) { Error(n, p, "must be a list like [a, b], got " + NodeKind(n)); return; }
      out->clear();
      for (std::size_t i = 0; i < n.size(); ++i) {
        if (!n[i].IsScalar()) { Error(n[i], p + "[" + std::to_string(i) + "]", "must be a string"); continue; }
        out->push_back(n[i].Scalar());
      }
    };
  }
  auto IntList(std::vector<int>* out) {
    return [this, out](const YAML::Node& n, const std::string& p) {
      if (!n.IsSequence()) { Error(n, p, "must be a list like [5, 6], got " + NodeKind(n)); return; }
      out->clear();
      for (std::size_t i = 0; i < n.size(); ++i) {
        long long v;
        if (!n[i].IsScalar() || !ParseInt(n[i].Scalar(), &v) || v < INT32_MIN || v > INT32_MAX) {
          Error(n[i], p + "[" + std::to_string(i) + "]", "must be a whole number, got " + NodeKind(n[i]));
          continue;
        }
        out->push_back(static_cast<int>(v));
      }
    };
  }

  static bool ParseInt(const std::string& s, long long* v) {
    if (s.empty()) return false;
    char* end = nullptr;
    errno = 0;
    long long r = std::strtoll(s.c_str(), &end, 10);
    if (errno != 0 || *end != '\0') {
      // Accept "1e3"-style integers written as floats only when exact.
      double d;
      if (!ParseDouble(s, &d) || d != std::floor(d) || std::fabs(d) > 9.0e18) return false;
      r = static_cast<long long>(d);
    }
    *v = r;
    return true;
  }
  static bool ParseDouble(const std::string& s, double* v) {
    if (s.empty()) return false;
    std::string t = s;
    if (t == ".inf" || t == ".nan" || t == "-.inf") return false;  // never meaningful in a spec
    char* end = nullptr;
    errno = 0;
    double r = std::strtod(t.c_str(), &end);
    if (errno != 0 || *end != '\0' || !std::isfinite(r)) return false;
    *v = r;
    return true;
  }

  void Document(const YAML::Node& root) {
    JobSpec& s = *spec_;
    if (root.IsNull() || !root.IsDefined()) {
      errors_->push_back({"", 0, "the spec is empty; it needs at least `model:` and `dataset: {path: ...}`"});
      return;
    }
    Map(root, "", {
      {"name", Str(&s.name)},
      {"model", Str(&s.model)},
      {"dataset", [&](const YAML::Node& n, const std::string& p) {
         Map(n, p, {{"path", Str(&s.dataset.path)},
                    {"format", Str(&s.dataset.format)},
                    {"chat_template", Str(&s.dataset.chat_template)},
                    {"train_on", Str(&s.dataset.train_on)},
                    {"max_seq_length", Int(&s.dataset.max_seq_length)},
                    {"packing", Bool(&s.dataset.packing)},
                    {"max_bad_line_fraction", Double(&s.dataset.max_bad_line_fraction)}});
       }},
      {"lora", [&](const YAML::Node& n, const std::string& p) {
         Map(n, p, {{"r", Int(&s.lora.r)},
                    {"alpha", Double(&s.lora.alpha)},
                    {"dropout", Double(&s.lora.dropout)},
                    {"targets", StrList(&s.lora.targets)},
                    {"rslora", Bool(&s.lora.rslora)}});
       }},
      {"quantization", [&](const YAML::Node& n, const std::string& p) {
         Map(n, p, {{"base", Str(&s.quantization.base)},
                    {"double_quant", Bool(&s.quantization.double_quant)},
                    {"block_size", Int(&s.quantization.block_size)}});
       }},
      {"training", [&](const YAML::Node& n, const std::string& p) {
         TrainingSpec& t = s.training;
         Map(n, p, {{"precision", Str(&t.precision)},
                    {"effective_batch_size", Int(&t.effective_batch_size)},
                    {"micro_batch_size", [&](const YAML::Node& v, const std::string& q) {
                       if (v.IsScalar() && v.Scalar() == "auto") { t.micro_batch_size = 0; return; }
                       Int(&t.micro_batch_size)(v, q);
                     }},
                    {"learning_rate", Double(&t.learning_rate)},
                    {"lr_scheduler", Str(&t.lr_scheduler)},
                    {"warmup_steps", Int(&t.warmup_steps)},
                    {"max_steps", Int(&t.max_steps)},
                    {"epochs", Double(&t.epochs)},
                    {"max_grad_norm", Double(&t.max_grad_norm)},
                    {"optimizer", Str(&t.optimizer)},
                    {"weight_decay", Double(&t.weight_decay)},
                    {"gradient_checkpointing", [&](const YAML::Node& v, const std::string& q) {
                       // YAML 1.1 reads bare on/off as booleans; accept both spellings.
                       bool b;
                       if (v.IsScalar() && (v.Scalar() == "true" || v.Scalar() == "false") &&
                           YAML::convert<bool>::decode(v, b)) {
                         t.gradient_checkpointing = b ? "on" : "off";
                         return;
                       }
                       Str(&t.gradient_checkpointing)(v, q);
                     }},
                    {"seed", Int(&t.seed)},
                    {"log_every_steps", Int(&t.log_every_steps)},
                    {"nan_policy", [&](const YAML::Node& v, const std::string& q) {
                       NanPolicySpec& np = t.nan_policy;
                       Map(v, q, {{"skip_step", Bool(&np.skip_step)},
                                  {"max_consecutive", Int(&np.max_consecutive)},
                                  {"rollback", Bool(&np.rollback)},
                                  {"lr_backoff", Double(&np.lr_backoff)},
                                  {"max_rollbacks", Int(&np.max_rollbacks)}});
                     }}});
       }},
      {"checkpoint", [&](const YAML::Node& n, const std::string& p) {
         Map(n, p, {{"every_steps", Int(&s.checkpoint.every_steps)}, {"keep", Int(&s.checkpoint.keep)}});
       }},
      {"output", [&](const YAML::Node& n, const std::string& p) {
         Map(n, p, {{"dir", Str(&s.output.dir)}, {"merge", Bool(&s.output.merge)}});
       }},
      {"resources", [&](const YAML::Node& n, const std::string& p) {
         Map(n, p, {{"gpus", Int(&s.resources.gpus)}, {"cpu_ranks", Int(&s.resources.cpu_ranks)}});
       }},
      {"priority", Int(&s.priority)},
      {"max_retries", Int(&s.max_retries)},
      {"faults", [&](const YAML::Node& n, const std::string& p) {
         Map(n, p, {{"nan_at_steps", IntList(&s.faults.nan_at_steps)},
                    {"oom_at_steps", IntList(&s.faults.oom_at_steps)},
                    {"gpu_memory_cap_gb", Double(&s.faults.gpu_memory_cap_gb)}});
       }},
    });
    if (!root.IsMap() && !root.IsNull()) return;
  }

 private:
  JobSpec* spec_;
  std::vector<SpecError>* errors_;
};

// Collects validation errors with the line that ParseJobSpec recorded.
class Checker {
 public:
  Checker(const JobSpec& spec, std::vector<SpecError>* errors) : spec_(spec), errors_(errors) {}
  void Fail(const std::string& path, const std::string& msg) {
    auto it = spec_.source_lines.find(path);
    errors_->push_back({path, it == spec_.source_lines.end() ? 0 : it->second, msg});
  }
  template <typename T>
  void Range(const std::string& path, T v, T lo, T hi, const std::string& hint = "") {
    if (v < lo || v > hi) {
      std::ostringstream os;
      os << "must be between " << lo << " and " << hi << " (got " << v << ")";
      if (!hint.empty()) os << "; " << hint;
      Fail(path, os.str());
    }
  }
  void OneOf(const std::string& path, const std::string& v, const std::set<std::string>& allowed) {
    if (!allowed.count(v)) Fail(path, "must be one of " + Join(allowed) + " (got '" + v + "')");
  }

 private:
  const JobSpec& spec_;
  std::vector<SpecError>* errors_;
};

std::string Absolute(const std::string& p, const std::string& base) {
  if (p.empty() || base.empty()) return p;
  fs::path path(p);
  if (path.is_absolute()) return path.lexically_normal().string();
  return (fs::path(base) / path).lexically_normal().string();
}

void CheckModelDir(const std::string& dir, Checker* c) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    c->Fail("model", "model directory '" + dir +
                         "' does not exist or is not a directory; point `model:` at a Hugging Face "
                         "model folder (config.json + *.safetensors), e.g. one made by "
                         "`tune-train init-model`");
    return;
  }
  std::ifstream in(fs::path(dir) / "config.json");
  if (!in) {
    c->Fail("model", "'" + dir + "' has no readable config.json; it is not a Hugging Face model folder");
    return;
  }
  nlohmann::json cfg = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (cfg.is_discarded() || !cfg.is_object()) {
    c->Fail("model", "'" + dir + "/config.json' is not valid JSON");
    return;
  }
  bool llama = cfg.value("model_type", "") == "llama";
  if (cfg.contains("architectures") && cfg["architectures"].is_array()) {
    for (const auto& a : cfg["architectures"]) {
      if (a.is_string() && a.get<std::string>() == "LlamaForCausalLM") llama = true;
    }
  }
  if (!llama) {
    c->Fail("model", "'" + dir + "/config.json' is not a Llama model (model_type '" +
                         cfg.value("model_type", std::string("?")) +
                         "'); tunefleet fine-tunes LlamaForCausalLM models");
  }
  if (!fs::exists(fs::path(dir) / "model.safetensors", ec) &&
      !fs::exists(fs::path(dir) / "model.safetensors.index.json", ec)) {
    c->Fail("model", "'" + dir + "' has no model.safetensors or model.safetensors.index.json");
  }
}

std::string FormatDouble(double v) {
  char buf[64];
  for (int prec = 6; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s = buf;
  // Keep it a float in YAML's eyes (so 1 stays 1.0 for float fields).
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

}  // namespace

std::string SpecError::ToString(const std::string& source) const {
  std::string out;
  if (!source.empty()) out += source + ":";
  if (line > 0) out += std::to_string(line) + ":";
  if (!out.empty()) out += " ";
  if (!path.empty()) out += path + ": ";
  return out + message;
}

std::string FormatErrors(const std::vector<SpecError>& errors, const std::string& source) {
  std::string out;
  for (const auto& e : errors) out += e.ToString(source) + "\n";
  return out;
}

std::vector<SpecError> ParseJobSpec(const std::string& yaml_text, JobSpec* out) {
  std::vector<SpecError> errors;
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    errors.push_back({"", e.mark.line + 1, "invalid YAML: " + e.msg});
    return errors;
  }
  if (root.IsDefined() && !root.IsNull() && !root.IsMap()) {
    errors.push_back({"", root.Mark().line + 1,
                      "the spec must be a mapping of sections (name:, model:, dataset:, ...), got " +
                          NodeKind(root)});
    return errors;
  }
  Reader reader(out, &errors);
  try {
    reader.Document(root);
  } catch (const YAML::Exception& e) {
    errors.push_back({"", e.mark.line + 1, "invalid YAML: " + e.msg});
  }
  return errors;
}

std::vector<SpecError> ValidateJobSpec(JobSpec* s, const ValidateOptions& opts) {
  std::vector<SpecError> errors;
  Checker c(*s, &errors);

  if (s->name.empty() || s->name.size() > 128 ||
      !std::all_of(s->name.begin(), s->name.end(), [](char ch) {
        return std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_' || ch == '.';
      })) {
    c.Fail("name", "must be 1-128 characters of letters, digits, '-', '_' or '.' (got '" + s->name + "')");
  }

  // Paths.
  if (s->model.empty()) {
    c.Fail("model", "is required: the Hugging Face model directory to fine-tune");
  } else {
    s->model = Absolute(s->model, opts.base_dir);
    if (opts.check_paths) CheckModelDir(s->model, &c);
  }
  if (s->dataset.path.empty()) {
    c.Fail("dataset.path", "is required: a JSONL file with one example per line");
  } else {
    s->dataset.path = Absolute(s->dataset.path, opts.base_dir);
    if (opts.check_paths) {
      std::error_code ec;
      std::ifstream in(s->dataset.path);
      if (!fs::is_regular_file(s->dataset.path, ec) || !in) {
        c.Fail("dataset.path", "cannot read '" + s->dataset.path + "'; give the path of an existing JSONL file");
      }
    }
  }
  if (s->output.dir.empty()) s->output.dir = "runs/" + s->name;
  if (s->output.dir.find("..") != std::string::npos &&
      fs::path(s->output.dir).lexically_normal().string().find("..") != std::string::npos) {
    c.Fail("output.dir", "must not climb out with '..' (got '" + s->output.dir + "')");
  }
  s->output.dir = Absolute(s->output.dir, opts.base_dir);

  // dataset
  c.OneOf("dataset.format", s->dataset.format,
          {"auto", "text", "prompt_completion", "messages", "sharegpt", "tokens"});
  c.OneOf("dataset.chat_template", s->dataset.chat_template,
          {"auto", "llama-3", "llama-3.1", "chatml", "mistral", "alpaca"});
  c.OneOf("dataset.train_on", s->dataset.train_on, {"completions", "all"});
  c.Range("dataset.max_seq_length", s->dataset.max_seq_length, 8, 1 << 20);
  c.Range("dataset.max_bad_line_fraction", s->dataset.max_bad_line_fraction, 0.0, 1.0);

  // lora
  c.Range("lora.r", s->lora.r, 1, 1024);
  if (!(s->lora.alpha > 0)) c.Fail("lora.alpha", "must be > 0 (got " + FormatDouble(s->lora.alpha) + ")");
  if (s->lora.dropout < 0 || s->lora.dropout >= 1) {
    c.Fail("lora.dropout", "must be in [0, 1) (got " + FormatDouble(s->lora.dropout) + ")");
  }
  if (s->lora.targets.empty()) c.Fail("lora.targets", "needs at least one module, e.g. [q_proj, v_proj]");
  std::set<std::string> seen;
  for (const auto& t : s->lora.targets) {
    if (!kLoraTargets.count(t)) c.Fail("lora.targets", "unknown module '" + t + "'; choose from " + Join(kLoraTargets));
    if (!seen.insert(t).second) c.Fail("lora.targets", "lists '" + t + "' twice");
  }

  // quantization
  c.OneOf("quantization.base", s->quantization.base, {"nf4", "bf16"});
  {
    int b = s->quantization.block_size;
    if (b < 16 || b > 4096 || (b & (b - 1)) != 0) {
      c.Fail("quantization.block_size", "must be a power of two between 16 and 4096 (got " + std::to_string(b) + "); 64 is standard");
    }
  }

  // training
  TrainingSpec& t = s->training;
  c.OneOf("training.precision", t.precision, {"auto", "bf16", "fp16", "fp32"});
  c.Range("training.effective_batch_size", t.effective_batch_size, 1, 65536);
  c.Range("training.micro_batch_size", t.micro_batch_size, 0, 65536, "0 or auto lets the planner choose");
  if (!(t.learning_rate > 0 && t.learning_rate <= 1)) {
    c.Fail("training.learning_rate", "must be in (0, 1] (got " + FormatDouble(t.learning_rate) + "); 2.0e-4 is typical for LoRA");
  }
  c.OneOf("training.lr_scheduler", t.lr_scheduler, {"linear", "cosine", "constant"});
  c.Range("training.warmup_steps", t.warmup_steps, 0, 10000000);
  c.Range("training.max_steps", t.max_steps, 0, 10000000, "set max_steps > 0 or epochs > 0");
  if (t.epochs < 0 || t.epochs > 10000) c.Fail("training.epochs", "must be between 0 and 10000 (got " + FormatDouble(t.epochs) + ")");
  if (t.max_steps == 0 && t.epochs <= 0) {
    c.Fail("training.max_steps", "is 0 and training.epochs is 0: set one of them, e.g. max_steps: 60");
  }
  if (t.max_grad_norm < 0) c.Fail("training.max_grad_norm", "must be >= 0 (0 disables clipping)");
  c.OneOf("training.optimizer", t.optimizer, {"adamw", "adamw_8bit"});
  if (t.weight_decay < 0 || t.weight_decay > 1) c.Fail("training.weight_decay", "must be in [0, 1]");
  c.OneOf("training.gradient_checkpointing", t.gradient_checkpointing, {"auto", "on", "off", "offload", "selective"});
  c.Range("training.log_every_steps", t.log_every_steps, 1, 1000000);
  c.Range("training.nan_policy.max_consecutive", t.nan_policy.max_consecutive, 1, 1000);
  if (!(t.nan_policy.lr_backoff > 0 && t.nan_policy.lr_backoff <= 1)) {
    c.Fail("training.nan_policy.lr_backoff", "must be in (0, 1] (got " + FormatDouble(t.nan_policy.lr_backoff) + ")");
  }
  c.Range("training.nan_policy.max_rollbacks", t.nan_policy.max_rollbacks, 0, 100);

  // checkpoint / scheduling
  c.Range("checkpoint.every_steps", s->checkpoint.every_steps, 0, 10000000, "0 disables periodic checkpoints");
  c.Range("checkpoint.keep", s->checkpoint.keep, 1, 1000);
  c.Range("priority", s->priority, -1000, 1000);
  c.Range("max_retries", s->max_retries, 0, 100);

  // resources
  ResourcesSpec& r = s->resources;
  c.Range("resources.gpus", r.gpus, 0, 64);
  c.Range("resources.cpu_ranks", r.cpu_ranks, 0, 256);
  if (r.gpus > 0 && r.cpu_ranks > 0) {
    c.Fail("resources", "set either gpus or cpu_ranks, not both");
  } else if (r.gpus == 0 && r.cpu_ranks == 0) {
    if (opts.default_cpu_ranks > 0) r.cpu_ranks = opts.default_cpu_ranks; else r.gpus = 1;
  }
  int world = std::max(1, r.gpus > 0 ? r.gpus : r.cpu_ranks);
  if (t.effective_batch_size >= 1 && t.effective_batch_size % world != 0) {
    c.Fail("training.effective_batch_size",
           "must be a multiple of the number of ranks (" + std::to_string(world) + "), got " +
               std::to_string(t.effective_batch_size));
  } else if (t.micro_batch_size > 0 && t.effective_batch_size % (t.micro_batch_size * world) != 0) {
    c.Fail("training.micro_batch_size",
           "micro_batch_size x ranks (" + std::to_string(t.micro_batch_size) + " x " + std::to_string(world) +
               ") must divide effective_batch_size (" + std::to_string(t.effective_batch_size) +
               "); use auto to let the planner choose");
  }

  // faults
  for (int step : s->faults.nan_at_steps) {
    if (step < 1) c.Fail("faults.nan_at_steps", "steps are 1-based (got " + std::to_string(step) + ")");
  }
  for (int step : s->faults.oom_at_steps) {
    if (step < 1) c.Fail("faults.oom_at_steps", "steps are 1-based (got " + std::to_string(step) + ")");
  }
  if (s->faults.gpu_memory_cap_gb < 0) c.Fail("faults.gpu_memory_cap_gb", "must be >= 0 (0: no cap)");
  return errors;
}

std::string EmitJobSpecYaml(const JobSpec& s) {
  YAML::Emitter out;
  auto dbl = [](double v) { return FormatDouble(v); };
  out << YAML::BeginMap;
  out << YAML::Key << "name" << YAML::Value << s.name;
  out << YAML::Key << "model" << YAML::Value << s.model;
  out << YAML::Key << "dataset" << YAML::Value << YAML::BeginMap
      << YAML::Key << "path" << YAML::Value << s.dataset.path
      << YAML::Key << "format" << YAML::Value << s.dataset.format
      << YAML::Key << "chat_template" << YAML::Value << s.dataset.chat_template
      << YAML::Key << "train_on" << YAML::Value << s.dataset.train_on
      << YAML::Key << "max_seq_length" << YAML::Value << s.dataset.max_seq_length
      << YAML::Key << "packing" << YAML::Value << s.dataset.packing
      << YAML::Key << "max_bad_line_fraction" << YAML::Value << dbl(s.dataset.max_bad_line_fraction)
      << YAML::EndMap;
  out << YAML::Key << "lora" << YAML::Value << YAML::BeginMap
      << YAML::Key << "r" << YAML::Value << s.lora.r
      << YAML::Key << "alpha" << YAML::Value << dbl(s.lora.alpha)
      << YAML::Key << "dropout" << YAML::Value << dbl(s.lora.dropout)
      << YAML::Key << "targets" << YAML::Value << YAML::Flow << s.lora.targets
      << YAML::Key << "rslora" << YAML::Value << s.lora.rslora << YAML::EndMap;
  out << YAML::Key << "quantization" << YAML::Value << YAML::BeginMap
      << YAML::Key << "base" << YAML::Value << s.quantization.base
      << YAML::Key << "double_quant" << YAML::Value << s.quantization.double_quant
      << YAML::Key << "block_size" << YAML::Value << s.quantization.block_size << YAML::EndMap;
  const TrainingSpec& t = s.training;
  out << YAML::Key << "training" << YAML::Value << YAML::BeginMap
      << YAML::Key << "precision" << YAML::Value << t.precision
      << YAML::Key << "effective_batch_size" << YAML::Value << t.effective_batch_size
      << YAML::Key << "micro_batch_size" << YAML::Value << t.micro_batch_size
      << YAML::Key << "learning_rate" << YAML::Value << dbl(t.learning_rate)
      << YAML::Key << "lr_scheduler" << YAML::Value << t.lr_scheduler
      << YAML::Key << "warmup_steps" << YAML::Value << t.warmup_steps
      << YAML::Key << "max_steps" << YAML::Value << t.max_steps
      << YAML::Key << "epochs" << YAML::Value << dbl(t.epochs)
      << YAML::Key << "max_grad_norm" << YAML::Value << dbl(t.max_grad_norm)
      << YAML::Key << "optimizer" << YAML::Value << t.optimizer
      << YAML::Key << "weight_decay" << YAML::Value << dbl(t.weight_decay)
      << YAML::Key << "gradient_checkpointing" << YAML::Value << YAML::DoubleQuoted << t.gradient_checkpointing
      << YAML::Key << "seed" << YAML::Value << t.seed
      << YAML::Key << "log_every_steps" << YAML::Value << t.log_every_steps
      << YAML::Key << "nan_policy" << YAML::Value << YAML::BeginMap
      << YAML::Key << "skip_step" << YAML::Value << t.nan_policy.skip_step
      << YAML::Key << "max_consecutive" << YAML::Value << t.nan_policy.max_consecutive
      << YAML::Key << "rollback" << YAML::Value << t.nan_policy.rollback
      << YAML::Key << "lr_backoff" << YAML::Value << dbl(t.nan_policy.lr_backoff)
      << YAML::Key << "max_rollbacks" << YAML::Value << t.nan_policy.max_rollbacks
      << YAML::EndMap << YAML::EndMap;
  out << YAML::Key << "checkpoint" << YAML::Value << YAML::BeginMap
      << YAML::Key << "every_steps" << YAML::Value << s.checkpoint.every_steps
      << YAML::Key << "keep" << YAML::Value << s.checkpoint.keep << YAML::EndMap;
  out << YAML::Key << "output" << YAML::Value << YAML::BeginMap
      << YAML::Key << "dir" << YAML::Value << s.output.dir
      << YAML::Key << "merge" << YAML::Value << s.output.merge << YAML::EndMap;
  out << YAML::Key << "resources" << YAML::Value << YAML::BeginMap
      << YAML::Key << "gpus" << YAML::Value << s.resources.gpus
      << YAML::Key << "cpu_ranks" << YAML::Value << s.resources.cpu_ranks << YAML::EndMap;
  out << YAML::Key << "priority" << YAML::Value << s.priority;
  out << YAML::Key << "max_retries" << YAML::Value << s.max_retries;
  out << YAML::Key << "faults" << YAML::Value << YAML::BeginMap
      << YAML::Key << "nan_at_steps" << YAML::Value << YAML::Flow << s.faults.nan_at_steps
      << YAML::Key << "oom_at_steps" << YAML::Value << YAML::Flow << s.faults.oom_at_steps
      << YAML::Key << "gpu_memory_cap_gb" << YAML::Value << dbl(s.faults.gpu_memory_cap_gb)
      << YAML::EndMap;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

}  // namespace tune::spec
