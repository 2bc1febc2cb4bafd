#include <algorithm>
#include <chrono>
#include <thread>

#include <grpcpp/client_context.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/commands/commands.h"
#include "client/watch_view.h"
#include "common/control/spec_proto.h"

namespace tune::client {
namespace {

// Errors after which re-opening the stream can help (server restarting,
// network blip, server shutting the stream down).
bool Retryable(const grpc::Status& st) {
  switch (st.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::UNKNOWN:
    case grpc::StatusCode::INTERNAL:
    case grpc::StatusCode::ABORTED:
    case grpc::StatusCode::CANCELLED:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return true;
    default:
      return false;
  }
}

int ExitCodeFor(const v1::Job& job) {
  return job.state() == v1::JOB_STATE_SUCCEEDED ? kExitOk : kExitFailure;
}

}  // namespace

CLI::App* AddWatchCommand(CLI::App& app, WatchOptions* opts) {
  CLI::App* cmd = app.add_subcommand(
      "watch", "Follow a job live until it ends; exit 0 only if it SUCCEEDED");
  cmd->add_option("ID", opts->id, "Job id")->required();
  cmd->add_option("--reconnect-timeout", opts->reconnect_timeout_s,
                  "Give up after this many seconds without a stream (0: never)")
      ->check(CLI::NonNegativeNumber);
  return cmd;
}

int RunWatch(const CommandContext& ctx, ApiClient& api, const WatchOptions& opts) {
  // A unary call first: fails fast (and clearly) on a wrong address or id,
  // rather than entering the reconnect loop.
  v1::Job job;
  grpc::Status st = api.GetJob(opts.id, ctx.rpc_timeout_s, &job);
  if (!st.ok()) return ReportRpcError(ctx, st, "watch " + opts.id);

  WatchView::Options vo;
  vo.live = ctx.out_is_tty && ctx.format == OutputFormat::kTable;
  vo.width = ctx.terminal_width;
  WatchView view(*ctx.out, vo);
  const bool structured = ctx.format != OutputFormat::kTable;

  int64_t last_seq = 0;
  auto broken_since = std::chrono::steady_clock::now();
  bool broken = false;
  auto backoff = std::chrono::milliseconds(250);
  while (true) {
    grpc::ClientContext rpc;
    v1::WatchJobRequest req;
    req.set_id(opts.id);
    req.set_after_seq(last_seq);
    auto reader = api.stub().WatchJob(&rpc, req);
    v1::WatchJobResponse item;
    while (reader->Read(&item)) {
      if (broken) {
        // Notices go to stderr in json/yaml mode: stdout stays parseable.
        if (structured) {
          *ctx.err << "tunectl: reconnected to " << ctx.server << "\n";
        } else {
          view.Notice(absl::StrCat("reconnected to ", ctx.server));
        }
        broken = false;
      }
      backoff = std::chrono::milliseconds(250);
      // seq is strictly increasing; anything else is a replay we already showed.
      if (item.event().seq() <= last_seq) continue;
      last_seq = item.event().seq();
      if (item.has_job()) job = item.job();
      if (structured) {
        Json e = EventToJson(item.event());
        if (ctx.format == OutputFormat::kJson) {
          *ctx.out << ToJsonText(e, /*pretty=*/false) << "\n";
        } else {
          *ctx.out << "---\n" << ToYaml(e);
        }
        ctx.out->flush();
      } else {
        view.OnEvent(item.event(), job);
      }
    }
    st = reader->Finish();
    if (st.ok() && IsTerminal(job.state())) break;
    if (!st.ok() && !Retryable(st)) {
      return ReportRpcError(ctx, st, "watch " + opts.id);
    }
    // The stream ended early: either an error worth retrying, or the server
    // closed it without a terminal state (e.g. shutting down). Re-check the
    // job: it may have finished while no stream was open.
    v1::Job now;
    grpc::Status gst = api.GetJob(opts.id, ctx.rpc_timeout_s, &now);
    if (gst.ok()) {
      if (IsTerminal(now.state()) && now.last_event_seq() <= last_seq) {
        job = now;
        break;
      }
      if (st.ok()) {
        // Clean end without terminal state and the server is up: go again
        // right away, but not in a hot loop.
        std::this_thread::sleep_for(backoff);
        backoff = std::min(backoff * 2, std::chrono::milliseconds(5000));
        continue;
      }
    } else if (!Retryable(gst)) {
      return ReportRpcError(ctx, gst, "watch " + opts.id);
    }
    if (!broken) {
      broken = true;
      broken_since = std::chrono::steady_clock::now();
      std::string why = st.ok() ? gst.error_message() : st.error_message();
      if (!structured) {
        view.Notice(absl::StrCat("lost the stream from ", ctx.server, " (", why,
                                 "); reconnecting after seq ", last_seq));
      } else {
        *ctx.err << "tunectl: lost the stream from " << ctx.server << " (" << why
                 << "); reconnecting after seq " << last_seq << "\n";
      }
    }
    if (opts.reconnect_timeout_s > 0 &&
        std::chrono::steady_clock::now() - broken_since >
            std::chrono::seconds(opts.reconnect_timeout_s)) {
      *ctx.err << "tunectl: gave up on " << opts.id << " after " << opts.reconnect_timeout_s
               << " s without tune-server at " << ctx.server << " (last event seq " << last_seq
               << "; run `tunectl watch " << opts.id << "` to continue)\n";
      return kExitUnreachable;
    }
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::milliseconds(5000));
  }

  if (structured) {
    // The stream already printed every event; close with the final job.
    if (ctx.format == OutputFormat::kJson) {
      *ctx.out << ToJsonText(JobToJson(job), /*pretty=*/false) << "\n";
    } else {
      *ctx.out << "---\n" << ToYaml(JobToJson(job));
    }
    ctx.out->flush();
  } else {
    view.Finish(job);
  }
  return ExitCodeFor(job);
}

}  // namespace tune::client
