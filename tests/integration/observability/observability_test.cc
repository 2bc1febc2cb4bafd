// Observability integration test (issue 6, acceptance 1-3), against real
// peers on loopback:
//   * tune-server with --metrics-listen, a tune-worker with a CPU slot, its own
//     --metrics-listen and the real tune-train when built (else the
//     control-plane test double), and a CPU job that reports a NaN alert;
//   * `promtool check metrics` on server and worker /metrics scrapes taken
//     mid-job; the worker reports its CPU slot's host as gpu="cpu" under the
//     same worker label the server uses;
//   * a real Prometheus, configured from deploy/prometheus/prometheus.yml
//     (targets and intervals replaced), scraping server and worker during the
//     job;
//   * every PromQL expression of deploy/grafana/*.json and of the rule files
//     in deploy/prometheus/ - parsed out of the files, never listed here -
//     returns at least one series from that Prometheus;
//   * `promtool check config`, `promtool check rules`, `promtool test rules`.
//
// Expressions are evaluated as Grafana and the rule manager would, with two
// rewrites: Grafana variables become match-all values ($job -> .*, interval
// macros -> 1m), and a top-level comparison gets `bool`, so an alert that
// is (rightly) not firing still shows that the series it watches exist.
//
// Skips (GTEST_SKIP, with the reason) only when prometheus or promtool is not
// on PATH: `apt-get install prometheus` (scripts/install-deps.sh has it).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include "tests/integration/control_plane/control_plane_fixture.h"
#include "tests/integration/control_plane/process_harness.h"

namespace tune::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using std::chrono::milliseconds;
using std::chrono::seconds;

std::string DeployDir() {
  const char* env = std::getenv("TUNE_DEPLOY_DIR");
  return env && *env ? env : TUNE_DEPLOY_DIR;
}

// Absolute path of `name` on PATH, "" when absent.
std::string FindOnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    if (dir.empty()) continue;
    fs::path p = fs::path(dir) / name;
    if (access(p.c_str(), X_OK) == 0) return p.string();
  }
  return "";
}

// Minimal HTTP/1.0 GET on 127.0.0.1:port (HTTP/1.0: no chunked bodies).
// Returns the status code (-1 when the connection fails) and fills *body.
int HttpGet(int port, const std::string& target, std::string* body) {
  body->clear();
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  const std::string req = "GET " + target + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return -1;
  }
  std::string resp;
  char buf[65536];
  for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) resp.append(buf, n);
  close(fd);
  const size_t sp = resp.find(' ');
  const size_t end = resp.find("\r\n\r\n");
  if (sp == std::string::npos || end == std::string::npos) return -1;
  *body = resp.substr(end + 4);
  return std::atoi(resp.c_str() + sp + 1);
}

std::string UrlEncode(const std::string& s) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

// Grafana variables -> values that select everything: interval macros
// ($__rate_interval, $__interval, $__range, ...) become 1m; any other
// $var / ${var} / ${var:fmt} / [[var]] becomes the regex .* (the dashboards'
// allValue), which is what "All" sends.
std::string SubstituteGrafanaVariables(const std::string& expr) {
  static const std::regex kMacro(R"(\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?)");
  static const std::regex kVar(R"(\$\{[A-Za-z_][A-Za-z0-9_]*(:[A-Za-z]+)?\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[A-Za-z_][A-Za-z0-9_]*\]\])");
  std::string out = std::regex_replace(expr, kMacro, "1m");
  return std::regex_replace(out, kVar, ".*");
}

// Adds `bool` to every comparison operator outside label matchers ({...})
// and string literals that does not have it, so a filter such as `x > 0`
// keeps its series (with value 0/1) instead of dropping them.
std::string AddBoolToComparisons(const std::string& expr) {
  std::string out;
  int braces = 0;
  char quote = 0;
  for (size_t i = 0; i < expr.size(); ++i) {
    const char c = expr[i];
    if (quote) {
      out += c;
      if (c == '\\' && i + 1 < expr.size()) {
        out += expr[++i];
      } else if (c == quote) {
        quote = 0;
      }
      continue;
    }
    if (c == '"' || c == '\'' || c == '`') {
      quote = c;
      out += c;
      continue;
    }
    if (c == '{') ++braces;
    if (c == '}') --braces;
    std::string op;
    if (braces == 0) {
      const std::string two = expr.substr(i, 2);
      if (two == "==" || two == "!=" || two == ">=" || two == "<=") {
        op = two;
      } else if (c == '>' || c == '<') {
        op = std::string(1, c);
      }
    }
    if (op.empty()) {
      out += c;
      continue;
    }
    out += op;
    i += op.size() - 1;
    size_t j = i + 1;
    while (j < expr.size() && std::isspace(static_cast<unsigned char>(expr[j]))) ++j;
    if (expr.compare(j, 4, "bool") != 0) out += " bool";
  }
  return out;
}

