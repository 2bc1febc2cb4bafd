#include "common/control/spec_proto.h"

#include <string_view>

namespace tune {

void SpecToProto(const spec::JobSpec& in, v1::JobSpec* out) {
  out->Clear();
  out->set_name(in.name);
  out->set_model(in.model);
  auto* d = out->mutable_dataset();
  d->set_path(in.dataset.path);
  d->set_format(in.dataset.format);
  d->set_chat_template(in.dataset.chat_template);
  d->set_train_on(in.dataset.train_on);
  d->set_max_seq_length(in.dataset.max_seq_length);
  d->set_packing(in.dataset.packing);
  d->set_max_bad_line_fraction(in.dataset.max_bad_line_fraction);
  auto* l = out->mutable_lora();
  l->set_r(in.lora.r);
  l->set_alpha(in.lora.alpha);
  l->set_dropout(in.lora.dropout);
  for (const auto& t : in.lora.targets) l->add_targets(t);
  l->set_rslora(in.lora.rslora);
  auto* q = out->mutable_quantization();
  q->set_base(in.quantization.base);
  q->set_double_quant(in.quantization.double_quant);
  q->set_block_size(in.quantization.block_size);
  auto* t = out->mutable_training();
  const auto& ti = in.training;
  t->set_precision(ti.precision);
  t->set_effective_batch_size(ti.effective_batch_size);
  t->set_micro_batch_size(ti.micro_batch_size);
  t->set_learning_rate(ti.learning_rate);
  t->set_lr_scheduler(ti.lr_scheduler);
  t->set_warmup_steps(ti.warmup_steps);
  t->set_max_steps(ti.max_steps);
  t->set_epochs(ti.epochs);
  t->set_max_grad_norm(ti.max_grad_norm);
  t->set_optimizer(ti.optimizer);
  t->set_weight_decay(ti.weight_decay);
  t->set_gradient_checkpointing(ti.gradient_checkpointing);
  t->set_seed(ti.seed);
  t->set_log_every_steps(ti.log_every_steps);
  auto* np = t->mutable_nan_policy();
  np->set_skip_step(ti.nan_policy.skip_step);
  np->set_max_consecutive(ti.nan_policy.max_consecutive);
  np->set_rollback(ti.nan_policy.rollback);
  np->set_lr_backoff(ti.nan_policy.lr_backoff);
  np->set_max_rollbacks(ti.nan_policy.max_rollbacks);
  out->mutable_checkpoint()->set_every_steps(in.checkpoint.every_steps);
  out->mutable_checkpoint()->set_keep(in.checkpoint.keep);
  out->mutable_output()->set_dir(in.output.dir);
  out->mutable_output()->set_merge(in.output.merge);
  out->mutable_resources()->set_gpus(in.resources.gpus);
  out->mutable_resources()->set_cpu_ranks(in.resources.cpu_ranks);
  out->set_priority(in.priority);
  out->set_max_retries(in.max_retries);
  auto* f = out->mutable_faults();
  for (int s : in.faults.nan_at_steps) f->add_nan_at_steps(s);
  for (int s : in.faults.oom_at_steps) f->add_oom_at_steps(s);
  f->set_gpu_memory_cap_gb(in.faults.gpu_memory_cap_gb);
}

spec::JobSpec SpecFromProto(const v1::JobSpec& in) {
  spec::JobSpec out;
  out.name = in.name();
  out.model = in.model();
  out.dataset.path = in.dataset().path();
  out.dataset.format = in.dataset().format();
  out.dataset.chat_template = in.dataset().chat_template();
  out.dataset.train_on = in.dataset().train_on();
  out.dataset.max_seq_length = in.dataset().max_seq_length();
  out.dataset.packing = in.dataset().packing();
  out.dataset.max_bad_line_fraction = in.dataset().max_bad_line_fraction();
  out.lora.r = in.lora().r();
  out.lora.alpha = in.lora().alpha();
  out.lora.dropout = in.lora().dropout();
  out.lora.targets.assign(in.lora().targets().begin(), in.lora().targets().end());
  out.lora.rslora = in.lora().rslora();
  out.quantization.base = in.quantization().base();
  out.quantization.double_quant = in.quantization().double_quant();
  out.quantization.block_size = in.quantization().block_size();
  const auto& t = in.training();
  auto& to = out.training;
  to.precision = t.precision();
  to.effective_batch_size = t.effective_batch_size();
  to.micro_batch_size = t.micro_batch_size();
  to.learning_rate = t.learning_rate();
  to.lr_scheduler = t.lr_scheduler();
  to.warmup_steps = t.warmup_steps();
  to.max_steps = t.max_steps();
  to.epochs = t.epochs();
  to.max_grad_norm = t.max_grad_norm();
  to.optimizer = t.optimizer();
  to.weight_decay = t.weight_decay();
  to.gradient_checkpointing = t.gradient_checkpointing();
  to.seed = t.seed();
  to.log_every_steps = t.log_every_steps();
  to.nan_policy.skip_step = t.nan_policy().skip_step();
  to.nan_policy.max_consecutive = t.nan_policy().max_consecutive();
  to.nan_policy.rollback = t.nan_policy().rollback();
  to.nan_policy.lr_backoff = t.nan_policy().lr_backoff();
  to.nan_policy.max_rollbacks = t.nan_policy().max_rollbacks();
  out.checkpoint.every_steps = in.checkpoint().every_steps();
  out.checkpoint.keep = in.checkpoint().keep();
  out.output.dir = in.output().dir();
  out.output.merge = in.output().merge();
  out.resources.gpus = in.resources().gpus();
  out.resources.cpu_ranks = in.resources().cpu_ranks();
  out.priority = in.priority();
  out.max_retries = in.max_retries();
  out.faults.nan_at_steps.assign(in.faults().nan_at_steps().begin(), in.faults().nan_at_steps().end());
  out.faults.oom_at_steps.assign(in.faults().oom_at_steps().begin(), in.faults().oom_at_steps().end());
  out.faults.gpu_memory_cap_gb = in.faults().gpu_memory_cap_gb();
  return out;
}

namespace {

// Strips the enum's prefix: JOB_STATE_QUEUED -> QUEUED.
template <typename Enum, typename NameFn>
std::string ShortName(Enum v, NameFn name_fn, std::string_view prefix) {
  const std::string& full = name_fn(v);
  if (full.empty() || full.compare(0, prefix.size(), prefix) != 0) return "";
  std::string s = full.substr(prefix.size());
  return s == "UNSPECIFIED" ? "" : s;
}

template <typename Enum, typename ParseFn>
Enum FromShortName(const std::string& name, ParseFn parse_fn, std::string_view prefix, Enum fallback) {
  std::string upper;
  for (char c : name) upper += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  Enum v;
  if (!upper.empty() && parse_fn(std::string(prefix) + upper, &v)) return v;
  return fallback;
}

}  // namespace

std::string JobStateName(v1::JobState s) { return ShortName(s, v1::JobState_Name<v1::JobState>, "JOB_STATE_"); }
v1::JobState JobStateFromName(const std::string& n) {
  return FromShortName(n, v1::JobState_Parse, "JOB_STATE_", v1::JOB_STATE_UNSPECIFIED);
}
std::string FailureReasonName(v1::FailureReason r) {
  return ShortName(r, v1::FailureReason_Name<v1::FailureReason>, "FAILURE_REASON_");
}
v1::FailureReason FailureReasonFromName(const std::string& n) {
  return FromShortName(n, v1::FailureReason_Parse, "FAILURE_REASON_", v1::FAILURE_REASON_UNSPECIFIED);
}
// Event types are lower case in JSON ("nan_alert"), upper case in the enum.
std::string EventTypeName(v1::EventType t) {
  std::string s = ShortName(t, v1::EventType_Name<v1::EventType>, "EVENT_TYPE_");
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
v1::EventType EventTypeFromName(const std::string& n) {
  return FromShortName(n, v1::EventType_Parse, "EVENT_TYPE_", v1::EVENT_TYPE_UNSPECIFIED);
}

}  // namespace tune
