#include "server/local_worker.h"

#include <dirent.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"

namespace tune::server {

std::string LocalWorkerBinary() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "tune-worker";
  std::string exe(buf, n);
  return exe.substr(0, exe.rfind('/') + 1) + "tune-worker";
}

bool HostHasNvidiaGpu() {
  DIR* d = opendir("/proc/driver/nvidia/gpus");
  if (!d) return false;
  bool any = false;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] != '.') any = true;
  }
  closedir(d);
  return any;
}

int UsableCores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

absl::Status LocalWorker::Start() {
  struct stat st;
  if (stat(options_.binary.c_str(), &st) != 0 || !(st.st_mode & S_IXUSR)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--local-worker: no executable tune-worker at ", options_.binary,
        "; build it (ninja tune-worker) or start a worker yourself"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = SpawnLocked(); !s.ok()) return s;
  supervisor_ = std::thread([this] { Supervise(); });
  return absl::OkStatus();
}

absl::Status LocalWorker::SpawnLocked() {
  std::vector<std::string> args = {options_.binary,   "--server",   options_.server,
                                   "--name",          "local",      "--work-dir",
                                   options_.work_dir, "--log-level", options_.log_level};
  if (options_.cpu_slots >= 0) {
    args.push_back("--cpu-slots");
    args.push_back(std::to_string(options_.cpu_slots));
  }
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  if (pid == 0) {
    // Child: die with the server; undo the server's blocked signals.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    signal(SIGPIPE, SIG_DFL);  // tune-server ignores it; exec would pass that on.
    // Its own process group: Ctrl-C reaches the server, which stops the worker in order.
    setpgid(0, 0);
    if (!options_.join_token.empty()) setenv("TUNE_JOIN_TOKEN", options_.join_token.c_str(), 1);
    execv(argv[0], argv.data());
    _exit(127);
  }
  pid_ = pid;
  spdlog::info("started local worker (pid {}): {} --server {} --name local --work-dir {}", pid,
               options_.binary, options_.server, options_.work_dir);
  return absl::OkStatus();
}

void LocalWorker::Supervise() {
  absl::Duration backoff = absl::Seconds(1);
  while (true) {
    pid_t pid;
    {
      std::lock_guard<std::mutex> lock(mu_);
      pid = pid_;
    }
    if (pid <= 0) return;
    int status = 0;
    pid_t r;
    do {
      r = waitpid(pid, &status, 0);
    } while (r < 0 && errno == EINTR);
    const absl::Time exited_at = absl::Now();
    std::unique_lock<std::mutex> lock(mu_);
    pid_ = -1;
    if (stopping_) {
      cv_.notify_all();
      return;
    }
    std::string how = WIFSIGNALED(status) ? absl::StrCat("signal ", WTERMSIG(status))
                                          : absl::StrCat("exit code ", WEXITSTATUS(status));
    spdlog::error("local worker exited unexpectedly ({}); restarting in {}", how,
                  absl::FormatDuration(backoff));
    if (cv_.wait_for(lock, absl::ToChronoNanoseconds(backoff), [&] { return stopping_; })) {
      cv_.notify_all();
      return;
    }
    // A worker that ran a while before dying starts over with a short backoff.
    backoff = absl::Now() - exited_at > absl::Minutes(1) ? absl::Seconds(1)
                                                          : std::min(backoff * 2, absl::Seconds(30));
    if (absl::Status s = SpawnLocked(); !s.ok()) {
      spdlog::error("cannot restart the local worker: {}", s.ToString());
      return;
    }
  }
}

void LocalWorker::Stop(absl::Duration grace) {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_ && !supervisor_.joinable()) return;
  stopping_ = true;
  cv_.notify_all();
  if (pid_ > 0) {
    spdlog::info("stopping local worker (pid {})", pid_);
    kill(pid_, SIGTERM);
    if (!cv_.wait_for(lock, absl::ToChronoNanoseconds(grace), [&] { return pid_ <= 0; })) {
      spdlog::warn("local worker did not stop within {}; killing it", absl::FormatDuration(grace));
      if (pid_ > 0) kill(pid_, SIGKILL);
    }
  }
  lock.unlock();
  if (supervisor_.joinable()) supervisor_.join();
}

}  // namespace tune::server
