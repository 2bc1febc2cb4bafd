// Issue 2, acceptance 5: malformed specs are rejected at submit with one
// clear error each that names the field (or the line, for YAML syntax), exit
// code 2, nothing is queued, and the server stays up. Also: tunectl's message
// and exit code when no server is listening.
#include <sstream>

#include "tests/integration/control_plane/control_plane_fixture.h"

namespace tune::testing {
namespace {

using nlohmann::json;

// The indented error lines tunectl prints under "FILE was rejected:".
std::vector<std::string> ErrorLines(const std::string& err) {
  std::vector<std::string> lines;
  std::istringstream in(err);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("  ", 0) == 0) lines.push_back(line.substr(2));
  }
  return lines;
}

class SpecErrorsTest : public ControlPlaneTest {};

TEST_F(SpecErrorsTest, EachMalformedSpecGetsOneClearError) {
  Process* server = StartServer(5);
  ASSERT_NE(server, nullptr);
  std::string good = ReadFile(WriteJob(Params("good", 10), false));
  std::string model = Model(false);

  struct Case {
    std::string name;
    std::string yaml;
    std::string must_mention;  // field path or line reference
  };
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    size_t at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) s.replace(at, from.size(), to);
    return s;
  };
  std::vector<Case> cases = {
      {"bad-syntax", replace("  max_steps: 10\n", "  max_steps: [10\n"), ".yaml:"},
      {"unknown-key", replace("  max_steps: 10\n", "  max_stepz: 10\n"), "training.max_stepz"},
      {"wrong-type", replace("  max_steps: 10\n", "  max_steps: lots\n"), "training.max_steps"},
      {"negative-steps", replace("  max_steps: 10\n", "  max_steps: -5\n"),
       "training.max_steps"},
      {"missing-model", replace("model: " + model + "\n", "model: " + tmp_ + "/no/such/model\n"),
       "model"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    std::string path = tmp_ + "/" + c.name + ".yaml";
    WriteFile(path, c.yaml);
    CommandResult r = Tunectl({"submit", path});
    EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
    EXPECT_TRUE(r.out.empty()) << "no job id for a rejected spec: " << r.out;
    std::vector<std::string> lines = ErrorLines(r.err);
    ASSERT_EQ(lines.size(), 1u) << "exactly one error expected, got:\n" << r.err;
    EXPECT_NE(lines[0].find(c.must_mention), std::string::npos)
        << "the error must name '" << c.must_mention << "': " << lines[0];
    EXPECT_NE(lines[0].find(c.name + ".yaml"), std::string::npos)
        << "the error names the file: " << lines[0];
    EXPECT_TRUE(server->Running()) << "tune-server died on " << c.name;
    EXPECT_EQ(Tunectl({"list"}).exit_code, 0) << "tune-server must stay up";
  }
  // Nothing was queued; a good spec still goes through.
  json jobs = TunectlJson({"list"});
  ASSERT_TRUE(jobs.is_array());
  EXPECT_TRUE(jobs.empty()) << jobs.dump();
  std::string id = Submit(tmp_ + "/good.yaml");
  EXPECT_FALSE(id.empty());
  jobs = TunectlJson({"list"});
  ASSERT_EQ(jobs.size(), 1u);
  EXPECT_EQ(jobs[0].value("id", ""), id);
  EXPECT_EQ(jobs[0].value("name", ""), "good");
}

TEST_F(SpecErrorsTest, UnreachableServerIsReportedClearly) {
  // Nothing listens on port_ (no server started).
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"list"}, {"get", "job-000001"}, {"workers"}, {"logs", "x"}}) {
    CommandResult r = Tunectl(args);
    EXPECT_EQ(r.exit_code, 3) << args[0] << ": " << r.err;
    EXPECT_NE(r.err.find("cannot reach tune-server at " + server_address() +
                         " (is it running? --server / TUNE_SERVER)"),
              std::string::npos)
        << r.err;
  }
}

TEST_F(SpecErrorsTest, UnknownJobIsAnErrorNotAnEmptyAnswer) {
  ASSERT_NE(StartServer(5), nullptr);
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"get", "job-999999"}, {"watch", "job-999999"},
        {"logs", "job-999999"}, {"cancel", "job-999999"}}) {
    CommandResult r = Tunectl(args);
    EXPECT_EQ(r.exit_code, 1) << args[0] << ": " << r.out << r.err;
    EXPECT_NE(r.err.find("job-999999"), std::string::npos) << r.err;
  }
}

}  // namespace
}  // namespace tune::testing
