#include "worker/agent/coordinator_link.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/control/grpc_status.h"
#include "common/control/time_util.h"
#include "spdlog/spdlog.h"

namespace tune::worker {

absl::Duration ReconnectBackoff(int failures, absl::Duration min, absl::Duration max,
                                double unit_random) {
  absl::Duration d = min;
  for (int i = 0; i < failures && d < max; ++i) d *= 2;
  d = std::min(d, max);
  const double jitter = 0.5 + 0.5 * std::clamp(unit_random, 0.0, 1.0);
  return d * jitter;
}

CoordinatorLink::CoordinatorLink(LinkOptions options, Outbox* outbox, LinkCallbacks callbacks)
    : options_(std::move(options)), outbox_(outbox), callbacks_(std::move(callbacks)) {}

CoordinatorLink::~CoordinatorLink() { Stop(); }

void CoordinatorLink::Start() { thread_ = std::thread([this] { Run(); }); }

void CoordinatorLink::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    if (active_ != nullptr) active_->TryCancel();
  }
  cv_.notify_all();
  outbox_->Interrupt();
  if (thread_.joinable()) thread_.join();
}

bool CoordinatorLink::WaitConnected(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  while (!connected_ && !stopping_) {
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) break;
    cv_.wait_for(lock, absl::ToChronoNanoseconds(left));
  }
  return connected_;
}

void CoordinatorLink::SetActiveContext(grpc::ClientContext* context) {
  std::lock_guard<std::mutex> lock(mu_);
  active_ = context;
  // Stop() may have run between the stopping_ check and here.
  if (context != nullptr && stopping_) context->TryCancel();
}

void CoordinatorLink::Run() {
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  int failures = 0;
  while (!stopping_) {
    const absl::Time began = absl::Now();
    const int sessions_before = sessions_.load();
    absl::Status why = RunSession();
    if (stopping_) break;
    // A session that lived a while resets the backoff: the next failure is a
    // new outage (e.g. a server restart), which should be retried quickly.
    if (sessions_.load() > sessions_before && absl::Now() - began > options_.max_backoff) {
      failures = 0;
    }
    const absl::Duration delay =
        ReconnectBackoff(failures, options_.min_backoff, options_.max_backoff, unit(rng));
    ++failures;
    const bool auth = absl::IsPermissionDenied(why) || absl::IsUnauthenticated(why);
    spdlog::log(auth ? spdlog::level::err
                     : (failures > 3 ? spdlog::level::warn : spdlog::level::info),
                "coordinator {}: {}{}; retrying in {} ms", options_.server, why.ToString(),
                auth ? " (check --join-token)" : "", absl::ToInt64Milliseconds(delay));
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, absl::ToChronoNanoseconds(delay), [this] { return stopping_.load(); });
  }
}

