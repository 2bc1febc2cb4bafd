#include "worker/trainer/data/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <queue>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

namespace tune::data {
namespace {

using json = nlohmann::json;

[[noreturn]] void Fail(const std::string& source, const std::string& what) {
  throw std::runtime_error(source + ": " + what);
}

// ---------------------------------------------------------------------------
// UTF-8 helpers.

size_t Utf8SeqLen(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xE) return 3;
  if ((c >> 3) == 0x1E) return 4;
  return 0;
}

// Decodes the (already validated) code point at text[*i], advancing *i.
uint32_t NextCodePoint(std::string_view text, size_t* i) {
  unsigned char c = static_cast<unsigned char>(text[*i]);
  size_t n = Utf8SeqLen(c);
  uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(text[*i + k]) & 0x3F);
  *i += n;
  return cp;
}

// Length of the valid UTF-8 sequence starting at bytes[i] (0 if invalid), and
// in *prefix the length of the longest prefix of a valid sequence (the
// "maximal subpart" that Rust's from_utf8_lossy replaces by one U+FFFD).
size_t ValidSeqAt(std::string_view b, size_t i, size_t* prefix) {
  auto byte = [&](size_t k) { return static_cast<unsigned char>(b[k]); };
  unsigned char c = byte(i);
  *prefix = 1;
  if (c < 0x80) return 1;
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;  // no surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (size_t k = 1; k < n; ++k) {
    if (i + k >= b.size()) return 0;
    unsigned char d = byte(i + k);
    unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (d < l || d > h) return 0;
    *prefix = k + 1;
  }
  return n;
}

std::string Utf8Lossy(std::string_view b) {
  std::string out;
  out.reserve(b.size());
  size_t i = 0;
  while (i < b.size()) {
    size_t prefix;
    size_t n = ValidSeqAt(b, i, &prefix);
    if (n) {
      out.append(b.substr(i, n));
      i += n;
    } else {
      out.append("\xEF\xBF\xBD");
      i += prefix;
    }
  }
  return out;
}

// Unicode White_Space (what `\s` means in Oniguruma and Rust's regex).
bool IsUnicodeWhiteSpace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

constexpr const char* kWhiteSpaceClassBody =
    "\\x{9}-\\x{D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
    "\\x{202F}\\x{205F}\\x{3000}";

// Rewrites `\s` / `\S` to explicit Unicode White_Space classes (see header).
std::string RewriteRegexForPcre2(const std::string& pattern, const std::string& source) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      char d = pattern[i + 1];
      if (d == 's') {
        out += in_class ? std::string(kWhiteSpaceClassBody)
                        : "[" + std::string(kWhiteSpaceClassBody) + "]";
      } else if (d == 'S') {
        if (in_class) {
          Fail(source, "pre_tokenizer regex uses \\S inside a character class, which is not supported");
        }
        out += "[^" + std::string(kWhiteSpaceClassBody) + "]";
      } else {
        out += c;
        out += d;
      }
      ++i;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (in_class && c == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
      // POSIX class [:name:] inside a class: copy through its closing ":]".
      size_t end = pattern.find(":]", i + 2);
      if (end != std::string::npos) {
        out.append(pattern, i, end + 2 - i);
        i = end + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

// ---------------------------------------------------------------------------
// A compiled PCRE2 pattern with JIT.

class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& source) {
    int err = 0;
    PCRE2_SIZE err_off = 0;
    uint32_t flags = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), flags,
                          &err, &err_off, nullptr);
    if (!code_) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof(buf));
      Fail(source, "cannot compile pre_tokenizer regex at offset " + std::to_string(err_off) +
                       ": " + reinterpret_cast<char*>(buf));
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends the [begin, end) of every non-empty, non-overlapping match in
  // subject (valid UTF-8) to *out.
  void FindAll(std::string_view subject, std::vector<std::pair<size_t, size_t>>* out) const {
    struct Free {
      void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
    };
    thread_local std::unique_ptr<pcre2_match_data, Free> holder(pcre2_match_data_create(4, nullptr));
    pcre2_match_data* md = holder.get();
    size_t pos = 0;
    auto* s = reinterpret_cast<PCRE2_SPTR>(subject.data());
    while (pos <= subject.size()) {
      int rc = jit_ ? pcre2_jit_match(code_, s, subject.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr)
                    : pcre2_match(code_, s, subject.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR buf[256];
        pcre2_get_error_message(rc, buf, sizeof(buf));
        throw std::runtime_error(std::string("pre_tokenizer regex match failed: ") +
                                 reinterpret_cast<char*>(buf));
      }
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      size_t b = ov[0], e = ov[1];
      if (e > b) {
        out->emplace_back(b, e);
        pos = e;
      } else {
        // Empty match: skip one code point (the reference skips empty matches).
        if (pos >= subject.size()) break;
        pos += std::max<size_t>(1, Utf8SeqLen(static_cast<unsigned char>(subject[pos])));
      }
    }
  }

 private:
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

