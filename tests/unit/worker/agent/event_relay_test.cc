// Event line parsing, stream splitting and the outbox's ack/resend rules.
#include "worker/agent/event_relay.h"

#include <map>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/time/clock.h"

namespace tune::worker {
namespace {

using nlohmann::json;

const absl::Time kNow = absl::FromUnixSeconds(1800000000);

TEST(ParseEventLineTest, KnownTypeKeepsLineAndTime) {
  const std::string line =
      R"({"type":"step","time":1700000000.25,"rank":1,"step":3,"loss":1.25,"lr":"nan"})";
  RelayedEvent e = ParseEventLine(line + "\r", 1, kNow);
  EXPECT_EQ(e.type, v1::EVENT_TYPE_STEP);
  EXPECT_EQ(e.rank, 1);
  EXPECT_EQ(e.payload_json, line);
  EXPECT_EQ(e.time.seconds(), 1700000000);
  EXPECT_EQ(e.time.nanos(), 250000000);
}

TEST(ParseEventLineTest, EveryDocumentedTrainerType) {
  const std::map<std::string, v1::EventType> types = {
      {"preflight", v1::EVENT_TYPE_PREFLIGHT}, {"plan", v1::EVENT_TYPE_PLAN},
      {"step", v1::EVENT_TYPE_STEP},           {"nan_alert", v1::EVENT_TYPE_NAN_ALERT},
      {"oom_recovered", v1::EVENT_TYPE_OOM_RECOVERED},
      {"checkpoint", v1::EVENT_TYPE_CHECKPOINT}, {"eval", v1::EVENT_TYPE_EVAL},
      {"log", v1::EVENT_TYPE_LOG},             {"done", v1::EVENT_TYPE_DONE},
      {"error", v1::EVENT_TYPE_ERROR}};
  for (const auto& [name, type] : types) {
    RelayedEvent e = ParseEventLine(R"({"type":")" + name + R"(","time":1})", 0, kNow);
    EXPECT_EQ(e.type, type) << name;
  }
}

TEST(ParseEventLineTest, ErrorEventCarriesReason) {
  RelayedEvent e = ParseEventLine(
      R"({"type":"error","time":1,"rank":0,"reason":"OOM","message":"out of memory"})", 0, kNow);
  EXPECT_EQ(e.type, v1::EVENT_TYPE_ERROR);
  EXPECT_EQ(e.error_reason, "OOM");
  EXPECT_EQ(e.error_message, "out of memory");
}

TEST(ParseEventLineTest, UnknownTypeStaysUnspecifiedWithPayload) {
  const std::string line = R"({"type":"future_thing","x":1})";
  RelayedEvent e = ParseEventLine(line, 2, kNow);
  EXPECT_EQ(e.type, v1::EVENT_TYPE_UNSPECIFIED);
  EXPECT_EQ(e.payload_json, line);
  EXPECT_EQ(e.time.seconds(), 1800000000);  // no "time": receipt time
}

TEST(ParseEventLineTest, MalformedLinesBecomeWarnings) {
  for (const std::string& line :
       {std::string("not json at all"), std::string("[1,2]"), std::string(R"({"no_type":1})"),
        std::string(R"({"type":5})"), std::string("{\"type\":\"step\""),
        std::string(R"({"type":"exited","state":"SUCCEEDED"})")}) {
    RelayedEvent e = ParseEventLine(line, 3, kNow);
    EXPECT_EQ(e.type, v1::EVENT_TYPE_LOG) << line;
    EXPECT_EQ(e.rank, 3);
    json j = json::parse(e.payload_json);
    EXPECT_EQ(j["type"], "log");
    EXPECT_EQ(j["level"], "warning");
    EXPECT_EQ(j["rank"], 3);
    EXPECT_NE(j["message"].get<std::string>().find("rank 3"), std::string::npos);
  }
}

TEST(ParseEventLineTest, InvalidUtf8IsQuotedSafely) {
  RelayedEvent e = ParseEventLine("bad \xff\xfe bytes", 0, kNow);
  EXPECT_EQ(e.type, v1::EVENT_TYPE_LOG);
  EXPECT_NO_THROW(json::parse(e.payload_json));
}

TEST(ParseEventLineTest, LongMalformedLineIsExcerpted) {
  RelayedEvent e = ParseEventLine(std::string(5000, 'x'), 0, kNow);
  EXPECT_LT(e.payload_json.size(), 1000u);
}

TEST(MakeWorkerEventTest, HasRankMinusOneAndFields) {
  RelayedEvent e = MakeWorkerEvent("exited", {{"state", "FAILED"}, {"exit_codes", {3}}}, kNow);
  EXPECT_EQ(e.type, v1::EVENT_TYPE_EXITED);
  EXPECT_EQ(e.rank, -1);
  json j = json::parse(e.payload_json);
  EXPECT_EQ(j["type"], "exited");
  EXPECT_EQ(j["rank"], -1);
  EXPECT_EQ(j["time"], 1800000000.0);
  EXPECT_EQ(j["state"], "FAILED");
}

TEST(RankEventStreamTest, SplitsPartialLines) {
  RankEventStream stream(0);
  EXPECT_TRUE(stream.Feed(R"({"type":"st)", kNow).empty());
  auto events = stream.Feed("ep\",\"time\":1}\n\n{\"type\":\"eval\",\"time\":2}\n{\"type\":", kNow);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].type, v1::EVENT_TYPE_STEP);
  EXPECT_EQ(events[1].type, v1::EVENT_TYPE_EVAL);
  events = stream.Feed("\"done\"}", kNow);
  EXPECT_TRUE(events.empty());
  events = stream.Finish(kNow);  // EOF without newline still delivers the line
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, v1::EVENT_TYPE_DONE);
}

