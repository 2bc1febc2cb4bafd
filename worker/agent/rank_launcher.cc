#include "worker/agent/rank_launcher.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "spdlog/spdlog.h"
#include "worker/agent/subprocess.h"

extern char** environ;

namespace tune::worker {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int kEventsFd = 3;
constexpr int kExecFailedCode = 127;
// After the last rank is reaped, how long to keep reading its pipes (a child
// of a rank may still hold them open).
constexpr absl::Duration kDrainAfterExit = absl::Seconds(1);
// Bytes read from one rank's pipe per supervision round, so one chatty rank
// cannot starve the others or delay exit handling.
constexpr size_t kReadBudgetPerRound = 1 << 20;

std::string ErrnoText(const std::string& what) {
  return absl::StrCat(what, ": ", std::strerror(errno));
}

// Writes `text` to `path` via a temporary file and rename, so a reader never
// sees half a file.
absl::Status WriteFileAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot rename ", tmp, ": ", ec.message()));
  return absl::OkStatus();
}

// Environment of one rank: the worker's own minus its secrets, plus the
// rendezvous variables.
std::vector<std::string> RankEnvironment(const std::map<std::string, std::string>& set,
                                         const std::map<std::string, std::string>& set_if_unset) {
  std::map<std::string, std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string entry(*e);
    size_t eq = entry.find('=');
    if (eq == std::string::npos) continue;
    env.emplace(entry.substr(0, eq), entry.substr(eq + 1));
  }
  env.erase("TUNE_JOIN_TOKEN");  // the worker's secret is none of the trainer's business
  for (const auto& [k, v] : set_if_unset) env.emplace(k, v);
  for (const auto& [k, v] : set) env[k] = v;
  std::vector<std::string> out;
  out.reserve(env.size());
  for (const auto& [k, v] : env) out.push_back(absl::StrCat(k, "=", v));
  return out;
}

std::vector<char*> CStrings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (std::string& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// Everything the child needs after fork, prepared before it: the child of a
// multi-threaded process may only make async-signal-safe calls.
struct ChildPlan {
  pid_t pgid = 0;  // 0: lead a new group
  pid_t parent_pid = 0;
  int null_fd = -1;
  int log_fd = -1;
  int event_fd = -1;
  const char* path = nullptr;
  const std::string* exec_error_prefix = nullptr;  // "... cannot execute PATH: errno "
  char* const* argv = nullptr;
  char* const* envp = nullptr;
};

void WriteAll(int fd, const char* s, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, s, n);
    if (w <= 0) return;
    s += w;
    n -= static_cast<size_t>(w);
  }
}

[[noreturn]] void RunChild(const ChildPlan& plan) {
  // Async-signal-safe calls only from here on.
  if (setpgid(0, plan.pgid) != 0) _exit(kExecFailedCode);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != plan.parent_pid) _exit(kExecFailedCode);  // the worker already died
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);  // the worker blocks SIGTERM/SIGINT
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof(dfl));
  dfl.sa_handler = SIG_DFL;
  for (int sig : {SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGCHLD, SIGUSR1, SIGUSR2}) {
    sigaction(sig, &dfl, nullptr);
  }
  // Move the sources above the targets first so no dup2 clobbers another source.
  int null_fd = fcntl(plan.null_fd, F_DUPFD_CLOEXEC, 10);
  int log_fd = fcntl(plan.log_fd, F_DUPFD_CLOEXEC, 10);
  int event_fd = fcntl(plan.event_fd, F_DUPFD_CLOEXEC, 10);
  if (null_fd < 0 || log_fd < 0 || event_fd < 0) _exit(kExecFailedCode);
  if (dup2(null_fd, STDIN_FILENO) < 0 || dup2(log_fd, STDOUT_FILENO) < 0 ||
      dup2(log_fd, STDERR_FILENO) < 0 || dup2(event_fd, kEventsFd) < 0) {
    _exit(kExecFailedCode);
  }
  // Everything else the worker opened is O_CLOEXEC; close the rest anyway
  // where the kernel can (Linux >= 5.9).
  syscall(SYS_close_range, kEventsFd + 1, ~0U, 0);
  execve(plan.path, plan.argv, plan.envp);
  const int err = errno;
  WriteAll(STDERR_FILENO, plan.exec_error_prefix->data(), plan.exec_error_prefix->size());
  char digits[16];
  int n = 0;
  int v = err;
  do {
    digits[n++] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v > 0 && n < 15);
  char line[20];
  int m = 0;
  while (n > 0) line[m++] = digits[--n];
  line[m++] = '\n';
  WriteAll(STDERR_FILENO, line, static_cast<size_t>(m));
  _exit(kExecFailedCode);
}

