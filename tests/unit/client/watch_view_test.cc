// Unit tests of what `tunectl watch` prints, live (TTY) and plain.
#include "client/watch_view.h"

#include <sstream>

#include <gtest/gtest.h>

#include "client/output.h"

namespace tune::client {
namespace {

v1::JobEvent Event(int64_t seq, v1::EventType type, int rank, const std::string& payload) {
  v1::JobEvent e;
  e.set_seq(seq);
  e.set_job_id("job-000007");
  e.set_attempt(1);
  e.set_rank(rank);
  e.set_type(type);
  e.set_payload_json(payload);
  return e;
}

v1::JobEvent Step(int64_t seq, int rank, int step, double loss) {
  return Event(seq, v1::EVENT_TYPE_STEP, rank,
               "{\"step\":" + std::to_string(step) + ",\"max_steps\":10,\"loss\":" +
                   std::to_string(loss) +
                   ",\"lr\":0.001,\"grad_norm\":1,\"tokens_per_s\":2048,\"vram_allocated\":0,"
                   "\"vram_peak\":0}");
}

v1::Job Job(v1::JobState state) {
  v1::Job job;
  job.set_id("job-000007");
  job.set_state(state);
  job.mutable_spec()->mutable_training()->set_max_steps(10);
  return job;
}

WatchView::Options Opts(bool live, int width, int points = 24) {
  WatchView::Options o;
  o.live = live;
  o.width = width;
  o.sparkline_points = points;
  return o;
}

int Count(const std::string& haystack, const std::string& needle) {
  int n = 0;
  for (size_t pos = haystack.find(needle); pos != std::string::npos;
       pos = haystack.find(needle, pos + 1)) {
    ++n;
  }
  return n;
}

TEST(WatchViewTest, PlainPrintsOneLinePerRankZeroStep) {
  std::ostringstream out;
  WatchView view(out, Opts(false, 80));
  v1::Job running = Job(v1::JOB_STATE_RUNNING);
  view.OnEvent(Event(1, v1::EVENT_TYPE_STATE, -1, R"({"state":"RUNNING"})"), running);
  view.OnEvent(Step(2, 0, 1, 3.0), running);
  view.OnEvent(Step(3, 1, 1, 3.0), running);  // same step from rank 1: not repeated
  view.OnEvent(Step(4, 0, 2, 2.0), running);
  view.OnEvent(Event(5, v1::EVENT_TYPE_CHECKPOINT, 0, R"({"step":2,"path":"/o/step-2"})"),
               running);
  view.OnEvent(Event(6, v1::EVENT_TYPE_ERROR, 1, R"({"reason":"CRASH","message":"segv"})"),
               running);
  v1::Job failed = Job(v1::JOB_STATE_FAILED);
  failed.set_reason(v1::FAILURE_REASON_CRASH);
  failed.set_last_step(2);
  failed.set_last_loss(2.0);
  failed.set_message("rank 1 crashed");
  view.Finish(failed);
  std::string text = out.str();
  EXPECT_EQ(text.find('\r'), std::string::npos) << "no control characters when not a TTY";
  EXPECT_EQ(text.find("\033"), std::string::npos);
  EXPECT_EQ(Count(text, "step 1/10"), 1) << text;
  EXPECT_EQ(Count(text, "step 2/10"), 1) << text;
  EXPECT_NE(text.find("checkpoint at step 2: /o/step-2"), std::string::npos) << text;
  EXPECT_NE(text.find("rank 1: error CRASH: segv"), std::string::npos) << text;
  EXPECT_NE(text.find("job-000007 FAILED (CRASH): 2/10 steps, loss 3.0000 -> 2.0000 — rank 1 "
                      "crashed\n"),
            std::string::npos)
      << text;
}

TEST(WatchViewTest, LiveRedrawsAStatusLineWithBarAndSparkline) {
  std::ostringstream out;
  WatchView view(out, Opts(true, 200, 8));
  v1::Job running = Job(v1::JOB_STATE_RUNNING);
  for (int s = 1; s <= 5; ++s) view.OnEvent(Step(s, 0, s, 6.0 - s), running);
  std::string status = view.StatusLine();
  EXPECT_NE(status.find("job-000007 RUNNING"), std::string::npos) << status;
  EXPECT_NE(status.find("[" + ProgressBar(0.5, 20) + "] 5/10"), std::string::npos) << status;
  EXPECT_NE(status.find("loss 1.0000"), std::string::npos) << status;
  EXPECT_NE(status.find("lr 1.00e-03"), std::string::npos) << status;
  EXPECT_NE(status.find("2.0k tok/s"), std::string::npos) << status;
  EXPECT_NE(status.find("█▆▅▃▁"), std::string::npos) << "falling loss sparkline: " << status;
  std::string text = out.str();
  EXPECT_NE(text.find("\r\033[K"), std::string::npos);
  EXPECT_EQ(Count(text, "\n"), 0) << "steps only redraw the status line";

  // A notable event is printed as a permanent line, then the status returns.
  view.OnEvent(Event(6, v1::EVENT_TYPE_NAN_ALERT, 0,
                     R"({"step":6,"where":"loss","consecutive":1,"total":1,"action":"skip"})"),
               running);
  text = out.str();
  EXPECT_EQ(Count(text, "\n"), 1);
  EXPECT_NE(text.find("non-finite value at step 6 in loss"), std::string::npos);
  EXPECT_EQ(text.substr(text.rfind('\n') + 1).find("\r\033[K"), 0u) << "status redrawn";

  v1::Job done = Job(v1::JOB_STATE_SUCCEEDED);
  done.set_last_step(10);
  done.set_last_loss(0.5);
  view.Finish(done);
  text = out.str();
  EXPECT_NE(text.find("job-000007 SUCCEEDED: 10/10 steps, loss 5.0000 -> 0.5000\n"),
            std::string::npos)
      << text;
}

TEST(WatchViewTest, LiveStatusNeverExceedsTerminalWidth) {
  std::ostringstream out;
  WatchView view(out, Opts(true, 40));
  v1::Job running = Job(v1::JOB_STATE_RUNNING);
  for (int s = 1; s <= 9; ++s) view.OnEvent(Step(s, 0, s, 1.0 / s), running);
  std::string text = out.str();
  std::string last = text.substr(text.rfind("\r\033[K") + 4);
  EXPECT_LE(DisplayWidth(last), 39u) << last;
}

}  // namespace
}  // namespace tune::client