struct Query {
  std::string where;  // File and JSON path / rule name, for failure messages.
  std::string expr;   // As written in the file.
  // For a Grafana `label_values(metric, label)` variable: the label that the
  // series of `expr` must carry.
  std::string label;
};

// Every "expr" string anywhere in a dashboard (panel targets, annotations,
// rows' nested panels) plus the templating variables' queries.
void CollectDashboardExprs(const json& node, const std::string& path, const std::string& file,
                           std::vector<Query>* out) {
  if (node.is_object()) {
    for (auto it = node.begin(); it != node.end(); ++it) {
      if (it.key() == "expr" && it.value().is_string()) {
        if (!it.value().get<std::string>().empty()) {
          out->push_back({file + ":" + path + "/expr", it.value().get<std::string>(), ""});
        }
      } else {
        CollectDashboardExprs(it.value(), path + "/" + it.key(), file, out);
      }
    }
  } else if (node.is_array()) {
    for (size_t i = 0; i < node.size(); ++i) {
      CollectDashboardExprs(node[i], path + "/" + std::to_string(i), file, out);
    }
  }
}

void CollectTemplateQueries(const json& dash, const std::string& file, std::vector<Query>* out) {
  if (!dash.contains("templating")) return;
  static const std::regex kLabelValues(R"(^\s*label_values\(\s*(.*?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$)");
  static const std::regex kQueryResult(R"(^\s*query_result\((.*)\)\s*$)");
  for (const json& v : dash["templating"].value("list", json::array())) {
    if (v.value("type", "") != "query") continue;
    std::string q;
    if (v.contains("query") && v["query"].is_object()) q = v["query"].value("query", "");
    if (v.contains("query") && v["query"].is_string()) q = v["query"].get<std::string>();
    if (q.empty()) q = v.value("definition", "");
    const std::string where = file + ":templating/" + v.value("name", "?");
    std::smatch m;
    if (std::regex_match(q, m, kLabelValues)) {
      out->push_back({where, m[1].str(), m[2].str()});
    } else if (std::regex_match(q, m, kQueryResult)) {
      out->push_back({where, m[1].str(), ""});
    } else {
      ADD_FAILURE() << where << ": template query \"" << q
                    << "\" is neither label_values(METRIC, LABEL) nor query_result(EXPR); "
                       "teach this test its form";
    }
  }
}

std::vector<std::string> FilesWithExtension(const std::string& dir,
                                            const std::vector<std::string>& exts) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const std::string ext = e.path().extension().string();
    if (std::find(exts.begin(), exts.end(), ext) != exts.end()) out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

class ObservabilityTest : public ControlPlaneTest {
 protected:
  // Evaluates `expr` at the current time; fills *series with the result
  // vector (a scalar counts as one) or *error.
  bool Evaluate(int prom_port, const std::string& expr, json* series, std::string* error) {
    std::string body;
    const int code = HttpGet(prom_port, "/api/v1/query?query=" + UrlEncode(expr), &body);
    json r = json::parse(body, nullptr, false);
    if (code != 200 || r.is_discarded() || r.value("status", "") != "success") {
      *error = "HTTP " + std::to_string(code) + ": " + body;
      return false;
    }
    const json& data = r["data"];
    if (data.value("resultType", "") == "scalar" || data.value("resultType", "") == "string") {
      *series = json::array({data["result"]});
    } else {
      *series = data["result"];
    }
    return true;
  }
};

