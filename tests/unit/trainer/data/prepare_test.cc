// Dataset formats, masking, BOS hygiene, truncation, packing, preflight and
// the traps of issue 4 acceptance 3.
#include "worker/trainer/data/prepare.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "worker/trainer/data/cli.h"
#include "worker/trainer/data/dataset.h"

namespace tune::data {
namespace {

using json = nlohmann::json;
const std::string kAssets = TUNE_ASSETS_DIR;

bool Exists(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0;
}

#define REQUIRE_ASSETS()                                                              \
  if (!Exists(kAssets + "/llama3/tokenizer.json") ||                                  \
      !Exists(kAssets + "/llama3_1/tokenizer.json")) {                                \
    GTEST_SKIP() << "Llama 3 tokenizer assets missing in " << kAssets;                \
  }

const Tokenizer& Llama3() {
  static std::unique_ptr<Tokenizer> t = Tokenizer::FromDir(kAssets + "/llama3");
  return *t;
}
const Tokenizer& Llama31() {
  static std::unique_ptr<Tokenizer> t = Tokenizer::FromDir(kAssets + "/llama3_1");
  return *t;
}
json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}
// Llama 3 tokenizer with a replaced tokenizer_config.json.
std::unique_ptr<Tokenizer> Llama3WithConfig(const json& cfg) {
  static json tj = ReadJson(kAssets + "/llama3/tokenizer.json");
  return Tokenizer::FromJson(tj, cfg);
}

PreparedDataset Prep(const std::string& jsonl, const Tokenizer& tok, DataOptions o = {}) {
  std::istringstream in(jsonl);
  return PrepareFromStream(in, o, tok);
}

std::string Line(const json& j) { return j.dump() + "\n"; }

json Conversation() {
  return {{"messages",
           {{{"role", "system"}, {"content", "Be brief."}},
            {{"role", "user"}, {"content", "Hi"}},
            {{"role", "assistant"}, {"content", "Hello!"}}}}};
}

// Targets (labels != -100) in order.
std::vector<int32_t> Targets(const Example& ex) {
  std::vector<int32_t> out;
  for (int32_t l : ex.labels)
    if (l != kIgnoreIndex) out.push_back(l);
  return out;
}

void ExpectShifted(const Example& ex) {
  ASSERT_EQ(ex.labels.size(), ex.input_ids.size());
  for (size_t t = 0; t + 1 < ex.input_ids.size(); ++t) {
    if (ex.labels[t] != kIgnoreIndex) {
      EXPECT_EQ(ex.labels[t], ex.input_ids[t + 1]) << "t=" << t;
    }
  }
  EXPECT_EQ(ex.labels.back(), kIgnoreIndex);
}

TEST(PrepareTest, DoubleBosTrapFixedAndCountedLlama31) {
  REQUIRE_ASSETS();
  // Template writes <|begin_of_text|> and the 3.1 post-processor adds another.
  ASSERT_EQ(Llama31().Encode("<|begin_of_text|>x", true)[1], 128000);  // the trap is real
  PreparedDataset ds = Prep(Line(Conversation()) + Line(Conversation()), Llama31());
  ASSERT_EQ(ds.examples.size(), 2u);
  for (const Example& ex : ds.examples) {
    EXPECT_EQ(ex.input_ids[0], 128000);
    EXPECT_NE(ex.input_ids[1], 128000);
    EXPECT_EQ(std::count(ex.input_ids.begin(), ex.input_ids.end(), 128000), 1);
    ExpectShifted(ex);
  }
  EXPECT_EQ(ds.preflight_report["bos_fixed"], 2);
  EXPECT_EQ(ds.preflight_report["bos"]["duplicates_removed"], 2);
  EXPECT_EQ(ds.preflight_report["template"]["name"], "llama-3");
}

TEST(PrepareTest, OriginalLlama3TemplateTrapAndExactIds) {
  REQUIRE_ASSETS();
  PreparedDataset ds = Prep(Line(Conversation()), Llama3());
  const json& r = ds.preflight_report;
  EXPECT_EQ(r["bos_fixed"], 0);
  EXPECT_EQ(r["template"]["name"], "llama-3");
  EXPECT_TRUE(r["template"].value("generation_prompt_omitted", false));
  EXPECT_NE(r["template"]["reason"].get<std::string>().find("even without add_generation_prompt"),
            std::string::npos);
  // HF rendering (add_generation_prompt=False, minus the unconditional header),
  // tokenized by HF: ByteLevel post-processor adds nothing.
  const std::string hf =
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>";
  const Example& ex = ds.examples.at(0);
  EXPECT_EQ(ex.input_ids, Llama3().Encode(hf, true));
  EXPECT_EQ(ex.input_ids.back(), 128009);
  // Supervised: the assistant content and its <|eot_id|>, nothing else.
  EXPECT_EQ(Targets(ex), (std::vector<int32_t>{9906, 0, 128009}));
  ExpectShifted(ex);
  // Both configs feed the same ids.
  EXPECT_EQ(Prep(Line(Conversation()), Llama31()).examples.at(0).input_ids, ex.input_ids);
}

TEST(PrepareTest, PreflightReportShape) {
  REQUIRE_ASSETS();
  PreparedDataset ds = Prep(Line(Conversation()), Llama3());
  const json& r = ds.preflight_report;
  for (const char* k : {"examples", "tokens", "truncated", "dropped_no_supervised", "bos_fixed", "bad_lines",
                        "supervised_fraction_histogram", "first_example", "template", "format"}) {
    EXPECT_TRUE(r.contains(k)) << k;
  }
  EXPECT_EQ(r["supervised_fraction_histogram"].size(), 10u);
  int sum = 0;
  for (int v : r["supervised_fraction_histogram"]) sum += v;
  EXPECT_EQ(sum, 1);
  EXPECT_EQ(r["tokens"], ds.examples[0].input_ids.size());
  std::string sup;
  for (const json& s : r["first_example"]["segments"])
    if (s["supervised"]) sup += s["text"].get<std::string>();
  EXPECT_EQ(sup, "Hello!<|eot_id|>");
  EXPECT_EQ(r["format"]["name"], "messages");
}

TEST(PrepareTest, TrainOnAllSupervisesEverything) {
  REQUIRE_ASSETS();
  DataOptions o;
  o.train_on = "all";
  PreparedDataset ds = Prep(Line(Conversation()), Llama3(), o);
  const Example& ex = ds.examples.at(0);
  for (size_t t = 0; t + 1 < ex.input_ids.size(); ++t) EXPECT_EQ(ex.labels[t], ex.input_ids[t + 1]);
}

TEST(PrepareTest, SystemOnlyExampleIsDroppedAndAllDroppedFails) {
  REQUIRE_ASSETS();
  json sys_only = {{"messages", {{{"role", "system"}, {"content", "Only a system prompt."}}}}};
  PreparedDataset ds = Prep(Line(sys_only) + Line(Conversation()), Llama3());
  EXPECT_EQ(ds.examples.size(), 1u);
  EXPECT_EQ(ds.preflight_report["dropped_no_supervised"], 1);
  EXPECT_EQ(ds.preflight_report["dropped_examples"][0]["line"], 1);
  try {
    Prep(Line(sys_only), Llama3());
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("loss 0.0"), std::string::npos) << e.what();
    EXPECT_EQ(e.report()["dropped_no_supervised"], 1);
  }
}

