#include "common/control/time_util.h"

#include <cmath>

namespace tune {

google::protobuf::Timestamp ToProtoTime(absl::Time t) {
  google::protobuf::Timestamp ts;
  const int64_t nanos = absl::ToUnixNanos(t);
  ts.set_seconds(nanos / 1000000000);
  ts.set_nanos(static_cast<int32_t>(nanos % 1000000000));
  if (ts.nanos() < 0) {
    ts.set_seconds(ts.seconds() - 1);
    ts.set_nanos(ts.nanos() + 1000000000);
  }
  return ts;
}

absl::Time FromProtoTime(const google::protobuf::Timestamp& ts) {
  return absl::FromUnixSeconds(ts.seconds()) + absl::Nanoseconds(ts.nanos());
}

google::protobuf::Timestamp ProtoTimeFromUnixSeconds(double seconds) {
  google::protobuf::Timestamp ts;
  if (!std::isfinite(seconds) || seconds < 0) return ts;
  double whole = std::floor(seconds);
  ts.set_seconds(static_cast<int64_t>(whole));
  ts.set_nanos(static_cast<int32_t>((seconds - whole) * 1e9));
  return ts;
}

}  // namespace tune
