#include "client/output.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <utility>

#include <google/protobuf/util/json_util.h>
#include <yaml-cpp/yaml.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/control/spec_proto.h"
#include "common/control/time_util.h"

namespace tune::client {
namespace {

using json = Json;

bool IsSet(const google::protobuf::Timestamp& ts) { return ts.seconds() != 0 || ts.nanos() != 0; }

json TimestampJson(const google::protobuf::Timestamp& ts) {
  if (!IsSet(ts)) return nullptr;
  return FormatTimestamp(ts);
}

// JSON has no NaN/inf; nlohmann would write them as null anyway, but saying
// so explicitly keeps the schema obvious.
json Number(double v) {
  if (!std::isfinite(v)) return nullptr;
  return v;
}

double UnixSeconds(const google::protobuf::Timestamp& ts) {
  return static_cast<double>(ts.seconds()) + static_cast<double>(ts.nanos()) * 1e-9;
}

json SpecJson(const v1::JobSpec& spec) {
  std::string text;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(spec, &text, options).ok()) return nullptr;
  json out = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (out.is_discarded()) return nullptr;
  // proto3 JSON writes int64 as a string; the seed is a plain number to users.
  if (out.contains("training") && out["training"].contains("seed") &&
      out["training"]["seed"].is_string()) {
    out["training"]["seed"] = spec.training().seed();
  }
  return out;
}

std::string Cell(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return "";
  return v.dump();
}

std::string StepProgress(const v1::Job& job) {
  int max_steps = job.spec().training().max_steps();
  if (job.last_step() == 0 && max_steps == 0) return "-";
  if (max_steps > 0) return absl::StrCat(job.last_step(), "/", max_steps);
  return absl::StrCat(job.last_step());
}

std::string StateWithReason(const v1::Job& job) {
  std::string state = JobStateName(job.state());
  if (job.reason() != v1::FAILURE_REASON_UNSPECIFIED &&
      (job.state() == v1::JOB_STATE_FAILED || job.state() == v1::JOB_STATE_CANCELLED ||
       job.state() == v1::JOB_STATE_QUEUED)) {
    absl::StrAppend(&state, " (", FailureReasonName(job.reason()), ")");
  }
  if (job.cancel_requested() && job.state() == v1::JOB_STATE_RUNNING) {
    absl::StrAppend(&state, " (cancelling)");
  }
  return state;
}

std::string Str(const json& payload, const char* key) {
  auto it = payload.find(key);
  if (it == payload.end() || it->is_null()) return "";
  if (it->is_string()) return it->get<std::string>();
  return it->dump();
}

std::string Num(const json& payload, const char* key, const char* fmt = "%g") {
  std::optional<double> v = PayloadNumber(payload, key);
  if (!v) return "?";
  if (!std::isfinite(*v)) return FormatLoss(*v);
  char buf[64];
  std::snprintf(buf, sizeof(buf), fmt, *v);
  return buf;
}

std::string Int(const json& payload, const char* key) {
  std::optional<double> v = PayloadNumber(payload, key);
  if (!v || !std::isfinite(*v)) return "?";
  return absl::StrCat(static_cast<long long>(std::llround(*v)));
}

std::string JoinJsonArray(const json& payload, const char* key) {
  auto it = payload.find(key);
  if (it == payload.end() || !it->is_array()) return "";
  std::vector<std::string> parts;
  for (const auto& e : *it) parts.push_back(Cell(e));
  return absl::StrJoin(parts, ",");
}

// YAML 1.1/1.2 scalars that a reader would not take as a string.
bool NeedsQuotes(const std::string& s) {
  if (s.empty()) return true;
  std::string lower = absl::AsciiStrToLower(s);
  static const char* kSpecial[] = {"true",  "false", "yes", "no",   "on",   "off",  "y",
                                   "n",     "null",  "~",   ".nan", ".inf", "-.inf", "+.inf"};
  for (const char* k : kSpecial) {
    if (lower == k) return true;
  }
  // Anything that starts like a number (digits, sign, dot) is quoted: cheap
  // and safe, since quoting never changes a string's value.
  char c = s[0];
  if ((c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.') return true;
  // Leading/trailing spaces, and characters yaml-cpp may otherwise emit plain.
  if (s.front() == ' ' || s.back() == ' ') return true;
  return false;
}

void EmitYaml(YAML::Emitter& out, const json& v) {
  switch (v.type()) {
    case json::value_t::object:
      out << YAML::BeginMap;
      for (auto it = v.begin(); it != v.end(); ++it) {
        out << YAML::Key << it.key() << YAML::Value;
        EmitYaml(out, it.value());
      }
      out << YAML::EndMap;
      break;
    case json::value_t::array:
      if (v.empty()) {
        out << YAML::Flow << YAML::BeginSeq << YAML::EndSeq;
        break;
      }
      out << YAML::BeginSeq;
      for (const auto& e : v) EmitYaml(out, e);
      out << YAML::EndSeq;
      break;
    case json::value_t::string: {
      const std::string& s = v.get_ref<const std::string&>();
      if (NeedsQuotes(s)) out << YAML::DoubleQuoted;
      out << s;
      break;
    }
    case json::value_t::boolean:
      out << (v.get<bool>() ? "true" : "false");
      break;
    case json::value_t::number_integer:
      out << v.get<int64_t>();
      break;
    case json::value_t::number_unsigned:
      out << v.get<uint64_t>();
      break;
    case json::value_t::number_float: {
      double d = v.get<double>();
      // Shortest text that reads back as the same double.
      out << json(d).dump();
      break;
    }
    case json::value_t::null:
    case json::value_t::discarded:
    case json::value_t::binary:
      out << YAML::Null;
      break;
  }
}

}  // namespace

absl::StatusOr<OutputFormat> ParseOutputFormat(std::string_view name) {
  if (name == "table") return OutputFormat::kTable;
  if (name == "json") return OutputFormat::kJson;
  if (name == "yaml") return OutputFormat::kYaml;
  return absl::InvalidArgumentError(
      absl::StrCat("-o/--output: unknown format '", std::string(name), "' (use table, json or yaml)"));
}

json JobToJson(const v1::Job& job) {
  json j;
  j["id"] = job.id();
  j["name"] = job.spec().name();
  j["state"] = JobStateName(job.state());
  j["reason"] = FailureReasonName(job.reason());
  j["message"] = job.message();
  j["attempt"] = job.attempt();
  j["worker"] = job.worker();
  j["devices"] = json::array();
  for (int d : job.devices()) j["devices"].push_back(d);
  j["priority"] = job.spec().priority();
  j["max_steps"] = job.spec().training().max_steps();
  j["last_step"] = job.last_step();
  j["last_loss"] = job.last_step() > 0 ? Number(job.last_loss()) : json(nullptr);
  j["last_checkpoint_step"] = job.last_checkpoint_step();
  j["last_event_seq"] = job.last_event_seq();
  j["cancel_requested"] = job.cancel_requested();
  j["pending_reason"] = job.pending_reason();
  j["created_at"] = TimestampJson(job.created_at());
  j["started_at"] = TimestampJson(job.started_at());
  j["finished_at"] = TimestampJson(job.finished_at());
  j["spec"] = job.has_spec() ? SpecJson(job.spec()) : json(nullptr);
  return j;
}

json EventPayload(const v1::JobEvent& event) {
  if (event.payload_json().empty()) return json::object();
  json payload = json::parse(event.payload_json(), nullptr, /*allow_exceptions=*/false);
  if (payload.is_discarded() || !payload.is_object()) {
    return json{{"payload_raw", event.payload_json()}};
  }
  return payload;
}

json EventToJson(const v1::JobEvent& event) {
  json payload = EventPayload(event);
  std::string type = EventTypeName(event.type());
  if (type.empty()) {
    // Unknown to this tunectl: keep the producer's own type string.
    auto it = payload.find("type");
    type = (it != payload.end() && it->is_string()) ? it->get<std::string>() : "unknown";
  }
  // The stored envelope first, then the payload's own fields in their order.
  json j;
  j["seq"] = event.seq();
  j["job_id"] = event.job_id();
  j["type"] = type;
  j["attempt"] = event.attempt();
  j["rank"] = event.rank();
  if (IsSet(event.time())) {
    j["time"] = UnixSeconds(event.time());
  }
  for (auto it = payload.begin(); it != payload.end(); ++it) {
    if (!j.contains(it.key())) j[it.key()] = it.value();
  }
  return j;
}

json WorkerToJson(const v1::Worker& worker) {
  json j;
  const v1::WorkerInfo& info = worker.info();
  j["name"] = info.name();
  j["hostname"] = info.hostname();
  j["state"] = worker.state() == v1::WORKER_STATE_READY  ? "READY"
               : worker.state() == v1::WORKER_STATE_LOST ? "LOST"
                                                         : "";
  j["version"] = info.version();
  j["gpus"] = json::array();
  for (const auto& g : info.gpus()) {
    j["gpus"].push_back({{"index", g.index()},
                         {"name", g.name()},
                         {"memory_total_bytes", g.memory_total_bytes()},
                         {"uuid", g.uuid()}});
  }
  j["cpu_slots"] = info.cpu_slots();
  j["free_gpus"] = json::array();
  for (int g : worker.free_gpus()) j["free_gpus"].push_back(g);
  j["free_cpu_slots"] = worker.free_cpu_slots();
  j["job_ids"] = json::array();
  for (const auto& id : worker.job_ids()) j["job_ids"].push_back(id);
  j["last_heartbeat"] = TimestampJson(worker.last_heartbeat());
  j["gpu_stats"] = json::array();
  for (const auto& s : worker.gpu_stats()) {
    j["gpu_stats"].push_back({{"index", s.index()},
                              {"memory_used_bytes", s.memory_used_bytes()},
                              {"memory_total_bytes", s.memory_total_bytes()},
                              {"utilization_percent", s.utilization_percent()}});
  }
  return j;
}

std::optional<double> PayloadNumber(const json& payload, const char* key) {
  if (!payload.is_object()) return std::nullopt;
  auto it = payload.find(key);
  if (it == payload.end()) return std::nullopt;
  if (it->is_number()) return it->get<double>();
  if (it->is_string()) {
    const std::string& s = it->get_ref<const std::string&>();
    if (s == "nan") return std::nan("");
    if (s == "inf") return HUGE_VAL;
    if (s == "-inf") return -HUGE_VAL;
  }
  return std::nullopt;
}

LossSummary SummarizeLosses(const std::vector<v1::JobEvent>& events) {
  // step -> (attempt, loss); a later attempt overrides a re-run step.
  std::map<int, std::pair<int, double>> by_step;
  LossSummary s;
  for (const auto& e : events) {
    if (e.type() != v1::EVENT_TYPE_STEP || e.rank() != 0) continue;
    json payload = EventPayload(e);
    std::optional<double> step = PayloadNumber(payload, "step");
    std::optional<double> loss = PayloadNumber(payload, "loss");
    if (!step || !loss) continue;
    if (!std::isfinite(*loss)) {
      ++s.non_finite;
      continue;
    }
    int k = static_cast<int>(*step);
    auto it = by_step.find(k);
    if (it == by_step.end() || it->second.first <= e.attempt()) {
      by_step[k] = {e.attempt(), *loss};
    }
  }
  if (by_step.empty()) return s;
  s.steps = static_cast<int>(by_step.size());
  s.first_step = by_step.begin()->first;
  s.first = by_step.begin()->second.second;
  s.last_step = by_step.rbegin()->first;
  s.last = by_step.rbegin()->second.second;
  s.min = s.first;
  s.min_step = s.first_step;
  for (const auto& [step, v] : by_step) {
    if (v.second < s.min) {
      s.min = v.second;
      s.min_step = step;
    }
  }
  return s;
}

json LossSummaryToJson(const LossSummary& s) {
  if (s.steps == 0) return nullptr;
  return json{{"steps", s.steps},          {"first_step", s.first_step}, {"first", s.first},
              {"min", s.min},              {"min_step", s.min_step},     {"last_step", s.last_step},
              {"last", s.last},            {"non_finite", s.non_finite}};
}

std::string ToJsonText(const json& value, bool pretty) {
  return value.dump(pretty ? 2 : -1, ' ', /*ensure_ascii=*/false, json::error_handler_t::replace);
}

std::string ToYaml(const json& value) {
  YAML::Emitter out;
  out.SetIndent(2);
  EmitYaml(out, value);
  std::string text = out.c_str();
  if (!text.empty() && text.back() != '\n') text.push_back('\n');
  return text;
}

std::string RenderTable(const Table& table) {
  size_t cols = table.headers.size();
  for (const auto& r : table.rows) cols = std::max(cols, r.size());
  std::vector<size_t> width(cols, 0);
  auto measure = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], DisplayWidth(row[i]));
  };
  measure(table.headers);
  for (const auto& r : table.rows) measure(r);
  std::string out;
  auto emit = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t i = 0; i < cols; ++i) {
      const std::string cell = i < row.size() ? row[i] : "";
      line += cell;
      if (i + 1 < cols) line.append(width[i] - DisplayWidth(cell) + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line;
    out += '\n';
  };
  if (!table.headers.empty()) emit(table.headers);
  for (const auto& r : table.rows) emit(r);
  return out;
}

