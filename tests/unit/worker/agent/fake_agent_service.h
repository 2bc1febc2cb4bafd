// An in-process AgentService for the worker's tests: records registrations,
// heartbeats and events (stored once per (job, attempt, source_seq)), acks them
// when `ack_` is set, and sends queued ServerMessages after each message it reads.
#ifndef TUNE_TESTS_UNIT_WORKER_AGENT_FAKE_AGENT_SERVICE_H_
#define TUNE_TESTS_UNIT_WORKER_AGENT_FAKE_AGENT_SERVICE_H_

#include <chrono>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "tune/v1/agent_service.grpc.pb.h"

namespace tune::worker {

class FakeAgentService final : public v1::AgentService::Service {
 public:
  grpc::Status Register(grpc::ServerContext*, const v1::RegisterRequest* request,
                        v1::RegisterResponse* response) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!token_.empty() && request->join_token() != token_) {
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "bad join token");
    }
    registers_.push_back(*request);
    response->set_session_id("session-" + std::to_string(registers_.size()));
    response->set_heartbeat_interval_ms(50);
    for (const auto& s : stale_) *response->add_stale() = s;
    return grpc::Status::OK;
  }

  grpc::Status Session(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<v1::ServerMessage, v1::AgentMessage>* stream)
      override {
    v1::AgentMessage m;
    if (!stream->Read(&m) || m.kind_case() != v1::AgentMessage::kSessionId) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "session_id first");
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      session_ids_.push_back(m.session_id());
    }
    while (stream->Read(&m)) {
      std::vector<v1::ServerMessage> out;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (m.has_heartbeat()) {
          ++heartbeats_;
          last_heartbeat_ = m.heartbeat();
        } else if (m.has_event()) {
          const v1::AgentEvent& e = m.event();
          ++events_received_;
          auto key = std::make_tuple(e.job_id(), e.attempt(), e.source_seq());
          if (stored_.insert(key).second) events_.push_back(e);
          if (ack_) {
            v1::ServerMessage ack;
            ack.mutable_ack()->set_job_id(e.job_id());
            ack.mutable_ack()->set_attempt(e.attempt());
            ack.mutable_ack()->set_source_seq(e.source_seq());
            out.push_back(ack);
          }
        }
        while (!to_send_.empty()) {
          out.push_back(to_send_.front());
          to_send_.pop_front();
        }
      }
      for (const auto& msg : out) {
        if (!stream->Write(msg)) return grpc::Status::OK;
      }
    }
    return grpc::Status::OK;
  }

  std::mutex mu_;
  std::string token_;
  bool ack_ = true;
  std::vector<v1::RunningAttempt> stale_;
  std::vector<v1::RegisterRequest> registers_;
  std::vector<std::string> session_ids_;
  int heartbeats_ = 0;
  v1::Heartbeat last_heartbeat_;
  int events_received_ = 0;
  std::set<std::tuple<std::string, int, int64_t>> stored_;
  std::vector<v1::AgentEvent> events_;  // each stored event once, in arrival order
  std::deque<v1::ServerMessage> to_send_;
};

struct FakeAgentServer {
  FakeAgentService service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;

  void Start(int want_port = 0) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:" + std::to_string(want_port),
                             grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    server = builder.BuildAndStart();
    ASSERT_NE(server, nullptr);
    ASSERT_GT(port, 0);
  }
  void Stop() {
    server->Shutdown(std::chrono::system_clock::now());
    server->Wait();
    server.reset();
  }
};

}  // namespace tune::worker

#endif  // TUNE_TESTS_UNIT_WORKER_AGENT_FAKE_AGENT_SERVICE_H_