TEST_F(ObservabilityTest, MetricsDashboardsAndAlertsAgainstRealPrometheus) {
  const std::string prometheus = FindOnPath("prometheus");
  const std::string promtool = FindOnPath("promtool");
  if (prometheus.empty() || promtool.empty()) {
    GTEST_SKIP() << "prometheus and promtool are not on PATH; install Debian's `prometheus` "
                    "package (scripts/install-deps.sh) to run this test";
  }
  const std::string deploy = DeployDir();
  const std::string prom_dir = deploy + "/prometheus";
  const std::string grafana_dir = deploy + "/grafana";

  // --- The files themselves: rule files are the YAML files with `groups`,
  // rule tests those with `tests` (the same split the Helm chart makes).
  std::vector<std::string> rule_files, rule_tests;
  for (const std::string& f : FilesWithExtension(prom_dir, {".yml", ".yaml"})) {
    YAML::Node doc = YAML::LoadFile(f);
    if (doc.IsMap() && doc["groups"]) rule_files.push_back(f);
    if (doc.IsMap() && doc["tests"]) rule_tests.push_back(f);
  }
  ASSERT_FALSE(rule_files.empty()) << "no rule file (YAML with `groups:`) in " << prom_dir;
  ASSERT_FALSE(rule_tests.empty()) << "no rule test file (YAML with `tests:`) in " << prom_dir;
  {
    std::vector<std::string> argv = {promtool, "check", "rules"};
    argv.insert(argv.end(), rule_files.begin(), rule_files.end());
    CommandResult r = RunCommand(argv, {}, seconds(30));
    EXPECT_EQ(r.exit_code, 0) << "promtool check rules:\n" << r.out << r.err;
  }
  bool nan_alert_tested = false;
  for (const std::string& t : rule_tests) {
    CommandResult r = RunCommand({promtool, "test", "rules", t}, {}, seconds(60));
    EXPECT_EQ(r.exit_code, 0) << "promtool test rules " << t << ":\n" << r.out << r.err;
    nan_alert_tested |= ReadFile(t).find("alertname: TunefleetNanAlert") != std::string::npos;
  }
  EXPECT_TRUE(nan_alert_tested) << "no rule test exercises TunefleetNanAlert";
  {
    CommandResult r = RunCommand({promtool, "check", "config", "--syntax-only",
                                  prom_dir + "/prometheus.yml"},
                                 {}, seconds(30));
    EXPECT_EQ(r.exit_code, 0) << "promtool check config:\n" << r.out << r.err;
  }

  // Queries: dashboards, then alert rules.
  std::vector<Query> dashboard_queries;
  const std::vector<std::string> dashboards = FilesWithExtension(grafana_dir, {".json"});
  ASSERT_FALSE(dashboards.empty()) << "no dashboard JSON in " << grafana_dir;
  for (const std::string& f : dashboards) {
    json dash = json::parse(ReadFile(f), nullptr, false);
    ASSERT_FALSE(dash.is_discarded()) << f << " is not valid JSON";
    const std::string name = fs::path(f).filename().string();
    CollectDashboardExprs(dash, "", name, &dashboard_queries);
    CollectTemplateQueries(dash, name, &dashboard_queries);
    // The job overview must be filterable by job.
    bool has_job_var = false;
    for (const json& v : dash["templating"].value("list", json::array())) {
      has_job_var |= v.value("name", "") == "job";
    }
    EXPECT_TRUE(has_job_var) << name << " has no `job` template variable";
  }
  std::vector<Query> rule_queries;
  for (const std::string& f : rule_files) {
    YAML::Node doc = YAML::LoadFile(f);
    for (const auto& g : doc["groups"]) {
      for (const auto& r : g["rules"]) {
        const std::string name = r["alert"] ? r["alert"].as<std::string>()
                                            : r["record"].as<std::string>("?");
        rule_queries.push_back({fs::path(f).filename().string() + ":" + name,
                                r["expr"].as<std::string>(), ""});
        if (r["alert"]) {
          EXPECT_TRUE(r["annotations"] && r["annotations"]["runbook"])
              << name << " in " << f << " has no runbook annotation";
        }
      }
    }
  }
  ASSERT_GE(dashboard_queries.size(), 10u) << "dashboard expressions not found";
  ASSERT_GE(rule_queries.size(), 5u);

  // --- Real processes: server with /metrics, a CPU worker, Prometheus.
  const int metrics_port = FreePort();
  // A short retention, so the end of the test can see a finished job's
  // series go (the queries all run while the job is still RUNNING).
  Process* server = StartServer(
      10, {"--metrics-listen", "127.0.0.1:" + std::to_string(metrics_port),
           "--metrics-retention", "2"});
  ASSERT_NE(server, nullptr);
  ASSERT_TRUE(WaitForPort(metrics_port, seconds(10))) << "no /metrics on " << metrics_port;

  const TrainerChoice trainer = PreferredTrainer();
  const int worker_metrics_port = FreePort();
  ASSERT_NE(StartWorker("obs-w1", 1, trainer, {{"FAKE_TRAINER_STEP_MS", "250"}},
                        {"--metrics-listen", "127.0.0.1:" + std::to_string(worker_metrics_port)}),
            nullptr);
  ASSERT_TRUE(WaitForPort(worker_metrics_port, seconds(10)))
      << "no worker /metrics on " << worker_metrics_port;

  // Prometheus, configured from the shipped prometheus.yml: same scrape
  // settings (honor_labels above all), local target, 1 s intervals.
  const int prom_port = FreePort();
  YAML::Node cfg = YAML::LoadFile(prom_dir + "/prometheus.yml");
  cfg["global"]["scrape_interval"] = "1s";
  cfg["global"]["evaluation_interval"] = "1s";
  YAML::Node rules(YAML::NodeType::Sequence);
  for (const std::string& f : rule_files) rules.push_back(f);
  cfg["rule_files"] = rules;
  // Both shipped scrape jobs, each pointed at its local process (the
  // workers' file_sd discovery is dropped: the one target is static here).
  YAML::Node scrapes(YAML::NodeType::Sequence);
  std::map<std::string, int> job_ports = {{"tunefleet-server", metrics_port},
                                          {"tunefleet-workers", worker_metrics_port}};
  for (YAML::Node sc : cfg["scrape_configs"]) {
    const std::string name = sc["job_name"].as<std::string>();
    auto port = job_ports.find(name);
    if (port == job_ports.end()) continue;
    EXPECT_TRUE(sc["honor_labels"] && sc["honor_labels"].as<bool>())
        << "the " << name << " scrape needs honor_labels: true (the `job` and `worker` labels)";
    YAML::Node target;
    target["targets"].push_back("127.0.0.1:" + std::to_string(port->second));
    YAML::Node statics(YAML::NodeType::Sequence);
    statics.push_back(target);
    sc["static_configs"] = statics;
    sc.remove("file_sd_configs");
    sc["scrape_interval"] = "1s";
    scrapes.push_back(sc);
    job_ports.erase(port);
  }
  for (const auto& [name, port] : job_ports) {
    ADD_FAILURE() << "deploy/prometheus/prometheus.yml has no " << name << " scrape job";
  }
  ASSERT_TRUE(job_ports.empty());
  cfg["scrape_configs"] = scrapes;
  YAML::Emitter emitter;
  emitter << cfg;
  const std::string prom_cfg = tmp_ + "/prometheus.yml";
  WriteFile(prom_cfg, emitter.c_str());
  fs::create_directories(tmp_ + "/prometheus-data");
  std::string error;
  auto prom = Process::Spawn(
      {prometheus, "--config.file=" + prom_cfg, "--storage.tsdb.path=" + tmp_ + "/prometheus-data",
       "--web.listen-address=127.0.0.1:" + std::to_string(prom_port), "--log.level=warn"},
      {}, tmp_ + "/prometheus.log", &error);
  ASSERT_NE(prom, nullptr) << error;
  processes_.push_back(std::move(prom));
  std::string body;
  ASSERT_TRUE(WaitUntil([&] { return HttpGet(prom_port, "/-/ready", &body) == 200; },
                        seconds(30)))
      << "Prometheus not ready:\n" << processes_.back()->LogTail(30);
  // Target discovery hands targets to the scraper in batches (every 5 s), so
  // wait for the first scrape before the job starts: its counters must be
  // seen at 0 before they are incremented.
  json up;
  for (const std::string scrape_job : {"tunefleet-server", "tunefleet-workers"}) {
    ASSERT_TRUE(WaitUntil(
        [&] {
          return Evaluate(prom_port, "up{job=\"" + scrape_job + "\"} == 1", &up, &error) &&
                 up.size() == 1;
        },
        seconds(30)))
        << "Prometheus never scraped " << scrape_job << ": " << error << "\n"
        << processes_.back()->LogTail(30);
  }

  // --- A CPU job that reports a NaN alert at step kNanStep and runs long
  // enough for Prometheus to see it. The alert comes a few scrapes after the
  // start so Prometheus has seen the counter at 0 (an increment inside the
  // first scrape interval of a series is invisible to increase()).
  constexpr int kNanStep = 12;
  JobParams p = Params("obs", trainer.real ? 60 : 400, 1, 0, /*every_steps=*/1000);
  p.extra_yaml = "faults:\n  nan_at_steps: [" + std::to_string(kNanStep) + "]\n";
  const std::string id = Submit(WriteJob(p, trainer.real));
  ASSERT_FALSE(id.empty());

  // --- Mid-job scrape: the job's series are there; promtool accepts it.
  const std::string step_series = "tune_job_step{job=\"" + id + "\"}";
  std::string scrape;
  ASSERT_TRUE(WaitUntil(
      [&] {
        return HttpGet(metrics_port, "/metrics", &scrape) == 200 &&
               scrape.find(step_series) != std::string::npos &&
               scrape.find("tune_nan_alerts_total{job=\"" + id + "\"} 1") != std::string::npos;
      },
      seconds(60)))
      << "no step / NaN alert series for " << id << " in /metrics:\n" << scrape;
  EXPECT_EQ(GetJob(id).value("state", ""), "RUNNING") << "the scrape must be mid-job";
  EXPECT_NE(scrape.find("gpu=\"cpu\""), std::string::npos)
      << "CPU ranks' memory series (gpu=\"cpu\") missing:\n" << scrape;
  const std::string scrape_file = tmp_ + "/scrape.txt";
  WriteFile(scrape_file, scrape);
  {
    CommandResult r = RunCommand({"/bin/sh", "-c", "exec \"$0\" check metrics < \"$1\"",
                                  promtool, scrape_file},
                                 {}, seconds(30));
    EXPECT_EQ(r.exit_code, 0) << "promtool check metrics on the mid-job scrape:\n"
                              << r.out << r.err << "\nscrape:\n" << scrape;
  }

  // --- The worker's own /metrics mid-job: its CPU slot is busy with the one
  // rank, the host is its "cpu" device, and promtool accepts the text.
  std::string worker_scrape;
  auto has = [&](const std::string& text, const std::string& line) {
    return text.find(line) != std::string::npos;
  };
  EXPECT_TRUE(WaitUntil(
      [&] {
        return HttpGet(worker_metrics_port, "/metrics", &worker_scrape) == 200 &&
               has(worker_scrape, "tune_worker_ranks_running{worker=\"obs-w1\"} 1\n");
      },
      seconds(15)))
      << "worker /metrics never showed the running rank:\n" << worker_scrape;
  EXPECT_EQ(GetJob(id).value("state", ""), "RUNNING") << "the worker scrape must be mid-job";
  for (const char* line :
       {"tune_worker_connected{worker=\"obs-w1\"} 1\n",
        "tune_worker_slots{device=\"cpu\",state=\"busy\",worker=\"obs-w1\"} 1\n",
        "tune_worker_slots{device=\"cpu\",state=\"free\",worker=\"obs-w1\"} 0\n",
        "tune_worker_slots{device=\"gpu\",state=\"free\",worker=\"obs-w1\"} 0\n",
        "tune_worker_gpu_memory_bytes{gpu=\"cpu\",kind=\"used\",worker=\"obs-w1\"} ",
        "tune_worker_gpu_memory_bytes{gpu=\"cpu\",kind=\"total\",worker=\"obs-w1\"} ",
        "tune_worker_gpu_utilization_ratio{gpu=\"cpu\",worker=\"obs-w1\"} ",
        "tune_worker_outbox_events{worker=\"obs-w1\"} "}) {
    EXPECT_TRUE(has(worker_scrape, line)) << "missing " << line << " in\n" << worker_scrape;
  }
  // No GPU on a worker started with --gpus none: no numeric gpu label.
  EXPECT_FALSE(std::regex_search(worker_scrape, std::regex(R"(gpu="[0-9]+")"))) << worker_scrape;
  const std::string worker_scrape_file = tmp_ + "/worker-scrape.txt";
  WriteFile(worker_scrape_file, worker_scrape);
  {
    CommandResult r = RunCommand({"/bin/sh", "-c", "exec \"$0\" check metrics < \"$1\"",
                                  promtool, worker_scrape_file},
                                 {}, seconds(30));
    EXPECT_EQ(r.exit_code, 0) << "promtool check metrics on the worker's mid-job scrape:\n"
                              << r.out << r.err << "\nscrape:\n" << worker_scrape;
  }

  // --- Prometheus has the job, under its own `job` label (honor_labels).
  json series;
  ASSERT_TRUE(WaitUntil(
      [&] { return Evaluate(prom_port, step_series, &series, &error) && series.size() == 1; },
      seconds(30)))
      << "Prometheus never scraped " << step_series << " " << error << "\n"
      << processes_.back()->LogTail(30);

  // --- Every expression returns at least one series. Range functions need a
  // few samples, so each gets until a shared deadline.
  const auto deadline = std::chrono::steady_clock::now() + seconds(45);
  auto check = [&](const Query& q, const std::string& evaluated) {
    json result;
    std::string err;
    bool ok = false;
    do {
      ok = Evaluate(prom_port, evaluated, &result, &err);
      if (ok && !q.label.empty()) {
        json with_label = json::array();
        for (const json& s : result) {
          if (s.contains("metric") && s["metric"].contains(q.label)) with_label.push_back(s);
        }
        result = with_label;
      }
      if (ok && !result.empty()) break;
      std::this_thread::sleep_for(milliseconds(500));
    } while (std::chrono::steady_clock::now() < deadline);
    EXPECT_TRUE(ok && !result.empty())
        << q.where << ": no series for\n  " << q.expr << "\nevaluated as\n  " << evaluated
        << (q.label.empty() ? "" : "\n(series must carry label " + q.label + ")")
        << (ok ? "" : "\nerror: " + err);
  };
  for (const Query& q : dashboard_queries) {
    check(q, AddBoolToComparisons(SubstituteGrafanaVariables(q.expr)));
  }
  for (const Query& q : rule_queries) check(q, AddBoolToComparisons(q.expr));

  // Worker-reported and server-reported device series join on (worker, gpu):
  // both processes name the worker and its CPU device the same way.
  const std::string joined =
      "tune_worker_gpu_memory_bytes{kind=\"total\"} and on (worker, gpu) tune_gpu_memory_bytes";
  EXPECT_TRUE(WaitUntil(
      [&] { return Evaluate(prom_port, joined, &series, &error) && series.size() == 1; },
      seconds(15)))
      << "worker and server device series do not join on (worker, gpu): " << series.dump()
      << error;

  // The NaN alert is visible as an increase in Prometheus: the signal the
  // TunefleetNanAlert rule and the dashboard annotation use.
  const std::string nan_increase =
      "increase(tune_nan_alerts_total{job=\"" + id + "\"}[5m]) > 0";
  EXPECT_TRUE(WaitUntil(
      [&] { return Evaluate(prom_port, nan_increase, &series, &error) && series.size() == 1; },
      seconds(15)))
      << "NaN alert increment not seen by Prometheus: " << series.dump() << error;

  // --- Bounded cardinality: once the job has ended and the retention
  // window passed, /metrics no longer carries its series.
  ASSERT_EQ(Tunectl({"cancel", id}).exit_code, 0);
  WaitForState(id, "", seconds(30));
  const std::string job_label = "job=\"" + id + "\"";
  EXPECT_TRUE(WaitUntil(
      [&] {
        return HttpGet(metrics_port, "/metrics", &scrape) == 200 &&
               scrape.find(job_label) == std::string::npos;
      },
      seconds(15)))
      << id << "'s series still on /metrics after --metrics-retention 2:\n" << scrape;
  EXPECT_NE(scrape.find("tune_jobs{state=\"CANCELLED\"} 1"), std::string::npos) << scrape;
}

TEST(PromqlRewriteTest, GrafanaVariablesAndBool) {
  EXPECT_EQ(SubstituteGrafanaVariables(
                "increase(tune_nan_alerts_total{job=~\"$job\",w=~\"${worker}\"}[$__rate_interval])"),
            "increase(tune_nan_alerts_total{job=~\".*\",w=~\".*\"}[1m])");
  EXPECT_EQ(SubstituteGrafanaVariables("rate(x[$__interval]) + y{a=~\"[[a]]\"}"),
            "rate(x[1m]) + y{a=~\".*\"}");
  EXPECT_EQ(AddBoolToComparisons("a{x!=\"1\",y=~\"a>b\"} > 0.95"),
            "a{x!=\"1\",y=~\"a>b\"} > bool 0.95");
  EXPECT_EQ(AddBoolToComparisons("a >= 1 and on () b == 0"), "a >= bool 1 and on () b == bool 0");
  EXPECT_EQ(AddBoolToComparisons("a > bool 1"), "a > bool 1");
  EXPECT_EQ(AddBoolToComparisons("sum(rate(x[5m]))"), "sum(rate(x[5m]))");
}

}  // namespace
}  // namespace tune::testing