Table JobsTable(const std::vector<v1::Job>& jobs, absl::Time now) {
  Table t;
  t.headers = {"ID", "NAME", "STATE", "PRIORITY", "ATTEMPT", "WORKER", "STEP", "LOSS", "AGE"};
  for (const auto& job : jobs) {
    std::string age =
        IsSet(job.created_at()) ? FormatAge(now - FromProtoTime(job.created_at())) : "";
    t.rows.push_back({job.id(), job.spec().name(), StateWithReason(job),
                      absl::StrCat(job.spec().priority()), absl::StrCat(job.attempt()),
                      job.worker().empty() ? "-" : job.worker(), StepProgress(job),
                      job.last_step() > 0 ? FormatLoss(job.last_loss()) : "-", age});
  }
  return t;
}

Table WorkersTable(const std::vector<v1::Worker>& workers, absl::Time now) {
  Table t;
  t.headers = {"NAME", "STATE", "HOST", "GPUS", "FREE GPUS", "CPU SLOTS", "FREE CPU", "JOBS",
               "HEARTBEAT"};
  for (const auto& w : workers) {
    std::vector<std::string> gpus;
    for (const auto& g : w.info().gpus()) {
      gpus.push_back(absl::StrCat(g.index(), ":", g.name(), " ",
                                  FormatBytes(static_cast<double>(g.memory_total_bytes()))));
    }
    std::vector<std::string> free;
    for (int g : w.free_gpus()) free.push_back(absl::StrCat(g));
    std::string hb = IsSet(w.last_heartbeat())
                         ? absl::StrCat(FormatAge(now - FromProtoTime(w.last_heartbeat())), " ago")
                         : "-";
    json wj = WorkerToJson(w);
    t.rows.push_back({w.info().name(), wj["state"].get<std::string>(), w.info().hostname(),
                      gpus.empty() ? "-" : absl::StrJoin(gpus, ", "),
                      free.empty() ? "-" : absl::StrJoin(free, ","),
                      absl::StrCat(w.info().cpu_slots()), absl::StrCat(w.free_cpu_slots()),
                      w.job_ids().empty() ? "-" : absl::StrJoin(w.job_ids(), ","), hb});
  }
  return t;
}

