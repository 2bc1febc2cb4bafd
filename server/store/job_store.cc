#include "server/store/job_store.h"

#include <sqlite3.h>

#include <cmath>
#include <limits>

#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/control/status_macros.h"
#include "common/control/time_util.h"
#include "server/store/migrations.h"

namespace tune::server {
namespace {

constexpr int kBusyTimeoutMs = 5000;

int64_t ToMicros(absl::Time t) { return absl::ToUnixMicros(t); }

// One prepared statement; finalized on destruction.
class Stmt {
 public:
  Stmt(sqlite3* db, std::string sql) : db_(db), sql_(std::move(sql)) {
    rc_ = sqlite3_prepare_v2(db, sql_.c_str(), -1, &stmt_, nullptr);
  }
  ~Stmt() { sqlite3_finalize(stmt_); }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  absl::Status status() const {
    if (rc_ == SQLITE_OK) return absl::OkStatus();
    return absl::InternalError(
        absl::StrCat("sqlite: preparing \"", sql_, "\": ", sqlite3_errmsg(db_)));
  }
  // Binders take 1-based positions.
  void Bind(int i, int64_t v) { sqlite3_bind_int64(stmt_, i, v); }
  void Bind(int i, int v) { sqlite3_bind_int64(stmt_, i, v); }
  // SQLite turns a NaN REAL into NULL; non-finite values (a NaN loss is an event worth
  // keeping) are stored as the text "nan" / "inf" / "-inf" instead and read back by Double().
  void Bind(int i, double v) {
    if (std::isfinite(v)) {
      sqlite3_bind_double(stmt_, i, v);
    } else {
      sqlite3_bind_text(stmt_, i, std::isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf"), -1, SQLITE_STATIC);
    }
  }
  void Bind(int i, const std::string& v) {
    sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  }
  void BindBlob(int i, const std::string& v) {
    sqlite3_bind_blob(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  }
  void BindNull(int i) { sqlite3_bind_null(stmt_, i); }

  // SQLITE_ROW -> true, SQLITE_DONE -> false, anything else -> error.
  absl::StatusOr<bool> Step() {
    int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    return absl::InternalError(
        absl::StrCat("sqlite: running \"", sql_, "\": ", sqlite3_errmsg(db_)));
  }
  // Runs a statement that returns no rows.
  absl::Status Run() {
    auto r = Step();
    if (!r.ok()) return r.status();
    return absl::OkStatus();
  }
  void Reset() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }

  int64_t Int(int col) { return sqlite3_column_int64(stmt_, col); }
  double Double(int col) {
    if (sqlite3_column_type(stmt_, col) == SQLITE_TEXT) {
      std::string t(reinterpret_cast<const char*>(sqlite3_column_text(stmt_, col)));
      if (t == "inf") return std::numeric_limits<double>::infinity();
      if (t == "-inf") return -std::numeric_limits<double>::infinity();
      return std::numeric_limits<double>::quiet_NaN();
    }
    return sqlite3_column_double(stmt_, col);
  }
  bool IsNull(int col) { return sqlite3_column_type(stmt_, col) == SQLITE_NULL; }
  std::string Text(int col) {
    const unsigned char* p = sqlite3_column_text(stmt_, col);
    int n = sqlite3_column_bytes(stmt_, col);
    return p ? std::string(reinterpret_cast<const char*>(p), n) : std::string();
  }
  std::string Blob(int col) {
    const void* p = sqlite3_column_blob(stmt_, col);
    int n = sqlite3_column_bytes(stmt_, col);
    return p ? std::string(static_cast<const char*>(p), n) : std::string();
  }

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  std::string sql_;
  int rc_;
};

// BEGIN IMMEDIATE on construction; ROLLBACK unless Commit() succeeded.
class Txn {
 public:
  explicit Txn(sqlite3* db) : db_(db) {
    char* err = nullptr;
    int rc = sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, &err);
    if (rc != SQLITE_OK) {
      begin_status_ = absl::InternalError(
          absl::StrCat("sqlite: BEGIN: ", err ? err : sqlite3_errmsg(db_)));
    } else {
      open_ = true;
    }
    sqlite3_free(err);
  }
  ~Txn() {
    if (open_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
  const absl::Status& begin_status() const { return begin_status_; }
  absl::Status Commit() {
    char* err = nullptr;
    int rc = sqlite3_exec(db_, "COMMIT", nullptr, nullptr, &err);
    absl::Status s = absl::OkStatus();
    if (rc != SQLITE_OK) {
      s = absl::InternalError(absl::StrCat("sqlite: COMMIT: ", err ? err : sqlite3_errmsg(db_)));
    } else {
      open_ = false;
    }
    sqlite3_free(err);
    return s;
  }

 private:
  sqlite3* db_;
  bool open_ = false;
  absl::Status begin_status_;
};

std::string DevicesToText(const google::protobuf::RepeatedField<int32_t>& devices) {
  return absl::StrJoin(devices, ",");
}

absl::Status DevicesFromText(const std::string& text, v1::Job* job) {
  job->clear_devices();
  if (text.empty()) return absl::OkStatus();
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int v;
    if (!absl::SimpleAtoi(part, &v)) {
      return absl::DataLossError(
          absl::StrCat("job ", job->id(), ": malformed devices column \"", text, "\""));
    }
    job->add_devices(v);
  }
  return absl::OkStatus();
}

constexpr char kJobColumns[] =
    "id, submit_order, name, spec_yaml, spec, state, reason, message, priority, attempt, "
    "retries_used, max_retries, worker, devices, created_us, started_us, finished_us, "
    "last_step, last_loss, last_checkpoint_step, next_event_seq, cancel_requested";

absl::StatusOr<JobRecord> ReadJobRow(Stmt& s) {
  JobRecord r;
  v1::Job& j = r.job;
  j.set_id(s.Text(0));
  r.submit_order = s.Int(1);
  j.set_spec_yaml(s.Text(3));
  if (!j.mutable_spec()->ParseFromString(s.Blob(4))) {
    return absl::DataLossError(absl::StrCat("job ", j.id(), ": stored spec does not parse"));
  }
  j.set_state(static_cast<v1::JobState>(s.Int(5)));
  j.set_reason(static_cast<v1::FailureReason>(s.Int(6)));
  j.set_message(s.Text(7));
  j.set_attempt(static_cast<int32_t>(s.Int(9)));
  r.retries_used = static_cast<int32_t>(s.Int(10));
  j.set_worker(s.Text(12));
  RETURN_IF_ERROR(DevicesFromText(s.Text(13), &j));
  *j.mutable_created_at() = ToProtoTime(absl::FromUnixMicros(s.Int(14)));
  if (!s.IsNull(15)) *j.mutable_started_at() = ToProtoTime(absl::FromUnixMicros(s.Int(15)));
  if (!s.IsNull(16)) *j.mutable_finished_at() = ToProtoTime(absl::FromUnixMicros(s.Int(16)));
  j.set_last_step(static_cast<int32_t>(s.Int(17)));
  j.set_last_loss(s.Double(18));
  j.set_last_checkpoint_step(static_cast<int32_t>(s.Int(19)));
  j.set_last_event_seq(s.Int(20) - 1);
  j.set_cancel_requested(s.Int(21) != 0);
  return r;
}

v1::JobEvent ReadEventRow(Stmt& s) {
  // Columns: job_id, seq, attempt, rank, type, time_us, payload_json.
  v1::JobEvent e;
  e.set_job_id(s.Text(0));
  e.set_seq(s.Int(1));
  e.set_attempt(static_cast<int32_t>(s.Int(2)));
  e.set_rank(static_cast<int32_t>(s.Int(3)));
  e.set_type(static_cast<v1::EventType>(s.Int(4)));
  *e.mutable_time() = ToProtoTime(absl::FromUnixMicros(s.Int(5)));
  e.set_payload_json(s.Text(6));
  return e;
}

}  // namespace

absl::StatusOr<std::unique_ptr<JobStore>> JobStore::Open(const std::string& path) {
  sqlite3* db = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &db,
                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                           nullptr);
  if (rc != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    sqlite3_close(db);
    return absl::UnavailableError(absl::StrCat(
        "cannot open database ", path, ": ", msg,
        " (check that the directory exists and is writable, or pass another --db)"));
  }
  std::unique_ptr<JobStore> store(new JobStore(db));
  sqlite3_busy_timeout(db, kBusyTimeoutMs);
  {
    // journal_mode returns a row with the mode in effect; anything but "wal"
    // (":memory:" says "memory") is accepted only for in-memory databases.
    Stmt s(db, "PRAGMA journal_mode=WAL");
    RETURN_IF_ERROR(s.status());
    ASSIGN_OR_RETURN(bool row, s.Step());
    std::string mode = row ? s.Text(0) : "";
    if (mode != "wal" && path != ":memory:") {
      return absl::FailedPreconditionError(absl::StrCat(
          "database ", path, " cannot use WAL journaling (got \"", mode,
          "\"); put --db on a local filesystem"));
    }
  }
  RETURN_IF_ERROR(store->Exec("PRAGMA synchronous=FULL"));
  RETURN_IF_ERROR(store->Exec("PRAGMA foreign_keys=ON"));
  RETURN_IF_ERROR(store->Migrate());
  return store;
}

JobStore::~JobStore() { sqlite3_close(db_); }

absl::Status JobStore::Exec(const std::string& sql) {
  char* err = nullptr;
  int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err);
  if (rc != SQLITE_OK) {
    absl::Status s = absl::InternalError(absl::StrCat("sqlite: ", err ? err : sqlite3_errmsg(db_)));
    sqlite3_free(err);
    return s;
  }
  return absl::OkStatus();
}

