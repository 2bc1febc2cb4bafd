// JobService + AgentService over real gRPC on loopback, in one process: spec
// errors at submit, the Session stream (assignment down, events up, acks down)
// and WatchJob to the terminal state.
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "common/control/time_util.h"
#include "server/api/agent_service.h"
#include "server/api/job_service.h"

namespace tune::server {
namespace {

namespace fs = std::filesystem;

class ApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("tune_api_test_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "model");
    std::ofstream(dir_ / "model" / "config.json")
        << R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})";
    std::ofstream(dir_ / "model" / "model.safetensors") << "placeholder";
    std::ofstream(dir_ / "data.jsonl") << R"({"text": "hello"})" << "\n";

    auto s = JobStore::Open((dir_ / "jobs.db").string());
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
    CoordinatorOptions o;
    o.heartbeat_timeout = absl::Seconds(30);
    o.tick = absl::Milliseconds(100);
    coord_ = std::make_unique<Coordinator>(store_.get(), &metrics_, o);
    ASSERT_TRUE(coord_->Recover().ok());
    coord_->Start();
    jobs_ = std::make_unique<JobServiceImpl>(coord_.get(), &metrics_);
    agents_ = std::make_unique<AgentServiceImpl>(coord_.get(), &metrics_);
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(jobs_.get());
    b.RegisterService(agents_.get());
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                       grpc::InsecureChannelCredentials());
    job_stub_ = v1::JobService::NewStub(channel);
    agent_stub_ = v1::AgentService::NewStub(channel);
  }

  void TearDown() override {
    coord_->Shutdown();
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server_.reset();
    coord_.reset();
    store_.reset();
    fs::remove_all(dir_);
  }

  static void Deadline(grpc::ClientContext* ctx, int seconds = 20) {
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  }

  grpc::Status Submit(const std::string& yaml, v1::SubmitJobResponse* resp,
                      const std::string& base_dir = "") {
    v1::SubmitJobRequest req;
    req.set_spec_yaml(yaml);
    req.set_base_dir(base_dir.empty() ? dir_.string() : base_dir);
    req.set_source_name("job.yaml");
    grpc::ClientContext ctx;
    Deadline(&ctx);
    return job_stub_->SubmitJob(&ctx, req, resp);
  }

  fs::path dir_;
  ServerMetrics metrics_;
  std::unique_ptr<JobStore> store_;
  std::unique_ptr<Coordinator> coord_;
  std::unique_ptr<JobServiceImpl> jobs_;
  std::unique_ptr<AgentServiceImpl> agents_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::JobService::Stub> job_stub_;
  std::unique_ptr<v1::AgentService::Stub> agent_stub_;
};

constexpr char kGoodSpec[] =
    "name: api-test\n"
    "model: model\n"
    "dataset: {path: data.jsonl, format: text}\n"
    "training: {max_steps: 3}\n"
    "resources: {cpu_ranks: 1}\n";

TEST_F(ApiTest, SubmitRejectsBadSpecsListingEveryError) {
  v1::SubmitJobResponse resp;
  grpc::Status s = Submit(
      "name: bad\nmodel: model\ndataset: {path: data.jsonl}\n"
      "training:\n  max_steps: -5\n  bogus_key: 1\n",
      &resp);
  ASSERT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("job.yaml:"), std::string::npos) << s.error_message();
  EXPECT_NE(s.error_message().find("training.bogus_key"), std::string::npos) << s.error_message();

  s = Submit("name: x\nmodel: no-such-model\ndataset: {path: data.jsonl}\n", &resp);
  ASSERT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("model"), std::string::npos) << s.error_message();

  s = Submit("name: [unclosed\n", &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  s = Submit(kGoodSpec, &resp, "relative/dir");
  ASSERT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("base_dir"), std::string::npos);

  // Nothing was queued.
  v1::ListJobsRequest lreq;
  v1::ListJobsResponse lresp;
  grpc::ClientContext ctx;
  ASSERT_TRUE(job_stub_->ListJobs(&ctx, lreq, &lresp).ok());
  EXPECT_EQ(lresp.jobs_size(), 0);
}

