// JSON-lines events of tune-train (contract: docs/events.md).
//
// An EventSink writes every event as one JSON object per line to the
// inherited file descriptor given by --events-fd (when >= 0) AND appends it to
// <output>/events.jsonl (when a path is given). Each line is written with a
// single write(2) and the file is opened O_APPEND, so several ranks may share
// one events.jsonl without interleaving, and a resumed attempt appends.
// Every event gets "type", "time" (Unix seconds, fractional) and "rank".
// Non-finite numbers anywhere in the fields become the strings "nan", "inf"
// and "-inf" (JSON has no such numbers). Emit never throws on I/O errors: a
// closed reader must not kill training; the first failure is logged once.
#ifndef TUNE_WORKER_TRAINER_EVENTS_H_
#define TUNE_WORKER_TRAINER_EVENTS_H_

#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

namespace tune::train {

// Replaces non-finite floating-point numbers (recursively) by "nan"/"inf"/"-inf".
nlohmann::json SanitizeNonFinite(nlohmann::json value);

class EventSink {
 public:
  // `events_fd` < 0: no fd. `file_path` empty: no file. Throws
  // std::runtime_error when the file cannot be opened.
  EventSink(int rank, int events_fd, const std::string& file_path);
  ~EventSink();
  EventSink(const EventSink&) = delete;
  EventSink& operator=(const EventSink&) = delete;

  // Writes {"type": type, "time": now, "rank": rank, ...fields}. `fields`
  // must be an object (or null).
  void Emit(const std::string& type, const nlohmann::json& fields);

  // Convenience for `log` events (also written to the stderr logger).
  void EmitLog(const std::string& level, const std::string& message);

  int rank() const { return rank_; }

 private:
  void WriteAll(int fd, const std::string& line, bool* warned);

  int rank_;
  int events_fd_;
  int file_fd_ = -1;
  std::mutex mu_;
  bool fd_warned_ = false;
  bool file_warned_ = false;
};

// Formats the human progress line printed to stdout per step, e.g.
// "step 12/60 loss 2.3412 lr 1.8e-04 gnorm 0.91 tok/s 5321 vram 0.0G".
std::string FormatProgressLine(long step, long max_steps, double loss, double lr, double grad_norm,
                               double tokens_per_s, double vram_bytes);

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_EVENTS_H_
