#include "client/watch_view.h"

#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/output.h"
#include "common/control/spec_proto.h"

namespace tune::client {

WatchView::WatchView(std::ostream& out, Options options) : out_(out), options_(options) {
  if (options_.width < 20) options_.width = 20;
}

void WatchView::PrintLine(const std::string& line) {
  if (options_.live && status_shown_) {
    out_ << "\r\033[K";  // Erase the status line; it is redrawn below the new line.
    status_shown_ = false;
  }
  out_ << line << '\n';
}

void WatchView::Redraw() {
  if (!options_.live) return;
  out_ << "\r\033[K" << TruncateToWidth(StatusLine(), static_cast<size_t>(options_.width - 1));
  out_.flush();
  status_shown_ = true;
}

std::string WatchView::StatusLine() const {
  std::string s = absl::StrCat(job_id_, " ", state_);
  if (max_steps_ > 0) {
    double frac = static_cast<double>(step_) / max_steps_;
    absl::StrAppend(&s, "  [", ProgressBar(frac, 20), "] ", step_, "/", max_steps_);
  } else if (step_ > 0) {
    absl::StrAppend(&s, "  step ", step_);
  }
  if (have_loss_) absl::StrAppend(&s, "  loss ", FormatLoss(loss_));
  if (step_ > 0) {
    char lr[32];
    std::snprintf(lr, sizeof(lr), "%.2e", lr_);
    absl::StrAppend(&s, "  lr ", lr, "  ", FormatRate(tokens_per_s_), " tok/s");
    if (vram_peak_ > 0) {
      absl::StrAppend(&s, "  VRAM ", FormatBytes(vram_allocated_), " (peak ",
                      FormatBytes(vram_peak_), ")");
    }
  }
  if (recent_losses_.size() >= 2) {
    std::vector<double> v(recent_losses_.begin(), recent_losses_.end());
    absl::StrAppend(&s, "  ", Sparkline(v, static_cast<size_t>(options_.sparkline_points)));
  }
  return s;
}

void WatchView::OnEvent(const v1::JobEvent& event, const v1::Job& job) {
  job_id_ = job.id().empty() ? event.job_id() : job.id();
  state_ = JobStateName(job.state());
  if (max_steps_ == 0) max_steps_ = job.spec().training().max_steps();

  Json p = EventPayload(event);
  std::string prefix = event.rank() > 0 ? absl::StrCat("rank ", event.rank(), ": ") : "";
  switch (event.type()) {
    case v1::EVENT_TYPE_STEP: {
      if (event.rank() != 0) return;  // Same numbers on every rank.
      if (auto v = PayloadNumber(p, "step")) step_ = static_cast<int>(*v);
      if (auto v = PayloadNumber(p, "max_steps"); v && *v > 0) max_steps_ = static_cast<int>(*v);
      if (auto v = PayloadNumber(p, "loss")) {
        loss_ = *v;
        have_loss_ = true;
        if (!have_first_loss_ && std::isfinite(*v)) {
          first_loss_ = *v;
          have_first_loss_ = true;
        }
        recent_losses_.push_back(*v);
        while (recent_losses_.size() > static_cast<size_t>(options_.sparkline_points)) {
          recent_losses_.pop_front();
        }
      }
      lr_ = PayloadNumber(p, "lr").value_or(lr_);
      tokens_per_s_ = PayloadNumber(p, "tokens_per_s").value_or(tokens_per_s_);
      vram_allocated_ = PayloadNumber(p, "vram_allocated").value_or(vram_allocated_);
      vram_peak_ = PayloadNumber(p, "vram_peak").value_or(vram_peak_);
      if (!options_.live) PrintLine(EventSummary(event));
      break;
    }
    case v1::EVENT_TYPE_PLAN:
    case v1::EVENT_TYPE_NAN_ALERT:
      // Written by every rank with the same content; rank 0 speaks for all.
      if (event.rank() > 0) return;
      PrintLine(EventSummary(event));
      break;
    default:
      PrintLine(prefix + EventSummary(event));
      break;
  }
  Redraw();
}

void WatchView::Notice(const std::string& text) {
  PrintLine(text);
  Redraw();
}

void WatchView::Finish(const v1::Job& job) {
  if (options_.live && status_shown_) {
    out_ << "\r\033[K";
    status_shown_ = false;
  }
  std::string s = absl::StrCat(job.id(), " ", JobStateName(job.state()));
  if (job.reason() != v1::FAILURE_REASON_UNSPECIFIED) {
    absl::StrAppend(&s, " (", FailureReasonName(job.reason()), ")");
  }
  int steps = job.last_step() > 0 ? job.last_step() : step_;
  if (steps > 0) {
    absl::StrAppend(&s, ": ", steps, max_steps_ > 0 ? absl::StrCat("/", max_steps_) : "",
                    " steps");
    double last = job.last_step() > 0 ? job.last_loss() : loss_;
    if (have_first_loss_) {
      absl::StrAppend(&s, ", loss ", FormatLoss(first_loss_), " -> ", FormatLoss(last));
    } else {
      absl::StrAppend(&s, ", loss ", FormatLoss(last));
    }
  }
  if (!job.message().empty() && job.state() != v1::JOB_STATE_SUCCEEDED) {
    absl::StrAppend(&s, " — ", job.message());
  }
  out_ << s << '\n';
  out_.flush();
}

}  // namespace tune::client