absl::Status CoordinatorLink::RunSession() {
  grpc::ChannelArguments args;
  // Our own loop does the backoff; a fresh channel per session with its own
  // subchannel pool keeps gRPC's reconnect state from delaying it further.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
              static_cast<int>(absl::ToInt64Milliseconds(options_.min_backoff)));
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS,
              static_cast<int>(absl::ToInt64Milliseconds(options_.min_backoff)));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
              static_cast<int>(absl::ToInt64Milliseconds(options_.max_backoff)));
  if (options_.keepalive > absl::ZeroDuration()) {
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS,
                static_cast<int>(absl::ToInt64Milliseconds(options_.keepalive)));
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  }
  std::shared_ptr<grpc::ChannelCredentials> creds =
      options_.credentials ? options_.credentials : grpc::InsecureChannelCredentials();
  auto stub = v1::AgentService::NewStub(grpc::CreateCustomChannel(options_.server, creds, args));

  // ---- Register ----------------------------------------------------------
  v1::RegisterRequest request;
  *request.mutable_info() = options_.info;
  request.set_join_token(options_.join_token);
  if (callbacks_.running) {
    for (const AttemptKey& k : callbacks_.running()) {
      v1::RunningAttempt* r = request.add_running();
      r->set_job_id(k.job_id);
      r->set_attempt(k.attempt);
    }
  }
  v1::RegisterResponse response;
  {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + options_.register_timeout));
    // Waiting for the channel to connect (within the deadline) makes a server
    // restart cost one attempt rather than a burst of instant failures.
    context.set_wait_for_ready(true);
    SetActiveContext(&context);
    grpc::Status status = stub->Register(&context, request, &response);
    SetActiveContext(nullptr);
    if (!status.ok()) {
      return absl::Status(FromGrpcStatus(status).code(),
                          absl::StrCat("Register failed: ", status.error_message()));
    }
  }
  for (const v1::RunningAttempt& stale : response.stale()) {
    spdlog::warn("server no longer wants {} attempt {}; stopping it", stale.job_id(),
                 stale.attempt());
    if (callbacks_.on_stale) callbacks_.on_stale(AttemptKey{stale.job_id(), stale.attempt()});
  }
  absl::Duration heartbeat = response.heartbeat_interval_ms() > 0
                                 ? absl::Milliseconds(response.heartbeat_interval_ms())
                                 : options_.default_heartbeat;
  heartbeat = std::max(heartbeat, absl::Milliseconds(50));

  // ---- Session -----------------------------------------------------------
  grpc::ClientContext context;
  SetActiveContext(&context);
  std::unique_ptr<grpc::ClientReaderWriter<v1::AgentMessage, v1::ServerMessage>> stream =
      stub->Session(&context);
  absl::Status ended = absl::OkStatus();
  v1::AgentMessage hello;
  hello.set_session_id(response.session_id());
  std::atomic<bool> reader_done{false};
  std::thread reader;
  if (!stream->Write(hello)) {
    ended = absl::UnavailableError("Session: the server closed the stream at once");
  } else {
    // Whatever the server has not acknowledged may be lost with the old
    // session: send it all again (the server stores each source_seq once).
    outbox_->RewindUnacked();
    {
      std::lock_guard<std::mutex> lock(mu_);
      connected_ = true;
      ++sessions_;
    }
    cv_.notify_all();
    spdlog::info("connected to {} as {} (session {}, heartbeat {} ms, {} unacknowledged event(s) to send)",
                 options_.server, options_.info.name(), response.session_id(),
                 absl::ToInt64Milliseconds(heartbeat), outbox_->unacked());

    reader = std::thread([&] {
      v1::ServerMessage message;
      while (stream->Read(&message)) {
        switch (message.kind_case()) {
          case v1::ServerMessage::kAck:
            outbox_->Ack(AttemptKey{message.ack().job_id(), message.ack().attempt()},
                         message.ack().source_seq());
            break;
          case v1::ServerMessage::kAssignment:
            if (callbacks_.on_assignment) callbacks_.on_assignment(message.assignment());
            break;
          case v1::ServerMessage::kCancel:
            if (callbacks_.on_cancel) callbacks_.on_cancel(message.cancel());
            break;
          case v1::ServerMessage::KIND_NOT_SET:
            spdlog::warn("server sent an empty message; ignored");
            break;
        }
      }
      reader_done = true;
      outbox_->Interrupt();
    });

    absl::Time next_heartbeat = absl::Now();
    while (!stopping_ && !reader_done) {
      if (absl::Now() >= next_heartbeat) {
        v1::AgentMessage m;
        v1::Heartbeat* hb = m.mutable_heartbeat();
        if (callbacks_.gpu_stats) {
          for (v1::GpuStats& g : callbacks_.gpu_stats()) *hb->add_gpus() = std::move(g);
        }
        if (callbacks_.running) {
          for (const AttemptKey& k : callbacks_.running()) {
            v1::RunningAttempt* r = hb->add_running();
            r->set_job_id(k.job_id);
            r->set_attempt(k.attempt);
          }
        }
        if (!stream->Write(m)) {
          ended = absl::UnavailableError("Session: heartbeat write failed");
          break;
        }
        next_heartbeat = absl::Now() + heartbeat;
      }
      std::vector<v1::AgentEvent> events =
          outbox_->TakeUnsent(options_.max_events_per_write_batch);
      bool write_failed = false;
      for (size_t i = 0; i < events.size(); ++i) {
        v1::AgentMessage m;
        *m.mutable_event() = std::move(events[i]);
        // Coalesce a batch into few frames; the last write flushes it.
        grpc::WriteOptions write_options;
        if (i + 1 < events.size()) write_options.set_buffer_hint();
        if (!stream->Write(m, write_options)) {
          write_failed = true;
          break;
        }
      }
      if (write_failed) {
        ended = absl::UnavailableError("Session: event write failed");
        break;
      }
      if (events.empty()) {
        // Bounded wait: wakes for new events, Stop(), the reader ending, or
        // the next heartbeat, whichever is first.
        outbox_->WaitForUnsent(std::min(next_heartbeat, absl::Now() + absl::Milliseconds(250)));
      }
    }
  }

  {
    std::lock_guard<std::mutex> lock(mu_);
    connected_ = false;
  }
  cv_.notify_all();
  // When the reader saw the end, Finish() returns the server's own status.
  if (!reader_done) context.TryCancel();
  if (reader.joinable()) reader.join();
  grpc::Status status = stream->Finish();
  SetActiveContext(nullptr);
  if (stopping_) return absl::CancelledError("stopping");
  if (ended.ok()) {
    ended = status.ok() ? absl::UnavailableError("Session: the server ended the stream")
                        : absl::Status(FromGrpcStatus(status).code(),
                                       absl::StrCat("Session: ", status.error_message()));
  }
  return ended;
}

}  // namespace tune::worker