std::string ExitCodeMeaning(int code) {
  switch (code) {
    case 2: return "bad command line or spec";
    case 3: return "out of memory that re-planning could not absorb";
    case 4: return "NaN policy exhausted";
    case 5: return "dataset failed preflight";
    case kExecFailedCode: return "the trainer could not be executed";
    default: return "crash";
  }
}

bool IsKnownFailureReason(const std::string& reason) {
  static const char* const kReasons[] = {"OOM", "NAN_ABORT", "CRASH", "INVALID_SPEC", "DATA"};
  return std::find(std::begin(kReasons), std::end(kReasons), reason) != std::end(kReasons);
}

}  // namespace

std::string ReasonForExitCode(int exit_code) {
  switch (exit_code) {
    case 0: return "";
    case 2: return "INVALID_SPEC";
    case 3: return "OOM";
    case 4: return "NAN_ABORT";
    case 5: return "DATA";
    default: return "CRASH";
  }
}

ExitSummary SummarizeExit(const AttemptOutcome& o) {
  ExitSummary s;
  if (!o.launch_error.empty()) {
    s.state = "FAILED";
    s.reason = "CRASH";
    s.message = o.launch_error;
    s.failed_rank = o.first_failed_rank;
    return s;
  }
  if (o.cancelled) {
    s.state = "CANCELLED";
    s.reason = "CANCELLED";
    s.message = "cancelled: the ranks were stopped (SIGTERM, then SIGKILL after the grace period)";
    return s;
  }
  int failed = o.first_failed_rank;
  if (failed < 0) {
    for (size_t r = 0; r < o.exit_codes.size(); ++r) {
      if (o.exit_codes[r] != 0) {
        failed = static_cast<int>(r);
        break;
      }
    }
  }
  if (failed < 0 || failed >= static_cast<int>(o.exit_codes.size())) {
    s.state = "SUCCEEDED";
    s.reason = "";
    s.message = absl::StrCat("all ", o.exit_codes.size(), " ranks exited 0");
    return s;
  }
  s.state = "FAILED";
  s.failed_rank = failed;
  const int code = o.exit_codes[failed];
  std::string how = code > 128 && code < 128 + 65
                        ? absl::StrCat("rank ", failed, " was killed by ", SignalName(code - 128))
                        : absl::StrCat("rank ", failed, " exited with code ", code, " (",
                                       ExitCodeMeaning(code), ")");
  if (o.error_rank >= 0 && IsKnownFailureReason(o.error_reason)) {
    s.reason = o.error_reason;
    s.message = o.error_message.empty()
                    ? how
                    : absl::StrCat("rank ", o.error_rank, ": ", o.error_message);
  } else {
    s.reason = ReasonForExitCode(code);
    s.message = how;
  }
  return s;
}

