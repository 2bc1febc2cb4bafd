#include <grpcpp/client_context.h>

#include "absl/time/clock.h"
#include "client/commands/commands.h"
#include "common/control/spec_proto.h"

namespace tune::client {

CLI::App* AddListCommand(CLI::App& app, ListOptions* opts) {
  CLI::App* cmd = app.add_subcommand("list", "List jobs, newest first");
  cmd->add_option("--state", opts->states,
                  "Only jobs in these states (QUEUED, SCHEDULED, RUNNING, SUCCEEDED, FAILED, "
                  "CANCELLED); repeatable")
      ->check(CLI::IsMember({"QUEUED", "SCHEDULED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"},
                            CLI::ignore_case));
  cmd->add_option("--limit", opts->limit, "At most this many jobs")->check(CLI::Range(1, 100000));
  return cmd;
}

int RunList(const CommandContext& ctx, const ListOptions& opts) {
  ApiClient api(ctx.server);
  v1::ListJobsRequest req;
  for (const auto& s : opts.states) {
    std::string upper = s;
    for (auto& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    req.add_states(JobStateFromName(upper));
  }
  req.set_limit(opts.limit);
  v1::ListJobsResponse resp;
  auto rpc = api.UnaryContext(ctx.rpc_timeout_s);
  grpc::Status st = api.stub().ListJobs(rpc.get(), req, &resp);
  if (!st.ok()) return ReportRpcError(ctx, st, "list");
  std::vector<v1::Job> jobs(resp.jobs().begin(), resp.jobs().end());
  if (ctx.format == OutputFormat::kTable) {
    if (jobs.empty()) {
      *ctx.err << "no jobs\n";
      return kExitOk;
    }
    *ctx.out << RenderTable(JobsTable(jobs, absl::Now()));
    return kExitOk;
  }
  Json arr = Json::array();
  for (const auto& j : jobs) arr.push_back(JobToJson(j));
  PrintStructured(ctx, arr);
  return kExitOk;
}

}  // namespace tune::client