// GPT-2's ByteLevel alphabet: printable bytes map to themselves, the rest to
// U+0100 + n in byte order.
struct ByteLevelAlphabet {
  std::array<uint32_t, 256> byte_to_cp{};
  std::array<int16_t, 512> cp_to_byte{};  // -1: not in the alphabet (all code points are < 512)
  ByteLevelAlphabet() {
    cp_to_byte.fill(-1);
    uint32_t n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      byte_to_cp[b] = printable ? b : 256 + n++;
      cp_to_byte[byte_to_cp[b]] = static_cast<int16_t>(b);
    }
  }
};
const ByteLevelAlphabet& Alphabet() {
  static const ByteLevelAlphabet a;
  return a;
}

// ByteLevel form ("Ġthe") -> raw bytes (" the"). Returns false when a code
// point is outside the alphabet.
bool ByteLevelToBytes(std::string_view token, std::string* out) {
  out->clear();
  const auto& a = Alphabet();
  size_t i = 0;
  if (FindInvalidUtf8(token) != std::string_view::npos) return false;
  while (i < token.size()) {
    uint32_t cp = NextCodePoint(token, &i);
    if (cp >= a.cp_to_byte.size() || a.cp_to_byte[cp] < 0) return false;
    out->push_back(static_cast<char>(a.cp_to_byte[cp]));
  }
  return true;
}

// ---------------------------------------------------------------------------
// Open-addressing string -> int32 map with string_view lookups (the vocab is
// probed once per pre-token, so lookups must not allocate).

class FlatStringMap {
 public:
  void Reserve(size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    slots_.assign(cap, Slot{});
  }
  bool Insert(std::string_view key, int32_t value) {
    if ((size_ + 1) * 2 > slots_.size()) Grow();
    uint64_t h = Hash(key);
    size_t mask = slots_.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      Slot& s = slots_[i];
      if (s.value < 0) {
        s.hash = h;
        s.offset = static_cast<uint32_t>(arena_.size());
        s.len = static_cast<uint32_t>(key.size());
        s.value = value;
        arena_.append(key);
        ++size_;
        return true;
      }
      if (s.hash == h && KeyOf(s) == key) return false;
    }
  }
  int32_t Find(std::string_view key) const {
    if (slots_.empty()) return -1;
    uint64_t h = Hash(key);
    size_t mask = slots_.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      const Slot& s = slots_[i];
      if (s.value < 0) return -1;
      if (s.hash == h && KeyOf(s) == key) return s.value;
    }
  }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t offset = 0, len = 0;
    int32_t value = -1;
  };
  static uint64_t Hash(std::string_view k) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a, then a final mix
    for (unsigned char c : k) h = (h ^ c) * 1099511628211ull;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
  }
  std::string_view KeyOf(const Slot& s) const {
    return std::string_view(arena_).substr(s.offset, s.len);
  }
  void Grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(std::max<size_t>(16, old.size() * 2), Slot{});
    size_t mask = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.value < 0) continue;
      size_t i = s.hash & mask;
      while (slots_[i].value >= 0) i = (i + 1) & mask;
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  std::string arena_;
  size_t size_ = 0;
};

// ---------------------------------------------------------------------------
// Pipeline pieces.

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum Kind { kSplit, kByteLevel } kind;
  std::unique_ptr<Regex> regex;  // kSplit, or kByteLevel with use_regex
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;  // kByteLevel
};

struct AddedToken {
  int32_t id;
  std::string content;
  bool special, lstrip, rstrip, single_word, normalized;
};

// A piece of text to be processed, as a view plus the mapping of its bytes
// back to the original text: original offset of byte k = base + k, clamped to
// [clamp_lo, clamp_hi] (a prefix space inserted by ByteLevel maps to the start).
struct Piece {
  std::string_view text;
  int64_t base;
  uint32_t clamp_lo, clamp_hi;
};

struct PostItem {
  bool is_sequence;              // $A
  std::vector<int32_t> ids;      // special token ids
};

}  // namespace

struct Tokenizer::Impl {
  std::string source;
  // Model.
  FlatStringMap vocab_bytes;                 // raw bytes -> id (BPE vocab only)
  std::vector<std::string> id_to_bytes;      // decoded bytes of every id ("" if unused)
  std::vector<std::string> id_to_token;      // tokenizer.json form of every id
  std::vector<bool> id_present;
  std::vector<bool> id_special;
  std::vector<bool> id_added;
  std::unordered_map<std::string, int32_t> token_to_id;  // tokenizer.json form
  std::array<int32_t, 256> byte_id{};
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (l,r) -> (rank, new id)
  bool ignore_merges = false;
  // Added tokens.
  std::vector<AddedToken> added;
  struct Trie {
    struct Node {
      std::vector<std::pair<unsigned char, int32_t>> next;  // sorted by byte
      int32_t token = -1;                                   // index into `added`
    };
    std::vector<Node> nodes{Node{}};
    std::array<bool, 256> first{};
    bool empty = true;
    void Add(const std::string& s, int32_t idx) {
      int32_t n = 0;
      for (unsigned char c : s) {
        auto& nx = nodes[n].next;
        auto it = std::lower_bound(nx.begin(), nx.end(), std::make_pair(c, int32_t{-1}));
        if (it != nx.end() && it->first == c) {
          n = it->second;
        } else {
          int32_t id = static_cast<int32_t>(nodes.size());
          nx.insert(it, {c, id});
          nodes.emplace_back();
          n = id;
        }
      }
      if (nodes[n].token < 0) nodes[n].token = idx;  // first definition wins
      first[static_cast<unsigned char>(s[0])] = true;
      empty = false;
    }
    // Longest token starting at text[pos]; returns its length, 0 if none.
    size_t Longest(std::string_view text, size_t pos, int32_t* token) const {
      int32_t n = 0;
      size_t best = 0;
      for (size_t i = pos; i < text.size(); ++i) {
        const auto& nx = nodes[n].next;
        unsigned char c = static_cast<unsigned char>(text[i]);
        auto it = std::lower_bound(nx.begin(), nx.end(), std::make_pair(c, int32_t{-1}));
        if (it == nx.end() || it->first != c) break;
        n = it->second;
        if (nodes[n].token >= 0) {
          best = i + 1 - pos;
          *token = nodes[n].token;
        }
      }
      return best;
    }
  };
  Trie raw_trie, normalized_trie;
  std::unique_ptr<Regex> word_char;  // for single_word boundaries
  // Pre-tokenizer.
  std::vector<PreTokenizerStep> pre;
  // Post-processor.
  std::vector<PostItem> post_single;  // empty: nothing added
  bool has_template = false;
  int32_t max_id = -1;