std::string TailOfFile(const std::string& path, int max_lines) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  const std::streamoff start = std::max<std::streamoff>(0, size - (64 << 10));
  in.seekg(start);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (start > 0) {  // drop the partial first line
    size_t nl = text.find('\n');
    text = nl == std::string::npos ? "" : text.substr(nl + 1);
  }
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  size_t pos = text.size();
  for (int n = 0; n < max_lines && pos != std::string::npos && pos > 0; ++n) {
    pos = text.rfind('\n', pos - 1);
  }
  if (pos != std::string::npos && pos < text.size() && text[pos] == '\n') ++pos;
  if (pos == std::string::npos) pos = 0;
  return text.substr(pos);
}

absl::StatusOr<int> PickFreePort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(ErrnoText("socket"));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    std::string err = ErrnoText("bind 127.0.0.1:0");
    close(fd);
    return absl::InternalError(err);
  }
  close(fd);
  return static_cast<int>(ntohs(addr.sin_port));
}

bool IsSafeJobId(const std::string& id) {
  if (id.empty() || id.size() > 128 || id == "." || id == "..") return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == '-';
  });
}

struct RankLauncher::Attempt {
  AttemptKey key;
  v1::Assignment assignment;
  std::thread thread;

  std::mutex mu;  // guards the stop request below
  bool stop_requested = false;
  bool cancel = false;    // a user cancel: the attempt ends CANCELLED
  bool shutdown = false;  // the worker stops: no `exited` event
  absl::Duration grace;
};

RankLauncher::RankLauncher(LauncherOptions options, Outbox* outbox)
    : options_(std::move(options)), outbox_(outbox) {}

RankLauncher::~RankLauncher() { StopAll(options_.grace); }

void RankLauncher::SetExitCallback(ExitCallback callback) {
  std::lock_guard<std::mutex> lock(mu_);
  on_exit_ = std::move(callback);
}

std::string RankLauncher::AttemptDir(const AttemptKey& key) const {
  return absl::StrCat(options_.work_dir, "/jobs/", key.job_id, "/attempt-", key.attempt);
}

void RankLauncher::JoinFinishedLocked(std::vector<std::thread>* out) {
  for (std::thread& t : finished_) out->push_back(std::move(t));
  finished_.clear();
}

absl::Status RankLauncher::Launch(const v1::Assignment& assignment) {
  AttemptKey key{assignment.job_id(), assignment.attempt()};
  std::vector<std::thread> to_join;
  {
    std::lock_guard<std::mutex> lock(mu_);
    JoinFinishedLocked(&to_join);
    if (stopped_) {
      return absl::FailedPreconditionError("the worker is shutting down; not starting new attempts");
    }
    if (running_.count(key) > 0) {
      return absl::AlreadyExistsError(
          absl::StrCat(key.job_id, " attempt ", key.attempt, " is already running"));
    }
    auto attempt = std::make_shared<Attempt>();
    attempt->key = key;
    attempt->assignment = assignment;
    attempt->grace = options_.grace;
    running_[key] = attempt;
    attempt->thread = std::thread([this, attempt] { Supervise(attempt); });
  }
  for (std::thread& t : to_join) t.join();
  return absl::OkStatus();
}

bool RankLauncher::Cancel(const AttemptKey& key, absl::Duration grace) {
  std::shared_ptr<Attempt> attempt;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = running_.find(key);
    if (it == running_.end()) return false;
    attempt = it->second;
  }
  std::lock_guard<std::mutex> lock(attempt->mu);
  if (!attempt->stop_requested) {
    attempt->stop_requested = true;
    attempt->cancel = true;
    attempt->grace = grace > absl::ZeroDuration() ? grace : options_.grace;
  }
  return true;
}

std::vector<AttemptKey> RankLauncher::Running() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<AttemptKey> out;
  for (const auto& [key, attempt] : running_) out.push_back(key);
  return out;
}

RankLauncher::Usage RankLauncher::CurrentUsage() const {
  std::lock_guard<std::mutex> lock(mu_);
  Usage usage;
  for (const auto& [key, attempt] : running_) {
    const v1::Assignment& a = attempt->assignment;
    usage.gpus += a.gpus_size();
    usage.cpu_slots += a.gpus_size() > 0 ? 0 : a.cpu_ranks();
    usage.ranks += a.gpus_size() > 0 ? a.gpus_size() : a.cpu_ranks();
  }
  return usage;
}

