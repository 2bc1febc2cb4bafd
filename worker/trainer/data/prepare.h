// From a JSONL file to model-ready, masked, BOS-clean sequences plus a
// preflight report (issue 4). Runs before the model loads.
//
// Pipeline per example:
//  1. Render: `messages` / `sharegpt` with the chat template; `prompt_completion`
//     as a user/assistant exchange with the chat template, or - when
//     chat_template is auto and tokenizer_config.json has none - as
//     prompt + completion + EOS; `text` as the text + EOS.
//  2. Tokenize the whole rendered text the usual way (add_special_tokens=true,
//     so the tokenizer's post-processor runs exactly as in Hugging Face).
//  3. BOS hygiene: the sequence starts with exactly one bos_id(). Extra leading
//     BOS tokens (template text "<|begin_of_text|>" + a post-processor that adds
//     one: the Llama 3.1 double-BOS trap) are removed; a missing one is added.
//     Each kept example that needed a fix counts once in `bos_fixed`.
//  4. Mask: with train_on=completions a token is supervised when its bytes
//     overlap an assistant segment (assistant content and its end-of-turn
//     marker, e.g. "<|eot_id|>"); for `text` everything is supervised; with
//     train_on=all everything is. A pad token distinct from EOS/EOT is never
//     supervised.
//  5. Truncate to max_seq_length (counted in `truncated`); an example left with
//     no supervised token (system-only conversation, prompt longer than
//     max_seq_length, ...) is dropped and counted in `dropped_no_supervised`.
//  6. Labels are shifted for next-token prediction: labels[t] is the target for
//     input position t (input_ids[t+1] when supervised, else -100; the last is -100).
//  7. Packing (optional): examples are concatenated in order into sequences of
//     at most max_seq_length; position_ids restart at 0 per example and
//     segment_ids number the examples within a sequence (attention must not
//     cross segment boundaries). Without packing: position_ids 0..n-1, segment_ids 0.
//
// Format `tokens` (pre-tokenized) skips steps 1-5: the ids are used exactly as
// given - no template, no BOS/EOS added or removed, no pad masking, never
// truncated. Labels default to every next token (Hugging Face labels =
// input_ids); a given "labels" array is shifted as in step 6. Packing applies
// as above. An example with no target (a single id, or labels[1:] all -100) is
// dropped like in step 5. A line longer than max_seq_length, or with an id
// (or label other than -100) outside [0, tok.vocab_size()), is a DataError
// naming the first such line and the count: both mean the file was made for
// another setting, so skipping lines would silently train on other data.
//
// DataError (exit code 5) when: the template is unknown/unrecognised, the
// format cannot be detected, more than max_bad_line_fraction of the non-blank
// lines are bad, or no example has a supervised token.
#ifndef TUNE_WORKER_TRAINER_DATA_PREPARE_H_
#define TUNE_WORKER_TRAINER_DATA_PREPARE_H_

#include <cstdint>
#include <istream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/jobspec/job_spec.h"
#include "worker/trainer/data/tokenizer.h"

namespace tune::data {

inline constexpr int32_t kIgnoreIndex = -100;

struct Example {
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;        // kIgnoreIndex = not supervised; labels[t] targets position t
  std::vector<int32_t> position_ids;  // restart at 0 per packed example
  std::vector<int32_t> segment_ids;   // equal ids may attend to each other (causally)
};

struct PreparedDataset {
  std::vector<Example> examples;  // sequences as fed to the model (packed when packing is on)
  nlohmann::json preflight_report;
};

// The dataset failed preflight; what() says why and how to fix it.
class DataError : public std::runtime_error {
 public:
  DataError(const std::string& message, nlohmann::json report = nullptr)
      : std::runtime_error(message), report_(std::move(report)) {}
  // The partial preflight report (null when it failed before one existed).
  const nlohmann::json& report() const { return report_; }

 private:
  nlohmann::json report_;
};

struct DataOptions {
  std::string format = "auto";
  std::string chat_template = "auto";
  std::string train_on = "completions";
  int max_seq_length = 2048;
  bool packing = false;
  double max_bad_line_fraction = 0.01;
  static DataOptions FromSpec(const spec::DatasetSpec& d);
};

// Reads spec.dataset.path. Throws DataError (see above; also when the file
// cannot be opened).
PreparedDataset PrepareDataset(const spec::JobSpec& spec, const Tokenizer& tok);

// Same from a stream (tests, stdin).
PreparedDataset PrepareFromStream(std::istream& in, const DataOptions& opts, const Tokenizer& tok);

}  // namespace tune::data

#endif  // TUNE_WORKER_TRAINER_DATA_PREPARE_H_