TEST_F(ApiTest, JobTravelsThroughTheAgentSessionAndWatchEndsWithTheFinalState) {
  v1::SubmitJobResponse submitted;
  grpc::Status s = Submit(kGoodSpec, &submitted);
  ASSERT_TRUE(s.ok()) << s.error_message();
  const v1::Job& job = submitted.job();
  EXPECT_EQ(job.state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(job.spec().model(), (dir_ / "model").string()) << "paths are made absolute";
  EXPECT_NE(job.spec_yaml().find("max_steps: 3"), std::string::npos) << job.spec_yaml();

  // A worker registers and opens its session.
  v1::RegisterRequest reg;
  reg.mutable_info()->set_name("w1");
  reg.mutable_info()->set_hostname("localhost");
  reg.mutable_info()->set_cpu_slots(2);
  v1::RegisterResponse reg_resp;
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    ASSERT_TRUE(agent_stub_->Register(&ctx, reg, &reg_resp).ok());
  }
  grpc::ClientContext session_ctx;
  Deadline(&session_ctx, 30);
  auto stream = agent_stub_->Session(&session_ctx);
  v1::AgentMessage hello;
  hello.set_session_id(reg_resp.session_id());
  ASSERT_TRUE(stream->Write(hello));
  v1::AgentMessage hb;
  hb.mutable_heartbeat();
  ASSERT_TRUE(stream->Write(hb));

  v1::ServerMessage down;
  ASSERT_TRUE(stream->Read(&down));
  ASSERT_TRUE(down.has_assignment()) << down.DebugString();
  EXPECT_EQ(down.assignment().job_id(), job.id());
  EXPECT_EQ(down.assignment().attempt(), 1);
  EXPECT_EQ(down.assignment().cpu_ranks(), 1);

  auto send_event = [&](int64_t seq, v1::EventType type, const std::string& payload) {
    v1::AgentMessage m;
    v1::AgentEvent* e = m.mutable_event();
    e->set_job_id(job.id());
    e->set_attempt(1);
    e->set_source_seq(seq);
    e->set_rank(-1);
    e->set_type(type);
    *e->mutable_time() = ToProtoTime(absl::Now());
    e->set_payload_json(payload);
    ASSERT_TRUE(stream->Write(m));
    v1::ServerMessage ack;
    ASSERT_TRUE(stream->Read(&ack));
    ASSERT_TRUE(ack.has_ack()) << ack.DebugString();
    EXPECT_EQ(ack.ack().job_id(), job.id());
    EXPECT_EQ(ack.ack().source_seq(), seq);
  };
  send_event(1, v1::EVENT_TYPE_STARTED, R"({"type":"started","worker":"w1"})");
  send_event(2, v1::EVENT_TYPE_EXITED, R"({"type":"exited","state":"SUCCEEDED","reason":""})");
  send_event(2, v1::EVENT_TYPE_EXITED, R"({"type":"exited","state":"SUCCEEDED","reason":""})");

  // Watch from the start: the stream ends by itself after SUCCEEDED.
  grpc::ClientContext watch_ctx;
  Deadline(&watch_ctx);
  v1::WatchJobRequest wreq;
  wreq.set_id(job.id());
  auto watch = job_stub_->WatchJob(&watch_ctx, wreq);
  v1::WatchJobResponse item;
  std::vector<int64_t> seqs;
  v1::JobState last_state = v1::JOB_STATE_UNSPECIFIED;
  while (watch->Read(&item)) {
    seqs.push_back(item.event().seq());
    last_state = item.job().state();
  }
  ASSERT_TRUE(watch->Finish().ok());
  EXPECT_EQ(seqs, (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(last_state, v1::JOB_STATE_SUCCEEDED);

  v1::GetJobEventsRequest ereq;
  ereq.set_id(job.id());
  ereq.set_limit(2);
  v1::GetJobEventsResponse eresp;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(job_stub_->GetJobEvents(&ctx, ereq, &eresp).ok());
  }
  EXPECT_EQ(eresp.events_size(), 2);
  EXPECT_TRUE(eresp.more());

  v1::ListWorkersResponse workers;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(job_stub_->ListWorkers(&ctx, v1::ListWorkersRequest(), &workers).ok());
  }
  ASSERT_EQ(workers.workers_size(), 1);
  EXPECT_EQ(workers.workers(0).state(), v1::WORKER_STATE_READY);
  EXPECT_EQ(workers.workers(0).free_cpu_slots(), 2);

  v1::GetJobRequest greq;
  greq.set_id("job-000404");
  v1::GetJobResponse gresp;
  {
    grpc::ClientContext ctx;
    EXPECT_EQ(job_stub_->GetJob(&ctx, greq, &gresp).error_code(), grpc::StatusCode::NOT_FOUND);
  }

  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ApiTest, SessionNeedsARegisteredSessionId) {
  grpc::ClientContext ctx;
  Deadline(&ctx);
  auto stream = agent_stub_->Session(&ctx);
  v1::AgentMessage hello;
  hello.set_session_id("not-registered");
  stream->Write(hello);
  stream->WritesDone();
  v1::ServerMessage m;
  EXPECT_FALSE(stream->Read(&m));
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

}  // namespace
}  // namespace tune::server
