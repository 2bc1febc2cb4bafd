// Tokenizer equality with Hugging Face's Rust `tokenizers` (npm binding),
// special tokens, decode, invalid UTF-8.
#include "worker/trainer/data/tokenizer.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace tune::data {
namespace {

using json = nlohmann::json;

const std::string kAssets = TUNE_ASSETS_DIR;
const std::string kTestData = std::string(TUNE_SOURCE_DIR) + "/tests/unit/trainer/data/testdata";

bool Exists(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0;
}

const Tokenizer& Llama3() {
  static std::unique_ptr<Tokenizer> t = Tokenizer::FromDir(kAssets + "/llama3");
  return *t;
}
const Tokenizer& Llama31() {
  static std::unique_ptr<Tokenizer> t = Tokenizer::FromDir(kAssets + "/llama3_1");
  return *t;
}

#define REQUIRE_ASSETS()                                                                   \
  if (!Exists(kAssets + "/llama3/tokenizer.json") ||                                       \
      !Exists(kAssets + "/llama3_1/tokenizer.json")) {                                     \
    GTEST_SKIP() << "Llama 3 tokenizer assets missing in " << kAssets                      \
                 << " (run scripts/fetch-assets.sh " << kAssets << ")";                    \
  }

std::vector<std::string> ReadCorpus(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) out.push_back(json::parse(line).get<std::string>());
  }
  return out;
}

std::string RunCapture(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) {
    *rc = -1;
    return out;
  }
  char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  *rc = pclose(p);
  return out;
}

TEST(TokenizerTest, GoldenIdsWithoutNode) {
  REQUIRE_ASSETS();
  std::ifstream in(kTestData + "/tokenizer_golden.jsonl");
  ASSERT_TRUE(in) << "golden file missing";
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    json j = json::parse(line);
    std::string text = j["text"];
    EXPECT_EQ(Llama3().Encode(text, false), j["llama3"].get<std::vector<int32_t>>()) << json(text).dump();
    EXPECT_EQ(Llama31().Encode(text, true), j["llama3_1_add_special"].get<std::vector<int32_t>>())
        << json(text).dump();
    ++n;
  }
  EXPECT_GE(n, 50);
}

// The acceptance test: >= 2,000 corpus lines, ids from the Rust library at
// test time, compared token for token.
void CompareWithNode(const std::string& dir, bool add_special, const Tokenizer& tok) {
  const std::string corpus = kTestData + "/tokenizer_corpus.jsonl";
  const std::string modules = kAssets + "/node_modules";
  int rc = 0;
  RunCapture("node --version 2>/dev/null", &rc);
  if (rc != 0) GTEST_SKIP() << "node not found on PATH: reference comparison skipped (golden test still ran)";
  if (!Exists(modules + "/tokenizers")) {
    GTEST_SKIP() << "npm package tokenizers missing in " << modules << " (scripts/fetch-assets.sh)";
  }
  std::string cmd = "node '" + kTestData + "/reference_ids.js' '" + modules + "' '" + kAssets + "/" +
                    dir + "/tokenizer.json' '" + corpus + "' " + (add_special ? "1" : "0");
  std::string out = RunCapture(cmd, &rc);
  ASSERT_EQ(rc, 0) << "reference script failed: " << cmd;
  std::vector<std::string> texts = ReadCorpus(corpus);
  ASSERT_GE(texts.size(), 2000u);
  std::istringstream ref(out);
  std::string line;
  size_t i = 0, mismatches = 0;
  while (std::getline(ref, line) && i < texts.size()) {
    std::vector<int32_t> want = json::parse(line).get<std::vector<int32_t>>();
    std::vector<int32_t> got = tok.Encode(texts[i], add_special);
    if (got != want && ++mismatches <= 10) {
      ADD_FAILURE() << "line " << i + 1 << " " << json(texts[i]).dump() << "\n want " << json(want).dump()
                    << "\n got  " << json(got).dump();
    }
    ++i;
  }
  EXPECT_EQ(i, texts.size()) << "reference produced fewer lines than the corpus";
  EXPECT_EQ(mismatches, 0u);
}

TEST(TokenizerTest, EqualsHuggingFaceOnCorpusLlama3) {
  REQUIRE_ASSETS();
  CompareWithNode("llama3", false, Llama3());
}

TEST(TokenizerTest, EqualsHuggingFaceOnCorpusLlama31WithSpecial) {
  REQUIRE_ASSETS();
  CompareWithNode("llama3_1", true, Llama31());
}

