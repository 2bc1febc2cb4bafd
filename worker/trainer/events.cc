#include "worker/trainer/events.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "worker/trainer/logger.h"

namespace tune::train {

nlohmann::json SanitizeNonFinite(nlohmann::json value) {
  if (value.is_number_float()) {
    const double v = value.get<double>();
    if (std::isnan(v)) return "nan";
    if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
    return value;
  }
  if (value.is_object() || value.is_array()) {
    for (auto& item : value) item = SanitizeNonFinite(std::move(item));
  }
  return value;
}

EventSink::EventSink(int rank, int events_fd, const std::string& file_path)
    : rank_(rank), events_fd_(events_fd) {
  if (!file_path.empty()) {
    file_fd_ = ::open(file_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (file_fd_ < 0) {
      throw std::runtime_error("cannot open events file " + file_path + ": " + std::strerror(errno) +
                               " (check that output.dir is writable)");
    }
  }
}

EventSink::~EventSink() {
  if (file_fd_ >= 0) ::close(file_fd_);
}

void EventSink::WriteAll(int fd, const std::string& line, bool* warned) {
  size_t off = 0;
  while (off < line.size()) {
    const ssize_t n = ::write(fd, line.data() + off, line.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (!*warned) {
        *warned = true;
        LogWarning(std::string("cannot write event to fd ") + std::to_string(fd) + ": " +
                   std::strerror(errno) + "; further failures on it are not reported");
      }
      return;
    }
    off += static_cast<size_t>(n);
  }
}

void EventSink::Emit(const std::string& type, const nlohmann::json& fields) {
  nlohmann::json event = nlohmann::json::object();
  event["type"] = type;
  event["time"] = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  event["rank"] = rank_;
  if (fields.is_object()) {
    for (auto it = fields.begin(); it != fields.end(); ++it) event[it.key()] = it.value();
  }
  // Invalid UTF-8 (e.g. a raw dataset snippet) is replaced rather than thrown.
  const std::string line =
      SanitizeNonFinite(std::move(event)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  std::lock_guard<std::mutex> lock(mu_);
  if (events_fd_ >= 0) WriteAll(events_fd_, line, &fd_warned_);
  if (file_fd_ >= 0) WriteAll(file_fd_, line, &file_warned_);
}

void EventSink::EmitLog(const std::string& level, const std::string& message) {
  Log(level == "warning" ? LogLevel::kWarning : LogLevel::kInfo, message);
  Emit("log", {{"level", level}, {"message", message}});
}

std::string FormatProgressLine(long step, long max_steps, double loss, double lr, double grad_norm,
                               double tokens_per_s, double vram_bytes) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), "step %ld/%ld loss %.4f lr %.1e gnorm %.2f tok/s %.0f vram %.1fG", step,
                max_steps, loss, lr, grad_norm, tokens_per_s, vram_bytes / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

}  // namespace tune::train
