// Shared plumbing of the tunectl commands: the connection to tune-server,
// where output goes, and how RPC failures become messages and exit codes.
#ifndef TUNE_CLIENT_CLIENT_H_
#define TUNE_CLIENT_CLIENT_H_

#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/channel.h>
#include <grpcpp/support/status.h>

#include "client/output.h"
#include "tune/v1/job_service.grpc.pb.h"

namespace tune::client {

// Exit codes of tunectl (documented in `tunectl --help`).
inline constexpr int kExitOk = 0;           // Success (watch: the job SUCCEEDED).
inline constexpr int kExitFailure = 1;      // RPC error, or the job ended FAILED/CANCELLED.
inline constexpr int kExitUsage = 2;        // Bad command line, unreadable file, rejected spec.
inline constexpr int kExitUnreachable = 3;  // tune-server could not be reached.

inline constexpr char kDefaultServer[] = "127.0.0.1:7070";

struct CommandContext {
  std::string server = kDefaultServer;  // HOST:PORT of tune-server.
  OutputFormat format = OutputFormat::kTable;
  std::ostream* out = nullptr;  // Results.
  std::ostream* err = nullptr;  // Diagnostics.
  bool out_is_tty = false;      // Live rendering for watch.
  int terminal_width = 100;
  // Deadline of unary RPCs.
  int rpc_timeout_s = 30;
};

// One channel to tune-server, shared by every call of a command.
class ApiClient {
 public:
  explicit ApiClient(const std::string& address);

  v1::JobService::Stub& stub() { return *stub_; }
  const std::string& address() const { return address_; }

  // A ClientContext with the unary deadline set.
  std::unique_ptr<grpc::ClientContext> UnaryContext(int timeout_s) const;

  grpc::Status GetJob(const std::string& id, int timeout_s, v1::Job* job);
  // Every stored event with seq > after_seq, paging through GetJobEvents.
  grpc::Status GetAllEvents(const std::string& id, int64_t after_seq, int timeout_s,
                            std::vector<v1::JobEvent>* events);

 private:
  std::string address_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::JobService::Stub> stub_;
};

// Prints a one-line diagnostic for a failed RPC to ctx.err and returns the
// exit code: UNAVAILABLE -> "cannot reach tune-server at ADDR (is it running?
// --server / TUNE_SERVER)" and kExitUnreachable; INVALID_ARGUMENT ->
// kExitUsage; anything else kExitFailure. `what` names the operation
// ("get job-000001").
int ReportRpcError(const CommandContext& ctx, const grpc::Status& status, std::string_view what);

// Prints a JSON value as the selected format (json pretty, yaml block). Only
// valid for kJson/kYaml.
void PrintStructured(const CommandContext& ctx, const Json& value);

bool IsTerminal(v1::JobState state);

}  // namespace tune::client

#endif  // TUNE_CLIENT_CLIENT_H_
