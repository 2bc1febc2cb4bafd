#include "server/coordinator/coordinator.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/control/spec_proto.h"
#include "common/control/status_macros.h"
#include "common/control/time_util.h"
#include "server/jobs/job_state_machine.h"
#include "server/scheduler/scheduler.h"

namespace tune::server {
namespace {

constexpr int kDefaultListLimit = 100;
constexpr int kDefaultEventLimit = 1000;
constexpr int kMaxEventLimit = 10000;
constexpr int kWatchPage = 500;
// How often the last heartbeat of a connected worker is written to the store.
constexpr absl::Duration kPersistHeartbeatEvery = absl::Seconds(10);
// A stale attempt a worker keeps reporting gets a CancelAttempt at most this often.
constexpr absl::Duration kStaleCancelEvery = absl::Seconds(10);

NewEvent StateEvent(const v1::Job& job, absl::Time now) {
  nlohmann::json p = {
      {"type", "state"},
      {"time", static_cast<double>(absl::ToUnixMicros(now)) / 1e6},
      {"rank", -1},
      {"state", JobStateName(job.state())},
      {"reason", FailureReasonName(job.reason())},
      {"message", job.message()},
      {"attempt", job.attempt()},
      {"worker", job.worker()},
  };
  NewEvent e;
  e.attempt = 0;
  e.rank = -1;
  e.type = v1::EVENT_TYPE_STATE;
  e.time = now;
  e.payload_json = p.dump();
  return e;
}

// A JSON number, or the strings "nan"/"inf"/"-inf" the trainer writes for
// non-finite values; `fallback` for anything else.
double JsonNumber(const nlohmann::json& obj, const char* key, double fallback) {
  auto it = obj.find(key);
  if (it == obj.end()) return fallback;
  if (it->is_number()) return it->get<double>();
  if (it->is_string()) {
    const std::string s = it->get<std::string>();
    if (s == "nan") return std::numeric_limits<double>::quiet_NaN();
    if (s == "inf") return std::numeric_limits<double>::infinity();
    if (s == "-inf") return -std::numeric_limits<double>::infinity();
  }
  return fallback;
}

bool IsGpuJob(const v1::JobSpec& spec) { return spec.resources().gpus() > 0; }

// The gpu label of tune_gpu_memory_bytes for `rank` of `job`: the index of
// the rank's reserved GPU, "cpu" for CPU jobs, "" for a rank out of range.
std::string MetricsDevice(const JobRecord& job, int rank) {
  if (!IsGpuJob(job.job.spec())) return rank >= 0 ? ServerMetrics::kCpuDevice : "";
  if (rank < 0 || rank >= job.job.devices_size()) return "";
  return std::to_string(job.job.devices(rank));
}

bool HoldsDevices(v1::JobState s) {
  return s == v1::JOB_STATE_SCHEDULED || s == v1::JOB_STATE_RUNNING;
}

std::string Secs(absl::Duration d) { return absl::StrFormat("%.1f s", absl::ToDoubleSeconds(d)); }

}  // namespace

// ---------------------------------------------------------------- AgentSession

void AgentSession::Push(v1::ServerMessage msg) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    queue_.push_back(std::move(msg));
  }
  cv_.notify_all();
}

bool AgentSession::Next(v1::ServerMessage* out, absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
               [&] { return closed_ || !queue_.empty(); });
  if (closed_ || queue_.empty()) return false;
  *out = std::move(queue_.front());
  queue_.pop_front();
  return true;
}

void AgentSession::Close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    queue_.clear();
  }
  cv_.notify_all();
}

bool AgentSession::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

std::vector<v1::ServerMessage> AgentSession::Drain() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<v1::ServerMessage> out(queue_.begin(), queue_.end());
  queue_.clear();
  return out;
}

// ----------------------------------------------------------------- Coordinator

Coordinator::Coordinator(JobStore* store, ServerMetrics* metrics, CoordinatorOptions options)
    : store_(store), metrics_(metrics), options_(std::move(options)) {}

Coordinator::~Coordinator() { Shutdown(); }

absl::Status Coordinator::Recover() {
  std::lock_guard<std::mutex> lock(mu_);
  const absl::Time now = Now();
  ASSIGN_OR_RETURN(std::vector<WorkerRecord> workers, store_->ListWorkers());
  for (WorkerRecord& w : workers) {
    WorkerEntry& e = workers_[w.info.name()];
    e.info = w.info;
    e.state = w.state;
    // A worker that was READY gets a full heartbeat timeout from now to
    // reconnect before its attempts are given up.
    e.last_heartbeat = w.state == v1::WORKER_STATE_READY ? now : w.last_heartbeat;
    e.last_persisted = now;
  }
  ASSIGN_OR_RETURN(std::vector<JobRecord> jobs,
                   store_->ListJobs({v1::JOB_STATE_QUEUED, v1::JOB_STATE_SCHEDULED,
                                     v1::JOB_STATE_RUNNING},
                                    0));
  for (JobRecord& j : jobs) {
    if (j.state() == v1::JOB_STATE_QUEUED) queued_since_[j.id()] = now;
    active_[j.id()] = std::move(j);
  }
  ASSIGN_OR_RETURN(auto counts, store_->CountJobsByState());
  for (const auto& [state, n] : counts) {
    if (IsTerminal(state)) terminal_counts_[state] = n;
  }
  spdlog::info("recovered {} active job(s) and {} worker(s) from the store", active_.size(),
               workers_.size());
  UpdateGaugesLocked();
  return absl::OkStatus();
}

