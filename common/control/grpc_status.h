// The one conversion between absl::Status and grpc::Status, used at the RPC edge only.
#ifndef TUNE_COMMON_CONTROL_GRPC_STATUS_H_
#define TUNE_COMMON_CONTROL_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace tune {

// Same code (the enums agree numerically) and message.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace tune

#endif  // TUNE_COMMON_CONTROL_GRPC_STATUS_H_