  // Word cache for BPE results of words not in the vocab.
  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<std::pair<int32_t, uint32_t>>> cache;

  void Load(const json& tj);
  void LoadModel(const json& model);
  void LoadAddedTokens(const json& added);
  void LoadPreTokenizer(const json& pt);
  void LoadPostProcessor(const json& pp);
  void LoadDecoder(const json& dec);

  void SplitAdded(const Trie& trie, bool normalized, std::string_view text, size_t begin,
                  size_t end, std::vector<std::tuple<size_t, size_t, int32_t>>* out) const;
  void PreTokenize(std::string_view text, size_t begin, size_t end, std::vector<Piece>* pieces,
                   std::deque<std::string>* owned) const;
  void Bpe(std::string_view word, std::vector<std::pair<int32_t, uint32_t>>* out) const;
  void EncodeSegment(std::string_view text, size_t begin, size_t end, Encoding* enc) const;
};

namespace {

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

}  // namespace

void Tokenizer::Impl::LoadModel(const json& model) {
  if (!model.is_object() || model.value("type", "") != "BPE") {
    Fail(source, "model.type must be \"BPE\" (got " +
                     (model.is_object() ? model.value("type", std::string("<missing>")) : "<none>") +
                     "); only byte-level BPE tokenizers (Llama 3) are supported");
  }
  if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"].get<double>() > 0) {
    Fail(source, "model.dropout is set; BPE dropout is not supported for training data");
  }
  if (model.value("byte_fallback", false)) {
    Fail(source, "model.byte_fallback is true (SentencePiece-style BPE); not supported");
  }
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(k) && !model[k].is_null() && !model[k].get<std::string>().empty()) {
      Fail(source, std::string("model.") + k + " is set; not supported");
    }
  }
  ignore_merges = model.value("ignore_merges", false);
  const json& vocab = model.at("vocab");
  if (!vocab.is_object()) Fail(source, "model.vocab must be an object of token -> id");
  vocab_bytes.Reserve(vocab.size());
  token_to_id.reserve(vocab.size() + 1024);
  std::string bytes;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    int32_t id = it.value().get<int32_t>();
    if (id < 0) Fail(source, "model.vocab[\"" + it.key() + "\"] has a negative id");
    if (!ByteLevelToBytes(it.key(), &bytes)) {
      Fail(source, "model.vocab token \"" + it.key() +
                       "\" is not in the ByteLevel alphabet; only byte-level BPE is supported");
    }
    if (static_cast<size_t>(id) >= id_to_bytes.size()) {
      id_to_bytes.resize(id + 1);
      id_to_token.resize(id + 1);
      id_present.resize(id + 1, false);
    }
    id_to_bytes[id] = bytes;
    id_to_token[id] = it.key();
    id_present[id] = true;
    token_to_id[it.key()] = id;
    vocab_bytes.Insert(bytes, id);
    max_id = std::max(max_id, id);
  }
  for (int b = 0; b < 256; ++b) {
    byte_id[b] = vocab_bytes.Find(std::string_view(reinterpret_cast<const char*>(&b), 1));
  }
  const json& m = model.at("merges");
  merges.reserve(m.size() * 2);
  std::string lb, rb;
  for (size_t rank = 0; rank < m.size(); ++rank) {
    std::string l, r;
    if (m[rank].is_string()) {
      const std::string& s = m[rank].get_ref<const std::string&>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos) Fail(source, "model.merges[" + std::to_string(rank) + "] has no space");
      l = s.substr(0, sp);
      r = s.substr(sp + 1);
    } else if (m[rank].is_array() && m[rank].size() == 2) {
      l = m[rank][0].get<std::string>();
      r = m[rank][1].get<std::string>();
    } else {
      Fail(source, "model.merges[" + std::to_string(rank) + "] must be \"a b\" or [a, b]");
    }
    auto li = token_to_id.find(l), ri = token_to_id.find(r), ni = token_to_id.find(l + r);
    if (li == token_to_id.end() || ri == token_to_id.end() || ni == token_to_id.end()) {
      Fail(source, "model.merges[" + std::to_string(rank) + "] (\"" + l + "\", \"" + r +
                       "\") refers to a token missing from model.vocab");
    }
    merges.emplace(PairKey(li->second, ri->second),
                   std::make_pair(static_cast<int32_t>(rank), ni->second));
  }
}

