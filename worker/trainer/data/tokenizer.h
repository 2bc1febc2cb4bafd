// Hugging Face `tokenizer.json` tokenizer (byte-level BPE, as used by Llama 3).
//
// Contract: Encode() returns the same ids as Hugging Face's Rust `tokenizers`
// library (`Tokenizer.encode`) for every valid UTF-8 input, for the model and
// pipeline components listed below. Unsupported components are rejected when
// the file is loaded (std::runtime_error naming the component), never
// approximated.
//
// Supported tokenizer.json components:
//  * normalizer: null (none).
//  * pre_tokenizer: Split (Regex or String pattern; behaviours Isolated,
//    Removed, MergedWithPrevious, MergedWithNext, Contiguous; invert),
//    ByteLevel (add_prefix_space, use_regex), or a Sequence of those (each
//    variant is checked against the reference in the unit tests).
//  * model: BPE over the ByteLevel alphabet (merges as "a b" strings or
//    [a, b] pairs, ignore_merges honoured, no dropout, no unk/byte_fallback).
//  * added_tokens: matched on the raw text before BPE, leftmost-longest, with
//    the `lstrip`, `rstrip`, `single_word` (Rust `\w` boundaries) and
//    `normalized` flags; `special` decides what Decode(skip_special_tokens=true)
//    drops. Their ids must be the ones the reference assigns (the vocab id when
//    the content is a vocab entry, else the next id after the vocab, in file
//    order); a file that disagrees is rejected rather than renumbered.
//  * post_processor: ByteLevel (no id change), TemplateProcessing ($A plus
//    special tokens), Sequence of those.
//  * decoder: ByteLevel (bytes reassembled, invalid UTF-8 replaced by U+FFFD
//    exactly like Rust's String::from_utf8_lossy).
//
// Regex semantics: the pattern is compiled with PCRE2 (UTF, UCP, JIT). PCRE2's
// `\s` differs from the regex engine behind Hugging Face's tokenizers
// (Oniguruma; Rust's `regex` agrees on this): there `\s` is Unicode White_Space,
// which includes U+0085 (NEL) and excludes U+FEFF and U+180E. `\s` and `\S` in
// the pattern are therefore rewritten to an explicit White_Space class before
// compilation.
//
// Invalid UTF-8 input: Encode() throws std::invalid_argument whose message
// names the byte offset of the first invalid byte (the reference library cannot
// be given invalid UTF-8 at all, so there is nothing to replace silently).
//
// Thread safety: a Tokenizer is immutable after FromDir/FromJson except for an
// internal, mutex-protected word cache; Encode/Decode may be called from
// several threads.
#ifndef TUNE_WORKER_TRAINER_DATA_TOKENIZER_H_
#define TUNE_WORKER_TRAINER_DATA_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace tune::data {

// Token ids plus, for each id, the byte range [begin, end) of the input text
// it came from. Tokens inserted by the post-processor have begin == end and
// `from_post_processor` set.
struct Encoding {
  std::vector<int32_t> ids;
  std::vector<std::pair<uint32_t, uint32_t>> offsets;
  std::vector<bool> from_post_processor;
};

class Tokenizer {
 public:
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Loads `dir`/tokenizer.json and, when present, `dir`/tokenizer_config.json
  // (bos/eos/pad tokens, chat_template). Throws std::runtime_error naming the
  // file and the unsupported or malformed field.
  static std::unique_ptr<Tokenizer> FromDir(const std::string& dir);
  // Same from parsed JSON documents; `tokenizer_config` may be null.
  static std::unique_ptr<Tokenizer> FromJson(const nlohmann::json& tokenizer_json,
                                             const nlohmann::json& tokenizer_config,
                                             const std::string& source_name = "tokenizer.json");

  // `add_special_tokens` applies the post-processor (e.g. Llama 3.1's
  // TemplateProcessing prepends <|begin_of_text|>). Special-token strings in
  // `text` are always matched as their ids, as in Hugging Face.
  // Throws std::invalid_argument on invalid UTF-8 (message names the offset).
  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const;
  Encoding EncodeWithOffsets(std::string_view text, bool add_special_tokens) const;

  // Hugging Face decode: tokens concatenated, ByteLevel bytes reassembled,
  // invalid UTF-8 replaced like String::from_utf8_lossy. With
  // `skip_special_tokens`, added tokens flagged `special` are dropped.
  // Throws std::invalid_argument for an id outside [0, vocab_size()).
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  // Ids from tokenizer_config.json (bos_token / eos_token / pad_token), falling
  // back to the post-processor's first special token (BOS) and
  // <|end_of_text|> / </s> (EOS). -1 when the tokenizer has none.
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  std::optional<int32_t> pad_id() const { return pad_id_; }
  const std::string& bos_token() const { return bos_token_; }
  const std::string& eos_token() const { return eos_token_; }
  // Id of a vocabulary or added token given by its text as it appears in
  // tokenizer.json (byte-level form for BPE tokens, e.g. "Ġthe"); -1 if absent.
  int32_t TokenToId(std::string_view token) const;
  // Inverse of TokenToId; throws std::invalid_argument for an unknown id.
  std::string IdToToken(int32_t id) const;
  bool IsSpecial(int32_t id) const;
  // Largest id + 1 (model vocab and added tokens).
  int32_t vocab_size() const;
  // Whether Encode(..., true) prepends bos_id() (post-processor inspection).
  bool post_processor_adds_bos() const { return post_adds_bos_; }
  // tokenizer_config.json's chat_template ("" when absent; the "default" entry
  // when it is a list of named templates).
  const std::string& chat_template() const { return chat_template_; }

  struct Impl;

 private:
  Tokenizer();
  std::unique_ptr<Impl> impl_;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  std::optional<int32_t> pad_id_;
  std::string bos_token_, eos_token_;
  bool post_adds_bos_ = false;
  std::string chat_template_;
};

// Returns the offset of the first byte that is not part of valid UTF-8, or
// std::string_view::npos when `text` is valid. Overlong forms, surrogates and
// code points above U+10FFFF are invalid.
size_t FindInvalidUtf8(std::string_view text);

}  // namespace tune::data

#endif  // TUNE_WORKER_TRAINER_DATA_TOKENIZER_H_
