// The trainer's own small logger (DESIGN.md: no spdlog/fmt next to libtorch).
//
// Lines go to stderr as "2026-11-29T04:31:17.123Z I r0 message". stderr is
// what tune-worker keeps as the failing rank's tail, so messages must be
// self-contained. Thread-safe: one write(2) per line.
#ifndef TUNE_WORKER_TRAINER_LOGGER_H_
#define TUNE_WORKER_TRAINER_LOGGER_H_

#include <string>

namespace tune::train {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// The rank printed in every line (default 0).
void SetLogRank(int rank);
// Lines below `level` are dropped (default kInfo; TUNE_LOG_LEVEL=debug lowers it).
void SetLogLevel(LogLevel level);

void Log(LogLevel level, const std::string& message);
inline void LogDebug(const std::string& m) { Log(LogLevel::kDebug, m); }
inline void LogInfo(const std::string& m) { Log(LogLevel::kInfo, m); }
inline void LogWarning(const std::string& m) { Log(LogLevel::kWarning, m); }
inline void LogError(const std::string& m) { Log(LogLevel::kError, m); }

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_LOGGER_H_