void Coordinator::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (loop_.joinable() || stopping_) return;
  loop_ = std::thread([this] { Loop(); });
}

void Coordinator::Shutdown() {
  std::vector<std::shared_ptr<AgentSession>> sessions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    for (auto& [name, w] : workers_) {
      if (w.session) sessions.push_back(w.session);
    }
  }
  loop_cv_.notify_all();
  for (auto& s : sessions) s->Close();
  NotifyWatchers();
  if (loop_.joinable() && loop_.get_id() != std::this_thread::get_id()) loop_.join();
}

bool Coordinator::shutting_down() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stopping_;
}

void Coordinator::Kick() {
  kicked_ = true;
  loop_cv_.notify_all();
}

void Coordinator::NotifyWatchers() {
  {
    std::lock_guard<std::mutex> lock(notify_mu_);
    ++event_version_;
  }
  notify_cv_.notify_all();
}

void Coordinator::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    loop_cv_.wait_for(lock, absl::ToChronoNanoseconds(options_.tick),
                      [&] { return kicked_ || stopping_; });
    if (stopping_) break;
    kicked_ = false;
    lock.unlock();
    Tick();
    lock.lock();
  }
}

void Coordinator::Tick() {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return;
  const absl::Time now = Now();
  for (auto& [name, w] : workers_) {
    if (w.state != v1::WORKER_STATE_READY) continue;
    if (now - w.last_heartbeat > options_.heartbeat_timeout) {
      WorkerLostLocked(w, now);
    } else if (w.session && now - w.last_persisted >= kPersistHeartbeatEvery) {
      PersistWorkerLocked(w, now);
    }
  }
  // Attempts whose worker is gone (lost above, unknown after a restore, or a
  // store write that failed earlier and is retried here).
  std::vector<std::string> orphans;
  for (const auto& [id, job] : active_) {
    if (!HoldsDevices(job.state())) continue;
    auto w = workers_.find(job.job.worker());
    if (w == workers_.end() || w->second.state != v1::WORKER_STATE_READY) orphans.push_back(id);
  }
  for (const std::string& id : orphans) {
    const std::string worker = active_[id].job.worker();
    AttemptLostLocked(id, absl::StrCat("worker ", worker, " lost"), now);
  }
  // Attempts a worker should have confirmed by now.
  std::vector<std::string> expired;
  for (const auto& [id, since] : unconfirmed_) {
    if (now - since > options_.heartbeat_timeout) expired.push_back(id);
  }
  for (const std::string& id : expired) {
    auto it = active_.find(id);
    if (it == active_.end() || !HoldsDevices(it->second.state())) {
      unconfirmed_.erase(id);
      continue;
    }
    const std::string worker = it->second.job.worker();
    const int attempt = it->second.job.attempt();
    AttemptLostLocked(id,
                      absl::StrCat("worker ", worker, " has not reported attempt ", attempt,
                                   " as running for ", Secs(options_.heartbeat_timeout)),
                      now);
    PushToWorkerLocked(worker, CancelFor(id, attempt));
  }
  ScheduleLocked(now);
  UpdateGaugesLocked();
}

absl::Status Coordinator::CommitJobLocked(const JobRecord& updated, absl::Time now) {
  auto it = active_.find(updated.id());
  if (it == active_.end()) {
    return absl::InternalError(absl::StrCat("job ", updated.id(), " is not active"));
  }
  const JobRecord before = it->second;
  std::vector<NewEvent> events;
  if (before.state() != updated.state()) events.push_back(StateEvent(updated.job, now));
  std::vector<v1::JobEvent> appended;
  RETURN_IF_ERROR(store_->UpdateJob(updated, events, &appended));
  AfterCommitLocked(before, updated, appended, now);
  return absl::OkStatus();
}