TEST(PrepareTest, PromptLongerThanMaxSeqLength) {
  REQUIRE_ASSETS();
  std::string long_prompt;
  for (int i = 0; i < 200; ++i) long_prompt += "word ";
  json ex = {{"messages", {{{"role", "user"}, {"content", long_prompt}}, {{"role", "assistant"}, {"content", "ok"}}}}};
  DataOptions o;
  o.max_seq_length = 64;
  PreparedDataset ds = Prep(Line(ex) + Line(Conversation()), Llama3(), o);
  EXPECT_EQ(ds.preflight_report["truncated"], 1);
  EXPECT_EQ(ds.preflight_report["dropped_no_supervised"], 1);
  EXPECT_NE(ds.preflight_report["dropped_examples"][0]["reason"].get<std::string>().find("max_seq_length"),
            std::string::npos);
  ASSERT_EQ(ds.examples.size(), 1u);
  // Truncated but still supervised: kept, length capped.
  json long_answer = {{"messages", {{{"role", "user"}, {"content", "q"}}, {{"role", "assistant"}, {"content", long_prompt}}}}};
  PreparedDataset d2 = Prep(Line(long_answer), Llama3(), o);
  EXPECT_EQ(d2.examples.at(0).input_ids.size(), 64u);
  EXPECT_EQ(d2.preflight_report["truncated"], 1);
  ExpectShifted(d2.examples[0]);
}