void Tokenizer::Impl::LoadAddedTokens(const json& added_json) {
  if (added_json.is_null()) return;
  if (!added_json.is_array()) Fail(source, "added_tokens must be an array");
  // The reference does not read these ids: it gives an added token the model's
  // id when its content is a vocab entry, else the next id after the vocab.
  // Files it wrote agree; a file that does not would be renumbered silently.
  int32_t next_id = static_cast<int32_t>(token_to_id.size());
  std::unordered_map<std::string, int32_t> seen;
  for (const json& t : added_json) {
    AddedToken a{t.at("id").get<int32_t>(), t.at("content").get<std::string>(),
                 t.value("special", false), t.value("lstrip", false), t.value("rstrip", false),
                 t.value("single_word", false), t.value("normalized", false)};
    if (a.content.empty()) Fail(source, "added_tokens entry with id " + std::to_string(a.id) + " is empty");
    auto in_vocab = token_to_id.find(a.content);
    auto again = seen.find(a.content);
    int32_t expected = in_vocab != token_to_id.end() ? in_vocab->second
                       : again != seen.end()         ? again->second
                                                     : next_id++;
    seen.emplace(a.content, expected);
    if (expected != a.id) {
      Fail(source, "added_tokens entry \"" + a.content + "\" has id " + std::to_string(a.id) +
                       " but Hugging Face tokenizers would assign it id " + std::to_string(expected) +
                       " (ids must follow the model vocab in order); fix the file");
    }
    if (static_cast<size_t>(a.id) >= id_to_bytes.size()) {
      id_to_bytes.resize(a.id + 1);
      id_to_token.resize(a.id + 1);
      id_present.resize(a.id + 1, false);
    }
    // Decoding an added token: the ByteLevel decoder maps its characters back
    // to bytes when all are in the alphabet, otherwise keeps the raw text.
    std::string bytes;
    id_to_bytes[a.id] = ByteLevelToBytes(a.content, &bytes) ? bytes : a.content;
    id_to_token[a.id] = a.content;
    id_present[a.id] = true;
    token_to_id[a.content] = a.id;
    max_id = std::max(max_id, a.id);
    int32_t idx = static_cast<int32_t>(added.size());
    added.push_back(a);
    (a.normalized ? normalized_trie : raw_trie).Add(a.content, idx);
  }
  id_special.assign(id_to_bytes.size(), false);
  id_added.assign(id_to_bytes.size(), false);
  for (const auto& a : added) {
    id_added[a.id] = true;
    id_special[a.id] = a.special;
  }
}

void Tokenizer::Impl::LoadPreTokenizer(const json& pt) {
  if (pt.is_null()) return;
  std::vector<const json*> steps;
  if (pt.value("type", "") == "Sequence") {
    for (const json& s : pt.at("pretokenizers")) steps.push_back(&s);
  } else {
    steps.push_back(&pt);
  }
  for (const json* sp : steps) {
    const json& s = *sp;
    std::string type = s.value("type", "");
    PreTokenizerStep step;
    if (type == "Split") {
      step.kind = PreTokenizerStep::kSplit;
      const json& pat = s.at("pattern");
      if (pat.contains("Regex")) {
        step.regex = std::make_unique<Regex>(
            RewriteRegexForPcre2(pat["Regex"].get<std::string>(), source), false, source);
      } else if (pat.contains("String")) {
        step.regex = std::make_unique<Regex>(pat["String"].get<std::string>(), true, source);
      } else {
        Fail(source, "pre_tokenizer Split.pattern must hold Regex or String");
      }
      std::string b = s.value("behavior", "Isolated");
      if (b == "Removed") step.behavior = SplitBehavior::kRemoved;
      else if (b == "Isolated") step.behavior = SplitBehavior::kIsolated;
      else if (b == "MergedWithPrevious") step.behavior = SplitBehavior::kMergedWithPrevious;
      else if (b == "MergedWithNext") step.behavior = SplitBehavior::kMergedWithNext;
      else if (b == "Contiguous") step.behavior = SplitBehavior::kContiguous;
      else Fail(source, "pre_tokenizer Split.behavior \"" + b + "\" is unknown");
      step.invert = s.value("invert", false);
    } else if (type == "ByteLevel") {
      step.kind = PreTokenizerStep::kByteLevel;
      step.add_prefix_space = s.value("add_prefix_space", false);
      if (s.value("use_regex", true)) {
        // GPT-2's pattern, which the ByteLevel pre-tokenizer applies itself.
        step.regex = std::make_unique<Regex>(
            RewriteRegexForPcre2(
                "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
                source),
            false, source);
      }
    } else {
      Fail(source, "pre_tokenizer type \"" + type +
                       "\" is not supported (supported: Split, ByteLevel, Sequence)");
    }
    pre.push_back(std::move(step));
  }
}

