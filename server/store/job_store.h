// JobStore: the durable state of tune-server (jobs, their events, workers) in
// SQLite.
//
// Contract:
//  * The database runs in WAL mode with synchronous=FULL, foreign keys on and a
//    busy timeout, so a call that returned OK survives a crash of the process
//    (and of the machine): callers acknowledge only after it returns.
//  * Schema changes are the numbered migrations embedded in the binary
//    (server/store/migrations/NNNN_name.sql); Open applies the missing ones in
//    order, each in its own transaction, and records them in schema_migrations.
//    A database written by a newer tune-server is refused.
//  * Every job has a gap-free event sequence 1, 2, 3, ...; the store assigns it
//    in the same transaction that writes the events and the job row, so
//    `JobRecord::job.last_event_seq` always equals the newest stored seq.
//  * Agent events are unique per (job, attempt, source_seq): a resent event is
//    reported as a duplicate and changes nothing.
//  * Thread-safe: calls are serialised on one connection.
#ifndef TUNE_SERVER_STORE_JOB_STORE_H_
#define TUNE_SERVER_STORE_JOB_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/jobs/job_record.h"
#include "tune/v1/job.pb.h"
#include "tune/v1/worker.pb.h"

struct sqlite3;

namespace tune::server {

// An event to append; the store gives it its per-job seq.
struct NewEvent {
  int32_t attempt = 0;     // 0 for server events.
  int32_t rank = -1;       // -1 for agent and server events.
  int64_t source_seq = 0;  // Worker numbering (> 0); 0 for server events.
  v1::EventType type = v1::EVENT_TYPE_UNSPECIFIED;
  absl::Time time = absl::UnixEpoch();
  std::string payload_json = "{}";
};

struct WorkerRecord {
  v1::WorkerInfo info;
  v1::WorkerState state = v1::WORKER_STATE_UNSPECIFIED;
  absl::Time last_heartbeat = absl::UnixEpoch();
};

struct EventPage {
  std::vector<v1::JobEvent> events;  // seq ascending.
  bool more = false;                 // Events after the last one exist.
};

struct AgentEventResult {
  // True when (job, attempt, source_seq) was stored before; nothing changed.
  bool duplicate = false;
  // The agent event followed by the extra events, with their seqs (empty when
  // duplicate).
  std::vector<v1::JobEvent> appended;
};

class JobStore {
 public:
  // Opens (creating when missing) the database at `path` and migrates it.
  // ":memory:" gives a private in-memory database (tests).
  static absl::StatusOr<std::unique_ptr<JobStore>> Open(const std::string& path);
  ~JobStore();
  JobStore(const JobStore&) = delete;
  JobStore& operator=(const JobStore&) = delete;

  // Highest applied migration version.
  absl::StatusOr<int> SchemaVersion();

  // Inserts a new job. Assigns submit_order and the id "job-NNNNNN" (ignoring
  // any id in `job`), writes the row and appends `events`, atomically.
  // Returns the stored record (with id, submit_order and last_event_seq).
  absl::StatusOr<JobRecord> InsertJob(JobRecord job, const std::vector<NewEvent>& events,
                                      std::vector<v1::JobEvent>* appended = nullptr);

  // Writes every column of `job` (found by id; NOT_FOUND otherwise) except the
  // event counter, and appends `events`, atomically. `job.last_event_seq` is
  // ignored; the stored value advances by events.size().
  absl::Status UpdateJob(const JobRecord& job, const std::vector<NewEvent>& events,
                         std::vector<v1::JobEvent>* appended = nullptr);

  // Stores an agent event (event.source_seq > 0) of job `job_id` unless the same
  // (job, attempt, source_seq) is already stored. When it is new, also writes
  // `job_update` (when not null; same rules as UpdateJob) and appends `extra`
  // after it, all in one transaction. NOT_FOUND when the job does not exist.
  absl::StatusOr<AgentEventResult> AppendAgentEvent(const std::string& job_id,
                                                    const NewEvent& event,
                                                    const JobRecord* job_update,
                                                    const std::vector<NewEvent>& extra);

  // NOT_FOUND when there is no such job.
  absl::StatusOr<JobRecord> GetJob(const std::string& id);
  // Jobs in any of `states` (all when empty), newest first; `limit` <= 0: all.
  absl::StatusOr<std::vector<JobRecord>> ListJobs(const std::vector<v1::JobState>& states,
                                                  int limit);

  // Number of jobs in each state.
  absl::StatusOr<std::map<v1::JobState, int>> CountJobsByState();

  // Events of `job_id` with seq > after_seq, at most `limit` (>= 1).
  // NOT_FOUND when there is no such job.
  absl::StatusOr<EventPage> ListEvents(const std::string& job_id, int64_t after_seq,
                                       int limit);
  // The newest server `state` event with seq <= `seq`, if any.
  absl::StatusOr<std::optional<v1::JobEvent>> LastStateEventAtOrBefore(
      const std::string& job_id, int64_t seq);

  // Inserts or replaces the worker named info.name.
  absl::Status UpsertWorker(const WorkerRecord& worker);
  // All workers by name.
  absl::StatusOr<std::vector<WorkerRecord>> ListWorkers();

 private:
  explicit JobStore(sqlite3* db) : db_(db) {}
  absl::Status Migrate();
  absl::Status Exec(const std::string& sql);
  // Helpers that run inside an open transaction.
  absl::Status WriteJobRowLocked(const JobRecord& job, bool insert);
  absl::Status AppendEventsLocked(const std::string& job_id, const std::vector<NewEvent>& events,
                                  std::vector<v1::JobEvent>* appended);
  absl::StatusOr<JobRecord> GetJobLocked(const std::string& id);

  std::mutex mu_;
  sqlite3* db_;
};

}  // namespace tune::server

#endif  // TUNE_SERVER_STORE_JOB_STORE_H_