TEST(TokenizerTest, PostProcessors) {
  REQUIRE_ASSETS();
  // Original Llama 3: ByteLevel post-processor adds nothing.
  EXPECT_EQ(Llama3().Encode("Hello world", true), (std::vector<int32_t>{9906, 1917}));
  EXPECT_FALSE(Llama3().post_processor_adds_bos());
  // Llama 3.1: TemplateProcessing prepends BOS - even before a BOS in the text.
  EXPECT_EQ(Llama31().Encode("Hello world", true), (std::vector<int32_t>{128000, 9906, 1917}));
  EXPECT_EQ(Llama31().Encode("<|begin_of_text|>hi", true), (std::vector<int32_t>{128000, 128000, 6151}));
  EXPECT_TRUE(Llama31().post_processor_adds_bos());
  EXPECT_EQ(Llama31().Encode("", true), (std::vector<int32_t>{128000}));
  EXPECT_TRUE(Llama31().Encode("", false).empty());
}

TEST(TokenizerTest, SpecialIdsFromConfig) {
  REQUIRE_ASSETS();
  EXPECT_EQ(Llama3().bos_id(), 128000);
  EXPECT_EQ(Llama3().eos_id(), 128001);  // <|end_of_text|> in the original files
  EXPECT_EQ(Llama31().eos_id(), 128009);  // <|eot_id|> in the later files
  EXPECT_FALSE(Llama3().pad_id().has_value());
  EXPECT_EQ(Llama3().vocab_size(), 128256);
  EXPECT_EQ(Llama3().TokenToId("<|eot_id|>"), 128009);
  EXPECT_EQ(Llama3().TokenToId("Hello"), 9906);
  EXPECT_EQ(Llama3().TokenToId("no-such-token-xyz"), -1);
  EXPECT_EQ(Llama3().IdToToken(1917), "Ġworld");
  EXPECT_TRUE(Llama3().IsSpecial(128009));
  EXPECT_FALSE(Llama3().IsSpecial(1917));
}

TEST(TokenizerTest, SpecialTokensMatchedInsideText) {
  REQUIRE_ASSETS();
  // Raw-text special strings become their ids (HF default); near misses do not.
  EXPECT_EQ(Llama3().Encode("a<|eot_id|>b", false), (std::vector<int32_t>{64, 128009, 65}));
  auto near = Llama3().Encode("<|eot_id |>", false);
  EXPECT_EQ(std::count(near.begin(), near.end(), 128009), 0);
  // Leftmost-longest: "<|start_header_id|>" wins over any shorter prefix.
  EXPECT_EQ(Llama3().Encode("<|start_header_id|>user<|end_header_id|>", false),
            (std::vector<int32_t>{128006, 882, 128007}));
}

TEST(TokenizerTest, WhitespaceFollowsRustNotPcre2) {
  REQUIRE_ASSETS();
  // U+0085 is \s for the reference (it joins "  c" handling), U+FEFF is not.
  EXPECT_EQ(Llama3().Encode("a\xC2\x85" "b  c", false), (std::vector<int32_t>{64, 116360, 65, 220, 272}));
  EXPECT_EQ(Llama3().Encode("x\xEF\xBB\xBF y", false), (std::vector<int32_t>{87, 3305, 379}));
}

TEST(TokenizerTest, DecodeRoundTripAndSkipSpecial) {
  REQUIRE_ASSETS();
  for (const std::string& text : ReadCorpus(kTestData + "/tokenizer_corpus.jsonl")) {
    ASSERT_EQ(Llama3().Decode(Llama3().Encode(text, false)), text);
  }
  std::vector<int32_t> ids = Llama31().Encode("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", true);
  EXPECT_EQ(Llama31().Decode(ids, false),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
  EXPECT_EQ(Llama31().Decode(ids, true), "user\n\nHi");
  EXPECT_THROW(Llama3().Decode({1, 999999}), std::invalid_argument);
}

TEST(TokenizerTest, DecodeInvalidBytesLikeFromUtf8Lossy) {
  REQUIRE_ASSETS();
  // The first byte of a 4-byte emoji alone is one U+FFFD; "F0 9F" too (maximal subpart).
  std::vector<int32_t> emoji = Llama3().Encode("\xF0\x9F\x98\x80", false);  // 😀
  ASSERT_GE(emoji.size(), 1u);
  int32_t f0 = Llama3().TokenToId("ð");  // byte 0xF0 in the ByteLevel alphabet
  ASSERT_GE(f0, 0);
  EXPECT_EQ(Llama3().Decode({f0}), "\xEF\xBF\xBD");
  EXPECT_EQ(Llama3().Decode({f0, Llama3().TokenToId("a")}), "\xEF\xBF\xBD" "a");
}

TEST(TokenizerTest, InvalidUtf8NamesTheOffset) {
  REQUIRE_ASSETS();
  try {
    Llama3().Encode(std::string("ok \xC3\x28 bad"), false);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("byte offset 3"), std::string::npos) << e.what();
  }
  EXPECT_EQ(FindInvalidUtf8("\xED\xA0\x80"), 0u);       // surrogate
  EXPECT_EQ(FindInvalidUtf8("a\xC0\xAF"), 1u);          // overlong
  EXPECT_EQ(FindInvalidUtf8("ab\xF4\x90\x80\x80"), 2u); // > U+10FFFF
  EXPECT_EQ(FindInvalidUtf8("h\xC3\xA9llo"), std::string_view::npos);
}

