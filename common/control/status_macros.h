// absl::Status helpers for the control plane (never included by libtorch targets).
#ifndef TUNE_COMMON_CONTROL_STATUS_MACROS_H_
#define TUNE_COMMON_CONTROL_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define TUNE_CONCAT_INNER_(a, b) a##b
#define TUNE_CONCAT_(a, b) TUNE_CONCAT_INNER_(a, b)

// Returns from the calling function when `expr` (an absl::Status) is not OK.
#define RETURN_IF_ERROR(expr)                \
  do {                                       \
    ::absl::Status tune_status_ = (expr);    \
    if (!tune_status_.ok()) return tune_status_; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, MakeX());` unwraps an absl::StatusOr or returns its status.
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  ASSIGN_OR_RETURN_IMPL_(TUNE_CONCAT_(tune_statusor_, __LINE__), lhs, rexpr)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                           \
  if (!tmp.ok()) return tmp.status();           \
  lhs = std::move(tmp).value()

#endif  // TUNE_COMMON_CONTROL_STATUS_MACROS_H_