void Tokenizer::Impl::LoadPostProcessor(const json& pp) {
  if (pp.is_null()) return;
  std::string type = pp.value("type", "");
  if (type == "Sequence") {
    for (const json& p : pp.at("processors")) LoadPostProcessor(p);
    return;
  }
  if (type == "ByteLevel") return;  // only adjusts offsets; ids unchanged
  if (type != "TemplateProcessing") {
    Fail(source, "post_processor type \"" + type +
                     "\" is not supported (supported: ByteLevel, TemplateProcessing, Sequence)");
  }
  if (has_template) Fail(source, "post_processor has more than one TemplateProcessing");
  has_template = true;
  const json& specials = pp.value("special_tokens", json::object());
  for (const json& item : pp.at("single")) {
    if (item.contains("Sequence")) {
      std::string id = item["Sequence"].at("id").get<std::string>();
      if (id != "A") Fail(source, "post_processor.single uses sequence $" + id + " (only $A exists)");
      post_single.push_back({true, {}});
    } else if (item.contains("SpecialToken")) {
      std::string name = item["SpecialToken"].at("id").get<std::string>();
      if (!specials.contains(name)) {
        Fail(source, "post_processor.single names special token \"" + name +
                         "\" missing from post_processor.special_tokens");
      }
      post_single.push_back({false, specials[name].at("ids").get<std::vector<int32_t>>()});
    } else {
      Fail(source, "post_processor.single has an item that is neither Sequence nor SpecialToken");
    }
  }
}

void Tokenizer::Impl::LoadDecoder(const json& dec) {
  if (dec.is_null()) return;
  std::string type = dec.value("type", "");
  if (type == "Sequence") {
    for (const json& d : dec.at("decoders")) LoadDecoder(d);
    return;
  }
  if (type != "ByteLevel") {
    Fail(source, "decoder type \"" + type + "\" is not supported (supported: ByteLevel)");
  }
}

void Tokenizer::Impl::Load(const json& tj) {
  if (!tj.is_object()) Fail(source, "not a JSON object");
  if (tj.contains("normalizer") && !tj["normalizer"].is_null()) {
    Fail(source, "normalizer \"" + tj["normalizer"].value("type", std::string("?")) +
                     "\" is not supported (byte-level BPE tokenizers such as Llama 3 have none)");
  }
  LoadModel(tj.at("model"));
  LoadAddedTokens(tj.value("added_tokens", json()));
  if (id_special.size() < id_to_bytes.size()) {
    id_special.resize(id_to_bytes.size(), false);
    id_added.resize(id_to_bytes.size(), false);
  }
  LoadPreTokenizer(tj.value("pre_tokenizer", json()));
  LoadPostProcessor(tj.value("post_processor", json()));
  LoadDecoder(tj.value("decoder", json()));
  for (const auto& a : added) {
    if (a.single_word) {
      // Rust regex's Unicode \\w, which the reference uses for word boundaries.
      word_char = std::make_unique<Regex>(
          "[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}]", false, source);
      break;
    }
  }
}

// Splits text[begin, end) by added tokens: appends (b, e, id) with id = -1 for
// ordinary text. Hugging Face semantics: leftmost-longest matches; lstrip /
// rstrip absorb adjacent whitespace into the token; single_word tokens only
// match between non-word characters.
void Tokenizer::Impl::SplitAdded(const Trie& trie, bool /*normalized*/, std::string_view text,
                                 size_t begin, size_t end,
                                 std::vector<std::tuple<size_t, size_t, int32_t>>* out) const {
  if (trie.empty) {
    out->emplace_back(begin, end, -1);
    return;
  }
  std::string_view region = text.substr(0, end);
  size_t text_start = begin;  // start of pending ordinary text
  size_t pos = begin;
  auto is_ws_before = [&](size_t p, size_t* cp_len) {
    // Whitespace code point ending at p (p > text_start)?
    size_t q = p - 1;
    while (q > text_start && (static_cast<unsigned char>(text[q]) & 0xC0) == 0x80) --q;
    size_t i = q;
    uint32_t cp = NextCodePoint(text, &i);
    *cp_len = p - q;
    return IsUnicodeWhiteSpace(cp);
  };
  auto word_at = [&](size_t p, bool before) {
    if (before) {
      if (p == begin) return false;
      size_t q = p - 1;
      while (q > begin && (static_cast<unsigned char>(text[q]) & 0xC0) == 0x80) --q;
      std::vector<std::pair<size_t, size_t>> m;
      word_char->FindAll(text.substr(q, p - q), &m);
      return !m.empty();
    }
    if (p >= end) return false;
    size_t n = Utf8SeqLen(static_cast<unsigned char>(text[p]));
    std::vector<std::pair<size_t, size_t>> m;
    word_char->FindAll(text.substr(p, n), &m);
    return !m.empty();
  };
  while (pos < end) {
    if (!trie.first[static_cast<unsigned char>(text[pos])]) {
      ++pos;
      continue;
    }
    int32_t idx = -1;
    size_t len = trie.Longest(region, pos, &idx);
    if (len == 0) {
      ++pos;
      continue;
    }
    const AddedToken& a = added[idx];
    size_t mb = pos, me = pos + len;
    if (a.single_word && (word_at(mb, true) || word_at(me, false))) {
      pos = me;  // the match is consumed but not used, like the reference's find_iter
      continue;
    }
    if (a.lstrip) {
      size_t n;
      while (mb > text_start && is_ws_before(mb, &n)) mb -= n;
    }
    if (a.rstrip) {
      while (me < end) {
        size_t i = me;
        uint32_t cp = NextCodePoint(text, &i);
        if (!IsUnicodeWhiteSpace(cp)) break;
        me = i;
      }
    }
    if (mb > text_start) out->emplace_back(text_start, mb, -1);
    out->emplace_back(mb, me, a.id);
    text_start = pos = me;
  }
  if (text_start < end) out->emplace_back(text_start, end, -1);
}