Table EventsTable(const std::vector<v1::JobEvent>& events) {
  Table t;
  t.headers = {"SEQ", "TIME", "ATTEMPT", "RANK", "TYPE", "DETAILS"};
  for (const auto& e : events) {
    std::string type = EventTypeName(e.type());
    if (type.empty()) type = Str(EventPayload(e), "type");
    t.rows.push_back({absl::StrCat(e.seq()), FormatTimestamp(e.time()), absl::StrCat(e.attempt()),
                      e.rank() < 0 ? "-" : absl::StrCat(e.rank()), type, EventSummary(e)});
  }
  return t;
}

std::string JobDetails(const v1::Job& job, const LossSummary& losses, absl::Time now) {
  std::vector<std::pair<std::string, std::string>> kv;
  kv.emplace_back("id", job.id());
  kv.emplace_back("name", job.spec().name());
  kv.emplace_back("state", StateWithReason(job));
  if (!job.message().empty()) kv.emplace_back("message", job.message());
  if (job.state() == v1::JOB_STATE_QUEUED && !job.pending_reason().empty()) {
    kv.emplace_back("waiting", job.pending_reason());
  }
  kv.emplace_back("priority", absl::StrCat(job.spec().priority()));
  kv.emplace_back("attempt", absl::StrCat(job.attempt()));
  if (!job.worker().empty()) {
    std::vector<std::string> devs;
    for (int d : job.devices()) devs.push_back(absl::StrCat(d));
    std::string kind = job.spec().resources().gpus() > 0 ? "gpus" : "cpu slots";
    kv.emplace_back("worker", devs.empty() ? job.worker()
                                           : absl::StrCat(job.worker(), " (", kind, " ",
                                                          absl::StrJoin(devs, ","), ")"));
  }
  kv.emplace_back("step", StepProgress(job));
  if (job.last_checkpoint_step() > 0) {
    kv.emplace_back("checkpoint", absl::StrCat("step ", job.last_checkpoint_step()));
  }
  if (losses.steps > 0) {
    std::string loss = absl::StrCat("first ", FormatLoss(losses.first), " (step ",
                                    losses.first_step, ")  min ", FormatLoss(losses.min),
                                    " (step ", losses.min_step, ")  last ", FormatLoss(losses.last),
                                    " (step ", losses.last_step, ")");
    if (losses.non_finite > 0) absl::StrAppend(&loss, "  non-finite steps ", losses.non_finite);
    kv.emplace_back("loss", loss);
  } else if (job.last_step() > 0) {
    kv.emplace_back("loss", FormatLoss(job.last_loss()));
  }
  if (job.has_spec()) {
    kv.emplace_back("model", job.spec().model());
    kv.emplace_back("dataset", job.spec().dataset().path());
    kv.emplace_back("output", job.spec().output().dir());
    const auto& r = job.spec().resources();
    kv.emplace_back("resources", r.gpus() > 0 ? absl::StrCat(r.gpus(), " gpu(s)")
                                              : absl::StrCat(r.cpu_ranks(), " cpu rank(s)"));
  }
  auto time_line = [&](const char* key, const google::protobuf::Timestamp& ts) {
    if (!IsSet(ts)) return;
    kv.emplace_back(key, absl::StrCat(FormatTimestamp(ts), " (",
                                      FormatAge(now - FromProtoTime(ts)), " ago)"));
  };
  time_line("created", job.created_at());
  time_line("started", job.started_at());
  time_line("finished", job.finished_at());
  kv.emplace_back("events", absl::StrCat(job.last_event_seq()));

  size_t key_width = 0;
  for (const auto& [k, v] : kv) key_width = std::max(key_width, k.size());
  std::string out;
  for (const auto& [k, v] : kv) {
    absl::StrAppend(&out, k, ":", std::string(key_width - k.size() + 2, ' '), v, "\n");
  }
  return out;
}

