// dataset.format: tokens (pre-tokenized JSONL): ids used as given, labels,
// line-numbered errors for bad lines, vocabulary range and max_seq_length.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <sstream>

#include "worker/trainer/data/dataset.h"
#include "worker/trainer/data/prepare.h"

namespace tune::data {
namespace {

using json = nlohmann::json;
const std::string kAssets = TUNE_ASSETS_DIR;

#define REQUIRE_ASSETS()                                                       \
  do {                                                                         \
    struct stat st;                                                            \
    if (stat((kAssets + "/llama3/tokenizer.json").c_str(), &st) != 0) {        \
      GTEST_SKIP() << "Llama 3 tokenizer assets missing in " << kAssets;       \
    }                                                                          \
  } while (0)

const Tokenizer& Llama3() {
  static std::unique_ptr<Tokenizer> t = Tokenizer::FromDir(kAssets + "/llama3");
  return *t;
}

DataOptions Tokens(int max_seq_length = 64) {
  DataOptions o;
  o.format = "tokens";
  o.max_seq_length = max_seq_length;
  return o;
}

PreparedDataset Prep(const std::string& jsonl, const DataOptions& o) {
  std::istringstream in(jsonl);
  return PrepareFromStream(in, o, Llama3());
}

// The DataError message of preparing `jsonl` ("" when it succeeds).
std::string PrepError(const std::string& jsonl, const DataOptions& o) {
  try {
    Prep(jsonl, o);
  } catch (const DataError& e) {
    return e.what();
  }
  return "";
}

std::string Line(const json& j) { return j.dump() + "\n"; }

TEST(TokensFormatTest, IdsUsedAsGivenAndEveryNextTokenSupervised) {
  REQUIRE_ASSETS();
  // No BOS first, a doubled BOS in the middle, EOS last: none of it is touched.
  const std::vector<int32_t> ids = {791, 128000, 128000, 4062, 128001, 12};
  PreparedDataset ds = Prep(Line({{"input_ids", ids}}), Tokens());
  ASSERT_EQ(ds.examples.size(), 1u);
  const Example& ex = ds.examples[0];
  EXPECT_EQ(ex.input_ids, ids);
  EXPECT_EQ(ex.labels, (std::vector<int32_t>{128000, 128000, 4062, 128001, 12, kIgnoreIndex}));
  EXPECT_EQ(ex.position_ids, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(ex.segment_ids, std::vector<int32_t>(6, 0));
  const json& r = ds.preflight_report;
  EXPECT_EQ(r["format"]["name"], "tokens");
  EXPECT_EQ(r["format"]["reason"], "dataset.format: tokens");
  EXPECT_TRUE(r["template"]["name"].is_null());
  EXPECT_EQ(r["bos_fixed"], 0);
  EXPECT_EQ(r["tokens"], 6);
  EXPECT_EQ(r["supervised_tokens"], 5);
  EXPECT_EQ(r["truncated"], 0);
}

TEST(TokensFormatTest, LabelsFollowHuggingFaceConventionAndAreShifted) {
  REQUIRE_ASSETS();
  // labels[0] is never a target; -100 masks; a label may differ from the id.
  PreparedDataset ds =
      Prep(Line({{"input_ids", {10, 11, 12, 13}}, {"labels", {999, -100, 12, 77}}}), Tokens());
  ASSERT_EQ(ds.examples.size(), 1u);
  EXPECT_EQ(ds.examples[0].labels, (std::vector<int32_t>{kIgnoreIndex, 12, 77, kIgnoreIndex}));
  EXPECT_EQ(ds.preflight_report["supervised_tokens"], 2);
}

TEST(TokensFormatTest, AutoDetectsInputIdsWithLowestPrecedence) {
  REQUIRE_ASSETS();
  DataOptions o = Tokens();
  o.format = "auto";
  PreparedDataset ds = Prep("\n" + Line({{"input_ids", {1, 2, 3}}}), o);
  EXPECT_EQ(ds.preflight_report["format"]["name"], "tokens");
  EXPECT_EQ(ds.preflight_report["format"]["reason"], "auto: line 2 has key \"input_ids\" -> tokens");
  // A line with both "text" and "input_ids" is text (existing datasets keep their meaning).
  LoadedDataset both = [] {
    std::istringstream in(Line({{"text", "hi"}, {"input_ids", json::array({1})}}));
    return ReadJsonl(in, "auto");
  }();
  EXPECT_EQ(both.format, DatasetFormat::kText);
}

TEST(TokensFormatTest, MalformedLinesAreBadLinesWithLineNumbers) {
  REQUIRE_ASSETS();
  std::string data = Line({{"input_ids", {1, 2, 3}}}) +               // 1 ok
                     Line({{"input_ids", "1 2 3"}}) +                 // 2 not an array
                     Line({{"input_ids", json::array()}}) +           // 3 empty
                     Line({{"input_ids", {1, 2.5, 3}}}) +             // 4 not an integer
                     Line({{"input_ids", {1, 2}}, {"labels", {2}}}) + // 5 length mismatch
                     Line({{"text", "no ids"}}) +                     // 6 missing key
                     Line({{"input_ids", {1, 4294967296LL}}});        // 7 does not fit int32
  DataOptions o = Tokens();
  o.max_bad_line_fraction = 1.0;
  PreparedDataset ds = Prep(data, o);
  EXPECT_EQ(ds.examples.size(), 1u);
  const json& first = ds.preflight_report["bad_lines"]["first"];
  EXPECT_EQ(ds.preflight_report["bad_lines"]["count"], 6);
  ASSERT_EQ(first.size(), 5u);
  EXPECT_EQ(first[0]["line"], 2);
  EXPECT_NE(first[0]["reason"].get<std::string>().find("must be an array"), std::string::npos);
  EXPECT_EQ(first[1]["line"], 3);
  EXPECT_NE(first[1]["reason"].get<std::string>().find("is empty"), std::string::npos);
  EXPECT_EQ(first[2]["line"], 4);
  EXPECT_NE(first[2]["reason"].get<std::string>().find("input_ids[1] must be an integer"), std::string::npos);
  EXPECT_EQ(first[3]["line"], 5);
  EXPECT_NE(first[3]["reason"].get<std::string>().find("same length"), std::string::npos);
  EXPECT_EQ(first[4]["line"], 6);
  EXPECT_NE(first[4]["reason"].get<std::string>().find("missing key \"input_ids\""), std::string::npos);

  // With the default 1% budget the same file fails, naming the first bad line.
  std::string msg = PrepError(data, Tokens());
  EXPECT_NE(msg.find("6 of 7 lines are bad"), std::string::npos) << msg;
  EXPECT_NE(msg.find("line 2:"), std::string::npos) << msg;
}

TEST(TokensFormatTest, IdsOutsideTheVocabularyFailNamingTheLine) {
  REQUIRE_ASSETS();
  const int32_t vocab = Llama3().vocab_size();
  ASSERT_EQ(vocab, 128256);
  // The last valid id and -100 labels are fine.
  EXPECT_EQ(PrepError(Line({{"input_ids", {0, vocab - 1}}, {"labels", {-100, vocab - 1}}}), Tokens()), "");

  std::string data = Line({{"input_ids", {1, 2}}}) + Line({{"input_ids", {1, 2, vocab}}}) +
                     Line({{"input_ids", {-5, 2}}});
  std::string msg = PrepError(data, Tokens());
  EXPECT_NE(msg.find("line 2: input_ids[2] = 128256 is outside the tokenizer's vocabulary [0, 128256)"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("(2 line(s)"), std::string::npos) << msg;

  msg = PrepError(Line({{"input_ids", {1, 2}}, {"labels", {1, -1}}}), Tokens());
  EXPECT_NE(msg.find("line 1: labels[1] = -1 is outside"), std::string::npos) << msg;
}

TEST(TokensFormatTest, LongerThanMaxSeqLengthFailsInsteadOfTruncating) {
  REQUIRE_ASSETS();
  std::vector<int32_t> eight(8, 7), nine(9, 7);
  EXPECT_EQ(PrepError(Line({{"input_ids", eight}}), Tokens(8)), "");  // exactly max_seq_length fits
  std::string msg = PrepError(Line({{"input_ids", eight}}) + Line({{"input_ids", nine}}), Tokens(8));
  EXPECT_NE(msg.find("line 2: 9 ids, more than dataset.max_seq_length = 8"), std::string::npos) << msg;
  EXPECT_NE(msg.find("raise dataset.max_seq_length"), std::string::npos) << msg;
}

TEST(TokensFormatTest, ExamplesWithoutTargetsAreDroppedAndAllDroppedFails) {
  REQUIRE_ASSETS();
  PreparedDataset ds = Prep(Line({{"input_ids", json::array({5})}}) + Line({{"input_ids", {1, 2}}}), Tokens());
  EXPECT_EQ(ds.examples.size(), 1u);
  EXPECT_EQ(ds.preflight_report["dropped_no_supervised"], 1);
  EXPECT_EQ(ds.preflight_report["dropped_examples"][0]["line"], 1);

  std::string msg = PrepError(Line({{"input_ids", json::array({5})}}) +
                                  Line({{"input_ids", {1, 2, 3}}, {"labels", {1, -100, -100}}}),
                              Tokens());
  EXPECT_NE(msg.find("loss 0.0"), std::string::npos) << msg;
}

TEST(TokensFormatTest, PackingConcatenatesWithRestartedPositions) {
  REQUIRE_ASSETS();
  DataOptions o = Tokens(8);
  o.packing = true;
  PreparedDataset ds = Prep(Line({{"input_ids", {1, 2, 3}}}) + Line({{"input_ids", {4, 5, 6, 7}}}) +
                                Line({{"input_ids", {8, 9}}}),
                            o);
  ASSERT_EQ(ds.examples.size(), 2u);  // 3 + 4 fit in 8; the third starts a new sequence
  const Example& p = ds.examples[0];
  EXPECT_EQ(p.input_ids, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(p.labels, (std::vector<int32_t>{2, 3, kIgnoreIndex, 5, 6, 7, kIgnoreIndex}));
  EXPECT_EQ(p.position_ids, (std::vector<int32_t>{0, 1, 2, 0, 1, 2, 3}));
  EXPECT_EQ(p.segment_ids, (std::vector<int32_t>{0, 0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(ds.preflight_report["sequences"], 2);
}

}  // namespace
}  // namespace tune::data
