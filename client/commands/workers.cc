#include <grpcpp/client_context.h>

#include "absl/time/clock.h"
#include "client/commands/commands.h"

namespace tune::client {

CLI::App* AddWorkersCommand(CLI::App& app) {
  return app.add_subcommand("workers", "List registered workers and their free devices");
}

int RunWorkers(const CommandContext& ctx) {
  ApiClient api(ctx.server);
  v1::ListWorkersRequest req;
  v1::ListWorkersResponse resp;
  auto rpc = api.UnaryContext(ctx.rpc_timeout_s);
  grpc::Status st = api.stub().ListWorkers(rpc.get(), req, &resp);
  if (!st.ok()) return ReportRpcError(ctx, st, "workers");
  std::vector<v1::Worker> workers(resp.workers().begin(), resp.workers().end());
  if (ctx.format == OutputFormat::kTable) {
    if (workers.empty()) {
      *ctx.err << "no workers registered\n";
      return kExitOk;
    }
    *ctx.out << RenderTable(WorkersTable(workers, absl::Now()));
    return kExitOk;
  }
  Json arr = Json::array();
  for (const auto& w : workers) arr.push_back(WorkerToJson(w));
  PrintStructured(ctx, arr);
  return kExitOk;
}

}  // namespace tune::client
