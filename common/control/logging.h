// spdlog set-up for the control-plane binaries (never included by libtorch targets).
#ifndef TUNE_COMMON_CONTROL_LOGGING_H_
#define TUNE_COMMON_CONTROL_LOGGING_H_

#include <string>

namespace tune {

// Logs to stderr as "2026-11-29 04:30:00.123 I tune-server] message".
// `level` is trace|debug|info|warn|error; anything else is an error returned as false.
bool InitLogging(const std::string& program, const std::string& level);

}  // namespace tune

#endif  // TUNE_COMMON_CONTROL_LOGGING_H_
