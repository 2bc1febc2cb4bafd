#include "server/store/job_store.h"

#include <sqlite3.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "common/control/time_util.h"
#include "server/store/migrations.h"

namespace tune::server {
namespace {

namespace fs = std::filesystem;

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("tune_store_test_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    path_ = (dir_ / "jobs.db").string();
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<JobStore> OpenOrDie() {
    auto s = JobStore::Open(path_);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }

  static JobRecord NewJob(const std::string& name, int priority = 0) {
    JobRecord r;
    r.job.mutable_spec()->set_name(name);
    r.job.mutable_spec()->set_priority(priority);
    r.job.mutable_spec()->set_max_retries(2);
    r.job.mutable_spec()->mutable_resources()->set_cpu_ranks(2);
    r.job.set_spec_yaml("name: " + name + "\n");
    r.job.set_state(v1::JOB_STATE_QUEUED);
    r.job.set_attempt(1);
    *r.job.mutable_created_at() = ToProtoTime(absl::FromUnixSeconds(1700000000));
    return r;
  }

  static NewEvent ServerEvent(const std::string& payload) {
    NewEvent e;
    e.type = v1::EVENT_TYPE_STATE;
    e.time = absl::FromUnixSeconds(1700000001);
    e.payload_json = payload;
    return e;
  }

  static NewEvent AgentEvent(int attempt, int64_t source_seq) {
    NewEvent e;
    e.attempt = attempt;
    e.rank = 0;
    e.source_seq = source_seq;
    e.type = v1::EVENT_TYPE_STEP;
    e.time = absl::FromUnixSeconds(1700000002);
    e.payload_json = "{\"type\":\"step\",\"step\":" + std::to_string(source_seq) + "}";
    return e;
  }

  fs::path dir_;
  std::string path_;
};

TEST_F(StoreTest, MigrationsAreEmbeddedNumberedAndAppliedOnce) {
  const auto& migrations = EmbeddedMigrations();
  ASSERT_FALSE(migrations.empty());
  for (size_t i = 0; i < migrations.size(); ++i) {
    EXPECT_EQ(migrations[i].version, static_cast<int>(i) + 1);
    EXPECT_FALSE(migrations[i].sql.empty());
  }
  EXPECT_EQ(migrations[0].name, "0001_init");
  {
    auto store = OpenOrDie();
    auto v = store->SchemaVersion();
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(*v, static_cast<int>(migrations.size()));
  }
  // Reopening applies nothing twice (a second CREATE TABLE would fail).
  auto store = OpenOrDie();
  ASSERT_NE(store, nullptr);
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT COUNT(*) FROM schema_migrations", -1, &st, nullptr),
            SQLITE_OK);
  ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(st, 0), static_cast<int>(migrations.size()));
  sqlite3_finalize(st);
  ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
  EXPECT_STREQ(reinterpret_cast<const char*>(sqlite3_column_text(st, 0)), "wal");
  sqlite3_finalize(st);
  sqlite3_close(db);
}

TEST_F(StoreTest, RefusesADatabaseFromANewerServer) {
  { OpenOrDie(); }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "INSERT INTO schema_migrations VALUES (999, '0999_future', 0)",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  auto s = JobStore::Open(path_);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.status().message().find("999"), std::string::npos) << s.status();
}

TEST_F(StoreTest, OpenFailsClearlyForAMissingDirectory) {
  auto s = JobStore::Open((dir_ / "no" / "such" / "dir" / "x.db").string());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("cannot open database"), std::string::npos) << s.status();
}

TEST_F(StoreTest, InsertAssignsIdsSubmitOrderAndGapFreeSeqs) {
  auto store = OpenOrDie();
  std::vector<v1::JobEvent> appended;
  auto a = store->InsertJob(NewJob("a"), {ServerEvent("{\"state\":\"QUEUED\"}")}, &appended);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->id(), "job-000001");
  EXPECT_EQ(a->submit_order, 1);
  EXPECT_EQ(a->job.last_event_seq(), 1);
  ASSERT_EQ(appended.size(), 1u);
  EXPECT_EQ(appended[0].seq(), 1);
  auto b = store->InsertJob(NewJob("b"), {ServerEvent("{}")});
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->id(), "job-000002");
  EXPECT_EQ(b->submit_order, 2);

  // Each job numbers its own events from 1.
  JobRecord upd = *a;
  upd.job.set_state(v1::JOB_STATE_SCHEDULED);
  appended.clear();
  ASSERT_TRUE(store->UpdateJob(upd, {ServerEvent("{}"), ServerEvent("{}")}, &appended).ok());
  ASSERT_EQ(appended.size(), 2u);
  EXPECT_EQ(appended[0].seq(), 2);
  EXPECT_EQ(appended[1].seq(), 3);
  auto got = store->GetJob("job-000001");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->state(), v1::JOB_STATE_SCHEDULED);
  EXPECT_EQ(got->job.last_event_seq(), 3);
  auto page = store->ListEvents("job-000001", 0, 100);
  ASSERT_TRUE(page.ok());
  ASSERT_EQ(page->events.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(page->events[i].seq(), i + 1);
  // A stale last_event_seq in the written record does not move the counter back.
  upd.job.set_last_event_seq(0);
  appended.clear();
  ASSERT_TRUE(store->UpdateJob(upd, {ServerEvent("{}")}, &appended).ok());
  EXPECT_EQ(appended[0].seq(), 4);
}

