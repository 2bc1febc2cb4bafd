#include "client/client.h"

#include <chrono>

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include "absl/strings/str_cat.h"

namespace tune::client {

ApiClient::ApiClient(const std::string& address)
    : address_(address),
      channel_(grpc::CreateChannel(address, grpc::InsecureChannelCredentials())),
      stub_(v1::JobService::NewStub(channel_)) {}

std::unique_ptr<grpc::ClientContext> ApiClient::UnaryContext(int timeout_s) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(timeout_s));
  return ctx;
}

grpc::Status ApiClient::GetJob(const std::string& id, int timeout_s, v1::Job* job) {
  v1::GetJobRequest req;
  req.set_id(id);
  v1::GetJobResponse resp;
  auto ctx = UnaryContext(timeout_s);
  grpc::Status st = stub_->GetJob(ctx.get(), req, &resp);
  if (st.ok()) *job = resp.job();
  return st;
}

grpc::Status ApiClient::GetAllEvents(const std::string& id, int64_t after_seq, int timeout_s,
                                     std::vector<v1::JobEvent>* events) {
  constexpr int kPage = 1000;
  while (true) {
    v1::GetJobEventsRequest req;
    req.set_id(id);
    req.set_after_seq(after_seq);
    req.set_limit(kPage);
    v1::GetJobEventsResponse resp;
    auto ctx = UnaryContext(timeout_s);
    grpc::Status st = stub_->GetJobEvents(ctx.get(), req, &resp);
    if (!st.ok()) return st;
    for (auto& e : *resp.mutable_events()) {
      // Guard against a server that returns an event twice across pages.
      if (e.seq() <= after_seq) continue;
      after_seq = e.seq();
      events->push_back(std::move(e));
    }
    if (!resp.more() || resp.events_size() == 0) return grpc::Status::OK;
  }
}

int ReportRpcError(const CommandContext& ctx, const grpc::Status& status, std::string_view what) {
  std::ostream& err = *ctx.err;
  switch (status.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
      err << "tunectl: cannot reach tune-server at " << ctx.server
          << " (is it running? --server / TUNE_SERVER)";
      if (!status.error_message().empty()) err << ": " << status.error_message();
      err << "\n";
      return kExitUnreachable;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      err << "tunectl: " << what << ": tune-server at " << ctx.server << " did not answer within "
          << ctx.rpc_timeout_s << " s\n";
      return kExitFailure;
    case grpc::StatusCode::INVALID_ARGUMENT:
      err << "tunectl: " << what << ": " << status.error_message() << "\n";
      return kExitUsage;
    default:
      err << "tunectl: " << what << ": " << status.error_message();
      if (status.error_message().empty()) err << "gRPC error code " << status.error_code();
      err << "\n";
      return kExitFailure;
  }
}

void PrintStructured(const CommandContext& ctx, const Json& value) {
  if (ctx.format == OutputFormat::kYaml) {
    *ctx.out << ToYaml(value);
  } else {
    *ctx.out << ToJsonText(value, /*pretty=*/true) << "\n";
  }
  ctx.out->flush();
}

bool IsTerminal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

}  // namespace tune::client
