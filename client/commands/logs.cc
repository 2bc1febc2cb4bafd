#include <grpcpp/client_context.h>

#include "client/commands/commands.h"

namespace tune::client {

CLI::App* AddLogsCommand(CLI::App& app, LogsOptions* opts) {
  CLI::App* cmd = app.add_subcommand("logs", "Print a job's stored events");
  cmd->add_option("ID", opts->id, "Job id")->required();
  cmd->add_option("--after-seq", opts->after_seq, "Only events with a larger seq")
      ->check(CLI::NonNegativeNumber);
  return cmd;
}

int RunLogs(const CommandContext& ctx, const LogsOptions& opts) {
  ApiClient api(ctx.server);
  // Pages are printed as they arrive so that a long history starts showing
  // at once and memory stays bounded (json/table); yaml needs one document.
  constexpr int kPage = 1000;
  int64_t after = opts.after_seq;
  std::vector<v1::JobEvent> all;
  bool table_header_done = false;
  while (true) {
    v1::GetJobEventsRequest req;
    req.set_id(opts.id);
    req.set_after_seq(after);
    req.set_limit(kPage);
    v1::GetJobEventsResponse resp;
    auto rpc = api.UnaryContext(ctx.rpc_timeout_s);
    grpc::Status st = api.stub().GetJobEvents(rpc.get(), req, &resp);
    if (!st.ok()) return ReportRpcError(ctx, st, "logs " + opts.id);
    std::vector<v1::JobEvent> page;
    for (const auto& e : resp.events()) {
      if (e.seq() <= after) continue;  // Never print an event twice.
      after = e.seq();
      page.push_back(e);
    }
    switch (ctx.format) {
      case OutputFormat::kJson:
        for (const auto& e : page) *ctx.out << ToJsonText(EventToJson(e), false) << "\n";
        break;
      case OutputFormat::kYaml:
        all.insert(all.end(), page.begin(), page.end());
        break;
      case OutputFormat::kTable: {
        std::string text = RenderTable(EventsTable(page));
        // Each page is aligned on its own; keep one header for the whole log.
        if (table_header_done) text = text.substr(text.find('\n') + 1);
        if (!page.empty()) {
          *ctx.out << text;
          table_header_done = true;
        }
        break;
      }
    }
    ctx.out->flush();
    if (!resp.more() || resp.events_size() == 0) break;
  }
  if (ctx.format == OutputFormat::kYaml) {
    Json arr = Json::array();
    for (const auto& e : all) arr.push_back(EventToJson(e));
    PrintStructured(ctx, arr);
  } else if (ctx.format == OutputFormat::kTable && !table_header_done) {
    *ctx.err << "no events for " << opts.id << "\n";
  }
  return kExitOk;
}

}  // namespace tune::client
