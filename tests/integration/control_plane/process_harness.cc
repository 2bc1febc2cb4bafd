#include "tests/integration/control_plane/process_harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

extern char** environ;

namespace tune::testing {
namespace {

std::vector<std::string> BuildEnv(const Env& overrides) {
  std::map<std::string, std::string> env;
  for (char** e = environ; *e; ++e) {
    std::string kv = *e;
    auto eq = kv.find('=');
    if (eq == std::string::npos) continue;
    env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  for (const auto& [k, v] : overrides) {
    if (v.empty()) {
      env.erase(k);
    } else {
      env[k] = v;
    }
  }
  std::vector<std::string> out;
  for (const auto& [k, v] : env) out.push_back(k + "=" + v);
  return out;
}

std::vector<char*> CStrings(std::vector<std::string>& v) {
  std::vector<char*> out;
  for (auto& s : v) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

int ExitCodeOf(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// fork + exec with stdout/stderr redirected to the given fds; exec errors
// come back through a CLOEXEC pipe.
pid_t ForkExec(const std::vector<std::string>& argv, const Env& env, int out_fd, int err_fd,
               std::string* error) {
  std::vector<std::string> args = argv;
  std::vector<std::string> envs = BuildEnv(env);
  std::vector<char*> cargs = CStrings(args);
  std::vector<char*> cenv = CStrings(envs);
  int pipefd[2];
  if (pipe2(pipefd, O_CLOEXEC) != 0) {
    *error = std::string("pipe: ") + std::strerror(errno);
    return -1;
  }
  pid_t pid = fork();
  if (pid < 0) {
    *error = std::string("fork: ") + std::strerror(errno);
    close(pipefd[0]);
    close(pipefd[1]);
    return -1;
  }
  if (pid == 0) {
    setpgid(0, 0);
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, STDIN_FILENO);
    dup2(out_fd, STDOUT_FILENO);
    dup2(err_fd, STDERR_FILENO);
    // Tests may have blocked/ignored signals; children start clean.
    signal(SIGPIPE, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    execve(cargs[0], cargs.data(), cenv.data());
    int e = errno;
    ssize_t ignored = write(pipefd[1], &e, sizeof(e));
    (void)ignored;
    _exit(127);
  }
  close(pipefd[1]);
  int child_errno = 0;
  ssize_t n;
  do {
    n = read(pipefd[0], &child_errno, sizeof(child_errno));
  } while (n < 0 && errno == EINTR);
  close(pipefd[0]);
  if (n == sizeof(child_errno)) {
    *error = "exec " + argv[0] + ": " + std::strerror(child_errno);
    waitpid(pid, nullptr, 0);
    return -1;
  }
  return pid;
}

}  // namespace

std::unique_ptr<Process> Process::Spawn(const std::vector<std::string>& argv, const Env& env,
                                        const std::string& log_path, std::string* error) {
  int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) {
    *error = "open " + log_path + ": " + std::strerror(errno);
    return nullptr;
  }
  pid_t pid = ForkExec(argv, env, fd, fd, error);
  close(fd);
  if (pid < 0) return nullptr;
  std::unique_ptr<Process> p(new Process());
  p->pid_ = pid;
  p->name_ = std::filesystem::path(argv[0]).filename().string();
  p->log_path_ = log_path;
  return p;
}

Process::~Process() {
  if (pid_ > 0 && !reaped_) {
    kill(-pid_, SIGKILL);
    kill(pid_, SIGKILL);
    waitpid(pid_, &status_, 0);
    reaped_ = true;
  }
}

bool Process::Running() {
  if (reaped_) return false;
  pid_t r = waitpid(pid_, &status_, WNOHANG);
  if (r == pid_) {
    reaped_ = true;
    return false;
  }
  return true;
}

void Process::Kill9() {
  if (!reaped_) kill(pid_, SIGKILL);
  Wait(std::chrono::seconds(10));
}

std::optional<int> Process::Wait(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (Running()) {
    if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return status_;
}

int Process::Stop(std::chrono::milliseconds grace) {
  if (reaped_) return status_;
  kill(pid_, SIGTERM);
  if (auto st = Wait(grace)) return *st;
  kill(-pid_, SIGKILL);
  kill(pid_, SIGKILL);
  return Wait(std::chrono::seconds(10)).value_or(-1);
}

std::string Process::Log() const { return ReadFile(log_path_); }

std::string Process::LogTail(int lines) const {
  std::string text = Log();
  size_t pos = text.size();
  int seen = 0;
  while (pos > 0) {
    size_t nl = text.rfind('\n', pos - 1);
    if (nl == std::string::npos) {
      pos = 0;
      break;
    }
    if (nl + 1 < text.size() && ++seen > lines) {
      pos = nl + 1;
      break;
    }
    pos = nl;
  }
  return text.substr(pos);
}

CommandResult RunCommand(const std::vector<std::string>& argv, const Env& env,
                         std::chrono::milliseconds timeout) {
  CommandResult result;
  char out_path[] = "/tmp/tune-cmd-out-XXXXXX";
  char err_path[] = "/tmp/tune-cmd-err-XXXXXX";
  int out_fd = mkstemp(out_path);
  int err_fd = mkstemp(err_path);
  std::string error;
  pid_t pid = (out_fd >= 0 && err_fd >= 0) ? ForkExec(argv, env, out_fd, err_fd, &error) : -1;
  if (out_fd >= 0) close(out_fd);
  if (err_fd >= 0) close(err_fd);
  if (pid < 0) {
    result.err = error.empty() ? "cannot create temp files" : error;
  } else {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    while (true) {
      pid_t r = waitpid(pid, &status, WNOHANG);
      if (r == pid) {
        result.exit_code = ExitCodeOf(status);
        break;
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        kill(-pid, SIGKILL);
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        result.exit_code = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    result.out = ReadFile(out_path);
    result.err = ReadFile(err_path);
  }
  unlink(out_path);
  unlink(err_path);
  return result;
}

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  int port = -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    socklen_t len = sizeof(addr);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
      port = ntohs(addr.sin_port);
    }
  }
  close(fd);
  return port;
}

bool PortOpen(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

bool WaitForPort(int port, std::chrono::milliseconds timeout) {
  return WaitUntil([port] { return PortOpen(port); }, timeout, std::chrono::milliseconds(50));
}

bool WaitUntil(const std::function<bool()>& pred, std::chrono::milliseconds timeout,
               std::chrono::milliseconds every) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    if (pred()) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(every);
  }
}

bool PidAlive(pid_t pid) {
  if (pid <= 0) return false;
  if (kill(pid, 0) != 0) return false;
  // A zombie still answers kill(0); it is dead for our purposes.
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  auto close_paren = line.rfind(')');
  if (close_paren == std::string::npos || close_paren + 2 >= line.size()) return true;
  char state = line[close_paren + 2];
  return state != 'Z' && state != 'X';
}

std::string MakeTempDir(const std::string& prefix) {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/" + prefix + "-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) return "";
  return std::string(buf.data());
}

void RemoveTree(const std::string& path) {
  std::error_code ec;
  if (!path.empty()) std::filesystem::remove_all(path, ec);
}

void WriteFile(const std::string& path, const std::string& text) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace tune::testing
