#include <grpcpp/client_context.h>

#include "client/commands/commands.h"
#include "common/control/spec_proto.h"

namespace tune::client {

CLI::App* AddCancelCommand(CLI::App& app, CancelOptions* opts) {
  CLI::App* cmd = app.add_subcommand(
      "cancel", "Cancel a job (running ranks get SIGTERM, then SIGKILL after the grace period)");
  cmd->add_option("ID", opts->id, "Job id")->required();
  return cmd;
}

int RunCancel(const CommandContext& ctx, const CancelOptions& opts) {
  ApiClient api(ctx.server);
  v1::CancelJobRequest req;
  req.set_id(opts.id);
  v1::CancelJobResponse resp;
  auto rpc = api.UnaryContext(ctx.rpc_timeout_s);
  grpc::Status st = api.stub().CancelJob(rpc.get(), req, &resp);
  if (!st.ok()) return ReportRpcError(ctx, st, "cancel " + opts.id);
  const v1::Job& job = resp.job();
  if (ctx.format != OutputFormat::kTable) {
    PrintStructured(ctx, JobToJson(job));
    return kExitOk;
  }
  if (job.state() == v1::JOB_STATE_CANCELLED) {
    *ctx.out << job.id() << " CANCELLED\n";
  } else if (IsTerminal(job.state())) {
    // Already over: say so rather than pretend the cancel did something.
    *ctx.out << job.id() << " already " << JobStateName(job.state()) << "\n";
  } else {
    *ctx.out << job.id() << " cancelling (" << JobStateName(job.state())
             << "; its ranks are being stopped)\n";
  }
  return kExitOk;
}

}  // namespace tune::client
