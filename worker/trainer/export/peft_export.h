// Export of trained adapters in Hugging Face PEFT's format, our own loader for
// it, and the merged-model export.
//
// PEFT LoRA adapter directory (what `PeftModel.from_pretrained` reads):
//   adapter_config.json: {"peft_type": "LORA", "task_type": "CAUSAL_LM",
//     "r": 16, "lora_alpha": 16, "lora_dropout": 0.0,
//     "target_modules": ["q_proj", ...], "use_rslora": false, "bias": "none",
//     "base_model_name_or_path": "<dir>", "fan_in_fan_out": false,
//     "inference_mode": true, "modules_to_save": null, "init_lora_weights": true,
//     "layers_to_transform": null, "layers_pattern": null, ...}
//   adapter_model.safetensors: keys
//     base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
//     base_model.model.model.layers.N.mlp.{gate,up,down}_proj.lora_{A,B}.weight
//   (no adapter name in the key: PEFT strips ".default" when saving),
//   lora_A [r, in], lora_B [out, r].
#ifndef TUNE_WORKER_TRAINER_EXPORT_PEFT_EXPORT_H_
#define TUNE_WORKER_TRAINER_EXPORT_PEFT_EXPORT_H_

#include <nlohmann/json.hpp>

#include <string>

#include "common/jobspec/job_spec.h"
#include "worker/trainer/model/llama.h"

namespace tune::exporter {

constexpr const char* kPeftKeyPrefix = "base_model.model.";

// adapter_config.json content for the model's LoRA options.
nlohmann::json PeftAdapterConfig(const model::LlamaForCausalLM& model,
                                 const std::string& base_model_dir);

// Writes out_dir/adapter_config.json and out_dir/adapter_model.safetensors
// (LoRA weights in fp32; created atomically; out_dir is created). The spec
// contributes metadata only (job name); the LoRA options are the model's.
void ExportPeftAdapter(model::LlamaForCausalLM& model, const spec::JobSpec& spec,
                       const std::string& base_model_dir, const std::string& out_dir);

// Reads a PEFT adapter directory into the model's LoRA parameters. Checks that
// peft_type is LORA, r / lora_alpha / use_rslora / target_modules agree with
// the model's options, and every key is present with the right shape.
// Throws std::runtime_error naming the file and field.
void LoadPeftAdapter(model::LlamaForCausalLM& model, const std::string& dir);

// Writes a merged model directory loadable as a plain HF Llama: for every
// target linear W' = W + scaling * B @ A (computed in fp32, stored in bf16),
// everything else copied from the base. W is read from the original base
// checkpoint in base_model_dir (the most accurate choice, and what PEFT's
// merge_and_unload on a bf16 base does); with `from_quantized_base` W is
// instead the model's dequantised NF4 weight (the exact weights the adapter
// was trained against). Streams tensor by tensor, sharding above 2 GB; copies
// config.json (torch_dtype bfloat16), generation_config.json and tokenizer files.
void ExportMergedModel(model::LlamaForCausalLM& model, const spec::JobSpec& spec,
                       const std::string& base_model_dir, const std::string& out_dir,
                       bool from_quantized_base = false);

}  // namespace tune::exporter

#endif  // TUNE_WORKER_TRAINER_EXPORT_PEFT_EXPORT_H_