void Coordinator::AfterCommitLocked(const JobRecord& before, JobRecord updated,
                                    const std::vector<v1::JobEvent>& appended, absl::Time now) {
  const std::string id = updated.id();
  if (!appended.empty()) updated.job.set_last_event_seq(appended.back().seq());
  const v1::JobState from = before.state();
  const v1::JobState to = updated.state();
  if (from != to) {
    spdlog::info("{}: {} -> {} ({})", id, JobStateName(from), JobStateName(to),
                 updated.job.message());
    if (IsTerminal(to)) {
      active_.erase(id);
      queued_since_.erase(id);
      pending_reasons_.erase(id);
      unconfirmed_.erase(id);
      ++terminal_counts_[to];
      if (metrics_) metrics_->JobFinished(id);
      Kick();  // Devices were freed.
    } else if (to == v1::JOB_STATE_QUEUED) {
      queued_since_[id] = now;
      unconfirmed_.erase(id);
      Kick();
    } else if (to == v1::JOB_STATE_SCHEDULED) {
      queued_since_.erase(id);
      pending_reasons_.erase(id);
      if (metrics_) metrics_->JobStarted(id);
    } else if (to == v1::JOB_STATE_RUNNING) {
      unconfirmed_.erase(id);
    }
  }
  if (!IsTerminal(to)) active_[id] = std::move(updated);
  if (!appended.empty()) NotifyWatchers();
}

void Coordinator::WorkerLostLocked(WorkerEntry& w, absl::Time now) {
  spdlog::warn("worker {} lost: no heartbeat for {}", w.info.name(), Secs(now - w.last_heartbeat));
  w.state = v1::WORKER_STATE_LOST;
  if (w.session) {
    w.session->Close();
    w.session.reset();
  }
  w.session_id.clear();
  PersistWorkerLocked(w, now);
  std::vector<std::string> ids;
  for (const auto& [id, job] : active_) {
    if (HoldsDevices(job.state()) && job.job.worker() == w.info.name()) ids.push_back(id);
  }
  for (const std::string& id : ids) {
    AttemptLostLocked(id,
                      absl::StrCat("worker ", w.info.name(), " lost (no heartbeat for ",
                                   Secs(options_.heartbeat_timeout), ")"),
                      now);
  }
}

void Coordinator::AttemptLostLocked(const std::string& job_id, const std::string& why,
                                    absl::Time now) {
  auto it = active_.find(job_id);
  if (it == active_.end()) return;
  JobRecord copy = it->second;
  auto outcome = HandleAttemptLost(&copy, why, now);
  if (!outcome.ok()) {
    spdlog::error("{}: {}", job_id, outcome.status().ToString());
    return;
  }
  absl::Status s = CommitJobLocked(copy, now);
  if (!s.ok()) spdlog::error("{}: cannot record the lost attempt: {}", job_id, s.ToString());
}

void Coordinator::ScheduleLocked(absl::Time now) {
  std::vector<QueuedJob> queued;
  for (const auto& [id, r] : active_) {
    if (r.state() != v1::JOB_STATE_QUEUED) continue;
    QueuedJob q;
    q.id = id;
    q.priority = r.priority();
    q.submit_order = r.submit_order;
    q.gpus = r.job.spec().resources().gpus();
    q.cpu_ranks = q.gpus > 0 ? 0 : r.job.spec().resources().cpu_ranks();
    queued.push_back(q);
  }
  if (queued.empty()) {
    pending_reasons_.clear();
    return;
  }
  std::vector<WorkerCapacity> caps;
  for (const auto& [name, w] : workers_) {
    if (w.state != v1::WORKER_STATE_READY) continue;
    v1::Worker view = WorkerViewLocked(w);
    WorkerCapacity c;
    c.name = name;
    c.accepting = w.session && !w.session->closed();
    c.total_gpus = w.info.gpus_size();
    c.free_gpus.assign(view.free_gpus().begin(), view.free_gpus().end());
    c.total_cpu_slots = w.info.cpu_slots();
    // Free CPU slot indices: every slot not held by a job on this worker.
    std::set<int> used;
    for (const auto& [id, job] : active_) {
      if (HoldsDevices(job.state()) && job.job.worker() == name && !IsGpuJob(job.job.spec())) {
        used.insert(job.job.devices().begin(), job.job.devices().end());
      }
    }
    for (int i = 0; i < w.info.cpu_slots(); ++i) {
      if (!used.count(i)) c.free_cpu_slots.push_back(i);
    }
    caps.push_back(std::move(c));
  }
  ScheduleResult result = Schedule(std::move(queued), std::move(caps));
  pending_reasons_ = result.pending_reasons;
  for (const Placement& p : result.placements) {
    auto it = active_.find(p.job_id);
    if (it == active_.end()) continue;
    JobRecord copy = it->second;
    absl::Status s = ScheduleJob(&copy, p.worker, p.devices, now);
    if (s.ok()) {
      auto since = queued_since_.find(p.job_id);
      const absl::Time queued_at = since != queued_since_.end() ? since->second : now;
      s = CommitJobLocked(copy, now);
      if (s.ok()) {
        if (metrics_) metrics_->ObserveSchedulingLatency(absl::ToDoubleSeconds(now - queued_at));
        unconfirmed_[p.job_id] = now;
        PushToWorkerLocked(p.worker, AssignmentFor(active_[p.job_id]));
        continue;
      }
    }
    spdlog::error("{}: cannot schedule on {}: {}", p.job_id, p.worker, s.ToString());
  }
}