TEST(PrepareTest, WrongRoleNamesAndEmptyConversationAreBadLines) {
  REQUIRE_ASSETS();
  json wrong = {{"messages", {{{"role", "human"}, {"content", "Hi"}}, {{"role", "gpt"}, {"content", "Yo"}}}}};
  json empty = {{"messages", json::array()}};
  std::string data = Line(Conversation()) + Line(wrong) + Line(empty) + "{not json\n";
  for (int i = 0; i < 7; ++i) data += Line(Conversation());
  // 3 bad of 11 lines > 1%: the job fails, naming the lines.
  try {
    Prep(data, Llama3());
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("line 2: messages[0]: role 'human' is not one of system, user, assistant"),
              std::string::npos) << msg;
    EXPECT_NE(msg.find("line 3: \"messages\" is empty"), std::string::npos) << msg;
    EXPECT_NE(msg.find("line 4: invalid JSON"), std::string::npos) << msg;
  }
  DataOptions o;
  o.max_bad_line_fraction = 0.5;
  PreparedDataset ds = Prep(data, Llama3(), o);
  EXPECT_EQ(ds.examples.size(), 8u);
  EXPECT_EQ(ds.preflight_report["bad_lines"]["count"], 3);
  EXPECT_EQ(ds.preflight_report["bad_lines"]["first"][0]["line"], 2);
}

TEST(PrepareTest, FormatAutoDetection) {
  std::istringstream text("{\"text\": \"hello\"}\n");
  EXPECT_EQ(ReadJsonl(text, "auto").format, DatasetFormat::kText);
  std::istringstream pc("\n{\"prompt\": \"p\", \"completion\": \"c\"}\n");
  LoadedDataset d = ReadJsonl(pc, "auto");
  EXPECT_EQ(d.format, DatasetFormat::kPromptCompletion);
  EXPECT_NE(d.format_reason.find("line 2"), std::string::npos);
  std::istringstream sg(
      "{\"id\": 1}\n{\"conversations\": [{\"from\": \"system\", \"value\": \"s\"}, {\"from\": \"human\", "
      "\"value\": \"h\"}, {\"from\": \"gpt\", \"value\": \"g\"}]}\n");
  LoadedDataset s = ReadJsonl(sg, "auto");
  EXPECT_EQ(s.format, DatasetFormat::kSharegpt);
  ASSERT_EQ(s.examples.size(), 1u);
  EXPECT_EQ(s.examples[0].messages[1].role, "user");
  EXPECT_EQ(s.examples[0].messages[2].role, "assistant");
  ASSERT_EQ(s.bad_lines.size(), 1u);  // line 1 fits no format
  EXPECT_EQ(s.bad_lines[0].line, 1);
  std::istringstream msgs("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n");
  EXPECT_EQ(ReadJsonl(msgs, "auto").format, DatasetFormat::kMessages);
  std::istringstream none("{\"foo\": 1}\n");
  EXPECT_THROW(ReadJsonl(none, "auto"), std::invalid_argument);
  std::istringstream bad_from("{\"conversations\": [{\"from\": \"bot\", \"value\": \"x\"}]}\n");
  LoadedDataset b = ReadJsonl(bad_from, "sharegpt");
  ASSERT_EQ(b.bad_lines.size(), 1u);
  EXPECT_NE(b.bad_lines[0].reason.find("'bot'"), std::string::npos);
  std::istringstream x("{}\n");
  EXPECT_THROW(ReadJsonl(x, "csv"), std::invalid_argument);
}