size_t DisplayWidth(std::string_view utf8) {
  size_t n = 0;
  for (unsigned char c : utf8) {
    if ((c & 0xC0) != 0x80) ++n;
  }
  return n;
}

std::string TruncateToWidth(std::string_view utf8, size_t width) {
  size_t cells = 0;
  for (size_t i = 0; i < utf8.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(utf8[i]);
    if ((c & 0xC0) != 0x80) {
      if (cells == width) return std::string(utf8.substr(0, i));
      ++cells;
    }
  }
  return std::string(utf8);
}

std::string Sparkline(const std::vector<double>& values, size_t width) {
  static const char* kBars[] = {"▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"};
  if (values.empty() || width == 0) return "";
  size_t begin = values.size() > width ? values.size() - width : 0;
  double lo = HUGE_VAL, hi = -HUGE_VAL;
  for (size_t i = begin; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) continue;
    lo = std::min(lo, values[i]);
    hi = std::max(hi, values[i]);
  }
  std::string out;
  for (size_t i = begin; i < values.size(); ++i) {
    double v = values[i];
    if (!std::isfinite(v)) {
      out += "×";
    } else if (hi - lo <= 0) {
      out += kBars[3];
    } else {
      int idx = static_cast<int>(std::lround((v - lo) / (hi - lo) * 7.0));
      out += kBars[std::clamp(idx, 0, 7)];
    }
  }
  return out;
}

