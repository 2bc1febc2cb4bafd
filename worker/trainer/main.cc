// tune-train: the training engine (DESIGN.md "The trainer, stage by stage").
//
//   tune-train [train] --config job.yaml [--events-fd N] [--output DIR] [--resume]
//                      [--stop-after-step N] [--profile-steps A[-B] --profile-out FILE]
//   tune-train init-model --preset tiny|llama3-8b|CONFIG.json --tokenizer DIR --out DIR
//                         [--seed N] [--dtype bf16|fp32]
//   tune-train plan --config job.yaml --gpu-memory-gb N [--world-size W] [--host-memory-gb H] [-o json]
//   tune-train tokenize|render|preflight ...   (data pipeline tools, see --help)
//
// Rank and rendezvous come from RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
// MASTER_PORT (set by tune-worker; standalone defaults 0, 1, 0). Exit codes:
// docs/events.md.
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <stdexcept>
#include <string>

#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "worker/trainer/config.h"
#include "worker/trainer/data/cli.h"
#include "worker/trainer/logger.h"
#include "worker/trainer/model/llama.h"
#include "worker/trainer/model/cuda_ops.h"
#include "worker/trainer/plan/memory_plan.h"
#include "worker/trainer/recipe.h"
#include "worker/trainer/train/step_profiler.h"

namespace {

constexpr const char* kUsage = R"(tune-train: QLoRA fine-tuning of Llama-3-family models.

Usage:
  tune-train [train] --config job.yaml [--events-fd N] [--output DIR] [--resume]
                     [--stop-after-step N] [--profile-steps A[-B] --profile-out FILE]
      Train the job described by job.yaml (the same YAML as `tunectl submit`).
      --events-fd N        also write JSON-lines events to inherited fd N
      --output DIR         override output.dir
      --resume             continue from the newest complete checkpoint in
                           <output>/checkpoints (starts at step 1 when none)
      --stop-after-step N  checkpoint after step N and exit 0 (resume later)
      --profile-steps A[-B] --profile-out FILE
                           profile steps A..B on rank 0 and write where the
                           time went to FILE (device busy/idle, kernel time by
                           class, top kernels; FILE.trace.json with Kineto)
      Environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
      (data parallel; defaults 0, 1, 0, 127.0.0.1, 29500), OMP_NUM_THREADS
      (CPU threads per rank, default 1), TUNE_LOG_LEVEL=debug.
      Exit codes: 0 done, 2 bad spec/command line, 3 out of memory,
      4 NaN policy exhausted, 5 dataset failed preflight, 143 stopped by
      SIGTERM (checkpoint written), other: crash.

  tune-train init-model --preset tiny|llama3-8b|CONFIG.json --tokenizer DIR --out DIR
                        [--seed N] [--dtype bf16|fp32]
      Write a randomly initialised Llama in Hugging Face layout.

  tune-train plan --config job.yaml --gpu-memory-gb N [--world-size W] [--host-memory-gb H]
                  [--attention sdpa|sdpa_expand_kv|math] [--fused-kernels on|off] [-o text|json]
      Print the memory plan (micro-batch, grad-accum, checkpointing) and the
      predicted peak breakdown for a GPU of N GiB, without a GPU or the
      weights (only the model's config.json is read). Attention defaults to
      the kernel this build's torch uses; --attention sdpa plans for a torch
      >= 2.6 (cuDNN attention first, fused AdamW), as on the CUDA host.
      --host-memory-gb: host memory available per rank, which offload plans
      (and selective ones that keep attention outputs: CUDA, cuDNN, no
      packing, sequences over 4,096 tokens) must also fit
      (unchecked when absent). Exit 1 when nothing fits.

  tune-train tokenize --tokenizer DIR [--json] [--add-special] [--decode [--skip-special]]
  tune-train render --config job.yaml [--limit N]
  tune-train preflight --config job.yaml
      Data pipeline tools: tokenise stdin, print rendered training sequences,
      print the dataset preflight report.

  tune-train --help
)";

int UsageError(const std::string& message) {
  std::cerr << "tune-train: " << message << "\n(see tune-train --help)" << std::endl;
  return tune::train::kExitInvalidSpec;
}

bool ParseInt(const std::string& text, long min_value, long* out) {
  errno = 0;
  char* end = nullptr;
  const long v = std::strtol(text.c_str(), &end, 10);
  if (errno != 0 || end == text.c_str() || *end != '\0' || v < min_value) return false;
  *out = v;
  return true;
}

// A finite number > 0, the whole text (GiB flags of `plan`).
bool ParsePositiveDouble(const std::string& text, double* out) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || *end != '\0' || !(v > 0) || !std::isfinite(v)) return false;
  *out = v;
  return true;
}