TEST(PrepareTest, TextFormatAddsBosAndEos) {
  REQUIRE_ASSETS();
  PreparedDataset ds = Prep(Line({{"text", "Hello world"}}), Llama3());
  const Example& ex = ds.examples.at(0);
  EXPECT_EQ(ex.input_ids, (std::vector<int32_t>{128000, 9906, 1917, 128001}));
  EXPECT_EQ(ex.labels, (std::vector<int32_t>{9906, 1917, 128001, kIgnoreIndex}));
  EXPECT_EQ(ds.preflight_report["bos_fixed"], 1);  // BOS added (no post-processor BOS)
  // With the 3.1 files: BOS from the post-processor, EOS = <|eot_id|>.
  PreparedDataset d31 = Prep(Line({{"text", "Hello world"}}), Llama31());
  EXPECT_EQ(d31.examples.at(0).input_ids, (std::vector<int32_t>{128000, 9906, 1917, 128009}));
  EXPECT_EQ(d31.preflight_report["bos_fixed"], 0);
}

TEST(PrepareTest, PromptCompletionWithTemplateAndRaw) {
  REQUIRE_ASSETS();
  json pc = {{"prompt", "What is 2+2?"}, {"completion", " 4"}};
  PreparedDataset tds = Prep(Line(pc), Llama3());
  const Example& t = tds.examples.at(0);
  EXPECT_EQ(t.input_ids, Llama3().Encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                                         "What is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
                                         "\n\n4<|eot_id|>", false));
  // No chat_template in tokenizer_config.json: prompt + completion + EOS.
  auto plain = Llama3WithConfig({{"bos_token", "<|begin_of_text|>"}, {"eos_token", "<|end_of_text|>"}});
  PreparedDataset raw = Prep(Line(pc), *plain);
  const Example& r = raw.examples.at(0);
  std::vector<int32_t> want = {128000};
  for (int32_t id : plain->Encode("What is 2+2? 4", false)) want.push_back(id);
  want.push_back(128001);
  EXPECT_EQ(r.input_ids, want);
  std::vector<int32_t> targets = plain->Encode(" 4", false);
  targets.push_back(128001);
  EXPECT_EQ(Targets(r), targets);
  // Messages without any template: a clear DataError.
  EXPECT_THROW(Prep(Line(Conversation()), *plain), DataError);
}

TEST(PrepareTest, UnknownTemplateFails) {
  REQUIRE_ASSETS();
  auto custom = Llama3WithConfig({{"bos_token", "<|begin_of_text|>"},
                                  {"eos_token", "<|eot_id|>"},
                                  {"chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}"}});
  try {
    Prep(Line(Conversation()), *custom);
    FAIL();
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("refusing to guess"), std::string::npos);
  }
  DataOptions o;
  o.chat_template = "chatml";
  PreparedDataset ds = Prep(Line(Conversation()), *custom, o);
  EXPECT_EQ(ds.preflight_report["template"]["name"], "chatml");
  EXPECT_FALSE(ds.preflight_report["warnings"].empty());  // <|im_end|> is not a Llama 3 token
  EXPECT_EQ(ds.examples.at(0).input_ids[0], 128000);       // BOS added
}

TEST(PrepareTest, MistralSystemMessageIsABadLine) {
  REQUIRE_ASSETS();
  DataOptions o;
  o.chat_template = "mistral";
  o.max_bad_line_fraction = 0.9;
  json ok = {{"messages", {{{"role", "user"}, {"content", "Hi"}}, {{"role", "assistant"}, {"content", "Yo"}}}}};
  PreparedDataset ds = Prep(Line(Conversation()) + Line(ok), Llama31(), o);
  EXPECT_EQ(ds.preflight_report["bad_lines"]["count"], 1);
  EXPECT_NE(ds.preflight_report["bad_lines"]["first"][0]["reason"].get<std::string>().find("alternate"),
            std::string::npos);
  // The EOS in the template text is the <|eot_id|> of the 3.1 files and is supervised.
  EXPECT_EQ(Targets(ds.examples.at(0)).back(), 128009);
}