void Coordinator::UpdateGaugesLocked() {
  if (!metrics_) return;
  std::map<std::string, int> counts;
  int queued = 0;
  for (const auto& [id, j] : active_) {
    ++counts[JobStateName(j.state())];
    if (j.state() == v1::JOB_STATE_QUEUED) ++queued;
  }
  for (const auto& [state, n] : terminal_counts_) counts[JobStateName(state)] += n;
  metrics_->SetJobCounts(counts);
  metrics_->SetQueueDepth(queued);
  int ready = 0, lost = 0;
  for (const auto& [name, w] : workers_) {
    if (w.state == v1::WORKER_STATE_READY) ++ready;
    if (w.state == v1::WORKER_STATE_LOST) ++lost;
  }
  metrics_->SetWorkerCounts(ready, lost);
}

v1::ServerMessage Coordinator::AssignmentFor(const JobRecord& job) const {
  v1::ServerMessage m;
  v1::Assignment* a = m.mutable_assignment();
  a->set_job_id(job.id());
  a->set_attempt(job.job.attempt());
  a->set_spec_yaml(job.job.spec_yaml());
  *a->mutable_spec() = job.job.spec();
  if (IsGpuJob(job.job.spec())) {
    a->mutable_gpus()->CopyFrom(job.job.devices());
  } else {
    a->set_cpu_ranks(job.job.devices_size());
  }
  a->set_resume(ShouldResume(job));
  return m;
}

v1::ServerMessage Coordinator::CancelFor(const std::string& job_id, int attempt) const {
  v1::ServerMessage m;
  v1::CancelAttempt* c = m.mutable_cancel();
  c->set_job_id(job_id);
  c->set_attempt(attempt);
  c->set_grace_ms(static_cast<int32_t>(absl::ToInt64Milliseconds(options_.cancel_grace)));
  return m;
}

void Coordinator::PushToWorkerLocked(const std::string& worker, v1::ServerMessage msg) {
  auto it = workers_.find(worker);
  // Without a session the message is derived again when the worker attaches.
  if (it == workers_.end() || !it->second.session) return;
  it->second.session->Push(std::move(msg));
}

void Coordinator::CancelStaleLocked(WorkerEntry& w, const std::string& job_id, int attempt,
                                    absl::Time now) {
  auto key = std::make_pair(job_id, attempt);
  auto it = w.cancels_sent.find(key);
  if (it != w.cancels_sent.end() && now - it->second < kStaleCancelEvery) return;
  w.cancels_sent[key] = now;
  spdlog::info("worker {} runs {} attempt {}, which is not wanted; cancelling it", w.info.name(),
               job_id, attempt);
  if (w.session) w.session->Push(CancelFor(job_id, attempt));
}

bool Coordinator::IsWantedLocked(const std::string& worker, const std::string& job_id,
                                 int attempt) const {
  auto it = active_.find(job_id);
  return it != active_.end() && HoldsDevices(it->second.state()) &&
         it->second.job.worker() == worker && it->second.job.attempt() == attempt;
}

v1::Worker Coordinator::WorkerViewLocked(const WorkerEntry& w) const {
  v1::Worker out;
  *out.mutable_info() = w.info;
  out.set_state(w.state);
  *out.mutable_last_heartbeat() = ToProtoTime(w.last_heartbeat);
  std::set<int> used_gpus;
  int used_cpu = 0;
  for (const auto& [id, job] : active_) {
    if (!HoldsDevices(job.state()) || job.job.worker() != w.info.name()) continue;
    out.add_job_ids(id);
    if (IsGpuJob(job.job.spec())) {
      used_gpus.insert(job.job.devices().begin(), job.job.devices().end());
    } else {
      used_cpu += job.job.devices_size();
    }
  }
  for (const v1::GpuInfo& g : w.info.gpus()) {
    if (!used_gpus.count(g.index())) out.add_free_gpus(g.index());
  }
  out.set_free_cpu_slots(std::max(0, w.info.cpu_slots() - used_cpu));
  for (const v1::GpuStats& g : w.gpu_stats) *out.add_gpu_stats() = g;
  return out;
}

void Coordinator::PersistWorkerLocked(WorkerEntry& w, absl::Time now) {
  WorkerRecord r;
  r.info = w.info;
  r.state = w.state;
  r.last_heartbeat = w.last_heartbeat;
  absl::Status s = store_->UpsertWorker(r);
  if (!s.ok()) {
    spdlog::error("cannot store worker {}: {}", w.info.name(), s.ToString());
    return;
  }
  w.last_persisted = now;
}

std::string Coordinator::NewSessionId() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return absl::StrFormat("%016x%016x", rng(), rng());
}

// ------------------------------------------------------------------ JobService

