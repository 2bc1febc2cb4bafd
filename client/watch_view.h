// What `tunectl watch` (and `submit --wait`) prints while a job runs.
//
// Two modes:
//  * live (stdout is a terminal): one status line redrawn in place with a
//    progress bar to max_steps, loss, lr, tokens/s, VRAM and a sparkline of
//    recent losses; notable events (plan, preflight, nan_alert, oom_recovered,
//    checkpoint, eval, log, error, started/exited, state changes, done) are
//    printed as permanent lines above it.
//  * plain (pipes, files, CI logs): one line per event, no control characters;
//    step events of rank 0 only, since every rank reports the same step.
// The view only formats; it never talks to the server.
#ifndef TUNE_CLIENT_WATCH_VIEW_H_
#define TUNE_CLIENT_WATCH_VIEW_H_

#include <deque>
#include <ostream>
#include <string>

#include "tune/v1/job.pb.h"

namespace tune::client {

class WatchView {
 public:
  struct Options {
    bool live = false;        // Redraw a status line (terminal output).
    int width = 100;          // Terminal columns; the status line never exceeds it.
    int sparkline_points = 24;  // Recent losses in the sparkline.
  };

  WatchView(std::ostream& out, Options options);

  // Renders one event; `job` is the job after it (from WatchJobResponse).
  void OnEvent(const v1::JobEvent& event, const v1::Job& job);
  // A notice that is not an event, e.g. "connection lost, reconnecting".
  void Notice(const std::string& text);
  // Clears the status line (live mode) and prints the closing line:
  // "job-000001 SUCCEEDED: 60 steps, loss 2.3417 -> 0.1021".
  void Finish(const v1::Job& job);

  // The current status line (exposed for tests).
  std::string StatusLine() const;

 private:
  void PrintLine(const std::string& line);
  void Redraw();

  std::ostream& out_;
  Options options_;
  std::string job_id_;
  std::string state_;
  int step_ = 0;
  int max_steps_ = 0;
  double loss_ = 0;
  bool have_loss_ = false;
  double first_loss_ = 0;
  bool have_first_loss_ = false;
  double lr_ = 0;
  double tokens_per_s_ = 0;
  double vram_allocated_ = 0;
  double vram_peak_ = 0;
  std::deque<double> recent_losses_;
  bool status_shown_ = false;
};

}  // namespace tune::client

#endif  // TUNE_CLIENT_WATCH_VIEW_H_