absl::Status JobStore::Migrate() {
  std::lock_guard<std::mutex> lock(mu_);
  RETURN_IF_ERROR(Exec(
      "CREATE TABLE IF NOT EXISTS schema_migrations ("
      " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_us INTEGER NOT NULL)"));
  const std::vector<Migration>& migrations = EmbeddedMigrations();
  for (size_t i = 0; i < migrations.size(); ++i) {
    if (migrations[i].version != static_cast<int>(i) + 1) {
      return absl::InternalError(absl::StrCat("embedded migration ", migrations[i].name,
                                              " breaks the 1, 2, 3, ... numbering"));
    }
  }
  int current = 0;
  {
    Stmt s(db_, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations");
    RETURN_IF_ERROR(s.status());
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (row) current = static_cast<int>(s.Int(0));
  }
  int known = static_cast<int>(migrations.size());
  if (current > known) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the database has schema version ", current, " but this tune-server knows up to ",
        known, "; run a newer tune-server"));
  }
  for (int v = current + 1; v <= known; ++v) {
    const Migration& m = migrations[v - 1];
    Txn txn(db_);
    RETURN_IF_ERROR(txn.begin_status());
    absl::Status s = Exec(m.sql);
    if (!s.ok()) {
      return absl::InternalError(absl::StrCat("migration ", m.name, " failed: ", s.message()));
    }
    Stmt ins(db_, "INSERT INTO schema_migrations(version, name, applied_us) VALUES (?, ?, ?)");
    RETURN_IF_ERROR(ins.status());
    ins.Bind(1, m.version);
    ins.Bind(2, m.name);
    ins.Bind(3, ToMicros(absl::Now()));
    RETURN_IF_ERROR(ins.Run());
    RETURN_IF_ERROR(txn.Commit());
  }
  return absl::OkStatus();
}