TEST(PrepareTest, PadTokenNeverSupervised) {
  REQUIRE_ASSETS();
  const std::string pad = Llama3().IdToToken(128004);  // a reserved special token
  auto padded = Llama3WithConfig({{"bos_token", "<|begin_of_text|>"},
                                  {"eos_token", "<|end_of_text|>"},
                                  {"pad_token", pad}});
  ASSERT_EQ(padded->pad_id(), 128004);
  PreparedDataset ds = Prep(Line({{"text", "a" + pad + "b"}}), *padded);
  const Example& ex = ds.examples.at(0);
  for (size_t t = 0; t + 1 < ex.input_ids.size(); ++t) {
    if (ex.input_ids[t + 1] == 128004) {
      EXPECT_EQ(ex.labels[t], kIgnoreIndex);
    }
  }
  EXPECT_EQ(std::count(ex.input_ids.begin(), ex.input_ids.end(), 128004), 1);
}

TEST(PrepareTest, PackingRestartsPositionsAndIsolatesSegments) {
  REQUIRE_ASSETS();
  DataOptions o;
  o.packing = true;
  o.max_seq_length = 12;
  std::string data;
  for (const char* s : {"one two three", "four five", "six seven eight nine ten eleven"}) data += Line({{"text", s}});
  PreparedDataset single = Prep(data, Llama3());
  PreparedDataset ds = Prep(data, Llama3(), o);
  ASSERT_EQ(single.examples.size(), 3u);
  // 5 + 4 tokens fit in 12; the third (9 tokens) starts a new sequence.
  ASSERT_EQ(ds.examples.size(), 2u);
  const Example& p = ds.examples[0];
  size_t n0 = single.examples[0].input_ids.size(), n1 = single.examples[1].input_ids.size();
  ASSERT_EQ(p.input_ids.size(), n0 + n1);
  for (size_t t = 0; t < p.input_ids.size(); ++t) {
    bool first = t < n0;
    EXPECT_EQ(p.segment_ids[t], first ? 0 : 1);
    EXPECT_EQ(p.position_ids[t], static_cast<int32_t>(first ? t : t - n0));
  }
  EXPECT_EQ(p.input_ids[n0], 128000);             // each example keeps its BOS
  EXPECT_EQ(p.labels[n0 - 1], kIgnoreIndex);       // no target across the boundary
  EXPECT_EQ(ds.examples[1].segment_ids, std::vector<int32_t>(ds.examples[1].input_ids.size(), 0));
  EXPECT_EQ(ds.preflight_report["sequences"], 2);
  EXPECT_EQ(ds.preflight_report["examples"], 3);
}

// --- CLI -------------------------------------------------------------------

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/tune_data_test_XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::system(("rm -rf '" + path_ + "'").c_str()); }
  const std::string& path() const { return path_; }
  void Write(const std::string& name, const std::string& content) const {
    std::ofstream(path_ + "/" + name) << content;
  }

 private:
  std::string path_;
};

std::string Slurp(const std::string& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A model folder (config.json + the tokenizer files) and a job spec.
void MakeJob(const TempDir& d, const std::string& tokdir, const std::string& data) {
  std::system(("mkdir -p '" + d.path() + "/model'").c_str());
  d.Write("model/config.json", R"({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})");
  d.Write("model/model.safetensors", "");  // the spec validator only checks it exists
  d.Write("model/tokenizer.json", Slurp(kAssets + "/" + tokdir + "/tokenizer.json"));
  d.Write("model/tokenizer_config.json", Slurp(kAssets + "/" + tokdir + "/tokenizer_config.json"));
  d.Write("data.jsonl", data);
  d.Write("job.yaml", "name: t\nmodel: model\ndataset:\n  path: data.jsonl\n  max_seq_length: 256\n"
                      "resources:\n  cpu_ranks: 1\n");
}

int RunCli(int (*fn)(int, char**), std::vector<std::string> args, std::string* out) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  testing::internal::CaptureStdout();
  int rc = fn(static_cast<int>(argv.size()), argv.data());
  *out = testing::internal::GetCapturedStdout();
  return rc;
}