TEST(RankEventStreamTest, OverlongLineIsDroppedAndReported) {
  RankEventStream stream(1, /*max_line_bytes=*/64);
  auto events = stream.Feed(std::string(40, 'a'), kNow);
  EXPECT_TRUE(events.empty());
  events = stream.Feed(std::string(40, 'b'), kNow);  // 80 > 64: dropped
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, v1::EVENT_TYPE_LOG);
  EXPECT_NE(json::parse(events[0].payload_json)["message"].get<std::string>().find("longer than 64"),
            std::string::npos);
  events = stream.Feed(std::string(100, 'c'), kNow);  // still the same line: no new report
  EXPECT_TRUE(events.empty());
  events = stream.Feed("tail\n{\"type\":\"step\",\"time\":1}\n", kNow);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, v1::EVENT_TYPE_STEP);

  // A line at exactly the limit passes.
  std::string exact = R"({"type":"log","m":")";
  exact += std::string(64 - exact.size() - 2, 'x') + "\"}";
  ASSERT_EQ(exact.size(), 64u);
  events = stream.Feed(exact + "\n", kNow);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].payload_json, exact);

  // Over the limit inside one read, newline included.
  events = stream.Feed(std::string(65, 'z') + "\n{\"type\":\"eval\"}\n", kNow);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].type, v1::EVENT_TYPE_LOG);
  EXPECT_EQ(events[1].type, v1::EVENT_TYPE_EVAL);
}

RelayedEvent Ev(int rank) {
  RelayedEvent e;
  e.rank = rank;
  e.type = v1::EVENT_TYPE_STEP;
  e.payload_json = "{}";
  return e;
}

TEST(OutboxTest, NumbersPerAttemptFromOne) {
  Outbox box;
  AttemptKey a{"job-1", 1}, b{"job-2", 1}, a2{"job-1", 2};
  EXPECT_EQ(box.Add(a, Ev(0)), 1);
  EXPECT_EQ(box.Add(a, Ev(1)), 2);
  EXPECT_EQ(box.Add(b, Ev(0)), 1);
  EXPECT_EQ(box.Add(a2, Ev(0)), 1);
  EXPECT_EQ(box.Add(a, Ev(-1)), 3);
  EXPECT_EQ(box.unacked(), 5u);
  auto events = box.TakeUnsent(100);
  ASSERT_EQ(events.size(), 5u);
  std::map<std::pair<std::string, int>, int64_t> last;
  for (const auto& e : events) {
    auto k = std::make_pair(e.job_id(), e.attempt());
    EXPECT_EQ(e.source_seq(), last[k] + 1) << e.job_id();  // in order per attempt
    last[k] = e.source_seq();
  }
}