absl::StatusOr<int> JobStore::SchemaVersion() {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt s(db_, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations");
  RETURN_IF_ERROR(s.status());
  ASSIGN_OR_RETURN(bool row, s.Step());
  return row ? static_cast<int>(s.Int(0)) : 0;
}

absl::Status JobStore::WriteJobRowLocked(const JobRecord& r, bool insert) {
  const v1::Job& j = r.job;
  const char* sql =
      insert ? "INSERT INTO jobs(id, submit_order, name, spec_yaml, spec, state, reason, message, "
               "priority, attempt, retries_used, max_retries, worker, devices, created_us, "
               "started_us, finished_us, last_step, last_loss, last_checkpoint_step, "
               "cancel_requested, next_event_seq) "
               "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, "
               "?17, ?18, ?19, ?20, ?21, 1)"
             : "UPDATE jobs SET submit_order=?2, name=?3, spec_yaml=?4, spec=?5, state=?6, "
               "reason=?7, message=?8, priority=?9, attempt=?10, retries_used=?11, "
               "max_retries=?12, worker=?13, devices=?14, created_us=?15, started_us=?16, "
               "finished_us=?17, last_step=?18, last_loss=?19, last_checkpoint_step=?20, "
               "cancel_requested=?21 WHERE id=?1";
  Stmt s(db_, sql);
  RETURN_IF_ERROR(s.status());
  s.Bind(1, j.id());
  s.Bind(2, r.submit_order);
  s.Bind(3, j.spec().name());
  s.Bind(4, j.spec_yaml());
  s.BindBlob(5, j.spec().SerializeAsString());
  s.Bind(6, static_cast<int>(j.state()));
  s.Bind(7, static_cast<int>(j.reason()));
  s.Bind(8, j.message());
  s.Bind(9, j.spec().priority());
  s.Bind(10, j.attempt());
  s.Bind(11, r.retries_used);
  s.Bind(12, j.spec().max_retries());
  s.Bind(13, j.worker());
  s.Bind(14, DevicesToText(j.devices()));
  s.Bind(15, ToMicros(FromProtoTime(j.created_at())));
  if (j.has_started_at()) {
    s.Bind(16, ToMicros(FromProtoTime(j.started_at())));
  } else {
    s.BindNull(16);
  }
  if (j.has_finished_at()) {
    s.Bind(17, ToMicros(FromProtoTime(j.finished_at())));
  } else {
    s.BindNull(17);
  }
  s.Bind(18, j.last_step());
  s.Bind(19, j.last_loss());
  s.Bind(20, j.last_checkpoint_step());
  s.Bind(21, j.cancel_requested() ? 1 : 0);
  RETURN_IF_ERROR(s.Run());
  if (!insert && sqlite3_changes(db_) == 0) {
    return absl::NotFoundError(absl::StrCat("job ", j.id(), " not found"));
  }
  return absl::OkStatus();
}

absl::Status JobStore::AppendEventsLocked(const std::string& job_id,
                                          const std::vector<NewEvent>& events,
                                          std::vector<v1::JobEvent>* appended) {
  if (events.empty()) return absl::OkStatus();
  int64_t next;
  {
    Stmt s(db_, "SELECT next_event_seq FROM jobs WHERE id=?");
    RETURN_IF_ERROR(s.status());
    s.Bind(1, job_id);
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
    next = s.Int(0);
  }
  Stmt ins(db_,
           "INSERT INTO events(job_id, seq, attempt, rank, source_seq, type, time_us, "
           "payload_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)");
  RETURN_IF_ERROR(ins.status());
  for (const NewEvent& e : events) {
    ins.Reset();
    ins.Bind(1, job_id);
    ins.Bind(2, next);
    ins.Bind(3, e.attempt);
    ins.Bind(4, e.rank);
    if (e.source_seq > 0) {
      ins.Bind(5, e.source_seq);
    } else {
      ins.BindNull(5);
    }
    ins.Bind(6, static_cast<int>(e.type));
    ins.Bind(7, ToMicros(e.time));
    ins.Bind(8, e.payload_json);
    RETURN_IF_ERROR(ins.Run());
    if (appended) {
      v1::JobEvent out;
      out.set_seq(next);
      out.set_job_id(job_id);
      out.set_attempt(e.attempt);
      out.set_rank(e.rank);
      out.set_type(e.type);
      *out.mutable_time() = ToProtoTime(absl::FromUnixMicros(ToMicros(e.time)));
      out.set_payload_json(e.payload_json);
      appended->push_back(std::move(out));
    }
    ++next;
  }
  Stmt upd(db_, "UPDATE jobs SET next_event_seq=? WHERE id=?");
  RETURN_IF_ERROR(upd.status());
  upd.Bind(1, next);
  upd.Bind(2, job_id);
  return upd.Run();
}

absl::StatusOr<JobRecord> JobStore::InsertJob(JobRecord job, const std::vector<NewEvent>& events,
                                              std::vector<v1::JobEvent>* appended) {
  std::lock_guard<std::mutex> lock(mu_);
  Txn txn(db_);
  RETURN_IF_ERROR(txn.begin_status());
  {
    Stmt s(db_, "SELECT COALESCE(MAX(submit_order), 0) + 1 FROM jobs");
    RETURN_IF_ERROR(s.status());
    ASSIGN_OR_RETURN(bool row, s.Step());
    job.submit_order = row ? s.Int(0) : 1;
  }
  job.job.set_id(absl::StrFormat("job-%06d", job.submit_order));
  RETURN_IF_ERROR(WriteJobRowLocked(job, /*insert=*/true));
  std::vector<v1::JobEvent> local;
  RETURN_IF_ERROR(AppendEventsLocked(job.id(), events, &local));
  ASSIGN_OR_RETURN(JobRecord stored, GetJobLocked(job.id()));
  RETURN_IF_ERROR(txn.Commit());
  if (appended) appended->insert(appended->end(), local.begin(), local.end());
  return stored;
}

absl::Status JobStore::UpdateJob(const JobRecord& job, const std::vector<NewEvent>& events,
                                 std::vector<v1::JobEvent>* appended) {
  std::lock_guard<std::mutex> lock(mu_);
  Txn txn(db_);
  RETURN_IF_ERROR(txn.begin_status());
  RETURN_IF_ERROR(WriteJobRowLocked(job, /*insert=*/false));
  std::vector<v1::JobEvent> local;
  RETURN_IF_ERROR(AppendEventsLocked(job.id(), events, &local));
  RETURN_IF_ERROR(txn.Commit());
  if (appended) appended->insert(appended->end(), local.begin(), local.end());
  return absl::OkStatus();
}

absl::StatusOr<AgentEventResult> JobStore::AppendAgentEvent(const std::string& job_id,
                                                            const NewEvent& event,
                                                            const JobRecord* job_update,
                                                            const std::vector<NewEvent>& extra) {
  if (event.source_seq <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("agent event of ", job_id, " has source_seq ", event.source_seq,
                     "; workers number events from 1"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  Txn txn(db_);
  RETURN_IF_ERROR(txn.begin_status());
  AgentEventResult result;
  {
    Stmt s(db_, "SELECT 1 FROM events WHERE job_id=? AND attempt=? AND source_seq=?");
    RETURN_IF_ERROR(s.status());
    s.Bind(1, job_id);
    s.Bind(2, event.attempt);
    s.Bind(3, event.source_seq);
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (row) {
      result.duplicate = true;
      return result;  // Txn rolls back; nothing was written.
    }
  }
  std::vector<NewEvent> all;
  all.reserve(1 + extra.size());
  all.push_back(event);
  all.insert(all.end(), extra.begin(), extra.end());
  if (job_update) RETURN_IF_ERROR(WriteJobRowLocked(*job_update, /*insert=*/false));
  RETURN_IF_ERROR(AppendEventsLocked(job_id, all, &result.appended));
  RETURN_IF_ERROR(txn.Commit());
  return result;
}

absl::StatusOr<JobRecord> JobStore::GetJobLocked(const std::string& id) {
  Stmt s(db_, absl::StrCat("SELECT ", kJobColumns, " FROM jobs WHERE id=?"));
  RETURN_IF_ERROR(s.status());
  s.Bind(1, id);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  return ReadJobRow(s);
}

absl::StatusOr<JobRecord> JobStore::GetJob(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  return GetJobLocked(id);
}

absl::StatusOr<std::vector<JobRecord>> JobStore::ListJobs(const std::vector<v1::JobState>& states,
                                                          int limit) {
  std::string sql = absl::StrCat("SELECT ", kJobColumns, " FROM jobs");
  if (!states.empty()) {
    std::vector<int> ints(states.begin(), states.end());
    absl::StrAppend(&sql, " WHERE state IN (", absl::StrJoin(ints, ","), ")");
  }
  absl::StrAppend(&sql, " ORDER BY submit_order DESC");
  if (limit > 0) absl::StrAppend(&sql, " LIMIT ", limit);
  std::lock_guard<std::mutex> lock(mu_);
  Stmt s(db_, sql);
  RETURN_IF_ERROR(s.status());
  std::vector<JobRecord> out;
  while (true) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    ASSIGN_OR_RETURN(JobRecord r, ReadJobRow(s));
    out.push_back(std::move(r));
  }
  return out;
}

absl::StatusOr<std::map<v1::JobState, int>> JobStore::CountJobsByState() {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt s(db_, "SELECT state, COUNT(*) FROM jobs GROUP BY state");
  RETURN_IF_ERROR(s.status());
  std::map<v1::JobState, int> out;
  while (true) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    out[static_cast<v1::JobState>(s.Int(0))] = static_cast<int>(s.Int(1));
  }
  return out;
}

absl::StatusOr<EventPage> JobStore::ListEvents(const std::string& job_id, int64_t after_seq,
                                               int limit) {
  if (limit < 1) limit = 1;
  std::lock_guard<std::mutex> lock(mu_);
  {
    Stmt s(db_, "SELECT 1 FROM jobs WHERE id=?");
    RETURN_IF_ERROR(s.status());
    s.Bind(1, job_id);
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  }
  Stmt s(db_,
         "SELECT job_id, seq, attempt, rank, type, time_us, payload_json FROM events "
         "WHERE job_id=? AND seq>? ORDER BY seq LIMIT ?");
  RETURN_IF_ERROR(s.status());
  s.Bind(1, job_id);
  s.Bind(2, after_seq);
  s.Bind(3, static_cast<int64_t>(limit) + 1);  // One extra row tells whether more exist.
  EventPage page;
  while (true) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    if (static_cast<int>(page.events.size()) == limit) {
      page.more = true;
      break;
    }
    page.events.push_back(ReadEventRow(s));
  }
  return page;
}

