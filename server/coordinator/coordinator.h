// The coordinator: the one owner of tune-server's moving parts. It keeps the
// active (non-terminal) jobs and the worker registry in memory, mirrors every
// change into the JobStore before it is visible or acknowledged, runs the
// scheduler on every change and on a timer, and watches heartbeats.
//
// The gRPC services (server/api/) are thin adapters over this class; tests
// drive it directly.
//
// Worker lifecycle:
//  * Register(): upserts the worker (READY) and returns a session id and the
//    attempts it reported that the server no longer wants (`stale`). An
//    attempt is wanted when the job's current attempt is that number, on that
//    worker, and SCHEDULED or RUNNING.
//  * AttachSession(): the worker's Session stream. Assignments, cancels and
//    acks go down through the session's outbox. On attach, SCHEDULED attempts
//    the worker did not report are sent again, and pending cancels too.
//  * A READY worker silent for heartbeat_timeout becomes LOST; its attempts
//    are requeued (attempt + 1, resume) while retries remain, else FAILED/LOST
//    (CANCELLED when a cancel was pending). After a server restart, workers
//    get heartbeat_timeout from the restart to come back.
//  * An attempt placed on a worker must be confirmed by it: a new assignment
//    by an event or a heartbeat listing it, and an attempt the worker did not
//    report at Register, or stopped listing in its heartbeats, by showing up
//    again (or ending with `exited`). Unconfirmed for heartbeat_timeout, it
//    counts as lost.
//
// Every state change appends a server `state` event (rank -1, attempt 0) in
// the same transaction as the job row.
#ifndef TUNE_SERVER_COORDINATOR_COORDINATOR_H_
#define TUNE_SERVER_COORDINATOR_COORDINATOR_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/jobs/job_record.h"
#include "server/metrics/metrics.h"
#include "server/store/job_store.h"
#include "tune/v1/agent_service.pb.h"
#include "tune/v1/job_service.pb.h"

namespace tune::server {

struct CoordinatorOptions {
  // A worker silent this long is LOST.
  absl::Duration heartbeat_timeout = absl::Seconds(30);
  // What workers are told to use.
  absl::Duration heartbeat_interval = absl::Seconds(1);
  // SIGTERM -> SIGKILL grace sent with CancelAttempt.
  absl::Duration cancel_grace = absl::Seconds(10);
  // Scheduling / monitoring timer of the background loop.
  absl::Duration tick = absl::Seconds(1);
  // Workers must present this in Register (empty: no check).
  std::string join_token;
  // Clock; tests substitute a fake one.
  std::function<absl::Time()> clock = [] { return absl::Now(); };
};

// The server side of one worker Session stream: an outbox that one writer
// drains. Thread-safe.
class AgentSession {
 public:
  AgentSession(std::string worker, std::string id) : worker_(std::move(worker)), id_(std::move(id)) {}
  const std::string& worker() const { return worker_; }
  const std::string& id() const { return id_; }

  // Queues a message (dropped when closed: it is derived again on reconnect).
  void Push(v1::ServerMessage msg);
  // Waits up to `timeout` for a message. Returns true with *out filled, or
  // false on timeout or when closed (check closed()).
  bool Next(v1::ServerMessage* out, absl::Duration timeout);
  // Ends the session (superseded, worker lost, shutdown); wakes the writer.
  void Close();
  bool closed() const;
  // Messages queued and not yet taken (tests).
  std::vector<v1::ServerMessage> Drain();

 private:
  const std::string worker_;
  const std::string id_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<v1::ServerMessage> queue_;
  bool closed_ = false;
};

class Coordinator {
 public:
  // `store` must outlive the coordinator; `metrics` may be null.
  Coordinator(JobStore* store, ServerMetrics* metrics, CoordinatorOptions options);
  ~Coordinator();
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  // Loads active jobs and known workers from the store. Call once, before Start().
  absl::Status Recover();
  // Starts the background loop (scheduling + heartbeat monitor).
  void Start();
  // Stops the loop, closes every session and wakes watchers. Idempotent.
  void Shutdown();
  bool shutting_down() const;

  // One pass of the loop: heartbeat/attempt monitor, then scheduling.
  void Tick();

