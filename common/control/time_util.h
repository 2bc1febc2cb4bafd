// google.protobuf.Timestamp helpers.
#ifndef TUNE_COMMON_CONTROL_TIME_UTIL_H_
#define TUNE_COMMON_CONTROL_TIME_UTIL_H_

#include <google/protobuf/timestamp.pb.h>

#include "absl/time/time.h"

namespace tune {

google::protobuf::Timestamp ToProtoTime(absl::Time t);
absl::Time FromProtoTime(const google::protobuf::Timestamp& ts);
// Unix seconds with fraction, as the trainer writes "time".
google::protobuf::Timestamp ProtoTimeFromUnixSeconds(double seconds);

}  // namespace tune

#endif  // TUNE_COMMON_CONTROL_TIME_UTIL_H_