absl::StatusOr<std::optional<v1::JobEvent>> JobStore::LastStateEventAtOrBefore(
    const std::string& job_id, int64_t seq) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt s(db_,
         "SELECT job_id, seq, attempt, rank, type, time_us, payload_json FROM events "
         "WHERE job_id=? AND seq<=? AND type=? ORDER BY seq DESC LIMIT 1");
  RETURN_IF_ERROR(s.status());
  s.Bind(1, job_id);
  s.Bind(2, seq);
  s.Bind(3, static_cast<int>(v1::EVENT_TYPE_STATE));
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return std::optional<v1::JobEvent>();
  return std::optional<v1::JobEvent>(ReadEventRow(s));
}

absl::Status JobStore::UpsertWorker(const WorkerRecord& w) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt s(db_,
         "INSERT INTO workers(name, info, state, last_heartbeat_us) VALUES (?, ?, ?, ?) "
         "ON CONFLICT(name) DO UPDATE SET info=excluded.info, state=excluded.state, "
         "last_heartbeat_us=excluded.last_heartbeat_us");
  RETURN_IF_ERROR(s.status());
  s.Bind(1, w.info.name());
  s.BindBlob(2, w.info.SerializeAsString());
  s.Bind(3, static_cast<int>(w.state));
  s.Bind(4, ToMicros(w.last_heartbeat));
  return s.Run();
}

absl::StatusOr<std::vector<WorkerRecord>> JobStore::ListWorkers() {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt s(db_, "SELECT name, info, state, last_heartbeat_us FROM workers ORDER BY name");
  RETURN_IF_ERROR(s.status());
  std::vector<WorkerRecord> out;
  while (true) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    WorkerRecord w;
    if (!w.info.ParseFromString(s.Blob(1))) {
      return absl::DataLossError(absl::StrCat("worker ", s.Text(0), ": stored info does not parse"));
    }
    w.info.set_name(s.Text(0));
    w.state = static_cast<v1::WorkerState>(s.Int(2));
    w.last_heartbeat = absl::FromUnixMicros(s.Int(3));
    out.push_back(std::move(w));
  }
  return out;
}

}  // namespace tune::server