TEST(OutboxTest, SendsOnceUntilRewoundAndDropsOnlyAcked) {
  Outbox box;
  AttemptKey a{"job-1", 1};
  for (int i = 0; i < 5; ++i) box.Add(a, Ev(0));
  auto first = box.TakeUnsent(3);
  ASSERT_EQ(first.size(), 3u);
  EXPECT_EQ(first[0].source_seq(), 1);
  auto second = box.TakeUnsent(100);
  ASSERT_EQ(second.size(), 2u);
  EXPECT_EQ(second[0].source_seq(), 4);
  EXPECT_TRUE(box.TakeUnsent(100).empty());  // everything in flight

  box.Ack(a, 2);
  EXPECT_EQ(box.unacked(), 3u);
  EXPECT_TRUE(box.TakeUnsent(100).empty());

  // Reconnect: the unacknowledged 3..5 go again, in order.
  box.RewindUnacked();
  auto resent = box.TakeUnsent(100);
  ASSERT_EQ(resent.size(), 3u);
  EXPECT_EQ(resent[0].source_seq(), 3);
  EXPECT_EQ(resent[2].source_seq(), 5);

  // Stale and duplicate acks are harmless.
  box.Ack(a, 1);
  box.Ack(AttemptKey{"job-9", 1}, 7);
  EXPECT_EQ(box.unacked(), 3u);
  box.Add(a, Ev(0));  // 6, new
  box.Ack(a, 5);
  EXPECT_EQ(box.unacked(), 1u);
  auto fresh = box.TakeUnsent(100);
  ASSERT_EQ(fresh.size(), 1u);
  EXPECT_EQ(fresh[0].source_seq(), 6);
}

TEST(OutboxTest, AckBeyondSentKeepsUnsentBookkeepingSane) {
  Outbox box;
  AttemptKey a{"j", 1};
  for (int i = 0; i < 3; ++i) box.Add(a, Ev(0));
  ASSERT_EQ(box.TakeUnsent(1).size(), 1u);
  box.Ack(a, 2);  // acks one event that was never sent on this session
  auto rest = box.TakeUnsent(10);
  ASSERT_EQ(rest.size(), 1u);
  EXPECT_EQ(rest[0].source_seq(), 3);
}

TEST(OutboxTest, ClosedAttemptIsForgottenOnceAcked) {
  Outbox box;
  AttemptKey a{"job-1", 1};
  box.Add(a, Ev(0));
  box.Add(a, Ev(-1));
  box.CloseAttempt(a);
  EXPECT_EQ(box.attempts(), 1u);  // unacknowledged events keep it
  box.Ack(a, 1);
  EXPECT_EQ(box.attempts(), 1u);
  box.Ack(a, 2);
  EXPECT_EQ(box.attempts(), 0u);
  EXPECT_TRUE(box.WaitUntilEmpty(absl::Now()));

  AttemptKey b{"job-2", 1};
  box.Add(b, Ev(0));
  box.Ack(b, 1);
  EXPECT_EQ(box.attempts(), 1u);  // still open: its numbering continues
  EXPECT_EQ(box.Add(b, Ev(0)), 2);
}

TEST(OutboxTest, WaitForUnsentWakesOnAddAndTimesOut) {
  Outbox box;
  EXPECT_FALSE(box.WaitForUnsent(absl::Now() + absl::Milliseconds(20)));
  std::thread t([&] {
    absl::SleepFor(absl::Milliseconds(30));
    box.Add({"j", 1}, Ev(0));
  });
  EXPECT_TRUE(box.WaitForUnsent(absl::Now() + absl::Seconds(10)));
  t.join();
  std::thread u([&] {
    absl::SleepFor(absl::Milliseconds(30));
    box.Ack({"j", 1}, 1);
  });
  EXPECT_TRUE(box.WaitUntilEmpty(absl::Now() + absl::Seconds(10)));
  u.join();
}

}  // namespace
}  // namespace tune::worker