namespace {

// Applies a split behaviour to (range, is_delimiter) parts, as the reference.
void ApplyBehavior(SplitBehavior behavior, std::vector<std::pair<std::pair<size_t, size_t>, bool>>& parts,
                   std::vector<std::pair<size_t, size_t>>* out) {
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (auto& p : parts) out->push_back(p.first);
      return;
    case SplitBehavior::kRemoved:
      for (auto& p : parts)
        if (!p.second) out->push_back(p.first);
      return;
    case SplitBehavior::kMergedWithPrevious: {
      bool prev = false;
      for (auto& p : parts) {
        if (p.second && !prev && !out->empty()) out->back().second = p.first.second;
        else out->push_back(p.first);
        prev = p.second;
      }
      return;
    }
    case SplitBehavior::kMergedWithNext: {
      bool prev = false;
      std::vector<std::pair<size_t, size_t>> rev;
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        if (it->second && !prev && !rev.empty()) rev.back().first = it->first.first;
        else rev.push_back(it->first);
        prev = it->second;
      }
      out->insert(out->end(), rev.rbegin(), rev.rend());
      return;
    }
    case SplitBehavior::kContiguous: {
      bool prev = false;
      for (auto& p : parts) {
        if (p.second == prev && !out->empty()) out->back().second = p.first.second;
        else out->push_back(p.first);
        prev = p.second;
      }
      return;
    }
  }
}

}  // namespace

void Tokenizer::Impl::PreTokenize(std::string_view text, size_t begin, size_t end,
                                  std::vector<Piece>* pieces, std::deque<std::string>* owned) const {
  pieces->clear();
  pieces->push_back(Piece{text.substr(begin, end - begin), static_cast<int64_t>(begin),
                          static_cast<uint32_t>(begin), static_cast<uint32_t>(end)});
  std::vector<Piece> next;
  std::vector<std::pair<size_t, size_t>> matches, ranges;
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> parts;
  for (const PreTokenizerStep& step : pre) {
    next.clear();
    for (const Piece& p : *pieces) {
      Piece src = p;
      // The reference prefixes every piece reaching ByteLevel that does not
      // start with a space (checked against it).
      if (step.kind == PreTokenizerStep::kByteLevel && step.add_prefix_space &&
          (src.text.empty() || src.text[0] != ' ')) {
        owned->push_back(" " + std::string(src.text));
        src.text = owned->back();
        src.base -= 1;
      }
      if (!step.regex) {
        next.push_back(src);
        continue;
      }
      matches.clear();
      step.regex->FindAll(src.text, &matches);
      parts.clear();
      size_t last = 0;
      bool delim_is_match = !(step.kind == PreTokenizerStep::kSplit && step.invert);
      for (auto& m : matches) {
        if (m.first > last) parts.push_back({{last, m.first}, !delim_is_match});
        parts.push_back({m, delim_is_match});
        last = m.second;
      }
      if (last < src.text.size()) parts.push_back({{last, src.text.size()}, !delim_is_match});
      ranges.clear();
      SplitBehavior behavior =
          step.kind == PreTokenizerStep::kSplit ? step.behavior : SplitBehavior::kIsolated;
      ApplyBehavior(behavior, parts, &ranges);
      for (auto& r : ranges) {
        if (r.second <= r.first) continue;
        next.push_back(Piece{src.text.substr(r.first, r.second - r.first),
                             src.base + static_cast<int64_t>(r.first), src.clamp_lo, src.clamp_hi});
      }
    }
    pieces->swap(next);
  }
}

