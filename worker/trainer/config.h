// TrainConfig: everything tune-train decides before touching a model, derived
// from the job spec (common/jobspec), the command line and the rank
// environment. Torch-free so it can be unit-tested cheaply.
//
// Precision policy (DESIGN.md "bf16 compute"):
//   * CUDA: "auto" and "bf16" compute in bf16; "fp32" is honoured.
//   * CPU: "bf16" is honoured; "auto" picks fp32 as an explicit, logged
//     fallback because bf16 matmuls are slow on most CPUs (Debian's libtorch).
//   * CUDA "auto" on a GPU without bf16 (compute capability < 8.0): the
//     trainer switches to fp16 with dynamic loss scaling and warns.
//   * "fp16": CUDA only, with dynamic loss scaling (train/loss_scaler.h); on
//     CPU ranks it is a ConfigError (no fp16 matmuls in CPU libtorch).
#ifndef TUNE_WORKER_TRAINER_CONFIG_H_
#define TUNE_WORKER_TRAINER_CONFIG_H_

#include <stdexcept>
#include <string>
#include <vector>

#include "common/jobspec/job_spec.h"

namespace tune::train {

// Bad command line, spec or environment: tune-train exits 2 (INVALID_SPEC).
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Rank and rendezvous, passed explicitly by tune-worker (DESIGN.md).
struct DistEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  // Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (absent: the
  // defaults above, i.e. standalone). Throws ConfigError naming the variable.
  static DistEnv FromEnvironment();
};

// Command-line options of `tune-train [train]`.
struct CliOptions {
  std::string config_path;
  int events_fd = -1;
  std::string output_dir;  // overrides output.dir when non-empty
  bool resume = false;
};

// Split of the effective batch: micro_batch_size x grad_accum x world == effective.
struct BatchPlan {
  int micro_batch_size = 0;
  int grad_accum = 0;
};

// The provisional split TrainConfig::Load records (and the CPU default):
// micro_spec 0 = auto: effective / world (one micro-batch per rank per step).
// Throws ConfigError when effective is not divisible by world or micro x world.
// The trainer's setup then runs the memory planner (plan/memory_plan.h) once
// the device and the data are known: on CUDA it decides the auto fields; on
// CPU it keeps this split unless host memory is too small.
BatchPlan PlanBatch(int effective_batch_size, int micro_spec, int world_size);

// Provisional, like PlanBatch: "auto" is on for max_seq_length >= 1024 or on
// CUDA (where the memory planner replaces it); "on"/"off" as given; "offload"
// and "selective" are "on" with activation_offload / selective_recompute set.
bool ResolveGradientCheckpointing(const std::string& mode, int max_seq_length, bool use_cuda);

struct TrainConfig {
  spec::JobSpec spec;
  std::string config_path;
  DistEnv dist;
  CliOptions cli;

  bool use_cuda = false;
  int device_index = 0;     // cuda:LOCAL_RANK
  int cpu_threads = 1;      // OMP_NUM_THREADS or 1 (CPU ranks)
  std::string compute_dtype = "fp32";  // "bf16" | "fp16" | "fp32"
  std::string precision_note;          // why compute_dtype was chosen (logged)
  bool gradient_checkpointing = false;
  // gradient_checkpointing: offload — checkpointed layer inputs wait in host
  // memory (the last OOM step-down turns it on at run time too).
  bool activation_offload = false;
  // gradient_checkpointing: selective — each layer also keeps the residual
  // stream after attention and recomputes less (model SetSelectiveRecompute).
  bool selective_recompute = false;
  BatchPlan batch;

  std::string output_dir;      // absolute
  std::string checkpoint_dir;  // <output>/checkpoints
  std::string adapter_dir;     // <output>/adapter
  std::string events_path;     // <output>/events.jsonl

  // Reads and validates the YAML at cli.config_path (relative paths resolve
  // against the YAML's directory), applies the CLI and environment. Throws
  // ConfigError listing every problem with its YAML path and line.
  static TrainConfig Load(const CliOptions& cli, const DistEnv& dist);
  // Same from YAML text (tests). `base_dir` resolves relative paths.
  static TrainConfig FromYaml(const std::string& yaml_text, const std::string& source, const std::string& base_dir,
                              bool check_paths, const CliOptions& cli, const DistEnv& dist);

  // Cross-field checks of the derived values. Throws ConfigError.
  void Validate() const;
};

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_CONFIG_H_
