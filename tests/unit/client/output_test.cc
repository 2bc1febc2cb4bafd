// Unit tests of tunectl's output formatting: JSON/YAML views of jobs, events
// and workers, tables, sparkline, progress bar and the small formatters.
#include "client/output.h"

#include <cmath>

#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include "absl/time/time.h"
#include "common/control/time_util.h"

namespace tune::client {
namespace {

using json = Json;

v1::Job SampleJob() {
  v1::Job job;
  job.set_id("job-000042");
  job.set_state(v1::JOB_STATE_FAILED);
  job.set_reason(v1::FAILURE_REASON_OOM);
  job.set_message("rank 0 ran out of memory");
  job.set_attempt(2);
  job.set_worker("gpu-node-1");
  job.add_devices(0);
  job.add_devices(3);
  job.set_last_step(17);
  job.set_last_loss(1.25);
  job.set_last_checkpoint_step(15);
  job.set_last_event_seq(99);
  job.mutable_spec()->set_name("llama3-support-bot");
  job.mutable_spec()->set_priority(4);
  job.mutable_spec()->mutable_training()->set_max_steps(60);
  job.mutable_spec()->mutable_training()->set_seed(3407);
  job.mutable_spec()->mutable_resources()->set_gpus(2);
  *job.mutable_created_at() = ProtoTimeFromUnixSeconds(1764390000.5);
  return job;
}

v1::JobEvent StepEvent(int64_t seq, int attempt, int rank, int step, const std::string& loss) {
  v1::JobEvent e;
  e.set_seq(seq);
  e.set_job_id("job-000042");
  e.set_attempt(attempt);
  e.set_rank(rank);
  e.set_type(v1::EVENT_TYPE_STEP);
  *e.mutable_time() = ProtoTimeFromUnixSeconds(1764390000.0 + static_cast<double>(seq));
  e.set_payload_json(R"({"type":"step","rank":)" + std::to_string(rank) + R"(,"step":)" +
                     std::to_string(step) + R"(,"max_steps":60,"loss":)" + loss +
                     R"(,"lr":0.0002,"grad_norm":0.5,"tokens_per_s":12345,"time":1.0})");
  return e;
}

TEST(ParseOutputFormatTest, KnownAndUnknown) {
  EXPECT_EQ(*ParseOutputFormat("table"), OutputFormat::kTable);
  EXPECT_EQ(*ParseOutputFormat("json"), OutputFormat::kJson);
  EXPECT_EQ(*ParseOutputFormat("yaml"), OutputFormat::kYaml);
  auto bad = ParseOutputFormat("xml");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("table, json or yaml"), std::string::npos);
}

TEST(JobToJsonTest, NamesStatesAndFields) {
  json j = JobToJson(SampleJob());
  EXPECT_EQ(j["id"], "job-000042");
  EXPECT_EQ(j["name"], "llama3-support-bot");
  EXPECT_EQ(j["state"], "FAILED");
  EXPECT_EQ(j["reason"], "OOM");
  EXPECT_EQ(j["attempt"], 2);
  EXPECT_EQ(j["worker"], "gpu-node-1");
  EXPECT_EQ(j["devices"], json::array({0, 3}));
  EXPECT_EQ(j["priority"], 4);
  EXPECT_EQ(j["max_steps"], 60);
  EXPECT_EQ(j["last_step"], 17);
  EXPECT_DOUBLE_EQ(j["last_loss"].get<double>(), 1.25);
  EXPECT_EQ(j["created_at"], "2025-11-29T04:20:00.500Z");
  EXPECT_TRUE(j["started_at"].is_null());
  // The spec keeps proto field names and the seed stays a number.
  EXPECT_EQ(j["spec"]["training"]["max_steps"], 60);
  EXPECT_EQ(j["spec"]["training"]["seed"], 3407);
  EXPECT_EQ(j["spec"]["resources"]["gpus"], 2);
}

TEST(JobToJsonTest, NonFiniteAndUnsetLossAreNull) {
  v1::Job job = SampleJob();
  job.set_last_loss(std::nan(""));
  EXPECT_TRUE(JobToJson(job)["last_loss"].is_null());
  job.set_last_loss(2.0);
  job.set_last_step(0);
  EXPECT_TRUE(JobToJson(job)["last_loss"].is_null()) << "no step yet: no loss";
  job.set_state(v1::JOB_STATE_QUEUED);
  job.set_reason(v1::FAILURE_REASON_UNSPECIFIED);
  EXPECT_EQ(JobToJson(job)["state"], "QUEUED");
  EXPECT_EQ(JobToJson(job)["reason"], "");
}

TEST(EventToJsonTest, MergesPayloadUnderStoredFields) {
  v1::JobEvent e = StepEvent(7, 2, 1, 5, "\"nan\"");
  json j = EventToJson(e);
  EXPECT_EQ(j["seq"], 7);
  EXPECT_EQ(j["type"], "step");
  EXPECT_EQ(j["attempt"], 2);
  EXPECT_EQ(j["rank"], 1);
  EXPECT_EQ(j["job_id"], "job-000042");
  EXPECT_DOUBLE_EQ(j["time"].get<double>(), 1764390007.0) << "the stored time wins";
  EXPECT_EQ(j["step"], 5);
  EXPECT_EQ(j["loss"], "nan") << "trainer's non-finite strings pass through";
  EXPECT_EQ(j["max_steps"], 60);
}

TEST(EventToJsonTest, BrokenPayloadIsKeptRaw) {
  v1::JobEvent e;
  e.set_seq(1);
  e.set_type(v1::EVENT_TYPE_LOG);
  e.set_payload_json("{not json");
  json j = EventToJson(e);
  EXPECT_EQ(j["payload_raw"], "{not json");
  EXPECT_EQ(j["type"], "log");
  EXPECT_FALSE(j.contains("time")) << "unset time is left out";
}

TEST(EventToJsonTest, UnknownTypeKeepsProducerName) {
  v1::JobEvent e;
  e.set_seq(3);
  e.set_type(v1::EVENT_TYPE_UNSPECIFIED);
  e.set_payload_json(R"({"type":"gpu_temperature","celsius":81})");
  json j = EventToJson(e);
  EXPECT_EQ(j["type"], "gpu_temperature");
  EXPECT_EQ(j["celsius"], 81);
}

TEST(WorkerToJsonTest, Fields) {
  v1::Worker w;
  w.mutable_info()->set_name("wa");
  w.mutable_info()->set_hostname("node1");
  w.mutable_info()->set_cpu_slots(4);
  auto* g = w.mutable_info()->add_gpus();
  g->set_index(0);
  g->set_name("NVIDIA H200");
  g->set_memory_total_bytes(int64_t{150} << 30);
  w.set_state(v1::WORKER_STATE_LOST);
  w.set_free_cpu_slots(2);
  w.add_free_gpus(0);
  w.add_job_ids("job-000001");
  json j = WorkerToJson(w);
  EXPECT_EQ(j["name"], "wa");
  EXPECT_EQ(j["state"], "LOST");
  EXPECT_EQ(j["cpu_slots"], 4);
  EXPECT_EQ(j["free_cpu_slots"], 2);
  EXPECT_EQ(j["free_gpus"], json::array({0}));
  EXPECT_EQ(j["job_ids"], json::array({"job-000001"}));
  EXPECT_EQ(j["gpus"][0]["name"], "NVIDIA H200");
  EXPECT_TRUE(j["last_heartbeat"].is_null());
}

TEST(SummarizeLossesTest, RankZeroNewestAttemptWins) {
  std::vector<v1::JobEvent> events = {
      StepEvent(1, 1, 0, 1, "3.0"), StepEvent(2, 1, 1, 1, "99"),  // rank 1 ignored
      StepEvent(3, 1, 0, 2, "2.0"), StepEvent(4, 1, 0, 3, "2.5"),
      // Attempt 2 resumed after a checkpoint at step 2 and re-ran step 3.
      StepEvent(5, 2, 0, 3, "1.5"), StepEvent(6, 2, 0, 4, "\"nan\""),
      StepEvent(7, 2, 0, 5, "1.75")};
  LossSummary s = SummarizeLosses(events);
  EXPECT_EQ(s.steps, 4);
  EXPECT_EQ(s.first_step, 1);
  EXPECT_DOUBLE_EQ(s.first, 3.0);
  EXPECT_DOUBLE_EQ(s.min, 1.5);
  EXPECT_EQ(s.min_step, 3);
  EXPECT_EQ(s.last_step, 5);
  EXPECT_DOUBLE_EQ(s.last, 1.75);
  EXPECT_EQ(s.non_finite, 1);
  json j = LossSummaryToJson(s);
  EXPECT_EQ(j["steps"], 4);
  EXPECT_DOUBLE_EQ(j["min"].get<double>(), 1.5);
}

TEST(SummarizeLossesTest, NoStepsIsNull) {
  EXPECT_EQ(SummarizeLosses({}).steps, 0);
  EXPECT_TRUE(LossSummaryToJson(LossSummary{}).is_null());
}

TEST(ToYamlTest, RoundTripsTypes) {
  json v = {{"id", "job-1"},
            {"count", 3},
            {"loss", 0.125},
            {"ok", true},
            {"nothing", nullptr},
            {"numeric_string", "123"},
            {"bool_string", "yes"},
            {"empty", ""},
            {"list", {1, 2}},
            {"empty_list", json::array()},
            {"nested", {{"a", "b: c"}}}};
  std::string text = ToYaml(v);
  YAML::Node n = YAML::Load(text);
  EXPECT_EQ(n["id"].as<std::string>(), "job-1");
  EXPECT_EQ(n["count"].as<int>(), 3);
  EXPECT_DOUBLE_EQ(n["loss"].as<double>(), 0.125);
  EXPECT_TRUE(n["ok"].as<bool>());
  EXPECT_TRUE(n["nothing"].IsNull());
  EXPECT_EQ(n["numeric_string"].Tag(), "!") << "quoted, so it stays a string:\n" << text;
  EXPECT_EQ(n["numeric_string"].as<std::string>(), "123");
  EXPECT_EQ(n["bool_string"].Tag(), "!") << text;
  EXPECT_EQ(n["empty"].as<std::string>(), "");
  EXPECT_EQ(n["list"][1].as<int>(), 2);
  EXPECT_EQ(n["empty_list"].size(), 0u);
  EXPECT_EQ(n["nested"]["a"].as<std::string>(), "b: c");
  EXPECT_EQ(text.back(), '\n');
}

TEST(ToJsonTextTest, CompactAndPretty) {
  json v = {{"a", 1}};
  EXPECT_EQ(ToJsonText(v, false), "{\"a\":1}");
  EXPECT_EQ(ToJsonText(v, true), "{\n  \"a\": 1\n}");
  // Invalid UTF-8 from a payload must not throw.
  json bad = std::string("x\xff");
  EXPECT_NO_THROW(ToJsonText(bad, false));
}

TEST(RenderTableTest, AlignsByDisplayWidth) {
  Table t;
  t.headers = {"ID", "LOSS", "CURVE"};
  t.rows = {{"job-1", "0.5", "▁▂▃"}, {"job-22", "12.25", "█"}, {"x"}};
  std::string text = RenderTable(t);
  EXPECT_EQ(text,
            "ID      LOSS   CURVE\n"
            "job-1   0.5    ▁▂▃\n"
            "job-22  12.25  █\n"
            "x\n");
}

TEST(JobsTableTest, Columns) {
  v1::Job job = SampleJob();
  absl::Time now = absl::FromUnixSeconds(1764390000 + 301);
  Table t = JobsTable({job}, now);
  ASSERT_EQ(t.rows.size(), 1u);
  EXPECT_EQ(t.headers[0], "ID");
  EXPECT_EQ(t.rows[0][0], "job-000042");
  EXPECT_EQ(t.rows[0][2], "FAILED (OOM)");
  EXPECT_EQ(t.rows[0][6], "17/60");
  EXPECT_EQ(t.rows[0][7], "1.2500");
  EXPECT_EQ(t.rows[0][8], "5m");
}

TEST(JobDetailsTest, IncludesLossSummary) {
  v1::Job job = SampleJob();
  LossSummary s = SummarizeLosses({StepEvent(1, 1, 0, 1, "3.0"), StepEvent(2, 1, 0, 2, "1.0")});
  std::string text = JobDetails(job, s, absl::FromUnixSeconds(1764390100));
  EXPECT_NE(text.find("state:"), std::string::npos) << text;
  EXPECT_NE(text.find("FAILED (OOM)"), std::string::npos) << text;
  EXPECT_NE(text.find("first 3.0000 (step 1)  min 1.0000 (step 2)  last 1.0000 (step 2)"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("gpu-node-1 (gpus 0,3)"), std::string::npos) << text;
}

TEST(EventsTableTest, OneRowPerEvent) {
  Table t = EventsTable({StepEvent(1, 1, 0, 1, "3.0")});
  ASSERT_EQ(t.rows.size(), 1u);
  EXPECT_EQ(t.rows[0][0], "1");
  EXPECT_EQ(t.rows[0][4], "step");
  EXPECT_NE(t.rows[0][5].find("step 1/60  loss 3.0000"), std::string::npos) << t.rows[0][5];
}

TEST(SparklineTest, ScalesBetweenMinAndMax) {
  EXPECT_EQ(Sparkline({}, 10), "");
  EXPECT_EQ(Sparkline({1, 2, 3, 4, 5, 6, 7, 8}, 8), "▁▂▃▄▅▆▇█");
  EXPECT_EQ(Sparkline({8, 1}, 8), "█▁");
  EXPECT_EQ(Sparkline({2, 2, 2}, 8), "▄▄▄") << "flat curve sits in the middle";
  EXPECT_EQ(Sparkline({1, std::nan(""), 2}, 8), "▁×█");
}

TEST(SparklineTest, KeepsOnlyTheLastWidthValues) {
  std::vector<double> v = {100, 1, 2};
  EXPECT_EQ(Sparkline(v, 2), "▁█") << "100 is outside the window and does not scale it";
  EXPECT_EQ(DisplayWidth(Sparkline(std::vector<double>(50, 1.0), 24)), 24u);
}

TEST(ProgressBarTest, ExactWidthAndEighths) {
  EXPECT_EQ(ProgressBar(0, 4), "    ");
  EXPECT_EQ(ProgressBar(1, 4), "████");
  EXPECT_EQ(ProgressBar(0.5, 4), "██  ");
  EXPECT_EQ(ProgressBar(0.5 + 1.0 / 32, 4), "██▏ ") << "one eighth of a cell";
  EXPECT_EQ(ProgressBar(2.0, 3), "███") << "clamped";
  EXPECT_EQ(ProgressBar(-1, 3), "   ");
  EXPECT_EQ(ProgressBar(std::nan(""), 3), "   ");
  EXPECT_EQ(ProgressBar(0.5, 0), "");
  for (int i = 0; i <= 100; ++i) {
    EXPECT_EQ(DisplayWidth(ProgressBar(i / 100.0, 20)), 20u) << i;
  }
}

TEST(FormatTest, SmallFormatters) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
  EXPECT_EQ(FormatBytes(80.0 * (1 << 30)), "80.0 GiB");
  EXPECT_EQ(FormatAge(absl::Seconds(42)), "42s");
  EXPECT_EQ(FormatAge(absl::Minutes(5)), "5m");
  EXPECT_EQ(FormatAge(absl::Hours(3)), "3h");
  EXPECT_EQ(FormatAge(absl::Hours(50)), "2d");
  EXPECT_EQ(FormatAge(-absl::Seconds(3)), "0s");
  EXPECT_EQ(FormatLoss(1.23456), "1.2346");
  EXPECT_EQ(FormatLoss(std::nan("")), "nan");
  EXPECT_EQ(FormatLoss(-HUGE_VAL), "-inf");
  EXPECT_EQ(FormatRate(950), "950");
  EXPECT_EQ(FormatRate(12345), "12.3k");
  EXPECT_EQ(FormatRate(2.5e6), "2.50M");
  EXPECT_EQ(FormatTimestamp(google::protobuf::Timestamp()), "");
  EXPECT_EQ(TruncateToWidth("ab▁▂cd", 4), "ab▁▂");
  EXPECT_EQ(TruncateToWidth("ab", 4), "ab");
  EXPECT_EQ(DisplayWidth("▁▂x"), 3u);
}

TEST(PayloadNumberTest, NumbersAndNonFiniteStrings) {
  json p = {{"a", 2}, {"b", "nan"}, {"c", "-inf"}, {"d", "text"}};
  EXPECT_EQ(*PayloadNumber(p, "a"), 2.0);
  EXPECT_TRUE(std::isnan(*PayloadNumber(p, "b")));
  EXPECT_EQ(*PayloadNumber(p, "c"), -HUGE_VAL);
  EXPECT_FALSE(PayloadNumber(p, "d").has_value());
  EXPECT_FALSE(PayloadNumber(p, "missing").has_value());
}

TEST(EventSummaryTest, DescribesEachType) {
  auto make = [](v1::EventType type, const std::string& payload, int attempt = 1) {
    v1::JobEvent e;
    e.set_type(type);
    e.set_attempt(attempt);
    e.set_payload_json(payload);
    return EventSummary(e);
  };
  EXPECT_EQ(make(v1::EVENT_TYPE_CHECKPOINT, R"({"step":10,"path":"/r/step-10"})"),
            "checkpoint at step 10: /r/step-10");
  EXPECT_EQ(make(v1::EVENT_TYPE_STATE, R"({"state":"QUEUED","reason":"LOST","message":"w gone"})"),
            "state QUEUED (LOST): w gone");
  EXPECT_EQ(make(v1::EVENT_TYPE_ERROR, R"({"reason":"OOM","message":"no memory"})"),
            "error OOM: no memory");
  EXPECT_EQ(make(v1::EVENT_TYPE_NAN_ALERT,
                 R"({"step":3,"where":"loss","consecutive":1,"total":2,"action":"skip"})"),
            "non-finite value at step 3 in loss (consecutive 1, total 2): skip");
  EXPECT_EQ(make(v1::EVENT_TYPE_STARTED,
                 R"({"worker":"wb","devices":[0,1],"world_size":2,"resume":true,"pids":[5,6]})",
                 2),
            "attempt 2 started on wb: world size 2, devices 0,1, pids 5,6, resuming from the "
            "last checkpoint");
  EXPECT_EQ(make(v1::EVENT_TYPE_EXITED,
                 R"({"state":"FAILED","reason":"CRASH","exit_codes":[1,143],"message":"boom"})"),
            "attempt 1 exited: FAILED (CRASH), exit codes 1,143: boom");
  EXPECT_EQ(make(v1::EVENT_TYPE_LOG, R"({"level":"warning","message":"BOS fixed"})"),
            "warning: BOS fixed");
  EXPECT_NE(make(v1::EVENT_TYPE_STEP,
                 R"({"step":3,"max_steps":9,"loss":"nan","lr":1e-4,"grad_norm":2,)"
                 R"("tokens_per_s":1500,"vram_allocated":1073741824,"vram_peak":2147483648})")
                .find("step 3/9  loss nan  lr 1.000e-04  grad_norm 2  tok/s 1.5k  vram 1.0 GiB "
                      "(peak 2.0 GiB)"),
            std::string::npos);
}

}  // namespace
}  // namespace tune::client
