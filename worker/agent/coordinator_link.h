// The worker's connection to tune-server's AgentService.
//
// Register (worker info, join token, attempts still running) -> Session bidi
// stream: the session id first, then a heartbeat every heartbeat_interval_ms
// (GPU numbers, running attempts) and every outbox event; down the stream
// come Assignments, CancelAttempts and EventAcks. Any error (server down,
// restart, stream reset) ends the session; the link reconnects with
// exponential backoff (min_backoff doubling to max_backoff, with jitter),
// registers again and resends every event the server has not acknowledged,
// in source_seq order per attempt. Events leave the outbox only when acked.
#ifndef TUNE_WORKER_AGENT_COORDINATOR_LINK_H_
#define TUNE_WORKER_AGENT_COORDINATOR_LINK_H_

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "tune/v1/agent_service.grpc.pb.h"
#include "worker/agent/event_relay.h"

namespace tune::worker {

struct LinkOptions {
  std::string server;  // HOST:PORT (gRPC target)
  std::string join_token;
  v1::WorkerInfo info;
  std::shared_ptr<grpc::ChannelCredentials> credentials;  // null: insecure
  absl::Duration min_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(5);
  absl::Duration register_timeout = absl::Seconds(5);
  // Used when the server's RegisterResponse gives none.
  absl::Duration default_heartbeat = absl::Seconds(5);
  // HTTP/2 keepalive pings, so a server that vanished without closing the
  // connection (host down, network partition) is noticed. The server must
  // accept pings this often (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS).
  // Zero disables them.
  absl::Duration keepalive = absl::Seconds(30);
  size_t max_events_per_write_batch = 256;
};

// Everything the link asks of the rest of the worker. Callbacks run on the
// link's threads and must not block for long.
struct LinkCallbacks {
  std::function<void(const v1::Assignment&)> on_assignment;
  std::function<void(const v1::CancelAttempt&)> on_cancel;
  // The server no longer wants this attempt (reported in RegisterResponse.stale).
  std::function<void(const AttemptKey&)> on_stale;
  // Attempts running now (for Register and heartbeats).
  std::function<std::vector<AttemptKey>()> running;
  // GPU numbers for heartbeats.
  std::function<std::vector<v1::GpuStats>()> gpu_stats;
};

// Delay before reconnect number `failures` (0-based): min * 2^failures capped
// at max, then scaled by a jitter factor in [0.5, 1.0] (`unit_random` in [0,1)).
absl::Duration ReconnectBackoff(int failures, absl::Duration min, absl::Duration max,
                                double unit_random);

class CoordinatorLink {
 public:
  CoordinatorLink(LinkOptions options, Outbox* outbox, LinkCallbacks callbacks);
  // Stop().
  ~CoordinatorLink();

  // Starts the connect/reconnect thread. Call once.
  void Start();
  // Ends the session and the thread; safe to call more than once, and from
  // any thread but the link's own callbacks.
  void Stop();

  // True while a Session stream is established.
  bool connected() const { return connected_.load(); }
  // Sessions established so far (1 after the first connect, 2 after a reconnect...).
  int sessions() const { return sessions_.load(); }
  // Waits until connected (true) or `deadline` (false).
  bool WaitConnected(absl::Time deadline);

 private:
  // One Register + Session; returns why it ended.
  absl::Status RunSession();
  void Run();
  void SetActiveContext(grpc::ClientContext* context);

  const LinkOptions options_;
  Outbox* const outbox_;
  const LinkCallbacks callbacks_;

  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> connected_{false};
  std::atomic<int> sessions_{0};

  std::mutex mu_;
  std::condition_variable cv_;             // stop + connected changes
  grpc::ClientContext* active_ = nullptr;  // the RPC Stop() must cancel
};

}  // namespace tune::worker

#endif  // TUNE_WORKER_AGENT_COORDINATOR_LINK_H_
