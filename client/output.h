// Rendering of API objects for tunectl: `-o table|json|yaml` and the small
// terminal widgets (progress bar, sparkline) that `watch` draws.
//
// Contract of the machine-readable views (json and yaml carry the same data):
//  * A job is one object with "id", "name", "state" (a JobState name such as
//    "RUNNING"), "reason" (a FailureReason name or ""), "message", "attempt",
//    "worker", "devices", "priority", "max_steps", "last_step", "last_loss",
//    "last_checkpoint_step", "last_event_seq", "cancel_requested",
//    "pending_reason", "created_at"/"started_at"/"finished_at" (RFC 3339 UTC,
//    or null when unset) and "spec" (the validated spec, proto field names).
//  * An event is one object: the trainer/worker/server payload fields
//    (docs/events.md) with "seq", "job_id", "type" (an event type name such as
//    "step"), "attempt", "rank" and "time" (Unix seconds, fractional) set from
//    the stored event; those win over payload fields of the same name.
//  * A worker is one object with "name", "hostname", "state" ("READY"/"LOST"),
//    "gpus", "cpu_slots", "free_gpus", "free_cpu_slots", "job_ids",
//    "last_heartbeat", "version", "gpu_stats".
// Non-finite numbers become JSON null (JSON has no NaN); payload values the
// trainer already wrote as "nan"/"inf" strings stay strings.
#ifndef TUNE_CLIENT_OUTPUT_H_
#define TUNE_CLIENT_OUTPUT_H_

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tune/v1/job.pb.h"
#include "tune/v1/worker.pb.h"

namespace tune::client {

// JSON values keep their keys in insertion order, so that "id" / "seq" lead
// the objects tunectl prints.
using Json = nlohmann::ordered_json;

enum class OutputFormat { kTable, kJson, kYaml };

// "table" | "json" | "yaml"; anything else is InvalidArgument naming the choices.
absl::StatusOr<OutputFormat> ParseOutputFormat(std::string_view name);

// ---- JSON views ------------------------------------------------------------

Json JobToJson(const v1::Job& job);
Json EventToJson(const v1::JobEvent& event);
Json WorkerToJson(const v1::Worker& worker);

// The payload of an event as a JSON object; an unparsable payload becomes
// {"payload_raw": "<text>"} so that nothing the server stored is hidden.
Json EventPayload(const v1::JobEvent& event);

// Loss curve of a job, from its `step` events. Only rank 0 counts (every rank
// reports the same all-reduced loss). When a retry re-runs steps after a
// resume, the newest attempt's value of a step wins, so "last" is the loss of
// the highest step reached.
struct LossSummary {
  int steps = 0;            // Distinct steps with a finite loss.
  int first_step = 0;       // Lowest step with a finite loss.
  int last_step = 0;        // Highest step with a finite loss.
  double first = 0;         // Loss at first_step.
  double min = 0;           // Smallest finite loss.
  int min_step = 0;         // Step of `min`.
  double last = 0;          // Loss at last_step.
  int non_finite = 0;       // Step events whose loss was NaN/inf.
};
LossSummary SummarizeLosses(const std::vector<v1::JobEvent>& events);
// {"steps":..,"first":..,"min":..,"last":..,...}; null when no step had a loss.
Json LossSummaryToJson(const LossSummary& summary);

// A number from an event payload: JSON numbers as is, the strings "nan",
// "inf", "-inf" as the IEEE values; nullopt when absent or of another type.
std::optional<double> PayloadNumber(const Json& payload, const char* key);

// ---- Serialisation ---------------------------------------------------------

// Pretty JSON (2-space indent) or one compact line, always UTF-8 safe
// (invalid bytes are replaced rather than throwing).
std::string ToJsonText(const Json& value, bool pretty);
// Block-style YAML of a JSON value. Strings that a YAML reader would take for
// another type ("123", "true", "null", "", "1e5", ...) are double-quoted so the
// document reads back with the same types.
std::string ToYaml(const Json& value);

// ---- Tables ----------------------------------------------------------------

struct Table {
  std::vector<std::string> headers;
  std::vector<std::vector<std::string>> rows;
};
// Columns left-aligned and separated by two spaces, widths by display width
// (UTF-8 code points), no trailing spaces, one '\n' after each line. Rows
// shorter than the header are padded with empty cells.
std::string RenderTable(const Table& table);

Table JobsTable(const std::vector<v1::Job>& jobs, absl::Time now);
Table WorkersTable(const std::vector<v1::Worker>& workers, absl::Time now);
Table EventsTable(const std::vector<v1::JobEvent>& events);
// `tunectl get` in table mode: "key:  value" lines, plus the loss summary.
std::string JobDetails(const v1::Job& job, const LossSummary& losses, absl::Time now);

// ---- Small formatters ------------------------------------------------------

// Terminal cells taken by `utf8` (code points; all glyphs tunectl draws are
// one cell wide).
size_t DisplayWidth(std::string_view utf8);
// Cuts `utf8` to at most `width` cells, never inside a multi-byte character.
std::string TruncateToWidth(std::string_view utf8, size_t width);

// The last `width` values as block characters "▁▂▃▄▅▆▇█" scaled between their
// min and max; all equal -> "▄"; a non-finite value -> "×". Empty input -> "".
std::string Sparkline(const std::vector<double>& values, size_t width);
// Exactly `width` cells: full blocks, one partial eighth-block and spaces for
// `fraction` in [0, 1] (clamped; NaN counts as 0).
std::string ProgressBar(double fraction, int width);

// 1536 -> "1.5 KiB"; 0 -> "0 B".
std::string FormatBytes(double bytes);
// Compact age: "42s", "5m", "3h", "2d".
std::string FormatAge(absl::Duration d);
// Loss with 4 decimals; non-finite as "nan"/"inf"/"-inf".
std::string FormatLoss(double loss);
// Human rate: 950 -> "950", 12345 -> "12.3k", 2.5e6 -> "2.50M".
std::string FormatRate(double per_second);
// RFC 3339 UTC with milliseconds, "" for an unset timestamp.
std::string FormatTimestamp(const google::protobuf::Timestamp& ts);

// One human line describing an event (used by `logs` and `watch`), without
// the seq/time prefix, e.g. "checkpoint at step 10: /runs/x/checkpoints/step-10".
std::string EventSummary(const v1::JobEvent& event);

}  // namespace tune::client

#endif  // TUNE_CLIENT_OUTPUT_H_