absl::StatusOr<v1::Job> Coordinator::Submit(const v1::JobSpec& spec, const std::string& spec_yaml) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return absl::UnavailableError("tune-server is shutting down");
  const absl::Time now = Now();
  JobRecord r;
  *r.job.mutable_spec() = spec;
  r.job.set_spec_yaml(spec_yaml);
  r.job.set_state(v1::JOB_STATE_QUEUED);
  r.job.set_attempt(1);
  r.job.set_message("queued");
  *r.job.mutable_created_at() = ToProtoTime(now);
  std::vector<v1::JobEvent> appended;
  ASSIGN_OR_RETURN(JobRecord stored, store_->InsertJob(r, {StateEvent(r.job, now)}, &appended));
  spdlog::info("{}: submitted \"{}\" (priority {}, {})", stored.id(), spec.name(), spec.priority(),
               IsGpuJob(spec) ? absl::StrCat(spec.resources().gpus(), " GPU(s)")
                              : absl::StrCat(spec.resources().cpu_ranks(), " CPU rank(s)"));
  queued_since_[stored.id()] = now;
  active_[stored.id()] = stored;
  Kick();
  NotifyWatchers();
  UpdateGaugesLocked();
  return stored.job;
}

absl::StatusOr<v1::Job> Coordinator::GetJob(const std::string& id) {
  ASSIGN_OR_RETURN(JobRecord r, store_->GetJob(id));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = pending_reasons_.find(id);
  if (it != pending_reasons_.end() && r.state() == v1::JOB_STATE_QUEUED) {
    r.job.set_pending_reason(it->second);
  }
  return r.job;
}

absl::StatusOr<std::vector<v1::Job>> Coordinator::ListJobs(const std::vector<v1::JobState>& states,
                                                           int limit) {
  ASSIGN_OR_RETURN(std::vector<JobRecord> records,
                   store_->ListJobs(states, limit <= 0 ? kDefaultListLimit : limit));
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<v1::Job> out;
  out.reserve(records.size());
  for (JobRecord& r : records) {
    auto it = pending_reasons_.find(r.id());
    if (it != pending_reasons_.end() && r.state() == v1::JOB_STATE_QUEUED) {
      r.job.set_pending_reason(it->second);
    }
    out.push_back(std::move(r.job));
  }
  return out;
}

absl::StatusOr<v1::Job> Coordinator::Cancel(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  const absl::Time now = Now();
  auto it = active_.find(id);
  if (it == active_.end()) {
    // Terminal (or unknown): report what it is.
    ASSIGN_OR_RETURN(JobRecord r, store_->GetJob(id));
    RETURN_IF_ERROR(RequestCancel(&r, now).status());
    return r.job;
  }
  JobRecord copy = it->second;
  ASSIGN_OR_RETURN(CancelOutcome outcome, RequestCancel(&copy, now));
  if (outcome != CancelOutcome::kAlreadyRequested && outcome != CancelOutcome::kAlreadyCancelled) {
    RETURN_IF_ERROR(CommitJobLocked(copy, now));
  }
  if (outcome == CancelOutcome::kRequested || outcome == CancelOutcome::kAlreadyRequested) {
    spdlog::info("{}: cancel requested; stopping attempt {} on {}", id, copy.job.attempt(),
                 copy.job.worker());
    PushToWorkerLocked(copy.job.worker(), CancelFor(id, copy.job.attempt()));
  }
  UpdateGaugesLocked();
  return copy.job;
}

absl::StatusOr<EventPage> Coordinator::GetJobEvents(const std::string& id, int64_t after_seq,
                                                    int limit) {
  if (limit <= 0) limit = kDefaultEventLimit;
  limit = std::min(limit, kMaxEventLimit);
  return store_->ListEvents(id, std::max<int64_t>(after_seq, 0), limit);
}

std::vector<v1::Worker> Coordinator::ListWorkers() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<v1::Worker> out;
  for (const auto& [name, w] : workers_) out.push_back(WorkerViewLocked(w));
  return out;
}

