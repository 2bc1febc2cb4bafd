// JobService over gRPC: a thin adapter from RPCs to the Coordinator. Specs are
// parsed and validated here (tune::spec), so errors name the YAML source, line
// and path of each bad field.
#ifndef TUNE_SERVER_API_JOB_SERVICE_H_
#define TUNE_SERVER_API_JOB_SERVICE_H_

#include "absl/status/statusor.h"
#include "server/coordinator/coordinator.h"
#include "server/metrics/metrics.h"
#include "tune/v1/job_service.grpc.pb.h"

namespace tune::server {

// Parses and validates a SubmitJobRequest's YAML (relative paths against
// request.base_dir, which must be absolute when given; files are checked).
// INVALID_ARGUMENT lists every error, one per line, as
// "source:line: path: message". Specs over 1 MiB are refused. On success returns the canonical YAML and
// fills *spec.
absl::StatusOr<std::string> ParseSubmittedSpec(const v1::SubmitJobRequest& request,
                                               v1::JobSpec* spec);

class JobServiceImpl final : public v1::JobService::Service {
 public:
  // `metrics` may be null.
  JobServiceImpl(Coordinator* coordinator, ServerMetrics* metrics)
      : coordinator_(coordinator), metrics_(metrics) {}

  grpc::Status SubmitJob(grpc::ServerContext* ctx, const v1::SubmitJobRequest* req,
                         v1::SubmitJobResponse* resp) override;
  grpc::Status GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* req,
                      v1::GetJobResponse* resp) override;
  grpc::Status ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* req,
                        v1::ListJobsResponse* resp) override;
  grpc::Status CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* req,
                         v1::CancelJobResponse* resp) override;
  grpc::Status WatchJob(grpc::ServerContext* ctx, const v1::WatchJobRequest* req,
                        grpc::ServerWriter<v1::WatchJobResponse>* writer) override;
  grpc::Status GetJobEvents(grpc::ServerContext* ctx, const v1::GetJobEventsRequest* req,
                            v1::GetJobEventsResponse* resp) override;
  grpc::Status ListWorkers(grpc::ServerContext* ctx, const v1::ListWorkersRequest* req,
                           v1::ListWorkersResponse* resp) override;

 private:
  grpc::Status Done(const char* method, const absl::Status& status);

  Coordinator* const coordinator_;
  ServerMetrics* const metrics_;
};

}  // namespace tune::server

#endif  // TUNE_SERVER_API_JOB_SERVICE_H_
