#include "worker/trainer/config.h"

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "worker/trainer/logger.h"

namespace tune::train {
namespace {

namespace fs = std::filesystem;

int EnvInt(const char* name, int fallback, int min_value) {
  const char* raw = std::getenv(name);
  if (raw == nullptr || *raw == '\0') return fallback;
  errno = 0;
  char* end = nullptr;
  const long v = std::strtol(raw, &end, 10);
  if (errno != 0 || end == raw || *end != '\0' || v < min_value || v > INT_MAX) {
    throw ConfigError(std::string("environment variable ") + name + "='" + raw + "' is not an integer >= " +
                      std::to_string(min_value) + " (tune-worker sets it; unset it for a standalone run)");
  }
  return static_cast<int>(v);
}

}  // namespace

DistEnv DistEnv::FromEnvironment() {
  DistEnv env;
  env.rank = EnvInt("RANK", 0, 0);
  env.world_size = EnvInt("WORLD_SIZE", 1, 1);
  env.local_rank = EnvInt("LOCAL_RANK", 0, 0);
  env.master_port = EnvInt("MASTER_PORT", 29500, 1);
  if (env.master_port > 65535) {
    throw ConfigError("MASTER_PORT=" + std::to_string(env.master_port) + " is not a TCP port (1..65535)");
  }
  if (const char* addr = std::getenv("MASTER_ADDR"); addr != nullptr && *addr != '\0') env.master_addr = addr;
  if (env.rank >= env.world_size) {
    throw ConfigError("RANK=" + std::to_string(env.rank) + " must be < WORLD_SIZE=" +
                      std::to_string(env.world_size));
  }
  return env;
}

BatchPlan PlanBatch(int effective, int micro_spec, int world) {
  if (effective <= 0) throw ConfigError("training.effective_batch_size must be > 0");
  if (world <= 0) throw ConfigError("WORLD_SIZE must be > 0");
  if (effective % world != 0) {
    throw ConfigError("training.effective_batch_size (" + std::to_string(effective) +
                      ") must be divisible by the number of ranks (" + std::to_string(world) +
                      "); choose a multiple of " + std::to_string(world));
  }
  BatchPlan plan;
  plan.micro_batch_size = micro_spec > 0 ? micro_spec : effective / world;
  const int per_step = plan.micro_batch_size * world;
  if (effective % per_step != 0) {
    throw ConfigError("training.effective_batch_size (" + std::to_string(effective) +
                      ") must be a multiple of micro_batch_size x ranks (" + std::to_string(plan.micro_batch_size) +
                      " x " + std::to_string(world) + " = " + std::to_string(per_step) +
                      "); change micro_batch_size or effective_batch_size");
  }
  plan.grad_accum = effective / per_step;
  return plan;
}

bool ResolveGradientCheckpointing(const std::string& mode, int max_seq_length, bool use_cuda) {
  if (mode == "on" || mode == "offload" || mode == "selective") return true;
  if (mode == "off") return false;
  return max_seq_length >= 1024 || use_cuda;
}

TrainConfig TrainConfig::FromYaml(const std::string& yaml_text, const std::string& source,
                                  const std::string& base_dir, bool check_paths, const CliOptions& cli,
                                  const DistEnv& dist) {
  TrainConfig cfg;
  cfg.config_path = source;
  cfg.cli = cli;
  cfg.dist = dist;
  std::vector<spec::SpecError> errors = spec::ParseJobSpec(yaml_text, &cfg.spec);
  if (errors.empty()) {
    if (!cli.output_dir.empty()) cfg.spec.output.dir = cli.output_dir;
    spec::ValidateOptions vopts;
    vopts.base_dir = base_dir;
    vopts.check_paths = check_paths;
    // A spec without resources runs as one CPU rank standalone.
    vopts.default_cpu_ranks = 1;
    errors = spec::ValidateJobSpec(&cfg.spec, vopts);
  }
  if (!errors.empty()) throw ConfigError(spec::FormatErrors(errors, source));

  const spec::JobSpec& s = cfg.spec;
  cfg.use_cuda = s.resources.gpus > 0;
  cfg.device_index = dist.local_rank;
  cfg.cpu_threads = cfg.use_cuda ? 1 : EnvInt("OMP_NUM_THREADS", 1, 1);

  const std::string& p = s.training.precision;
  if (p == "fp16") {
    // Debian's CPU libtorch has no fp16 matmul kernels; fp16 is a GPU mode.
    if (!cfg.use_cuda) {
      throw ConfigError(source +
                        ": training.precision: fp16 needs a CUDA GPU (CPU libtorch has no fp16 matmuls); use "
                        "bf16 or fp32 on CPU ranks, or request resources.gpus");
    }
    cfg.compute_dtype = "fp16";
    cfg.precision_note = "fp16 as requested, with dynamic loss scaling";
  } else if (p == "bf16") {
    cfg.compute_dtype = "bf16";
    cfg.precision_note = "bf16 as requested";
  } else if (p == "fp32") {
    cfg.compute_dtype = "fp32";
    cfg.precision_note = "fp32 as requested";
  } else if (cfg.use_cuda) {
    // Provisional: the trainer checks the GPU's compute capability once it
    // has a device and falls back to fp16 + loss scaling before sm_80.
    cfg.compute_dtype = "bf16";
    cfg.precision_note = "auto: bf16 on CUDA";
  } else {
    cfg.compute_dtype = "fp32";
    cfg.precision_note =
        "auto: fp32 on CPU (bf16 matmuls are slow on CPUs; set training.precision: bf16 to force bf16)";
  }
  cfg.gradient_checkpointing =
      ResolveGradientCheckpointing(s.training.gradient_checkpointing, s.dataset.max_seq_length, cfg.use_cuda);
  cfg.activation_offload = s.training.gradient_checkpointing == "offload";
  cfg.selective_recompute = s.training.gradient_checkpointing == "selective";
  cfg.batch = PlanBatch(s.training.effective_batch_size, s.training.micro_batch_size, dist.world_size);

  fs::path out = s.output.dir.empty() ? fs::path("runs") / s.name : fs::path(s.output.dir);
  if (out.is_relative()) out = fs::absolute(base_dir.empty() ? out : fs::path(base_dir) / out);
  cfg.output_dir = out.lexically_normal().string();
  cfg.checkpoint_dir = (out / "checkpoints").lexically_normal().string();
  cfg.adapter_dir = (out / "adapter").lexically_normal().string();
  cfg.events_path = (out / "events.jsonl").lexically_normal().string();
  cfg.Validate();
  return cfg;
}

TrainConfig TrainConfig::Load(const CliOptions& cli, const DistEnv& dist) {
  if (cli.config_path.empty()) throw ConfigError("missing --config job.yaml (see tune-train --help)");
  std::ifstream in(cli.config_path);
  if (!in) throw ConfigError("cannot read --config " + cli.config_path + ": no such readable file");
  std::stringstream buf;
  buf << in.rdbuf();
  const fs::path parent = fs::absolute(fs::path(cli.config_path)).parent_path();
  return FromYaml(buf.str(), cli.config_path, parent.string(), /*check_paths=*/true, cli, dist);
}

void TrainConfig::Validate() const {
  const spec::TrainingSpec& t = spec.training;
  if (t.optimizer != "adamw" && t.optimizer != "adamw_8bit") {
    throw ConfigError("training.optimizer: '" + t.optimizer + "' is not supported; use adamw or adamw_8bit");
  }
  if (t.lr_scheduler != "linear" && t.lr_scheduler != "cosine" && t.lr_scheduler != "constant") {
    throw ConfigError("training.lr_scheduler: '" + t.lr_scheduler + "' is not supported; use linear, cosine or constant");
  }
  if (t.max_steps <= 0 && t.epochs <= 0) {
    throw ConfigError("training: set max_steps > 0 or epochs > 0");
  }
  if (spec.checkpoint.keep < 1) throw ConfigError("checkpoint.keep must be >= 1");
  if (batch.micro_batch_size * batch.grad_accum * dist.world_size != t.effective_batch_size) {
    throw ConfigError("internal: batch plan does not multiply to effective_batch_size");
  }
  const int spec_ranks = use_cuda ? spec.resources.gpus : spec.resources.cpu_ranks;
  if (spec_ranks != dist.world_size) {
    LogWarning("resources ask for " + std::to_string(spec_ranks) + " rank(s) but WORLD_SIZE=" +
               std::to_string(dist.world_size) + "; training with " + std::to_string(dist.world_size) +
               " (the effective batch, and so the loss curve, is the same)");
  }
}

}  // namespace tune::train