  // --- JobService ---
  // Queues a validated spec (paths absolute) with its canonical YAML.
  absl::StatusOr<v1::Job> Submit(const v1::JobSpec& spec, const std::string& spec_yaml);
  absl::StatusOr<v1::Job> GetJob(const std::string& id);
  // Newest first; `limit` <= 0 means 100.
  absl::StatusOr<std::vector<v1::Job>> ListJobs(const std::vector<v1::JobState>& states, int limit);
  absl::StatusOr<v1::Job> Cancel(const std::string& id);
  // `limit` <= 0 means 1000; capped at 10000.
  absl::StatusOr<EventPage> GetJobEvents(const std::string& id, int64_t after_seq, int limit);
  std::vector<v1::Worker> ListWorkers();
  // Replays events with seq > after_seq, then follows new ones, calling `send`
  // for each (with the job as of that event). Returns OK after the event that
  // puts the job in a terminal state (or at once when that event is at or
  // before after_seq), when `send` returns false, or when `cancelled` returns
  // true; UNAVAILABLE when the server shuts down; NOT_FOUND for unknown jobs.
  absl::Status Watch(const std::string& id, int64_t after_seq,
                     const std::function<bool(const v1::WatchJobResponse&)>& send,
                     const std::function<bool()>& cancelled);

  // --- AgentService ---
  absl::StatusOr<v1::RegisterResponse> Register(const v1::RegisterRequest& request);
  // FAILED_PRECONDITION when the id is not the worker's current registration.
  absl::StatusOr<std::shared_ptr<AgentSession>> AttachSession(const std::string& session_id);
  absl::Status Heartbeat(AgentSession& session, const v1::Heartbeat& heartbeat);
  // Persists the event (once per job/attempt/source_seq), applies it to the
  // job when it belongs to the current attempt, and returns the ack to send.
  absl::StatusOr<v1::EventAck> HandleAgentEvent(AgentSession& session,
                                                const v1::AgentEvent& event);
  // The stream ended; the worker stays READY until its heartbeat times out.
  void DetachSession(AgentSession& session);

 private:
  struct WorkerEntry {
    v1::WorkerInfo info;
    v1::WorkerState state = v1::WORKER_STATE_UNSPECIFIED;
    absl::Time last_heartbeat;
    absl::Time last_persisted;
    std::string session_id;                  // Of the latest Register.
    std::shared_ptr<AgentSession> session;   // Attached stream, if any.
    std::set<std::pair<std::string, int>> registered_running;  // Reported at Register.
    std::vector<v1::GpuStats> gpu_stats;
    std::map<std::pair<std::string, int>, absl::Time> cancels_sent;  // Stale attempts.
  };

  absl::Time Now() const { return options_.clock(); }
  void Kick();
  void NotifyWatchers();
  void Loop();

  // All *Locked helpers need mu_.
  // Writes `updated` (and a state event when its state differs from the
  // active copy) and updates the in-memory view.
  absl::Status CommitJobLocked(const JobRecord& updated, absl::Time now);
  void AfterCommitLocked(const JobRecord& before, JobRecord updated,
                         const std::vector<v1::JobEvent>& appended, absl::Time now);
  void WorkerLostLocked(WorkerEntry& worker, absl::Time now);
  void AttemptLostLocked(const std::string& job_id, const std::string& why, absl::Time now);
  void ScheduleLocked(absl::Time now);
  void UpdateGaugesLocked();
  v1::ServerMessage AssignmentFor(const JobRecord& job) const;
  v1::ServerMessage CancelFor(const std::string& job_id, int attempt) const;
  void PushToWorkerLocked(const std::string& worker, v1::ServerMessage msg);
  void CancelStaleLocked(WorkerEntry& worker, const std::string& job_id, int attempt,
                         absl::Time now);
  bool IsWantedLocked(const std::string& worker, const std::string& job_id, int attempt) const;
  v1::Worker WorkerViewLocked(const WorkerEntry& w) const;
  void PersistWorkerLocked(WorkerEntry& w, absl::Time now);
  std::string NewSessionId();

  JobStore* const store_;
  ServerMetrics* const metrics_;
  const CoordinatorOptions options_;

  mutable std::mutex mu_;
  std::map<std::string, JobRecord> active_;          // Non-terminal jobs by id.
  std::map<std::string, absl::Time> queued_since_;   // QUEUED jobs.
  std::map<std::string, std::string> pending_reasons_;
  std::map<std::string, absl::Time> unconfirmed_;    // Attempts to be confirmed by the worker.
  std::map<std::string, WorkerEntry> workers_;
  std::map<v1::JobState, int> terminal_counts_;
  bool kicked_ = false;
  bool stopping_ = false;
  std::condition_variable loop_cv_;
  std::thread loop_;

  // Watchers wait here for new events.
  mutable std::mutex notify_mu_;
  std::condition_variable notify_cv_;
  uint64_t event_version_ = 0;
};

}  // namespace tune::server

#endif  // TUNE_SERVER_COORDINATOR_COORDINATOR_H_
