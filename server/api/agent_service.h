// AgentService over gRPC: Register, and the bidi Session stream. One reader
// (the RPC thread: heartbeats and events in) and one writer thread per stream
// (assignments, cancels and acks out of the session's outbox), which is what
// sync gRPC streams allow.
#ifndef TUNE_SERVER_API_AGENT_SERVICE_H_
#define TUNE_SERVER_API_AGENT_SERVICE_H_

#include "server/coordinator/coordinator.h"
#include "server/metrics/metrics.h"
#include "tune/v1/agent_service.grpc.pb.h"

namespace tune::server {

class AgentServiceImpl final : public v1::AgentService::Service {
 public:
  // `metrics` may be null.
  AgentServiceImpl(Coordinator* coordinator, ServerMetrics* metrics)
      : coordinator_(coordinator), metrics_(metrics) {}

  grpc::Status Register(grpc::ServerContext* ctx, const v1::RegisterRequest* req,
                        v1::RegisterResponse* resp) override;
  grpc::Status Session(grpc::ServerContext* ctx,
                       grpc::ServerReaderWriter<v1::ServerMessage, v1::AgentMessage>* stream)
      override;

 private:
  grpc::Status Done(const char* method, const absl::Status& status);

  Coordinator* const coordinator_;
  ServerMetrics* const metrics_;
};

}  // namespace tune::server

#endif  // TUNE_SERVER_API_AGENT_SERVICE_H_