int RunTrain(int argc, char** argv, int first) {
  tune::train::TrainRunOptions opts;
  for (int i = first; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](std::string* out) {
      if (i + 1 >= argc) return false;
      *out = argv[++i];
      return true;
    };
    std::string v;
    long n = 0;
    if (arg == "--config") {
      if (!value(&opts.cli.config_path)) return UsageError("--config needs a path");
    } else if (arg == "--output") {
      if (!value(&opts.cli.output_dir)) return UsageError("--output needs a directory");
    } else if (arg == "--events-fd") {
      if (!value(&v) || !ParseInt(v, 0, &n) || n > INT_MAX) return UsageError("--events-fd needs a file descriptor >= 0");
      opts.cli.events_fd = static_cast<int>(n);
    } else if (arg == "--resume") {
      opts.cli.resume = true;
    } else if (arg == "--stop-after-step") {
      if (!value(&v) || !ParseInt(v, 1, &n) || n > INT_MAX) return UsageError("--stop-after-step needs a step >= 1");
      opts.stop_after_step = static_cast<int>(n);
    } else if (arg == "--profile-steps") {
      if (!value(&v) || !tune::train::ParseProfileSteps(v, &opts.profile_first, &opts.profile_last)) {
        return UsageError("--profile-steps needs A or A-B with 1 <= A <= B (e.g. 6-8)");
      }
    } else if (arg == "--profile-out") {
      if (!value(&opts.profile_out) || opts.profile_out.empty()) return UsageError("--profile-out needs a file path");
    } else {
      return UsageError("unknown argument '" + arg + "'");
    }
  }
  if (opts.cli.config_path.empty()) return UsageError("missing --config job.yaml");
  if ((opts.profile_first > 0) != !opts.profile_out.empty()) {
    return UsageError("--profile-steps and --profile-out go together");
  }
  return tune::train::RunTraining(opts);
}

int RunInitModel(int argc, char** argv) {
  std::string preset, tokenizer, out, dtype = "bf16";
  long seed = 0;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return UsageError("init-model: " + arg + " needs a value");
    const std::string v = argv[++i];
    if (arg == "--preset") {
      preset = v;
    } else if (arg == "--tokenizer") {
      tokenizer = v;
    } else if (arg == "--out") {
      out = v;
    } else if (arg == "--seed") {
      if (!ParseInt(v, 0, &seed)) return UsageError("init-model: --seed needs an integer >= 0");
    } else if (arg == "--dtype") {
      if (v != "bf16" && v != "fp32") return UsageError("init-model: --dtype must be bf16 or fp32");
      dtype = v;
    } else {
      return UsageError("init-model: unknown argument '" + arg + "'");
    }
  }
  if (preset.empty() || tokenizer.empty() || out.empty()) {
    return UsageError("init-model needs --preset, --tokenizer and --out");
  }
  try {
    tune::model::InitModel(preset, tokenizer, out, static_cast<uint64_t>(seed), dtype);
  } catch (const std::exception& e) {
    tune::train::LogError("init-model failed: " + std::string(e.what()));
    return 1;
  }
  std::cout << "wrote " << preset << " model to " << out << std::endl;
  return 0;
}