TEST_F(StoreTest, UpdateOfUnknownJobIsNotFoundAndWritesNothing) {
  auto store = OpenOrDie();
  JobRecord ghost = NewJob("ghost");
  ghost.job.set_id("job-000077");
  absl::Status s = store->UpdateJob(ghost, {ServerEvent("{}")});
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->GetJob("job-000077").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->ListEvents("job-000077", 0, 10).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(StoreTest, AgentEventsAreStoredOncePerAttemptAndSourceSeq) {
  auto store = OpenOrDie();
  auto job = store->InsertJob(NewJob("a"), {ServerEvent("{}")});
  ASSERT_TRUE(job.ok());
  JobRecord upd = *job;
  upd.job.set_last_step(1);
  auto first = store->AppendAgentEvent(job->id(), AgentEvent(1, 1), &upd, {ServerEvent("{}")});
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_FALSE(first->duplicate);
  ASSERT_EQ(first->appended.size(), 2u);
  EXPECT_EQ(first->appended[0].seq(), 2);
  EXPECT_EQ(first->appended[0].attempt(), 1);
  EXPECT_EQ(first->appended[1].seq(), 3);

  // The same event resent (e.g. after a reconnect): nothing changes, not even the job row.
  upd.job.set_last_step(99);
  auto again = store->AppendAgentEvent(job->id(), AgentEvent(1, 1), &upd, {ServerEvent("{}")});
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->duplicate);
  EXPECT_TRUE(again->appended.empty());
  auto got = store->GetJob(job->id());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->job.last_step(), 1);
  EXPECT_EQ(got->job.last_event_seq(), 3);

  // Same source_seq in another attempt is a different event.
  auto other = store->AppendAgentEvent(job->id(), AgentEvent(2, 1), nullptr, {});
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(other->duplicate);
  EXPECT_EQ(other->appended[0].seq(), 4);

  EXPECT_EQ(store->AppendAgentEvent("job-000404", AgentEvent(1, 1), nullptr, {}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store->AppendAgentEvent(job->id(), AgentEvent(1, 0), nullptr, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(StoreTest, EventPagingAndStateLookup) {
  auto store = OpenOrDie();
  auto job = store->InsertJob(NewJob("a"), {ServerEvent("{\"state\":\"QUEUED\"}")});
  ASSERT_TRUE(job.ok());
  for (int i = 1; i <= 5; ++i) {
    ASSERT_TRUE(store->AppendAgentEvent(job->id(), AgentEvent(1, i), nullptr, {}).ok());
  }
  ASSERT_TRUE(store->UpdateJob(*job, {ServerEvent("{\"state\":\"RUNNING\"}")}).ok());  // seq 7
  auto p1 = store->ListEvents(job->id(), 0, 4);
  ASSERT_TRUE(p1.ok());
  ASSERT_EQ(p1->events.size(), 4u);
  EXPECT_TRUE(p1->more);
  auto p2 = store->ListEvents(job->id(), 4, 4);
  ASSERT_TRUE(p2.ok());
  ASSERT_EQ(p2->events.size(), 3u);
  EXPECT_FALSE(p2->more);
  EXPECT_EQ(p2->events.front().seq(), 5);
  EXPECT_EQ(p2->events.back().seq(), 7);
  EXPECT_EQ(p2->events.back().type(), v1::EVENT_TYPE_STATE);

  auto s6 = store->LastStateEventAtOrBefore(job->id(), 6);
  ASSERT_TRUE(s6.ok());
  ASSERT_TRUE(s6->has_value());
  EXPECT_EQ((*s6)->seq(), 1);
  auto s7 = store->LastStateEventAtOrBefore(job->id(), 7);
  ASSERT_TRUE(s7.ok() && s7->has_value());
  EXPECT_EQ((*s7)->seq(), 7);
  auto s0 = store->LastStateEventAtOrBefore(job->id(), 0);
  ASSERT_TRUE(s0.ok());
  EXPECT_FALSE(s0->has_value());
}

TEST_F(StoreTest, ListJobsNewestFirstWithStateFilterAndCounts) {
  auto store = OpenOrDie();
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(store->InsertJob(NewJob(n), {}).ok());
  auto b = store->GetJob("job-000002");
  ASSERT_TRUE(b.ok());
  b->job.set_state(v1::JOB_STATE_RUNNING);
  ASSERT_TRUE(store->UpdateJob(*b, {}).ok());
  auto all = store->ListJobs({}, 0);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 3u);
  EXPECT_EQ((*all)[0].id(), "job-000003");
  EXPECT_EQ((*all)[2].id(), "job-000001");
  auto limited = store->ListJobs({}, 2);
  ASSERT_TRUE(limited.ok());
  EXPECT_EQ(limited->size(), 2u);
  auto queued = store->ListJobs({v1::JOB_STATE_QUEUED}, 0);
  ASSERT_TRUE(queued.ok());
  ASSERT_EQ(queued->size(), 2u);
  auto counts = store->CountJobsByState();
  ASSERT_TRUE(counts.ok());
  EXPECT_EQ((*counts)[v1::JOB_STATE_QUEUED], 2);
  EXPECT_EQ((*counts)[v1::JOB_STATE_RUNNING], 1);
}

TEST_F(StoreTest, ReopenAfterCloseKeepsEverything) {
  JobRecord written;
  {
    auto store = OpenOrDie();
    auto job = store->InsertJob(NewJob("keep", 7), {ServerEvent("{\"state\":\"QUEUED\"}")});
    ASSERT_TRUE(job.ok());
    written = *job;
    written.job.set_state(v1::JOB_STATE_RUNNING);
    written.job.set_worker("w1");
    written.job.add_devices(0);
    written.job.add_devices(3);
    written.job.set_attempt(2);
    written.retries_used = 1;
    written.job.set_last_step(12);
    written.job.set_last_loss(1.25);
    written.job.set_last_checkpoint_step(10);
    written.job.set_cancel_requested(true);
    written.job.set_message("running");
    written.job.set_reason(v1::FAILURE_REASON_LOST);
    *written.job.mutable_started_at() = ToProtoTime(absl::FromUnixMicros(1700000005123456));
    ASSERT_TRUE(store->UpdateJob(written, {ServerEvent("{}")}).ok());
    ASSERT_TRUE(store->AppendAgentEvent(written.id(), AgentEvent(2, 1), nullptr, {}).ok());
    WorkerRecord w;
    w.info.set_name("w1");
    w.info.set_hostname("host-a");
    w.info.set_cpu_slots(4);
    auto* g = w.info.add_gpus();
    g->set_index(0);
    g->set_name("NVIDIA H200");
    w.state = v1::WORKER_STATE_READY;
    w.last_heartbeat = absl::FromUnixSeconds(1700000100);
    ASSERT_TRUE(store->UpsertWorker(w).ok());
    w.info.set_cpu_slots(8);  // Upsert replaces.
    ASSERT_TRUE(store->UpsertWorker(w).ok());
  }
  auto store = OpenOrDie();
  auto got = store->GetJob(written.id());
  ASSERT_TRUE(got.ok()) << got.status();
  const v1::Job& j = got->job;
  EXPECT_EQ(j.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(j.worker(), "w1");
  ASSERT_EQ(j.devices_size(), 2);
  EXPECT_EQ(j.devices(1), 3);
  EXPECT_EQ(j.attempt(), 2);
  EXPECT_EQ(got->retries_used, 1);
  EXPECT_EQ(got->submit_order, 1);
  EXPECT_EQ(got->priority(), 7);
  EXPECT_EQ(j.last_step(), 12);
  EXPECT_DOUBLE_EQ(j.last_loss(), 1.25);
  EXPECT_EQ(j.last_checkpoint_step(), 10);
  EXPECT_TRUE(j.cancel_requested());
  EXPECT_EQ(j.reason(), v1::FAILURE_REASON_LOST);
  EXPECT_EQ(j.spec().name(), "keep");
  EXPECT_EQ(j.spec_yaml(), "name: keep\n");
  EXPECT_EQ(FromProtoTime(j.started_at()), absl::FromUnixMicros(1700000005123456));
  EXPECT_FALSE(j.has_finished_at());
  EXPECT_EQ(j.last_event_seq(), 3);
  auto page = store->ListEvents(written.id(), 0, 10);
  ASSERT_TRUE(page.ok());
  ASSERT_EQ(page->events.size(), 3u);
  EXPECT_EQ(page->events[2].attempt(), 2);
  EXPECT_EQ(page->events[2].rank(), 0);
  EXPECT_EQ(page->events[2].payload_json(), "{\"type\":\"step\",\"step\":1}");
  // The dedup key survives the restart too.
  auto dup = store->AppendAgentEvent(written.id(), AgentEvent(2, 1), nullptr, {});
  ASSERT_TRUE(dup.ok());
  EXPECT_TRUE(dup->duplicate);
  auto workers = store->ListWorkers();
  ASSERT_TRUE(workers.ok());
  ASSERT_EQ(workers->size(), 1u);
  EXPECT_EQ((*workers)[0].info.cpu_slots(), 8);
  EXPECT_EQ((*workers)[0].info.gpus(0).name(), "NVIDIA H200");
  EXPECT_EQ((*workers)[0].state, v1::WORKER_STATE_READY);
  EXPECT_EQ((*workers)[0].last_heartbeat, absl::FromUnixSeconds(1700000100));
}

}  // namespace
}  // namespace tune::server