// Byte-level BPE of one pre-token. Appends (id, byte length) per token.
void Tokenizer::Impl::Bpe(std::string_view word, std::vector<std::pair<int32_t, uint32_t>>* out) const {
  if (ignore_merges) {
    int32_t id = vocab_bytes.Find(word);
    if (id >= 0) {
      out->emplace_back(id, static_cast<uint32_t>(word.size()));
      return;
    }
  }
  if (word.size() == 1) {
    int32_t id = byte_id[static_cast<unsigned char>(word[0])];
    if (id >= 0) out->emplace_back(id, 1);
    return;
  }
  constexpr size_t kCacheMaxWord = 256;
  constexpr size_t kCacheMaxEntries = 1 << 16;
  bool cacheable = word.size() <= kCacheMaxWord;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu);
    auto it = cache.find(std::string(word));
    if (it != cache.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  struct Sym {
    int32_t id;
    int32_t prev, next;
    uint32_t len;
  };
  std::vector<Sym> syms;
  syms.reserve(word.size());
  for (size_t i = 0; i < word.size(); ++i) {
    int32_t id = byte_id[static_cast<unsigned char>(word[i])];
    if (id < 0) {
      // No token for this byte and no unk token: the reference drops it, but
      // its length must still count toward the previous symbol's offsets.
      if (!syms.empty()) syms.back().len += 1;
      continue;
    }
    int32_t idx = static_cast<int32_t>(syms.size());
    syms.push_back(Sym{id, idx - 1, idx + 1, 1});
  }
  if (!syms.empty()) syms.back().next = -1;
  struct Cand {
    int32_t rank, left, right_id, left_id, new_id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int32_t left) {
    if (left < 0) return;
    int32_t right = syms[left].next;
    if (right < 0) return;
    auto it = merges.find(PairKey(syms[left].id, syms[right].id));
    if (it != merges.end()) {
      heap.push(Cand{it->second.first, left, syms[right].id, syms[left].id, it->second.second});
    }
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) push(i);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    Sym& l = syms[c.left];
    if (l.len == 0 || l.id != c.left_id || l.next < 0) continue;
    Sym& r = syms[l.next];
    if (r.id != c.right_id) continue;
    l.id = c.new_id;
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (l.next >= 0) syms[l.next].prev = c.left;
    push(l.prev);
    push(c.left);
  }
  std::vector<std::pair<int32_t, uint32_t>> result;
  for (int32_t i = syms.empty() ? -1 : 0; i >= 0; i = syms[i].next) result.emplace_back(syms[i].id, syms[i].len);
  out->insert(out->end(), result.begin(), result.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu);
    if (cache.size() >= kCacheMaxEntries) cache.clear();
    cache.emplace(std::string(word), std::move(result));
  }
}

void Tokenizer::Impl::EncodeSegment(std::string_view text, size_t begin, size_t end, Encoding* enc) const {
  thread_local std::vector<Piece> pieces;
  thread_local std::vector<std::pair<int32_t, uint32_t>> toks;
  std::deque<std::string> owned;  // stable addresses: pieces view into it
  PreTokenize(text, begin, end, &pieces, &owned);
  for (const Piece& p : pieces) {
    toks.clear();
    Bpe(p.text, &toks);
    int64_t off = p.base;
    for (auto& t : toks) {
      int64_t b = std::clamp<int64_t>(off, p.clamp_lo, p.clamp_hi);
      int64_t e = std::clamp<int64_t>(off + t.second, p.clamp_lo, p.clamp_hi);
      enc->ids.push_back(t.first);
      enc->offsets.emplace_back(static_cast<uint32_t>(b), static_cast<uint32_t>(e));
      enc->from_post_processor.push_back(false);
      off += t.second;
    }
  }
}

// ---------------------------------------------------------------------------

size_t FindInvalidUtf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    if (static_cast<unsigned char>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    size_t prefix;
    size_t n = ValidSeqAt(text, i, &prefix);
    if (!n) return i;
    i += n;
  }
  return std::string_view::npos;
}

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;

namespace {

json ReadJsonFile(const std::string& path, bool required) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (!required) return json();
    throw std::runtime_error(path + ": cannot open (the tokenizer directory must hold tokenizer.json)");
  }
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    throw std::runtime_error(path + ": invalid JSON: " + e.what());
  }
}

// tokenizer_config.json token fields are a string or {"content": ...}.
std::string ConfigToken(const json& cfg, const char* key) {
  if (!cfg.is_object() || !cfg.contains(key) || cfg[key].is_null()) return "";
  const json& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content")) return v["content"].get<std::string>();
  return "";
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::FromDir(const std::string& dir) {
  json tj = ReadJsonFile(dir + "/tokenizer.json", true);
  json cfg = ReadJsonFile(dir + "/tokenizer_config.json", false);
  return FromJson(tj, cfg, dir + "/tokenizer.json");
}

std::unique_ptr<Tokenizer> Tokenizer::FromJson(const json& tokenizer_json, const json& cfg,
                                               const std::string& source_name) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->impl_->source = source_name;
  try {
    t->impl_->Load(tokenizer_json);
  } catch (const json::exception& e) {
    throw std::runtime_error(source_name + ": malformed: " + e.what());
  }
  const std::string cfg_name = "tokenizer_config.json";
  auto lookup = [&](const std::string& tok, const char* key) -> int32_t {
    if (tok.empty()) return -1;
    int32_t id = t->TokenToId(tok);
    if (id < 0) {
      throw std::runtime_error(cfg_name + ": " + key + " \"" + tok +
                               "\" is not a token of " + source_name);
    }
    return id;
  };
  t->bos_token_ = ConfigToken(cfg, "bos_token");
  t->eos_token_ = ConfigToken(cfg, "eos_token");
  t->bos_id_ = lookup(t->bos_token_, "bos_token");
  t->eos_id_ = lookup(t->eos_token_, "eos_token");
  std::string pad = ConfigToken(cfg, "pad_token");
  if (!pad.empty()) t->pad_id_ = lookup(pad, "pad_token");
  const Impl& im = *t->impl_;
  // Post-processor: does it put a special token before $A?
  int32_t template_first = -1;
  for (const PostItem& item : im.post_single) {
    if (item.is_sequence) break;
    if (!item.ids.empty()) {
      template_first = item.ids[0];
      break;
    }
  }
  if (t->bos_id_ < 0) {
    for (const char* name : {"<|begin_of_text|>", "<s>"}) {
      if (t->TokenToId(name) >= 0) {
        t->bos_id_ = t->TokenToId(name);
        break;
      }
    }
    if (t->bos_id_ < 0) t->bos_id_ = template_first;
    if (t->bos_id_ >= 0) t->bos_token_ = t->IdToToken(t->bos_id_);
  }
  if (t->eos_id_ < 0) {
    for (const char* name : {"<|end_of_text|>", "</s>"}) {
      if (t->TokenToId(name) >= 0) {
        t->eos_id_ = t->TokenToId(name);
        t->eos_token_ = name;
        break;
      }
    }
  }
  t->post_adds_bos_ = template_first >= 0 && template_first == t->bos_id_;
  if (cfg.is_object() && cfg.contains("chat_template")) {
    const json& ct = cfg["chat_template"];
    if (ct.is_string()) {
      t->chat_template_ = ct.get<std::string>();
    } else if (ct.is_array()) {
      for (const json& e : ct) {
        if (e.is_object() && e.value("name", "") == "default") {
          t->chat_template_ = e.value("template", "");
        }
      }
    }
  }
  return t;
}

