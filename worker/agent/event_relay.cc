#include "worker/agent/event_relay.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/control/spec_proto.h"
#include "common/control/time_util.h"

namespace tune::worker {
namespace {

using nlohmann::json;

constexpr size_t kExcerptBytes = 200;

double UnixSeconds(absl::Time t) { return absl::ToDoubleSeconds(t - absl::UnixEpoch()); }

// JSON text that never throws on invalid UTF-8 (bad bytes become U+FFFD).
std::string SafeDump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

RelayedEvent WarningEvent(int rank, const std::string& message, absl::Time now) {
  RelayedEvent e;
  e.rank = rank;
  e.type = v1::EVENT_TYPE_LOG;
  e.time = ToProtoTime(now);
  json j = {{"type", "log"},    {"time", UnixSeconds(now)}, {"rank", rank},
            {"level", "warning"}, {"message", message},      {"source", "tune-worker"}};
  e.payload_json = SafeDump(j);
  return e;
}

std::string Excerpt(std::string_view line) {
  if (line.size() <= kExcerptBytes) return std::string(line);
  return std::string(line.substr(0, kExcerptBytes)) + "...";
}

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v'; }

std::string_view Trim(std::string_view s) {
  while (!s.empty() && IsSpace(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsSpace(s.back())) s.remove_suffix(1);
  return s;
}

}  // namespace

RelayedEvent ParseEventLine(std::string_view line, int rank, absl::Time now) {
  line = Trim(line);
  json j;
  try {
    j = json::parse(line.begin(), line.end());
  } catch (const json::parse_error& e) {
    return WarningEvent(
        rank,
        absl::StrCat("rank ", rank, " wrote an event line that is not JSON (", e.what(),
                     "): ", Excerpt(line)),
        now);
  }
  if (!j.is_object()) {
    return WarningEvent(
        rank, absl::StrCat("rank ", rank, " wrote an event line that is not a JSON object: ",
                           Excerpt(line)),
        now);
  }
  auto type_it = j.find("type");
  if (type_it == j.end() || !type_it->is_string()) {
    return WarningEvent(
        rank, absl::StrCat("rank ", rank, " wrote an event without a string \"type\": ",
                           Excerpt(line)),
        now);
  }
  const std::string type_name = type_it->get<std::string>();
  const v1::EventType type = EventTypeFromName(type_name);
  if (type == v1::EVENT_TYPE_STARTED || type == v1::EVENT_TYPE_EXITED ||
      type == v1::EVENT_TYPE_STATE) {
    // Only the worker and the server write these; a rank forging one would
    // confuse the job's state machine.
    return WarningEvent(rank,
                        absl::StrCat("rank ", rank, " wrote an event of reserved type '",
                                     type_name, "': ", Excerpt(line)),
                        now);
  }

  RelayedEvent e;
  e.rank = rank;
  e.type = type;
  e.time = ToProtoTime(now);
  auto time_it = j.find("time");
  if (time_it != j.end() && time_it->is_number()) {
    double seconds = time_it->get<double>();
    if (std::isfinite(seconds) && seconds > 0) e.time = ProtoTimeFromUnixSeconds(seconds);
  }
  e.payload_json = std::string(line);
  if (type == v1::EVENT_TYPE_ERROR) {
    auto reason = j.find("reason");
    if (reason != j.end() && reason->is_string()) e.error_reason = reason->get<std::string>();
    auto message = j.find("message");
    if (message != j.end() && message->is_string()) e.error_message = message->get<std::string>();
  }
  return e;
}

RelayedEvent MakeWorkerEvent(const std::string& type, const nlohmann::json& fields,
                             absl::Time now) {
  json j = {{"type", type}, {"time", UnixSeconds(now)}, {"rank", -1}};
  for (auto it = fields.begin(); it != fields.end(); ++it) j[it.key()] = it.value();
  RelayedEvent e;
  e.rank = -1;
  e.type = EventTypeFromName(type);
  e.time = ToProtoTime(now);
  e.payload_json = SafeDump(j);
  return e;
}

RankEventStream::RankEventStream(int rank, size_t max_line_bytes)
    : rank_(rank), max_line_bytes_(max_line_bytes) {}

RelayedEvent RankEventStream::DroppedLineEvent(absl::Time now) const {
  return WarningEvent(rank_,
                      absl::StrCat("rank ", rank_, " wrote an event line longer than ",
                                   max_line_bytes_, " bytes; it was dropped"),
                      now);
}

void RankEventStream::TakeLine(std::string_view line, absl::Time now,
                               std::vector<RelayedEvent>* out) {
  if (Trim(line).empty()) return;
  out->push_back(ParseEventLine(line, rank_, now));
}

std::vector<RelayedEvent> RankEventStream::Feed(std::string_view bytes, absl::Time now) {
  std::vector<RelayedEvent> out;
  while (!bytes.empty()) {
    const size_t nl = bytes.find('\n');
    const std::string_view chunk = bytes.substr(0, nl);  // whole rest when no newline
    if (discarding_) {
      if (nl != std::string_view::npos) discarding_ = false;
    } else if (buffer_.size() + chunk.size() > max_line_bytes_) {
      buffer_.clear();
      out.push_back(DroppedLineEvent(now));
      discarding_ = nl == std::string_view::npos;
    } else if (nl == std::string_view::npos) {
      buffer_.append(chunk);
    } else if (buffer_.empty()) {
      TakeLine(chunk, now, &out);  // common case: a whole line in one read
    } else {
      buffer_.append(chunk);
      TakeLine(buffer_, now, &out);
      buffer_.clear();
    }
    if (nl == std::string_view::npos) break;
    bytes.remove_prefix(nl + 1);
  }
  return out;
}

std::vector<RelayedEvent> RankEventStream::Finish(absl::Time now) {
  std::vector<RelayedEvent> out;
  if (!discarding_ && !buffer_.empty()) TakeLine(buffer_, now, &out);
  buffer_.clear();
  discarding_ = false;
  return out;
}

int64_t Outbox::Add(const AttemptKey& key, const RelayedEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  Queue& q = queues_[key];
  v1::AgentEvent e;
  e.set_job_id(key.job_id);
  e.set_attempt(key.attempt);
  e.set_source_seq(q.next_seq++);
  e.set_rank(event.rank);
  e.set_type(event.type);
  *e.mutable_time() = event.time;
  e.set_payload_json(event.payload_json);
  q.events.push_back(std::move(e));
  ++unacked_;
  cv_.notify_all();
  return q.next_seq - 1;
}

std::vector<v1::AgentEvent> Outbox::TakeUnsent(size_t max) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<v1::AgentEvent> out;
  for (auto& [key, q] : queues_) {
    while (q.sent < q.events.size() && out.size() < max) out.push_back(q.events[q.sent++]);
    if (out.size() >= max) break;
  }
  return out;
}

void Outbox::Ack(const AttemptKey& key, int64_t source_seq) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = queues_.find(key);
  if (it == queues_.end()) return;
  Queue& q = it->second;
  while (!q.events.empty() && q.events.front().source_seq() <= source_seq) {
    q.events.pop_front();
    if (q.sent > 0) --q.sent;
    --unacked_;
  }
  if (q.closed && q.events.empty()) queues_.erase(it);
  cv_.notify_all();
}

