// tune-train: the training engine (DESIGN.md "The trainer, stage by stage").
//
//   tune-train [train] --config job.yaml [--events-fd N] [--output DIR] [--resume]
//                      [--stop-after-step N]
//   tune-train init-model --preset tiny|llama3-8b|CONFIG.json --tokenizer DIR --out DIR
//                         [--seed N] [--dtype bf16|fp32]
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

#include "worker/trainer/data/cli.h"
#include "worker/trainer/logger.h"
#include "worker/trainer/model/llama.h"
#include "worker/trainer/recipe.h"

namespace {

constexpr const char* kUsage = R"(tune-train: QLoRA fine-tuning of Llama-3-family models.

Usage:
  tune-train [train] --config job.yaml [--events-fd N] [--output DIR] [--resume]
                     [--stop-after-step N]
      Train the job described by job.yaml (the same YAML as `tunectl submit`).
      --events-fd N        also write JSON-lines events to inherited fd N
      --output DIR         override output.dir
      --resume             continue from the newest complete checkpoint in
                           <output>/checkpoints (starts at step 1 when none)
      --stop-after-step N  checkpoint after step N and exit 0 (resume later)
      Environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
      (data parallel; defaults 0, 1, 0, 127.0.0.1, 29500), OMP_NUM_THREADS
      (CPU threads per rank, default 1), TUNE_LOG_LEVEL=debug.
      Exit codes: 0 done, 2 bad spec/command line, 3 out of memory,
      4 NaN policy exhausted, 5 dataset failed preflight, 143 stopped by
      SIGTERM (checkpoint written), other: crash.

  tune-train init-model --preset tiny|llama3-8b|CONFIG.json --tokenizer DIR --out DIR
                        [--seed N] [--dtype bf16|fp32]
      Write a randomly initialised Llama in Hugging Face layout.

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
    } else {
      return UsageError("unknown argument '" + arg + "'");
    }
  }
  if (opts.cli.config_path.empty()) return UsageError("missing --config job.yaml");
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
  if (cmd == "train") return RunTrain(argc, argv, 2);
  if (cmd.rfind("--", 0) == 0) return RunTrain(argc, argv, 1);
  return UsageError("unknown command '" + cmd + "'");
}
