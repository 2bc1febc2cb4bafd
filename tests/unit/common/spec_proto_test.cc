#include "common/control/spec_proto.h"

#include <gtest/gtest.h>

namespace tune {
namespace {

TEST(SpecProtoTest, RoundTripKeepsEveryField) {
  spec::JobSpec s;
  s.name = "n";
  s.model = "/m";
  s.dataset.path = "/d.jsonl";
  s.dataset.packing = true;
  s.lora.targets = {"q_proj"};
  s.lora.rslora = true;
  s.training.learning_rate = 1e-3;
  s.training.nan_policy.lr_backoff = 0.25;
  s.resources.cpu_ranks = 2;
  s.faults.nan_at_steps = {5, 6};
  s.faults.gpu_memory_cap_gb = 8;
  v1::JobSpec p;
  SpecToProto(s, &p);
  spec::JobSpec back = SpecFromProto(p);
  EXPECT_EQ(spec::EmitJobSpecYaml(back), spec::EmitJobSpecYaml(s));
}

TEST(SpecProtoTest, EnumNames) {
  EXPECT_EQ(JobStateName(v1::JOB_STATE_SUCCEEDED), "SUCCEEDED");
  EXPECT_EQ(JobStateName(v1::JOB_STATE_UNSPECIFIED), "");
  EXPECT_EQ(JobStateFromName("running"), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(JobStateFromName("bogus"), v1::JOB_STATE_UNSPECIFIED);
  EXPECT_EQ(FailureReasonName(v1::FAILURE_REASON_NAN_ABORT), "NAN_ABORT");
  EXPECT_EQ(FailureReasonFromName("OOM"), v1::FAILURE_REASON_OOM);
  EXPECT_EQ(EventTypeName(v1::EVENT_TYPE_NAN_ALERT), "nan_alert");
  EXPECT_EQ(EventTypeFromName("oom_recovered"), v1::EVENT_TYPE_OOM_RECOVERED);
  EXPECT_EQ(EventTypeFromName("whatever"), v1::EVENT_TYPE_UNSPECIFIED);
}

}  // namespace
}  // namespace tune
