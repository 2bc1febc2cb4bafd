#include "server/api/agent_service.h"

#include <spdlog/spdlog.h>

#include <atomic>
#include <thread>

#include "common/control/grpc_status.h"

namespace tune::server {

grpc::Status AgentServiceImpl::Done(const char* method, const absl::Status& status) {
  if (metrics_) metrics_->CountGrpcRequest(method, absl::StatusCodeToString(status.code()));
  if (!status.ok()) spdlog::warn("{}: {}", method, status.ToString());
  return ToGrpcStatus(status);
}

grpc::Status AgentServiceImpl::Register(grpc::ServerContext*, const v1::RegisterRequest* req,
                                        v1::RegisterResponse* resp) {
  absl::StatusOr<v1::RegisterResponse> r = coordinator_->Register(*req);
  if (r.ok()) *resp = *std::move(r);
  return Done("Register", r.status());
}

grpc::Status AgentServiceImpl::Session(
    grpc::ServerContext* ctx, grpc::ServerReaderWriter<v1::ServerMessage, v1::AgentMessage>* stream) {
  v1::AgentMessage first;
  if (!stream->Read(&first)) return Done("Session", absl::OkStatus());  // Closed at once.
  if (first.kind_case() != v1::AgentMessage::kSessionId) {
    return Done("Session", absl::FailedPreconditionError(
                               "the first Session message must be the session_id from Register"));
  }
  absl::StatusOr<std::shared_ptr<AgentSession>> attached =
      coordinator_->AttachSession(first.session_id());
  if (!attached.ok()) return Done("Session", attached.status());
  std::shared_ptr<AgentSession> session = *attached;

  // The writer owns stream->Write. When the session is closed by the server
  // (superseded, worker lost, shutdown) or a write fails, it cancels the call
  // so the blocked Read below returns.
  std::atomic<bool> reading{true};
  std::thread writer([&] {
    v1::ServerMessage msg;
    while (true) {
      if (session->Next(&msg, absl::Milliseconds(500))) {
        if (!stream->Write(msg)) {
          if (reading) ctx->TryCancel();
          return;
        }
      } else if (session->closed()) {
        if (reading) ctx->TryCancel();
        return;
      } else if (ctx->IsCancelled()) {
        return;
      }
    }
  });

  absl::Status result = absl::OkStatus();
  v1::AgentMessage msg;
  while (stream->Read(&msg)) {
    if (msg.kind_case() == v1::AgentMessage::kHeartbeat) {
      absl::Status s = coordinator_->Heartbeat(*session, msg.heartbeat());
      if (!s.ok()) {
        result = s;
        break;
      }
    } else if (msg.kind_case() == v1::AgentMessage::kEvent) {
      absl::StatusOr<v1::EventAck> ack = coordinator_->HandleAgentEvent(*session, msg.event());
      if (ack.ok()) {
        v1::ServerMessage out;
        *out.mutable_ack() = *std::move(ack);
        session->Push(std::move(out));
      } else if (absl::IsFailedPrecondition(ack.status())) {
        result = ack.status();
        break;
      } else {
        // Acks are cumulative, so a later ack would cover this event: end the session
        // instead; the worker reconnects and resends everything not yet acknowledged.
        spdlog::warn("worker {}: event not stored, ending the session so it is resent: {}",
                     session->worker(), ack.status().ToString());
        result = absl::UnavailableError("event not stored: " + std::string(ack.status().message()));
        break;
      }
    } else if (msg.kind_case() == v1::AgentMessage::kSessionId) {
      spdlog::warn("worker {}: session_id sent twice on one stream; ignored", session->worker());
    }
  }
  reading = false;
  coordinator_->DetachSession(*session);
  writer.join();
  return Done("Session", result);
}

}  // namespace tune::server