TEST(CliTest, PreflightAndRender) {
  REQUIRE_ASSETS();
  TempDir d;
  MakeJob(d, "llama3_1", Line(Conversation()) + Line(Conversation()));
  std::string out;
  int rc = RunCli(RunPreflightCommand, {"preflight", "--config", d.path() + "/job.yaml"}, &out);
  ASSERT_EQ(rc, 0) << out;
  json report = json::parse(out);
  EXPECT_EQ(report["examples"], 2);
  EXPECT_EQ(report["bos_fixed"], 2);
  rc = RunCli(RunRenderCommand, {"render", "--config", d.path() + "/job.yaml", "--limit", "1"}, &out);
  ASSERT_EQ(rc, 0);
  std::istringstream lines(out);
  std::string line;
  int n = 0;
  while (std::getline(lines, line)) {
    json j = json::parse(line);
    EXPECT_EQ(j["ids"][0], 128000);
    EXPECT_NE(j["ids"][1], 128000);
    EXPECT_EQ(j["text"].get<std::string>().rfind("<|begin_of_text|><|start_header_id|>system", 0), 0u);
    EXPECT_EQ(j["labels"].size(), j["ids"].size());
    ++n;
  }
  EXPECT_EQ(n, 1);
}

TEST(CliTest, PreflightDataErrorExits5AndSpecErrorExits2) {
  REQUIRE_ASSETS();
  TempDir d;
  json sys_only = {{"messages", {{{"role", "system"}, {"content", "s"}}}}};
  MakeJob(d, "llama3", Line(sys_only));
  std::string out;
  EXPECT_EQ(RunCli(RunPreflightCommand, {"preflight", "--config", d.path() + "/job.yaml"}, &out), 5);
  EXPECT_EQ(json::parse(out)["dropped_no_supervised"], 1);
  d.Write("bad.yaml", "name: t\nmodel: model\nbogus_key: 1\n");
  EXPECT_EQ(RunCli(RunPreflightCommand, {"preflight", "--config", d.path() + "/bad.yaml"}, &out), 2);
  EXPECT_EQ(RunCli(RunPreflightCommand, {"preflight"}, &out), 2);
}

TEST(CliTest, TokenizeAndDecode) {
  REQUIRE_ASSETS();
  auto run = [](std::vector<std::string> args, const std::string& input, std::string* out) {
    std::istringstream in(input);
    std::streambuf* old = std::cin.rdbuf(in.rdbuf());
    int rc = RunCli(RunTokenizeCommand, std::move(args), out);
    std::cin.rdbuf(old);
    return rc;
  };
  const std::string dir = kAssets + "/llama3_1";
  std::string out;
  ASSERT_EQ(run({"tokenize", "--tokenizer", dir}, "Hello world\n", &out), 0);
  EXPECT_EQ(out, "[9906,1917]\n");
  ASSERT_EQ(run({"tokenize", "--tokenizer", dir, "--add-special", "--json"}, "\"a\\nb\"\n", &out), 0);
  EXPECT_EQ(out, json(Llama31().Encode("a\nb", true)).dump() + "\n");
  ASSERT_EQ(run({"tokenize", "--tokenizer", dir, "--decode", "--json"}, "[128000,9906,1917]\n", &out), 0);
  EXPECT_EQ(out, "\"<|begin_of_text|>Hello world\"\n");
  ASSERT_EQ(run({"tokenize", "--tokenizer", dir, "--decode", "--skip-special"}, "[128000,9906,1917]\n", &out), 0);
  EXPECT_EQ(out, "Hello world\n");
  EXPECT_EQ(run({"tokenize", "--tokenizer", dir}, std::string("ok\n\xC3\x28\n"), &out), 1);
  EXPECT_EQ(run({"tokenize"}, "", &out), 2);
}

}  // namespace
}  // namespace tune::data
