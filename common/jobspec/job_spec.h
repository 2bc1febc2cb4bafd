// The job spec: the YAML a user writes, parsed into plain structs.
//
// Shared by both sides of the build rule (DESIGN.md): the control plane
// (tunectl, tune-server, tune-worker) and the trainer (tune-train) parse the
// same YAML with this code, so a spec accepted at submit time is read the
// same way by every rank. Depends only on yaml-cpp and the standard library
// (no absl, no protobuf, no torch).
//
// Contract:
//  * Every field has a default (the values below).
//  * Unknown keys, wrong types and out-of-range numbers are errors that name
//    the YAML path (e.g. "training.max_steps") and the 1-based line, and say
//    how to fix it.
//  * ParseJobSpec only reads; ValidateJobSpec checks ranges and (optionally)
//    the filesystem, and makes relative paths absolute.
#ifndef TUNE_COMMON_JOBSPEC_JOB_SPEC_H_
#define TUNE_COMMON_JOBSPEC_JOB_SPEC_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tune::spec {

struct SpecError {
  std::string path;     // YAML path, "" for the document as a whole.
  int line = 0;         // 1-based line in the YAML text, 0 when unknown.
  std::string message;  // What is wrong and how to fix it.
  // "job.yaml:12: training.max_steps: must be > 0 (got -5)"; `source` may be "".
  std::string ToString(const std::string& source = "") const;
};

struct DatasetSpec {
  std::string path;                        // JSONL file. Required.
  std::string format = "auto";             // auto|text|prompt_completion|messages|sharegpt|tokens
  std::string chat_template = "auto";      // auto|llama-3|llama-3.1|chatml|mistral|alpaca
  std::string train_on = "completions";    // completions|all
  int max_seq_length = 2048;
  bool packing = false;
  double max_bad_line_fraction = 0.01;     // fail when more lines than this are bad
};

struct LoraSpec {
  int r = 16;
  double alpha = 16;
  double dropout = 0.0;
  std::vector<std::string> targets = {"q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj"};
  bool rslora = false;
};

struct QuantizationSpec {
  std::string base = "nf4";  // nf4|bf16
  bool double_quant = true;
  int block_size = 64;
};

struct NanPolicySpec {
  bool skip_step = true;
  int max_consecutive = 3;
  bool rollback = true;
  double lr_backoff = 0.5;
  int max_rollbacks = 2;
};

struct TrainingSpec {
  std::string precision = "auto";  // auto|bf16|fp16|fp32
  int effective_batch_size = 8;
  int micro_batch_size = 0;        // 0 = auto
  double learning_rate = 2.0e-4;
  std::string lr_scheduler = "linear";  // linear|cosine|constant
  int warmup_steps = 5;
  int max_steps = 60;              // 0 = derive from epochs
  double epochs = 0;
  double max_grad_norm = 1.0;
  std::string optimizer = "adamw_8bit";  // adamw|adamw_8bit
  double weight_decay = 0.01;
  std::string gradient_checkpointing = "auto";  // auto|on|off|offload|selective
  int64_t seed = 3407;
  NanPolicySpec nan_policy;
  int log_every_steps = 1;
};

struct CheckpointSpec {
  int every_steps = 50;
  int keep = 3;
};

struct OutputSpec {
  std::string dir;  // default: runs/<name>
  bool merge = false;
};

struct ResourcesSpec {
  int gpus = 0;       // exactly one of gpus / cpu_ranks is > 0 after validation
  int cpu_ranks = 0;
};

struct FaultsSpec {  // testing aids (README: "Fault injection")
  std::vector<int> nan_at_steps;
  std::vector<int> oom_at_steps;
  double gpu_memory_cap_gb = 0;
};

struct JobSpec {
  std::string name = "job";
  std::string model;  // HF directory. Required.
  DatasetSpec dataset;
  LoraSpec lora;
  QuantizationSpec quantization;
  TrainingSpec training;
  CheckpointSpec checkpoint;
  OutputSpec output;
  ResourcesSpec resources;
  int priority = 0;
  int max_retries = 2;
  FaultsSpec faults;

  // 1-based YAML line of each path seen by ParseJobSpec, so that later
  // validation errors can point at the line. Not part of the spec itself.
  std::map<std::string, int> source_lines;
};

// Parses `yaml_text` into `*out` (which starts from defaults). Returns every
// error found (syntax, unknown key, wrong type); empty means success.
std::vector<SpecError> ParseJobSpec(const std::string& yaml_text, JobSpec* out);

struct ValidateOptions {
  // Relative `model`, `dataset.path` and `output.dir` are resolved against this
  // (unchanged when empty).
  std::string base_dir;
  // Check that the model dir holds a readable Llama config.json and the dataset
  // file is readable.
  bool check_paths = true;
  // A resources section with neither gpus nor cpu_ranks gets this many CPU ranks
  // (0: it becomes gpus: 1).
  int default_cpu_ranks = 0;
};

// Range checks, enum checks, path checks; fills derived defaults (output.dir,
// resources). Empty result means the spec may be queued.
std::vector<SpecError> ValidateJobSpec(JobSpec* spec, const ValidateOptions& opts);

// Canonical YAML of a spec (all fields, stable order). ParseJobSpec of the
// result gives back an equal spec.
std::string EmitJobSpecYaml(const JobSpec& spec);

// Joins errors one per line, each via SpecError::ToString(source).
std::string FormatErrors(const std::vector<SpecError>& errors, const std::string& source = "");

}  // namespace tune::spec

#endif  // TUNE_COMMON_JOBSPEC_JOB_SPEC_H_