void Outbox::RewindUnacked() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [key, q] : queues_) q.sent = 0;
  cv_.notify_all();
}

void Outbox::CloseAttempt(const AttemptKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = queues_.find(key);
  if (it == queues_.end()) return;
  it->second.closed = true;
  if (it->second.events.empty()) queues_.erase(it);
  cv_.notify_all();
}

bool Outbox::HasUnsentLocked() const {
  for (const auto& [key, q] : queues_) {
    if (q.sent < q.events.size()) return true;
  }
  return false;
}

bool Outbox::WaitForUnsent(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  const uint64_t start = interrupts_;
  while (!HasUnsentLocked() && interrupts_ == start) {
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) break;
    cv_.wait_for(lock, absl::ToChronoNanoseconds(left));
  }
  return HasUnsentLocked();
}

void Outbox::Interrupt() {
  std::lock_guard<std::mutex> lock(mu_);
  ++interrupts_;
  cv_.notify_all();
}

bool Outbox::WaitUntilEmpty(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  // Interrupt() is not a reason to stop: the link interrupts whenever a
  // session ends (to wake its sender), and that is exactly when a flush must
  // keep waiting for the next session to deliver.
  while (unacked_ > 0) {
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) break;
    cv_.wait_for(lock, absl::ToChronoNanoseconds(left));
  }
  return unacked_ == 0;
}

size_t Outbox::unacked() const {
  std::lock_guard<std::mutex> lock(mu_);
  return unacked_;
}

size_t Outbox::attempts() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queues_.size();
}

}  // namespace tune::worker
