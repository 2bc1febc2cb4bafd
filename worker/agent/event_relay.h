// Events from the ranks to the server: JSON lines read from each rank's
// events pipe become tune.v1.AgentEvents, numbered per attempt and kept in an
// outbox until the server acknowledges them (docs/events.md, "Delivery
// guarantees").
#ifndef TUNE_WORKER_AGENT_EVENT_RELAY_H_
#define TUNE_WORKER_AGENT_EVENT_RELAY_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/time/time.h"
#include "tune/v1/agent_service.pb.h"

namespace tune::worker {

// Longest event line accepted from a rank; longer lines are dropped and
// reported by a `log` event.
inline constexpr size_t kMaxEventLineBytes = 1 << 20;

// One event ready for the outbox (source_seq is assigned there).
struct RelayedEvent {
  int rank = -1;
  v1::EventType type = v1::EVENT_TYPE_UNSPECIFIED;
  google::protobuf::Timestamp time;
  std::string payload_json;
  // For `error` events: the `reason` and `message` fields ("" otherwise).
  std::string error_reason;
  std::string error_message;
};

// Parses one line a rank wrote. A JSON object becomes an event of its "type"
// (unknown types stay UNSPECIFIED with the line intact), "time" (Unix seconds)
// its timestamp (`now` when absent or not a number), the line its payload.
// Anything else (not JSON, not an object, no string "type", or a type only
// tunefleet itself may write: started, exited, state) becomes a `log` event
// with level "warning" that quotes the start of the line, so nothing is lost
// silently. `rank` is the pipe's rank; it is authoritative over the line's.
RelayedEvent ParseEventLine(std::string_view line, int rank, absl::Time now);

// An event of the worker itself (rank -1): {"type", "time", "rank": -1, fields...}.
RelayedEvent MakeWorkerEvent(const std::string& type, const nlohmann::json& fields,
                             absl::Time now);

// Splits the byte stream of one rank's pipe into events: partial lines are
// buffered until their newline, lines longer than `max_line_bytes` are dropped
// (one `log` warning per dropped line), blank lines are ignored.
class RankEventStream {
 public:
  explicit RankEventStream(int rank, size_t max_line_bytes = kMaxEventLineBytes);

  std::vector<RelayedEvent> Feed(std::string_view bytes, absl::Time now);
  // End of the stream: a last line without a newline still counts.
  std::vector<RelayedEvent> Finish(absl::Time now);

 private:
  void TakeLine(std::string_view line, absl::Time now, std::vector<RelayedEvent>* out);
  RelayedEvent DroppedLineEvent(absl::Time now) const;

  int rank_;
  size_t max_line_bytes_;
  std::string buffer_;
  bool discarding_ = false;  // inside an over-long line, until its newline
};

// Identifies an attempt of a job.
struct AttemptKey {
  std::string job_id;
  int attempt = 0;
  bool operator<(const AttemptKey& o) const {
    return std::tie(job_id, attempt) < std::tie(o.job_id, o.attempt);
  }
  bool operator==(const AttemptKey& o) const {
    return job_id == o.job_id && attempt == o.attempt;
  }
};

// Every event not yet acknowledged by the server, per attempt in source_seq
// order. Events are dropped only by Ack(); after a reconnect RewindUnacked()
// makes all of them eligible for sending again. Thread-safe.
class Outbox {
 public:
  // Numbers `event` with the attempt's next source_seq (1, 2, ...) and queues
  // it. Returns the source_seq.
  int64_t Add(const AttemptKey& key, const RelayedEvent& event);

  // Up to `max` queued events not yet sent on the current session, oldest
  // first per attempt; they count as sent (in flight) afterwards.
  std::vector<v1::AgentEvent> TakeUnsent(size_t max);

  // Forgets the events of `key` with source_seq <= `source_seq`.
  void Ack(const AttemptKey& key, int64_t source_seq);

  // The session ended: every unacknowledged event will be sent again.
  void RewindUnacked();

  // The attempt produces no more events; its numbering is forgotten once all
  // its events are acknowledged.
  void CloseAttempt(const AttemptKey& key);

  // Waits until an unsent event exists, Interrupt() is called, or `deadline`.
  // Returns true when unsent events exist.
  bool WaitForUnsent(absl::Time deadline);
  // Wakes WaitForUnsent callers.
  void Interrupt();

  // Waits until nothing is left to acknowledge, or `deadline` (Interrupt()
  // does not end the wait). True when empty.
  bool WaitUntilEmpty(absl::Time deadline);

  size_t unacked() const;
  // Attempts still tracked (open, or closed with unacknowledged events).
  size_t attempts() const;

 private:
  struct Queue {
    int64_t next_seq = 1;
    std::deque<v1::AgentEvent> events;  // unacknowledged, by source_seq
    size_t sent = 0;                    // events[0, sent) are in flight
    bool closed = false;
  };
  bool HasUnsentLocked() const;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<AttemptKey, Queue> queues_;
  uint64_t interrupts_ = 0;
  size_t unacked_ = 0;
};

}  // namespace tune::worker

#endif  // TUNE_WORKER_AGENT_EVENT_RELAY_H_
