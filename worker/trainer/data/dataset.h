// JSONL training data: one example per line, in one of five formats.
//
//  text               {"text": "..."}
//  prompt_completion  {"prompt": "...", "completion": "..."}
//  messages           {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}  (OpenAI)
//  sharegpt           {"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}
//                     (human -> user, gpt -> assistant; "user"/"assistant" accepted too)
//  tokens             {"input_ids": [128000, 791, ...], "labels": [-100, 791, ...]}  (pre-tokenized)
//                     "labels" is optional and in Hugging Face convention: same length as
//                     input_ids, labels[t] is the target of the prediction made at position t-1
//                     (labels[0] is never used), -100 = not supervised. Without it every next
//                     token is a target (labels = input_ids). Ids must be integers; the vocabulary
//                     range and max_seq_length are checked by PrepareDataset (it knows both).
//
// `auto` detects the format from the first line that is a JSON object with one
// of the keys messages / conversations / prompt+completion / text / input_ids
// (in that order of precedence) and reports which line decided it.
//
// A line that does not parse or does not fit the format is a bad line: it is
// skipped and reported with its 1-based line number and the reason (unknown
// role, empty conversation, non-string content, invalid JSON or UTF-8, ...).
// Blank lines are ignored. Extra keys are allowed (datasets often carry ids).
#ifndef TUNE_WORKER_TRAINER_DATA_DATASET_H_
#define TUNE_WORKER_TRAINER_DATA_DATASET_H_

#include <cstdint>
#include <istream>
#include <string>
#include <vector>

#include "worker/trainer/data/chat_template.h"

namespace tune::data {

enum class DatasetFormat { kText, kPromptCompletion, kMessages, kSharegpt, kTokens };

// "text", "prompt_completion", "messages", "sharegpt", "tokens".
const char* FormatName(DatasetFormat f);

struct RawExample {
  int line = 0;                    // 1-based line in the file
  std::string text;                // kText
  std::string prompt, completion;  // kPromptCompletion
  std::vector<Message> messages;   // kMessages / kSharegpt (roles mapped to system/user/assistant)
  std::vector<int32_t> input_ids;  // kTokens
  std::vector<int32_t> labels;     // kTokens: HF convention (unshifted); empty = labels are input_ids
};

struct BadLine {
  int line = 0;
  std::string reason;
};

struct LoadedDataset {
  DatasetFormat format = DatasetFormat::kText;
  std::string format_reason;  // "auto: line 1 has key \"messages\"" or "dataset.format: messages"
  std::vector<RawExample> examples;
  std::vector<BadLine> bad_lines;  // every bad line, in order
  int nonblank_lines = 0;
};

// Reads JSONL from `in`. `format` is auto|text|prompt_completion|messages|sharegpt|tokens.
// Throws std::invalid_argument for an unknown `format` name or when `auto`
// finds no line to detect the format from (the message says what was expected).
LoadedDataset ReadJsonl(std::istream& in, const std::string& format);

// Opens `path` (std::runtime_error naming it when unreadable) and reads it.
LoadedDataset ReadJsonlFile(const std::string& path, const std::string& format);

}  // namespace tune::data

#endif  // TUNE_WORKER_TRAINER_DATA_DATASET_H_
