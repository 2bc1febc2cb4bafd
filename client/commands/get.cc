#include "absl/time/clock.h"
#include "client/commands/commands.h"

namespace tune::client {

CLI::App* AddGetCommand(CLI::App& app, GetOptions* opts) {
  CLI::App* cmd = app.add_subcommand("get", "Show one job with its loss summary");
  cmd->add_option("ID", opts->id, "Job id, e.g. job-000001")->required();
  return cmd;
}

int RunGet(const CommandContext& ctx, const GetOptions& opts) {
  ApiClient api(ctx.server);
  v1::Job job;
  grpc::Status st = api.GetJob(opts.id, ctx.rpc_timeout_s, &job);
  if (!st.ok()) return ReportRpcError(ctx, st, "get " + opts.id);
  // The loss summary needs the step events; a job with a long history pages.
  std::vector<v1::JobEvent> events;
  st = api.GetAllEvents(opts.id, 0, ctx.rpc_timeout_s, &events);
  if (!st.ok()) return ReportRpcError(ctx, st, "events of " + opts.id);
  LossSummary losses = SummarizeLosses(events);
  if (ctx.format == OutputFormat::kTable) {
    *ctx.out << JobDetails(job, losses, absl::Now());
    return kExitOk;
  }
  Json j = JobToJson(job);
  j["loss"] = LossSummaryToJson(losses);
  PrintStructured(ctx, j);
  return kExitOk;
}

}  // namespace tune::client
