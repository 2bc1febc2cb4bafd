#include "server/api/job_service.h"

#include <spdlog/spdlog.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/control/grpc_status.h"
#include "common/control/spec_proto.h"
#include "common/jobspec/job_spec.h"

namespace tune::server {
namespace {
// Specs are a few KB; anything near this is a mistake (a dataset pasted in).
constexpr size_t kMaxSpecBytes = 1 << 20;
}  // namespace

absl::StatusOr<std::string> ParseSubmittedSpec(const v1::SubmitJobRequest& request,
                                               v1::JobSpec* out) {
  const std::string source = request.source_name().empty() ? "spec" : request.source_name();
  if (!request.base_dir().empty() && request.base_dir()[0] != '/') {
    return absl::InvalidArgumentError(absl::StrCat(
        "base_dir must be an absolute directory (got \"", request.base_dir(),
        "\"); clients send the directory of the YAML file"));
  }
  if (request.spec_yaml().size() > kMaxSpecBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": the job spec is ", request.spec_yaml().size(), " bytes; the limit is ",
        kMaxSpecBytes, " (a spec holds settings and paths, never data)"));
  }
  if (request.spec_yaml().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": the job spec is empty"));
  }
  spec::JobSpec parsed;
  std::vector<spec::SpecError> errors = spec::ParseJobSpec(request.spec_yaml(), &parsed);
  if (errors.empty()) {
    spec::ValidateOptions opts;
    opts.base_dir = request.base_dir();
    opts.check_paths = true;
    errors = spec::ValidateJobSpec(&parsed, opts);
  }
  if (!errors.empty()) {
    std::string message = spec::FormatErrors(errors, source);
    absl::StripTrailingAsciiWhitespace(&message);
    return absl::InvalidArgumentError(message);
  }
  SpecToProto(parsed, out);
  return spec::EmitJobSpecYaml(parsed);
}

grpc::Status JobServiceImpl::Done(const char* method, const absl::Status& status) {
  if (metrics_) {
    metrics_->CountGrpcRequest(method, absl::StatusCodeToString(status.code()));
  }
  if (!status.ok() && status.code() != absl::StatusCode::kNotFound &&
      status.code() != absl::StatusCode::kInvalidArgument &&
      status.code() != absl::StatusCode::kFailedPrecondition) {
    spdlog::warn("{}: {}", method, status.ToString());
  }
  return ToGrpcStatus(status);
}

grpc::Status JobServiceImpl::SubmitJob(grpc::ServerContext*, const v1::SubmitJobRequest* req,
                                       v1::SubmitJobResponse* resp) {
  v1::JobSpec spec;
  absl::StatusOr<std::string> yaml = ParseSubmittedSpec(*req, &spec);
  if (!yaml.ok()) {
    spdlog::info("rejected a job spec from {}: {}",
                 req->source_name().empty() ? "a client" : req->source_name(),
                 std::string(yaml.status().message()));
    return Done("SubmitJob", yaml.status());
  }
  absl::StatusOr<v1::Job> job = coordinator_->Submit(spec, *yaml);
  if (job.ok()) *resp->mutable_job() = *std::move(job);
  return Done("SubmitJob", job.status());
}

grpc::Status JobServiceImpl::GetJob(grpc::ServerContext*, const v1::GetJobRequest* req,
                                    v1::GetJobResponse* resp) {
  absl::StatusOr<v1::Job> job = coordinator_->GetJob(req->id());
  if (job.ok()) *resp->mutable_job() = *std::move(job);
  return Done("GetJob", job.status());
}

grpc::Status JobServiceImpl::ListJobs(grpc::ServerContext*, const v1::ListJobsRequest* req,
                                      v1::ListJobsResponse* resp) {
  std::vector<v1::JobState> states;
  for (int s : req->states()) states.push_back(static_cast<v1::JobState>(s));
  absl::StatusOr<std::vector<v1::Job>> jobs = coordinator_->ListJobs(states, req->limit());
  if (jobs.ok()) {
    for (v1::Job& j : *jobs) *resp->add_jobs() = std::move(j);
  }
  return Done("ListJobs", jobs.status());
}

grpc::Status JobServiceImpl::CancelJob(grpc::ServerContext*, const v1::CancelJobRequest* req,
                                       v1::CancelJobResponse* resp) {
  absl::StatusOr<v1::Job> job = coordinator_->Cancel(req->id());
  if (job.ok()) *resp->mutable_job() = *std::move(job);
  return Done("CancelJob", job.status());
}

grpc::Status JobServiceImpl::WatchJob(grpc::ServerContext* ctx, const v1::WatchJobRequest* req,
                                      grpc::ServerWriter<v1::WatchJobResponse>* writer) {
  absl::Status s = coordinator_->Watch(
      req->id(), req->after_seq(),
      [writer](const v1::WatchJobResponse& r) { return writer->Write(r); },
      [ctx] { return ctx->IsCancelled(); });
  return Done("WatchJob", s);
}

grpc::Status JobServiceImpl::GetJobEvents(grpc::ServerContext*, const v1::GetJobEventsRequest* req,
                                          v1::GetJobEventsResponse* resp) {
  absl::StatusOr<EventPage> page =
      coordinator_->GetJobEvents(req->id(), req->after_seq(), req->limit());
  if (page.ok()) {
    for (v1::JobEvent& e : page->events) *resp->add_events() = std::move(e);
    resp->set_more(page->more);
  }
  return Done("GetJobEvents", page.status());
}

grpc::Status JobServiceImpl::ListWorkers(grpc::ServerContext*, const v1::ListWorkersRequest*,
                                         v1::ListWorkersResponse* resp) {
  for (v1::Worker& w : coordinator_->ListWorkers()) *resp->add_workers() = std::move(w);
  return Done("ListWorkers", absl::OkStatus());
}

}  // namespace tune::server