int RunPlan(int argc, char** argv) {
  namespace fs = std::filesystem;
  namespace plan = tune::plan;
  std::string config, output = "text", attention;
  // Default: what this binary would run on a GPU (the kernels compiled in).
  bool fused = tune::model::cuda_ops::Compiled();
  double gpu_gb = 0, host_gb = 0;  // host: available host memory per rank (0 = not checked)
  long world = 1;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return UsageError("plan: " + arg + " needs a value");
    const std::string v = argv[++i];
    if (arg == "--config") {
      config = v;
    } else if (arg == "--gpu-memory-gb") {
      if (!ParsePositiveDouble(v, &gpu_gb)) {
        return UsageError("plan: --gpu-memory-gb needs a positive number of GiB (e.g. 24 or 79.6)");
      }
    } else if (arg == "--host-memory-gb") {
      if (!ParsePositiveDouble(v, &host_gb)) {
        return UsageError("plan: --host-memory-gb needs a positive number of GiB (host memory available per rank)");
      }
    } else if (arg == "--world-size") {
      if (!ParseInt(v, 1, &world) || world > 4096) return UsageError("plan: --world-size needs an integer >= 1");
    } else if (arg == "--attention") {
      if (v != "sdpa" && v != "sdpa_expand_kv" && v != "math") {
        return UsageError("plan: --attention must be sdpa, sdpa_expand_kv or math");
      }
      attention = v;
    } else if (arg == "--fused-kernels") {
      if (v != "on" && v != "off") return UsageError("plan: --fused-kernels must be on or off");
      fused = v == "on";
    } else if (arg == "-o" || arg == "--output") {
      if (v != "text" && v != "json") return UsageError("plan: -o must be text or json");
      output = v;
    } else {
      return UsageError("plan: unknown argument '" + arg + "'");
    }
  }
  if (config.empty() || gpu_gb <= 0) return UsageError("plan needs --config job.yaml and --gpu-memory-gb N");
  try {
    std::ifstream in(config);
    if (!in) throw tune::train::ConfigError("cannot read --config " + config + ": no such readable file");
    std::stringstream text;
    text << in.rdbuf();
    tune::train::DistEnv dist;
    dist.world_size = static_cast<int>(world);
    // Paths are not checked: planning needs only the model's config.json.
    const tune::train::TrainConfig cfg = tune::train::TrainConfig::FromYaml(
        text.str(), config, fs::absolute(fs::path(config)).parent_path().string(), /*check_paths=*/false,
        tune::train::CliOptions{}, dist);
    const fs::path config_json = fs::path(cfg.spec.model) / "config.json";
    if (!fs::is_regular_file(config_json)) {
      throw tune::train::ConfigError("model: " + cfg.spec.model +
                                     " has no config.json; point `model` at a Hugging Face Llama directory "
                                     "(only config.json is needed to plan)");
    }
    const tune::model::LlamaConfig model = tune::model::LlamaConfig::FromJsonFile(config_json.string());
    // A GPU plan: "auto" precision is bf16 on CUDA (config.h).
    const std::string& p = cfg.spec.training.precision;
    const std::string precision = p == "auto" ? "bf16" : p;
    plan::AttentionKernel kernel = plan::AttentionFor(TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR);
    if (attention == "sdpa") kernel = plan::AttentionKernel::kSdpa;
    if (attention == "sdpa_expand_kv") kernel = plan::AttentionKernel::kSdpaExpandKv;
    if (attention == "math") kernel = plan::AttentionKernel::kMath;
    const auto card = static_cast<int64_t>(gpu_gb * static_cast<double>(int64_t{1} << 30));
    const int64_t free_bytes = std::max<int64_t>(0, card - plan::kCudaContextBytes);
    plan::PlanInputs inputs = plan::InputsFromSpec(cfg.spec, model, precision, static_cast<int>(world),
                                                   /*cuda=*/true, kernel, free_bytes);
    inputs.fused_kernels = fused && precision == "bf16";
    // --attention sdpa plans for the CUDA host's torch (>= 2.6: cuDNN
    // attention first, fused AdamW) even from a build with an older one.
    const bool host_torch = attention == "sdpa";
    plan::SetTorchBuild(inputs, host_torch ? 2 : TORCH_VERSION_MAJOR, host_torch ? 6 : TORCH_VERSION_MINOR);
    inputs.host_free_bytes = static_cast<int64_t>(host_gb * static_cast<double>(int64_t{1} << 30));
    const plan::MemoryPlan result = plan::ChoosePlan(inputs);
    if (output == "json") {
      nlohmann::json j = result.ToJson();
      j["world_size"] = world;
      j["effective_batch_size"] = inputs.effective_batch_size;
      j["precision"] = precision;
      j["seq_len"] = inputs.seq_len;
      j["attention"] = plan::AttentionKernelName(kernel);
      j["fused_kernels"] = inputs.fused_kernels;
      j["gpu_memory_bytes"] = card;
      std::cout << j.dump(2) << std::endl;
    } else {
      std::cout << "GPU " << plan::FormatBytes(card) << " (" << plan::FormatBytes(plan::kCudaContextBytes)
                << " CUDA context), model " << cfg.spec.model << "\n"
                << plan::FormatPlan(inputs, result);
    }
    if (!result.fits) {
      std::cerr << "tune-train plan: nothing fits " << plan::FormatBytes(card) << ": " << result.ShortfallText()
                << "; " << result.fix << std::endl;
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "tune-train plan: " << e.what() << std::endl;
    return tune::train::kExitInvalidSpec;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return UsageError("missing arguments");
  const std::string cmd = argv[1];
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::cout << kUsage;
    return 0;
  }
  // The data tools expect argv[0] to be the subcommand name.
  if (cmd == "tokenize") return tune::data::RunTokenizeCommand(argc - 1, argv + 1);
  if (cmd == "render") return tune::data::RunRenderCommand(argc - 1, argv + 1);
  if (cmd == "preflight") return tune::data::RunPreflightCommand(argc - 1, argv + 1);
  if (cmd == "init-model") return RunInitModel(argc, argv);
  if (cmd == "plan") return RunPlan(argc, argv);
  if (cmd == "train") return RunTrain(argc, argv, 2);
  if (cmd.rfind("--", 0) == 0) return RunTrain(argc, argv, 1);
  return UsageError("unknown command '" + cmd + "'");
}