void RankLauncher::StopAll(absl::Duration grace) {
  std::vector<std::shared_ptr<Attempt>> attempts;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
    for (const auto& [key, attempt] : running_) attempts.push_back(attempt);
  }
  for (const auto& attempt : attempts) {
    std::lock_guard<std::mutex> lock(attempt->mu);
    attempt->shutdown = true;
    if (!attempt->stop_requested) {
      attempt->stop_requested = true;
      attempt->grace = grace;
    }
  }
  WaitIdle(absl::InfiniteFuture());
  std::vector<std::thread> to_join;
  {
    std::lock_guard<std::mutex> lock(mu_);
    JoinFinishedLocked(&to_join);
  }
  for (std::thread& t : to_join) t.join();
}

bool RankLauncher::WaitIdle(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  while (!running_.empty()) {
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return false;
    idle_cv_.wait_for(lock, absl::ToChronoNanoseconds(std::min(left, absl::Hours(1))));
  }
  return true;
}

namespace {

struct Rank {
  int rank = 0;
  pid_t pid = -1;
  int event_fd = -1;  // read end, -1 once at EOF
  bool exited = false;
  int exit_code = -1;
  std::string log_path;
  std::unique_ptr<RankEventStream> stream;
};

}  // namespace

void RankLauncher::Supervise(std::shared_ptr<Attempt> attempt) {
  const AttemptKey key = attempt->key;
  const v1::Assignment& a = attempt->assignment;
  const std::string dir = AttemptDir(key);
  AttemptOutcome outcome;
  std::vector<Rank> ranks;

  auto emit = [&](const RelayedEvent& e) {
    if (e.type == v1::EVENT_TYPE_ERROR && outcome.error_rank < 0) {
      outcome.error_rank = e.rank;
      outcome.error_reason = e.error_reason;
      outcome.error_message = e.error_message;
    }
    outbox_->Add(key, e);
  };

  // ---- prepare -----------------------------------------------------------
  const int world = a.gpus_size() > 0 ? a.gpus_size() : a.cpu_ranks();
  std::string output_dir = a.spec().output().dir();
  std::string job_yaml = dir + "/job.yaml";
  int master_port = 0;
  auto prepare = [&]() -> absl::Status {
    if (!IsSafeJobId(key.job_id)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "job id '", key.job_id, "' is not usable as a directory name ([A-Za-z0-9._-] only)"));
    }
    if (key.attempt < 1) {
      return absl::InvalidArgumentError(absl::StrCat("attempt must be >= 1 (got ", key.attempt, ")"));
    }
    if (a.gpus_size() > 0 && a.cpu_ranks() > 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the assignment asks for ", a.gpus_size(), " GPUs and ", a.cpu_ranks(),
          " CPU ranks; exactly one kind is allowed"));
    }
    if (world < 1 || world > 1024) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the assignment has ", world, " ranks; it needs 1..1024 GPUs or CPU ranks"));
    }
    for (int gpu : a.gpus()) {
      if (std::find(options_.offered_gpus.begin(), options_.offered_gpus.end(), gpu) ==
          options_.offered_gpus.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "GPU ", gpu, " is not offered by worker ", options_.worker_name, " (offered: [",
            absl::StrJoin(options_.offered_gpus, ","), "])"));
      }
    }
    if (a.spec_yaml().empty()) {
      return absl::InvalidArgumentError("the assignment carries no spec_yaml");
    }
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
    if (output_dir.empty()) output_dir = absl::StrCat(options_.work_dir, "/jobs/", key.job_id, "/output");
    if (absl::Status s = WriteFileAtomically(job_yaml, a.spec_yaml()); !s.ok()) return s;
    absl::StatusOr<int> port = PickFreePort();
    if (!port.ok()) return port.status();
    master_port = *port;
    return absl::OkStatus();
  };

  auto finish = [&](bool emit_exited) {
    for (Rank& r : ranks) {
      if (r.event_fd >= 0) close(r.event_fd);
      r.event_fd = -1;
    }
    ExitSummary summary = SummarizeExit(outcome);
    if (emit_exited) {
      json fields = {{"state", summary.state},
                     {"reason", summary.reason},
                     {"exit_codes", outcome.exit_codes},
                     {"message", summary.message},
                     {"stderr_tail", ""}};
      if (summary.state == "FAILED" && summary.failed_rank >= 0 &&
          summary.failed_rank < static_cast<int>(ranks.size())) {
        fields["stderr_tail"] =
            TailOfFile(ranks[summary.failed_rank].log_path, options_.stderr_tail_lines);
      }
      outbox_->Add(key, MakeWorkerEvent("exited", fields, absl::Now()));
    }
    outbox_->CloseAttempt(key);
    if (!emit_exited) {
      spdlog::info("{} attempt {}: ranks stopped for the worker's shutdown (exit codes {})",
                   key.job_id, key.attempt, absl::StrJoin(outcome.exit_codes, ","));
    } else if (summary.state == "FAILED") {
      spdlog::warn("{} attempt {}: FAILED ({}): {}", key.job_id, key.attempt, summary.reason,
                   summary.message);
    } else {
      spdlog::info("{} attempt {}: {}: {}", key.job_id, key.attempt, summary.state,
                   summary.message);
    }
    ExitCallback callback;
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_.erase(key);
      finished_.push_back(std::move(attempt->thread));
      callback = on_exit_;
    }
    idle_cv_.notify_all();
    if (callback && emit_exited) callback(key, summary);
  };

  if (absl::Status s = prepare(); !s.ok()) {
    outcome.launch_error = absl::StrCat("cannot start ", key.job_id, " attempt ", key.attempt,
                                        ": ", s.message());
    finish(true);
    return;
  }

  // ---- spawn -------------------------------------------------------------
  std::vector<int> devices(a.gpus().begin(), a.gpus().end());
  const bool cpu_job = devices.empty();
  const int omp_threads = std::max(1, options_.usable_cores / world);
  std::map<std::string, std::string> common_env = {
      {"WORLD_SIZE", std::to_string(world)},
      {"LOCAL_WORLD_SIZE", std::to_string(world)},
      {"MASTER_ADDR", "127.0.0.1"},
      {"MASTER_PORT", std::to_string(master_port)},
      {"CUDA_VISIBLE_DEVICES", absl::StrJoin(devices, ",")},
      {"TUNE_JOB_ID", key.job_id},
      {"TUNE_ATTEMPT", std::to_string(key.attempt)},
  };
  std::map<std::string, std::string> defaults = {
      {"NCCL_NVLS_ENABLE", "0"},
      {"CUDA_DEVICE_ORDER", "PCI_BUS_ID"},  // CUDA numbers GPUs as NVML/nvidia-smi do
  };
  // CPU ranks share the cores; GPU ranks only get a default.
  (cpu_job ? common_env : defaults)["OMP_NUM_THREADS"] = std::to_string(omp_threads);

  std::vector<std::string> argv_strings = {options_.trainer, "--config", job_yaml,
                                           "--events-fd", std::to_string(kEventsFd),
                                           "--output", output_dir};
  if (a.resume()) argv_strings.push_back("--resume");
  std::vector<char*> argv = CStrings(argv_strings);

  const std::string exec_error_prefix = absl::StrCat(
      "tune-worker: cannot execute the trainer ", options_.trainer,
      " (check --trainer; 2 = no such file, 13 = permission denied): errno ");
  int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
  pid_t pgid = 0;
  std::string spawn_error = null_fd < 0 ? ErrnoText("open /dev/null") : "";
  for (int r = 0; r < world && spawn_error.empty(); ++r) {
    Rank rank;
    rank.rank = r;
    rank.log_path = absl::StrCat(dir, "/rank-", r, ".log");
    rank.stream = std::make_unique<RankEventStream>(r);
    int log_fd = open(rank.log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (log_fd < 0) {
      spawn_error = ErrnoText(absl::StrCat("cannot open ", rank.log_path));
      break;
    }
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) {
      spawn_error = ErrnoText("pipe2");
      close(log_fd);
      break;
    }
    // Room for bursts while this thread is busy elsewhere; best effort.
    fcntl(pipe_fds[1], F_SETPIPE_SZ, 1 << 20);
    fcntl(pipe_fds[0], F_SETFL, fcntl(pipe_fds[0], F_GETFL) | O_NONBLOCK);

    std::map<std::string, std::string> env = common_env;
    env["RANK"] = std::to_string(r);
    env["LOCAL_RANK"] = std::to_string(r);
    std::vector<std::string> env_strings = RankEnvironment(env, defaults);
    std::vector<char*> envp = CStrings(env_strings);

    ChildPlan plan;
    plan.pgid = pgid;
    plan.parent_pid = getpid();
    plan.null_fd = null_fd;
    plan.log_fd = log_fd;
    plan.event_fd = pipe_fds[1];
    plan.path = options_.trainer.c_str();
    plan.exec_error_prefix = &exec_error_prefix;
    plan.argv = argv.data();
    plan.envp = envp.data();
    pid_t pid = fork();
    if (pid == 0) RunChild(plan);
    const int fork_errno = errno;
    close(log_fd);
    close(pipe_fds[1]);
    if (pid < 0) {
      close(pipe_fds[0]);
      errno = fork_errno;
      spawn_error = ErrnoText("fork");
      break;
    }
    if (pgid == 0) pgid = pid;
    setpgid(pid, pgid);  // also done by the child; whichever runs first wins
    rank.pid = pid;
    rank.event_fd = pipe_fds[0];
    ranks.push_back(std::move(rank));
  }
  if (null_fd >= 0) close(null_fd);
  outcome.exit_codes.assign(world, -1);

  bool term_sent = false;
  bool kill_sent = false;
  absl::Time kill_at = absl::InfiniteFuture();
  auto signal_group = [&](int sig) {
    if (pgid > 0) kill(-pgid, sig);
  };
  auto stop_ranks = [&](absl::Duration grace) {
    if (term_sent) return;
    term_sent = true;
    kill_at = absl::Now() + grace;
    signal_group(grace > absl::ZeroDuration() ? SIGTERM : SIGKILL);
    if (grace <= absl::ZeroDuration()) kill_sent = true;
  };

  if (!spawn_error.empty()) {
    outcome.launch_error = absl::StrCat("cannot start ", key.job_id, " attempt ", key.attempt,
                                        ": ", spawn_error);
    stop_ranks(absl::ZeroDuration());
  } else {
    std::vector<int> pids;
    for (const Rank& r : ranks) pids.push_back(r.pid);
    emit(MakeWorkerEvent("started",
                         {{"worker", options_.worker_name},
                          {"devices", devices},
                          {"world_size", world},
                          {"resume", a.resume()},
                          {"pids", pids},
                          {"master_port", master_port},
                          {"attempt_dir", dir}},
                         absl::Now()));
    spdlog::info("{} attempt {}: started {} rank(s) of {} (pids {}), logs in {}", key.job_id,
                 key.attempt, world, options_.trainer, absl::StrJoin(pids, ","), dir);
  }

  // ---- supervise ---------------------------------------------------------
  // Why the ranks are being stopped; a worker shutdown gets no `exited` event.
  enum class StopCause { kNone, kRankFailed, kCancel, kShutdown };
  StopCause cause = StopCause::kNone;
  absl::Time all_exited_at = absl::InfiniteFuture();
  std::vector<char> buf(64 << 10);
  while (true) {
    // Stop requests (cancel / shutdown).
    {
      std::lock_guard<std::mutex> lock(attempt->mu);
      if (attempt->stop_requested && !term_sent) {
        cause = attempt->cancel ? StopCause::kCancel : StopCause::kShutdown;
        outcome.cancelled = attempt->cancel;
        stop_ranks(attempt->grace);
      }
    }

    // Events.
    std::vector<pollfd> pfds;
    std::vector<Rank*> polled;
    for (Rank& r : ranks) {
      if (r.event_fd >= 0) {
        pfds.push_back({r.event_fd, POLLIN, 0});
        polled.push_back(&r);
      }
    }
    const int timeout_ms = static_cast<int>(absl::ToInt64Milliseconds(options_.poll_interval));
    if (pfds.empty()) {
      absl::SleepFor(options_.poll_interval);
    } else if (poll(pfds.data(), pfds.size(), timeout_ms) > 0) {
      for (size_t i = 0; i < pfds.size(); ++i) {
        if (pfds[i].revents == 0) continue;
        Rank& r = *polled[i];
        size_t budget = kReadBudgetPerRound;
        while (budget > 0) {
          ssize_t got = read(r.event_fd, buf.data(), std::min(buf.size(), budget));
          if (got > 0) {
            budget -= static_cast<size_t>(got);
            for (const RelayedEvent& e :
                 r.stream->Feed(std::string_view(buf.data(), static_cast<size_t>(got)),
                                absl::Now())) {
              emit(e);
            }
            continue;
          }
          if (got < 0 && errno == EINTR) continue;
          if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
          for (const RelayedEvent& e : r.stream->Finish(absl::Now())) emit(e);  // EOF / error
          close(r.event_fd);
          r.event_fd = -1;
          break;
        }
      }
    }

    // Exits.
    bool all_exited = true;
    for (Rank& r : ranks) {
      if (r.exited) continue;
      int status = 0;
      pid_t got = waitpid(r.pid, &status, WNOHANG);
      if (got == r.pid) {
        r.exited = true;
        r.exit_code = ExitCodeFromWaitStatus(status);
        outcome.exit_codes[r.rank] = r.exit_code;
        if (r.exit_code != 0) {
          if (!term_sent) {
            cause = StopCause::kRankFailed;
            outcome.first_failed_rank = r.rank;
          }
          spdlog::log(term_sent ? spdlog::level::debug : spdlog::level::warn,
                      "{} attempt {}: rank {} (pid {}) exited with {}", key.job_id, key.attempt,
                      r.rank, r.pid, r.exit_code);
          stop_ranks(options_.grace);  // one rank failed: the group cannot go on
        }
      } else if (got < 0 && errno == ECHILD) {
        r.exited = true;  // reaped elsewhere; nothing to learn
      } else {
        all_exited = false;
      }
    }
    if (term_sent && !kill_sent && !all_exited && absl::Now() >= kill_at) {
      spdlog::warn("{} attempt {}: ranks still running after the grace period; SIGKILL",
                   key.job_id, key.attempt);
      signal_group(SIGKILL);
      kill_sent = true;
    }

    if (all_exited) {
      if (all_exited_at == absl::InfiniteFuture()) all_exited_at = absl::Now();
      bool open_pipes = std::any_of(ranks.begin(), ranks.end(),
                                    [](const Rank& r) { return r.event_fd >= 0; });
      if (!open_pipes) break;
      if (absl::Now() - all_exited_at > kDrainAfterExit) {
        // A descendant of a rank still holds a pipe: end the group for good.
        signal_group(SIGKILL);
        for (Rank& r : ranks) {
          if (r.event_fd < 0) continue;
          for (const RelayedEvent& e : r.stream->Finish(absl::Now())) emit(e);
        }
        break;
      }
    }
  }
  finish(cause != StopCause::kShutdown);
}

}  // namespace tune::worker
