// Conversions between the plain job spec (common/jobspec) and tune.v1.JobSpec.
#ifndef TUNE_COMMON_CONTROL_SPEC_PROTO_H_
#define TUNE_COMMON_CONTROL_SPEC_PROTO_H_

#include "common/jobspec/job_spec.h"
#include "tune/v1/job.pb.h"

namespace tune {

void SpecToProto(const spec::JobSpec& in, v1::JobSpec* out);
spec::JobSpec SpecFromProto(const v1::JobSpec& in);

// "QUEUED" <-> JOB_STATE_QUEUED, "OOM" <-> FAILURE_REASON_OOM, "step" <-> EVENT_TYPE_STEP.
// Unknown names map to the *_UNSPECIFIED value; UNSPECIFIED maps to "".
std::string JobStateName(v1::JobState state);
v1::JobState JobStateFromName(const std::string& name);
std::string FailureReasonName(v1::FailureReason reason);
v1::FailureReason FailureReasonFromName(const std::string& name);
std::string EventTypeName(v1::EventType type);
v1::EventType EventTypeFromName(const std::string& name);

}  // namespace tune

#endif  // TUNE_COMMON_CONTROL_SPEC_PROTO_H_