Encoding Tokenizer::EncodeWithOffsets(std::string_view text, bool add_special_tokens) const {
  size_t bad = FindInvalidUtf8(text);
  if (bad != std::string_view::npos) {
    char hex[8];
    std::snprintf(hex, sizeof(hex), "0x%02X", static_cast<unsigned char>(text[bad]));
    throw std::invalid_argument("invalid UTF-8 at byte offset " + std::to_string(bad) + " (byte " +
                                hex + "); the tokenizer accepts UTF-8 text only");
  }
  const Impl& im = *impl_;
  Encoding seq;
  seq.ids.reserve(text.size() / 3 + 4);
  std::vector<std::tuple<size_t, size_t, int32_t>> raw_parts, norm_parts;
  im.SplitAdded(im.raw_trie, false, text, 0, text.size(), &raw_parts);
  for (auto& [b, e, id] : raw_parts) {
    if (id >= 0) {
      seq.ids.push_back(id);
      seq.offsets.emplace_back(static_cast<uint32_t>(b), static_cast<uint32_t>(e));
      seq.from_post_processor.push_back(false);
      continue;
    }
    norm_parts.clear();
    im.SplitAdded(im.normalized_trie, true, text, b, e, &norm_parts);
    for (auto& [nb, ne, nid] : norm_parts) {
      if (nid >= 0) {
        seq.ids.push_back(nid);
        seq.offsets.emplace_back(static_cast<uint32_t>(nb), static_cast<uint32_t>(ne));
        seq.from_post_processor.push_back(false);
      } else {
        im.EncodeSegment(text, nb, ne, &seq);
      }
    }
  }
  if (!add_special_tokens || !im.has_template) return seq;
  Encoding out;
  for (const PostItem& item : im.post_single) {
    if (item.is_sequence) {
      out.ids.insert(out.ids.end(), seq.ids.begin(), seq.ids.end());
      out.offsets.insert(out.offsets.end(), seq.offsets.begin(), seq.offsets.end());
      out.from_post_processor.insert(out.from_post_processor.end(), seq.from_post_processor.begin(),
                                     seq.from_post_processor.end());
    } else {
      for (int32_t id : item.ids) {
        out.ids.push_back(id);
        out.offsets.emplace_back(0, 0);
        out.from_post_processor.push_back(true);
      }
    }
  }
  return out;
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_special_tokens) const {
  return EncodeWithOffsets(text, add_special_tokens).ids;
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  const Impl& im = *impl_;
  std::string bytes;
  for (size_t i = 0; i < ids.size(); ++i) {
    int32_t id = ids[i];
    if (id < 0 || static_cast<size_t>(id) >= im.id_to_bytes.size() || !im.id_present[id]) {
      throw std::invalid_argument("cannot decode id " + std::to_string(id) + " at index " +
                                  std::to_string(i) + ": not in the vocabulary (size " +
                                  std::to_string(vocab_size()) + ")");
    }
    if (skip_special_tokens && im.id_special[id]) continue;
    bytes += im.id_to_bytes[id];
  }
  return Utf8Lossy(bytes);
}

int32_t Tokenizer::TokenToId(std::string_view token) const {
  auto it = impl_->token_to_id.find(std::string(token));
  return it == impl_->token_to_id.end() ? -1 : it->second;
}

std::string Tokenizer::IdToToken(int32_t id) const {
  const Impl& im = *impl_;
  if (id < 0 || static_cast<size_t>(id) >= im.id_to_token.size() || !im.id_present[id]) {
    throw std::invalid_argument("unknown token id " + std::to_string(id));
  }
  return im.id_to_token[id];
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->id_special.size() && impl_->id_special[id];
}

int32_t Tokenizer::vocab_size() const { return impl_->max_id + 1; }

}  // namespace tune::data
