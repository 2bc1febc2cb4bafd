#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <grpcpp/client_context.h>

#include "absl/strings/str_split.h"
#include "client/commands/commands.h"

namespace tune::client {

CLI::App* AddSubmitCommand(CLI::App& app, SubmitOptions* opts) {
  CLI::App* cmd = app.add_subcommand("submit", "Validate and queue a job from a YAML spec");
  cmd->add_option("FILE", opts->file, "Job spec (YAML); relative paths in it are relative to it")
      ->required();
  cmd->add_flag("--wait,-w", opts->wait,
                "Follow the job until it ends (like watch); exit 0 only if it SUCCEEDED");
  cmd->add_option("--reconnect-timeout", opts->reconnect_timeout_s,
                  "With --wait: give up after this many seconds without a stream (0: never)")
      ->check(CLI::NonNegativeNumber);
  return cmd;
}

int RunSubmit(const CommandContext& ctx, const SubmitOptions& opts) {
  namespace fs = std::filesystem;
  std::ifstream in(opts.file, std::ios::binary);
  if (!in) {
    *ctx.err << "tunectl: cannot read " << opts.file << ": " << std::strerror(errno) << "\n";
    return kExitUsage;
  }
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) {
    *ctx.err << "tunectl: error reading " << opts.file << "\n";
    return kExitUsage;
  }
  std::error_code ec;
  fs::path abs = fs::absolute(fs::path(opts.file), ec);
  if (ec) {
    *ctx.err << "tunectl: cannot resolve " << opts.file << ": " << ec.message() << "\n";
    return kExitUsage;
  }

  v1::SubmitJobRequest req;
  req.set_spec_yaml(text.str());
  req.set_base_dir(abs.lexically_normal().parent_path().string());
  req.set_source_name(opts.file);
  v1::SubmitJobResponse resp;
  ApiClient api(ctx.server);
  auto rpc = api.UnaryContext(ctx.rpc_timeout_s);
  grpc::Status st = api.stub().SubmitJob(rpc.get(), req, &resp);
  if (!st.ok()) {
    if (st.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
      // The server lists every problem, one per line, each naming the YAML
      // path and line; show them as they are.
      *ctx.err << "tunectl: " << opts.file << " was rejected:\n";
      for (absl::string_view line : absl::StrSplit(st.error_message(), '\n')) {
        if (!line.empty()) *ctx.err << "  " << line << "\n";
      }
      return kExitUsage;
    }
    return ReportRpcError(ctx, st, "submit");
  }
  const v1::Job& job = resp.job();
  if (opts.wait) {
    if (ctx.format == OutputFormat::kTable) {
      *ctx.out << job.id() << "\n";
      ctx.out->flush();
    }
    WatchOptions w;
    w.id = job.id();
    w.reconnect_timeout_s = opts.reconnect_timeout_s;
    if (ctx.format == OutputFormat::kTable) return RunWatch(ctx, api, w);
    // Machine-readable --wait: no stream on stdout, only the final job.
    std::ostringstream sink;
    CommandContext quiet = ctx;
    quiet.out = &sink;
    quiet.format = OutputFormat::kTable;
    quiet.out_is_tty = false;
    int rc = RunWatch(quiet, api, w);
    v1::Job final_job;
    grpc::Status gst = api.GetJob(job.id(), ctx.rpc_timeout_s, &final_job);
    if (!gst.ok()) return ReportRpcError(ctx, gst, "get " + job.id());
    PrintStructured(ctx, JobToJson(final_job));
    return rc;
  }
  if (ctx.format == OutputFormat::kTable) {
    *ctx.out << job.id() << "\n";
  } else {
    PrintStructured(ctx, JobToJson(job));
  }
  return kExitOk;
}

}  // namespace tune::client