absl::Status Coordinator::Watch(const std::string& id, int64_t after_seq,
                                const std::function<bool(const v1::WatchJobResponse&)>& send,
                                const std::function<bool()>& cancelled) {
  int64_t cursor = std::max<int64_t>(after_seq, 0);
  ASSIGN_OR_RETURN(JobRecord job, store_->GetJob(id));
  // The state as of the cursor, so each streamed job snapshot carries the
  // state that was current at its event (not a later one).
  struct Snapshot {
    v1::JobState state = v1::JOB_STATE_QUEUED;
    v1::FailureReason reason = v1::FAILURE_REASON_UNSPECIFIED;
    std::string message;
  } snap;
  auto apply_state_event = [&snap](const v1::JobEvent& e) {
    nlohmann::json p = nlohmann::json::parse(e.payload_json(), nullptr, false);
    if (!p.is_object()) return;
    if (p.contains("state") && p["state"].is_string()) {
      snap.state = JobStateFromName(p["state"].get<std::string>());
    }
    snap.reason = p.contains("reason") && p["reason"].is_string()
                      ? FailureReasonFromName(p["reason"].get<std::string>())
                      : v1::FAILURE_REASON_UNSPECIFIED;
    snap.message = p.contains("message") && p["message"].is_string()
                       ? p["message"].get<std::string>()
                       : std::string();
  };
  ASSIGN_OR_RETURN(std::optional<v1::JobEvent> last_state,
                   store_->LastStateEventAtOrBefore(id, cursor));
  if (last_state) {
    apply_state_event(*last_state);
    if (IsTerminal(snap.state)) return absl::OkStatus();  // Ended at or before after_seq.
  }
  while (true) {
    if (cancelled()) return absl::OkStatus();
    if (shutting_down()) return absl::UnavailableError("tune-server is shutting down");
    uint64_t version;
    {
      std::lock_guard<std::mutex> lock(notify_mu_);
      version = event_version_;
    }
    ASSIGN_OR_RETURN(EventPage page, store_->ListEvents(id, cursor, kWatchPage));
    if (!page.events.empty()) {
      ASSIGN_OR_RETURN(v1::Job current, GetJob(id));
      for (const v1::JobEvent& e : page.events) {
        if (e.type() == v1::EVENT_TYPE_STATE) apply_state_event(e);
        v1::WatchJobResponse resp;
        *resp.mutable_event() = e;
        v1::Job* j = resp.mutable_job();
        *j = current;
        j->set_state(snap.state);
        j->set_reason(snap.reason);
        j->set_message(snap.message);
        j->set_last_event_seq(e.seq());
        if (!IsTerminal(snap.state)) j->clear_finished_at();
        if (snap.state != v1::JOB_STATE_QUEUED) j->clear_pending_reason();
        if (!send(resp)) return absl::OkStatus();
        cursor = e.seq();
        if (e.type() == v1::EVENT_TYPE_STATE && IsTerminal(snap.state)) return absl::OkStatus();
      }
      continue;
    }
    // Nothing new: wait for the next event (or poll the client every 250 ms).
    std::unique_lock<std::mutex> lock(notify_mu_);
    notify_cv_.wait_for(lock, std::chrono::milliseconds(250),
                        [&] { return event_version_ != version; });
  }
}

// ---------------------------------------------------------------- AgentService