std::string ProgressBar(double fraction, int width) {
  static const char* kEighths[] = {"", "▏", "▎", "▍", "▌", "▋", "▊", "▉"};
  if (width <= 0) return "";
  if (!(fraction > 0)) fraction = 0;  // also NaN
  if (fraction > 1) fraction = 1;
  int eighths = static_cast<int>(std::floor(fraction * width * 8 + 1e-9));
  int full = eighths / 8;
  int rem = eighths % 8;
  std::string out;
  for (int i = 0; i < full; ++i) out += "█";
  int cells = full;
  if (rem > 0 && cells < width) {
    out += kEighths[rem];
    ++cells;
  }
  out.append(static_cast<size_t>(width - cells), ' ');
  return out;
}

std::string FormatBytes(double bytes) {
  if (!std::isfinite(bytes)) return "?";
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  double v = bytes;
  while (std::fabs(v) >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  if (u == 0) return absl::StrCat(static_cast<long long>(v), " B");
  return absl::StrFormat("%.1f %s", v, kUnits[u]);
}

std::string FormatAge(absl::Duration d) {
  if (d < absl::ZeroDuration()) d = absl::ZeroDuration();
  int64_t s = absl::ToInt64Seconds(d);
  if (s < 120) return absl::StrCat(s, "s");
  if (s < 7200) return absl::StrCat(s / 60, "m");
  if (s < 48 * 3600) return absl::StrCat(s / 3600, "h");
  return absl::StrCat(s / 86400, "d");
}

std::string FormatLoss(double loss) {
  if (std::isnan(loss)) return "nan";
  if (std::isinf(loss)) return loss > 0 ? "inf" : "-inf";
  return absl::StrFormat("%.4f", loss);
}

std::string FormatRate(double v) {
  if (!std::isfinite(v)) return "?";
  if (std::fabs(v) < 1000) return absl::StrFormat("%.0f", v);
  if (std::fabs(v) < 1e6) return absl::StrFormat("%.1fk", v / 1e3);
  return absl::StrFormat("%.2fM", v / 1e6);
}

std::string FormatTimestamp(const google::protobuf::Timestamp& ts) {
  if (!IsSet(ts)) return "";
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", FromProtoTime(ts), absl::UTCTimeZone());
}

std::string EventSummary(const v1::JobEvent& event) {
  json p = EventPayload(event);
  if (p.contains("payload_raw")) return absl::StrCat("unparsable payload: ", Str(p, "payload_raw"));
  switch (event.type()) {
    case v1::EVENT_TYPE_STATE: {
      std::string s = absl::StrCat("state ", Str(p, "state"));
      std::string reason = Str(p, "reason");
      if (!reason.empty()) absl::StrAppend(&s, " (", reason, ")");
      std::string msg = Str(p, "message");
      if (!msg.empty()) absl::StrAppend(&s, ": ", msg);
      return s;
    }
    case v1::EVENT_TYPE_STARTED: {
      std::string s = absl::StrCat("attempt ", event.attempt(), " started on ", Str(p, "worker"),
                                   ": world size ", Int(p, "world_size"));
      std::string devs = JoinJsonArray(p, "devices");
      if (!devs.empty()) absl::StrAppend(&s, ", devices ", devs);
      std::string pids = JoinJsonArray(p, "pids");
      if (!pids.empty()) absl::StrAppend(&s, ", pids ", pids);
      if (p.value("resume", false)) absl::StrAppend(&s, ", resuming from the last checkpoint");
      return s;
    }
    case v1::EVENT_TYPE_EXITED: {
      std::string s = absl::StrCat("attempt ", event.attempt(), " exited: ", Str(p, "state"));
      std::string reason = Str(p, "reason");
      if (!reason.empty()) absl::StrAppend(&s, " (", reason, ")");
      std::string codes = JoinJsonArray(p, "exit_codes");
      if (!codes.empty()) absl::StrAppend(&s, ", exit codes ", codes);
      std::string msg = Str(p, "message");
      if (!msg.empty()) absl::StrAppend(&s, ": ", msg);
      return s;
    }
    case v1::EVENT_TYPE_PLAN:
      return absl::StrCat("plan: micro-batch ", Int(p, "micro_batch_size"), " x grad-accum ",
                          Int(p, "grad_accum"), " x world ", Int(p, "world_size"), " = ",
                          Int(p, "effective_batch_size"), ", ", Str(p, "precision"), " on ",
                          Str(p, "device"), ", gradient checkpointing ",
                          Str(p, "gradient_checkpointing"), ", predicted peak ",
                          FormatBytes(PayloadNumber(p, "predicted_peak_bytes").value_or(0)), " of ",
                          FormatBytes(PayloadNumber(p, "device_memory_bytes").value_or(0)));
    case v1::EVENT_TYPE_PREFLIGHT: {
      std::string s = absl::StrCat(
          "preflight: ", Int(p, "examples"), " examples, ", Int(p, "tokens"), " tokens, ",
          Int(p, "truncated"), " truncated, ", Int(p, "dropped_no_supervised"),
          " dropped (no supervised tokens), ", Int(p, "bos_fixed"), " BOS fixed, ",
          Int(p, "bad_lines"), " bad lines");
      auto it = p.find("warnings");
      if (it != p.end() && it->is_array()) {
        for (const auto& w : *it) absl::StrAppend(&s, "; warning: ", Cell(w));
      }
      return s;
    }
    case v1::EVENT_TYPE_STEP: {
      std::string step = Int(p, "step");
      std::optional<double> max_steps = PayloadNumber(p, "max_steps");
      if (max_steps && *max_steps > 0) absl::StrAppend(&step, "/", Int(p, "max_steps"));
      std::optional<double> loss = PayloadNumber(p, "loss");
      std::string s = absl::StrCat("step ", step, "  loss ", loss ? FormatLoss(*loss) : "?",
                                   "  lr ", Num(p, "lr", "%.3e"), "  grad_norm ",
                                   Num(p, "grad_norm", "%.4g"));
      if (auto tps = PayloadNumber(p, "tokens_per_s")) {
        absl::StrAppend(&s, "  tok/s ", FormatRate(*tps));
      }
      if (auto vram = PayloadNumber(p, "vram_peak"); vram && *vram > 0) {
        absl::StrAppend(&s, "  vram ", FormatBytes(PayloadNumber(p, "vram_allocated").value_or(0)),
                        " (peak ", FormatBytes(*vram), ")");
      }
      return s;
    }
    case v1::EVENT_TYPE_NAN_ALERT:
      return absl::StrCat("non-finite value at step ", Int(p, "step"), " in ", Str(p, "where"),
                          " (consecutive ", Int(p, "consecutive"), ", total ", Int(p, "total"),
                          "): ", Str(p, "action"));
    case v1::EVENT_TYPE_OOM_RECOVERED: {
      std::string s = absl::StrCat("out of memory at step ", Int(p, "step"),
                                   ", recovered: micro-batch ", Int(p, "micro_batch_size"),
                                   " x grad-accum ", Int(p, "grad_accum"),
                                   ", gradient checkpointing ", Str(p, "gradient_checkpointing"));
      std::string msg = Str(p, "message");
      if (!msg.empty()) absl::StrAppend(&s, " (", msg, ")");
      return s;
    }
    case v1::EVENT_TYPE_CHECKPOINT:
      return absl::StrCat("checkpoint at step ", Int(p, "step"), ": ", Str(p, "path"));
    case v1::EVENT_TYPE_EVAL:
      return absl::StrCat("eval at step ", Int(p, "step"), ": loss ",
                          FormatLoss(PayloadNumber(p, "loss").value_or(std::nan(""))));
    case v1::EVENT_TYPE_LOG:
      return absl::StrCat(Str(p, "level").empty() ? "info" : Str(p, "level"), ": ",
                          Str(p, "message"));
    case v1::EVENT_TYPE_DONE: {
      std::string s = absl::StrCat("done at step ", Int(p, "step"), ", loss ",
                                   FormatLoss(PayloadNumber(p, "loss").value_or(std::nan(""))));
      std::string adapter = Str(p, "adapter_dir");
      if (!adapter.empty()) absl::StrAppend(&s, "; adapter in ", adapter);
      return s;
    }
    case v1::EVENT_TYPE_ERROR:
      return absl::StrCat("error ", Str(p, "reason"), ": ", Str(p, "message"));
    default: {
      json rest = p;
      rest.erase("type");
      rest.erase("time");
      rest.erase("rank");
      return absl::StrCat(Str(p, "type").empty() ? "event" : Str(p, "type"), " ",
                          ToJsonText(rest, false));
    }
  }
}

}  // namespace tune::client