TEST(TokenizerTest, RejectsUnsupportedFiles) {
  json tj = {{"model", {{"type", "Unigram"}}}, {"normalizer", nullptr}};
  try {
    Tokenizer::FromJson(tj, json(), "x/tokenizer.json");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("model.type"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Tokenizer::FromDir("/nonexistent-dir"), std::runtime_error);
}

// lstrip / rstrip / single_word / normalized / non-special added tokens, on a
// modified Llama 3 tokenizer.json, against the reference.
TEST(TokenizerTest, AddedTokenFlagsEqualHuggingFace) {
  REQUIRE_ASSETS();
  int rc = 0;
  RunCapture("node --version 2>/dev/null", &rc);
  if (rc != 0) GTEST_SKIP() << "node not found on PATH";
  std::ifstream in(kAssets + "/llama3/tokenizer.json");
  json tj = json::parse(in);
  for (json& a : tj["added_tokens"]) {
    std::string c = a["content"];
    if (c == "<|eot_id|>") a["lstrip"] = a["rstrip"] = true;
    if (c == "<|reserved_special_token_0|>") a["single_word"] = true;
    if (c == "<|reserved_special_token_1|>") {
      a["normalized"] = true;
      a["special"] = false;
    }
    if (c == "<|reserved_special_token_2|>") {
      a["content"] = "wordq";  // not a vocab entry, so the id stays
      a["single_word"] = true;
    }
    if (c == "<|reserved_special_token_3|>") {
      a["content"] = " abq";
      a["lstrip"] = true;
    }
  }
  const std::vector<std::string> lines = {
      "x <|eot_id|> y", "x\u3000\u3000<|eot_id|>\n\ny", "<|eot_id|>   ", "a<|reserved_special_token_0|>b",
      "a <|reserved_special_token_0|> b", "_<|reserved_special_token_0|>_", "\u00e9<|reserved_special_token_0|>",
      "foo<|reserved_special_token_1|>bar", "wordq wordqs swordq wordq_ wordqwordq -wordq- \u00e9wordq wordq",
      "  abq abq  abq", " <|eot_id|><|eot_id|> <|eot_id|> ", "1wordq", "\u65e5wordq\u65e5",
      "<|eot_id|>wordq<|eot_id|>", "wordq\u0301", "\u0663wordq", "wordq\u24b6", "wordq\u00b2", "wordq\u200d",
      "\u203fwordq", "wordq\u2160"};
  char dir_tmpl[] = "/tmp/tune_tok_flags_XXXXXX";
  std::string dir = mkdtemp(dir_tmpl);
  std::ofstream(dir + "/tokenizer.json") << tj.dump();
  {
    std::ofstream corpus(dir + "/corpus.jsonl");
    for (const auto& l : lines) corpus << json(l).dump() << "\n";
  }
  std::string out = RunCapture("node '" + kTestData + "/reference_ids.js' '" + kAssets + "/node_modules' '" +
                                   dir + "/tokenizer.json' '" + dir + "/corpus.jsonl' 0",
                               &rc);
  ASSERT_EQ(rc, 0);
  auto tok = Tokenizer::FromDir(dir);
  std::istringstream ref(out);
  std::string line;
  for (const auto& text : lines) {
    ASSERT_TRUE(std::getline(ref, line));
    EXPECT_EQ(tok->Encode(text, false), json::parse(line).get<std::vector<int32_t>>()) << json(text).dump();
  }
  EXPECT_FALSE(tok->IsSpecial(128003));  // made non-special
  EXPECT_EQ(tok->Decode({8134, 128003, 2308}, true), "foo<|reserved_special_token_1|>bar");
  std::system(("rm -rf '" + dir + "'").c_str());
}

// Other pre-tokenizer configurations (Split behaviours, invert, String
// patterns, ByteLevel add_prefix_space / use_regex) against the reference on
// the first 400 corpus lines.
TEST(TokenizerTest, PreTokenizerVariantsEqualHuggingFace) {
  REQUIRE_ASSETS();
  int rc = 0;
  RunCapture("node --version 2>/dev/null", &rc);
  if (rc != 0) GTEST_SKIP() << "node not found on PATH";
  std::ifstream in(kAssets + "/llama3/tokenizer.json");
  const json base = json::parse(in);
  std::vector<std::pair<std::string, json>> variants;
  {
    json v = base;
    v["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = true;
    variants.emplace_back("ByteLevel add_prefix_space", v);
  }
  {
    json v = base;
    v["pre_tokenizer"] = {
        {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
    variants.emplace_back("ByteLevel use_regex (GPT-2)", v);
  }
  {
    json v = base;
    v["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithPrevious";
    v["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"String", " "}};
    variants.emplace_back("String MergedWithPrevious", v);
  }
  {
    json v = base;
    v["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Contiguous";
    v["pre_tokenizer"]["pretokenizers"][0]["invert"] = true;
    variants.emplace_back("Contiguous invert", v);
  }
  {
    json v = base;
    v["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithNext";
    v["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "\\s+"}};
    variants.emplace_back("MergedWithNext", v);
  }
  {
    json v = base;
    v["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed";
    v["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "\\p{P}"}};
    variants.emplace_back("Removed", v);
  }
  char dir_tmpl[] = "/tmp/tune_tok_variants_XXXXXX";
  std::string dir = mkdtemp(dir_tmpl);
  std::vector<std::string> texts = ReadCorpus(kTestData + "/tokenizer_corpus.jsonl");
  texts.resize(400);
  {
    std::ofstream corpus(dir + "/corpus.jsonl");
    for (const auto& l : texts) corpus << json(l).dump() << "\n";
  }
  for (const auto& [name, tj] : variants) {
    std::ofstream(dir + "/tokenizer.json") << tj.dump();
    std::string out = RunCapture("node '" + kTestData + "/reference_ids.js' '" + kAssets + "/node_modules' '" +
                                     dir + "/tokenizer.json' '" + dir + "/corpus.jsonl' 0",
                                 &rc);
    ASSERT_EQ(rc, 0) << name;
    auto tok = Tokenizer::FromDir(dir);
    std::istringstream ref(out);
    std::string line;
    int mismatches = 0;
    for (const auto& text : texts) {
      ASSERT_TRUE(std::getline(ref, line)) << name;
      if (tok->Encode(text, false) != json::parse(line).get<std::vector<int32_t>>() && ++mismatches <= 3) {
        ADD_FAILURE() << name << ": " << json(text).dump();
      }
    }
    EXPECT_EQ(mismatches, 0) << name;
  }
  std::system(("rm -rf '" + dir + "'").c_str());
}

// A tiny hand-made BPE exercising merges by rank, added-token flags and Split.
TEST(TokenizerTest, SmallBpeMergesAndAddedTokenFlags) {
  json vocab = json::object();
  int id = 0;
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    // ByteLevel alphabet entries for every byte.
    bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    uint32_t cp = printable ? b : 256 + extra++;
    std::string s;
    if (cp < 0x80) s += static_cast<char>(cp);
    else {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    vocab[s] = id++;
  }
  vocab["ab"] = id++;   // 256
  vocab["bc"] = id++;   // 257
  vocab["abc"] = id++;  // 258
  json tj = {
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"}, {"pattern", {{"Regex", "\\s+"}}}, {"behavior", "Removed"}, {"invert", false}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"added_tokens",
       {{{"id", 259}, {"content", "<x>"}, {"special", true}, {"lstrip", true}, {"rstrip", true},
         {"single_word", false}, {"normalized", false}}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"b c", "a b", "a bc"}}, {"ignore_merges", false}}}};
  auto tok = Tokenizer::FromJson(tj, json());
  // "bc" has rank 0, so "abc" -> a + bc -> abc (rank 2); "ab" alone -> ab.
  EXPECT_EQ(tok->Encode("abc", false), (std::vector<int32_t>{258}));
  EXPECT_EQ(tok->Encode("ab", false), (std::vector<int32_t>{256}));
  EXPECT_EQ(tok->Encode("abab", false), (std::vector<int32_t>{256, 256}));
  // Split Removed drops the whitespace; lstrip/rstrip absorb spaces around <x>.
  EXPECT_EQ(tok->Encode("ab  <x>  bc", false), (std::vector<int32_t>{256, 259, 257}));
  EXPECT_EQ(tok->Decode({256, 259, 257}, true), "abbc");
}

}  // namespace
}  // namespace tune::data