absl::StatusOr<v1::RegisterResponse> Coordinator::Register(const v1::RegisterRequest& request) {
  const v1::WorkerInfo& info = request.info();
  if (info.name().empty()) {
    return absl::InvalidArgumentError("worker registration needs info.name (the worker's --name)");
  }
  if (!options_.join_token.empty() && request.join_token() != options_.join_token) {
    return absl::UnauthenticatedError(
        absl::StrCat("worker ", info.name(),
                     ": join token does not match; give the worker the server's join token"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return absl::UnavailableError("tune-server is shutting down");
  const absl::Time now = Now();
  WorkerEntry& w = workers_[info.name()];
  if (w.session && !w.session->closed() && w.state == v1::WORKER_STATE_READY &&
      now - w.last_heartbeat <= options_.heartbeat_timeout && !w.info.hostname().empty() &&
      w.info.hostname() != info.hostname()) {
    return absl::AlreadyExistsError(absl::StrCat(
        "worker name ", info.name(), " is in use by a live worker on host ", w.info.hostname(),
        "; give this worker another --name"));
  }
  if (w.session) {
    w.session->Close();  // Superseded by this registration.
    w.session.reset();
  }
  const bool was_lost = w.state == v1::WORKER_STATE_LOST;
  w.info = info;
  w.state = v1::WORKER_STATE_READY;
  w.last_heartbeat = now;
  w.session_id = NewSessionId();
  w.registered_running.clear();
  PersistWorkerLocked(w, now);

  v1::RegisterResponse resp;
  resp.set_session_id(w.session_id);
  resp.set_heartbeat_interval_ms(
      static_cast<int32_t>(absl::ToInt64Milliseconds(options_.heartbeat_interval)));
  for (const v1::RunningAttempt& ra : request.running()) {
    if (IsWantedLocked(info.name(), ra.job_id(), ra.attempt())) {
      w.registered_running.insert({ra.job_id(), ra.attempt()});
      unconfirmed_.erase(ra.job_id());
    } else {
      *resp.add_stale() = ra;
    }
  }
  // Attempts the server placed here that the worker did not report: it may
  // still deliver their `exited` event (resent), or a resent assignment may
  // start them; either must happen within the heartbeat timeout.
  for (const auto& [id, job] : active_) {
    if (HoldsDevices(job.state()) && job.job.worker() == info.name() &&
        !w.registered_running.count({id, job.job.attempt()})) {
      unconfirmed_[id] = now;
    }
  }
  spdlog::info("worker {} registered{} ({} GPU(s), {} CPU slot(s), host {}); {} attempt(s) kept, "
               "{} stale",
               info.name(), was_lost ? " again after being lost" : "", info.gpus_size(),
               info.cpu_slots(), info.hostname(), w.registered_running.size(), resp.stale_size());
  Kick();
  UpdateGaugesLocked();
  return resp;
}

absl::StatusOr<std::shared_ptr<AgentSession>> Coordinator::AttachSession(
    const std::string& session_id) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return absl::UnavailableError("tune-server is shutting down");
  WorkerEntry* w = nullptr;
  for (auto& [name, e] : workers_) {
    if (!session_id.empty() && e.session_id == session_id) w = &e;
  }
  if (w == nullptr || w->state != v1::WORKER_STATE_READY) {
    return absl::FailedPreconditionError(
        "unknown or expired session id; call Register again and open a new Session");
  }
  if (w->session) w->session->Close();
  const absl::Time now = Now();
  w->session = std::make_shared<AgentSession>(w->info.name(), session_id);
  w->last_heartbeat = now;
  for (const auto& [id, job] : active_) {
    if (!HoldsDevices(job.state()) || job.job.worker() != w->info.name()) continue;
    const bool reported = w->registered_running.count({id, job.job.attempt()}) > 0;
    if (job.state() == v1::JOB_STATE_SCHEDULED && !reported) {
      w->session->Push(AssignmentFor(job));  // The first one may have been lost.
    }
    if (job.job.cancel_requested()) w->session->Push(CancelFor(id, job.job.attempt()));
  }
  spdlog::info("worker {} session attached", w->info.name());
  Kick();
  return w->session;
}

absl::Status Coordinator::Heartbeat(AgentSession& session, const v1::Heartbeat& heartbeat) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = workers_.find(session.worker());
  if (it == workers_.end() || it->second.session.get() != &session) {
    return absl::FailedPreconditionError("session superseded; register again");
  }
  WorkerEntry& w = it->second;
  const absl::Time now = Now();
  w.last_heartbeat = now;
  w.gpu_stats.assign(heartbeat.gpus().begin(), heartbeat.gpus().end());
  if (metrics_) {
    for (const v1::GpuStats& g : heartbeat.gpus()) {
      metrics_->SetGpuMemory(w.info.name(), g.index(), "total",
                             static_cast<double>(g.memory_total_bytes()));
    }
  }
  std::set<std::pair<std::string, int>> listed;
  for (const v1::RunningAttempt& ra : heartbeat.running()) {
    listed.insert({ra.job_id(), ra.attempt()});
    if (IsWantedLocked(w.info.name(), ra.job_id(), ra.attempt())) {
      unconfirmed_.erase(ra.job_id());
    } else {
      CancelStaleLocked(w, ra.job_id(), ra.attempt(), now);
    }
  }
  // An attempt placed here that the worker stops listing has to end (its
  // `exited` event) or reappear within the heartbeat timeout; emplace keeps
  // the earliest time it went missing.
  for (const auto& [id, job] : active_) {
    if (HoldsDevices(job.state()) && job.job.worker() == w.info.name() &&
        !listed.count({id, job.job.attempt()})) {
      unconfirmed_.emplace(id, now);
    }
  }
  for (auto c = w.cancels_sent.begin(); c != w.cancels_sent.end();) {
    c = now - c->second > absl::Minutes(5) ? w.cancels_sent.erase(c) : std::next(c);
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::EventAck> Coordinator::HandleAgentEvent(AgentSession& session,
                                                           const v1::AgentEvent& ev) {
  if (ev.job_id().empty() || ev.attempt() < 1 || ev.source_seq() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "agent event needs job_id, attempt >= 1 and source_seq >= 1 (got job_id \"", ev.job_id(),
        "\", attempt ", ev.attempt(), ", source_seq ", ev.source_seq(), ")"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto wit = workers_.find(session.worker());
  if (wit == workers_.end() || wit->second.session.get() != &session) {
    return absl::FailedPreconditionError("session superseded; register again");
  }
  WorkerEntry& w = wit->second;
  const absl::Time now = Now();
  v1::EventAck ack;
  ack.set_job_id(ev.job_id());
  ack.set_attempt(ev.attempt());
  ack.set_source_seq(ev.source_seq());

  NewEvent e;
  e.attempt = ev.attempt();
  e.rank = ev.rank();
  e.source_seq = ev.source_seq();
  e.type = ev.type();
  e.time = ev.has_time() ? FromProtoTime(ev.time()) : now;
  e.payload_json = ev.payload_json().empty() ? "{}" : ev.payload_json();
  nlohmann::json payload = nlohmann::json::parse(e.payload_json, nullptr, false);
  if (!payload.is_object()) payload = nlohmann::json::object();

  auto ait = active_.find(ev.job_id());
  const bool current = ait != active_.end() &&
                       IsWantedLocked(w.info.name(), ev.job_id(), ev.attempt());
  std::optional<JobRecord> before;
  std::optional<JobRecord> updated;
  std::vector<NewEvent> extra;
  if (current) {
    before = ait->second;
    updated = ait->second;
    JobRecord& u = *updated;
    unconfirmed_.erase(ev.job_id());
    switch (ev.type()) {
      case v1::EVENT_TYPE_STARTED: {
        absl::Status s = MarkRunning(&u, e.time);
        if (!s.ok()) spdlog::warn("{}: {}", ev.job_id(), s.ToString());
        break;
      }
      case v1::EVENT_TYPE_STEP:
        if (ev.rank() == 0) {
          u.job.set_last_step(static_cast<int32_t>(JsonNumber(payload, "step", u.job.last_step())));
          u.job.set_last_loss(JsonNumber(payload, "loss", u.job.last_loss()));
        }
        break;
      case v1::EVENT_TYPE_CHECKPOINT:
        u.job.set_last_checkpoint_step(
            static_cast<int32_t>(JsonNumber(payload, "step", u.job.last_checkpoint_step())));
        break;
      case v1::EVENT_TYPE_EXITED: {
        auto outcome = ApplyExited(&u, ParseExitedPayload(e.payload_json), now);
        if (!outcome.ok()) spdlog::warn("{}: {}", ev.job_id(), outcome.status().ToString());
        break;
      }
      default:
        break;
    }
    if (u.state() != before->state()) extra.push_back(StateEvent(u.job, now));
  } else if (ev.type() != v1::EVENT_TYPE_EXITED) {
    // An attempt the server no longer wants is still producing events.
    CancelStaleLocked(w, ev.job_id(), ev.attempt(), now);
  }

  auto result = store_->AppendAgentEvent(ev.job_id(), e, updated ? &*updated : nullptr, extra);
  if (!result.ok()) {
    if (absl::IsNotFound(result.status())) {
      // The job is unknown here (another database?): drop the event and stop
      // the attempt, so the worker does not resend it forever.
      spdlog::warn("worker {} sent an event of unknown job {}; dropping it", w.info.name(),
                   ev.job_id());
      CancelStaleLocked(w, ev.job_id(), ev.attempt(), now);
      return ack;
    }
    return result.status();
  }
  if (result->duplicate) return ack;

  if (metrics_) {
    if (ev.type() == v1::EVENT_TYPE_STEP) {
      if (ev.rank() == 0) {
        metrics_->RecordStep(ev.job_id(), JsonNumber(payload, "step", 0),
                             JsonNumber(payload, "loss", 0), JsonNumber(payload, "grad_norm", 0),
                             JsonNumber(payload, "lr", 0), JsonNumber(payload, "tokens_per_s", 0));
      }
      // Rank r runs on the r-th reserved GPU of the attempt; CPU ranks report
      // under gpu="cpu".
      const std::string device = current ? MetricsDevice(*before, ev.rank()) : "";
      if (!device.empty()) {
        metrics_->SetGpuMemory(w.info.name(), device, ServerMetrics::kAllocated,
                               JsonNumber(payload, "vram_allocated", 0));
        metrics_->SetGpuMemory(w.info.name(), device, ServerMetrics::kReserved,
                               JsonNumber(payload, "vram_reserved", 0));
        metrics_->SetGpuMemory(w.info.name(), device, ServerMetrics::kPeak,
                               JsonNumber(payload, "vram_peak", 0));
      }
    } else if (ev.type() == v1::EVENT_TYPE_PLAN && current && !IsGpuJob(before->job.spec())) {
      // A GPU's total comes from the worker's heartbeats (NVML); a CPU rank
      // has no such source, so the trainer's own figure is used.
      if (const std::string device = MetricsDevice(*before, ev.rank()); !device.empty()) {
        metrics_->SetGpuMemory(w.info.name(), device, ServerMetrics::kTotal,
                               JsonNumber(payload, "device_memory_bytes", 0));
      }
    } else if (ev.type() == v1::EVENT_TYPE_NAN_ALERT && ev.rank() <= 0) {
      metrics_->IncNanAlerts(ev.job_id());  // Every rank sees the same all-reduced values.
    } else if (ev.type() == v1::EVENT_TYPE_OOM_RECOVERED) {
      metrics_->IncOomRecoveries(ev.job_id());
    }
  }

  if (updated) {
    AfterCommitLocked(*before, *updated, result->appended, now);
    if (updated->state() != before->state()) UpdateGaugesLocked();
  } else {
    auto it = active_.find(ev.job_id());
    if (it != active_.end() && !result->appended.empty()) {
      it->second.job.set_last_event_seq(result->appended.back().seq());
    }
    NotifyWatchers();
  }
  return ack;
}

void Coordinator::DetachSession(AgentSession& session) {
  session.Close();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = workers_.find(session.worker());
  if (it != workers_.end() && it->second.session.get() == &session) {
    it->second.session.reset();
    spdlog::info("worker {} session ended; it has {} to reconnect", session.worker(),
                 Secs(options_.heartbeat_timeout));
  }
}

}  // namespace tune::server
