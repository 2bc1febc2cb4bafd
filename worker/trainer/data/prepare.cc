#include "worker/trainer/data/prepare.h"

#include <algorithm>
#include <array>
#include <fstream>
#include <memory>
#include <optional>

#include "worker/trainer/data/chat_template.h"
#include "worker/trainer/data/dataset.h"

namespace tune::data {
namespace {

using json = nlohmann::json;

constexpr size_t kReportedBadLines = 5;

// One rendered example: text segments with supervision flags, plus ids to
// append after tokenization (EOS for text / raw prompt_completion).
struct Rendered {
  std::vector<TextSegment> segments;
  bool append_eos = false;
};

struct Counters {
  int64_t tokens = 0, supervised_tokens = 0;
  int truncated = 0, dropped_no_supervised = 0, bos_fixed = 0;
  int bos_duplicates_removed = 0, bos_added = 0, eot_missing = 0;
  std::array<int, 10> histogram{};
  std::vector<json> dropped_examples;  // first few
};

json BadLinesJson(const std::vector<BadLine>& bad, size_t total) {
  json first = json::array();
  for (size_t i = 0; i < bad.size() && i < kReportedBadLines; ++i) {
    first.push_back({{"line", bad[i].line}, {"reason", bad[i].reason}});
  }
  return {{"count", bad.size()}, {"nonblank_lines", total}, {"first", first}};
}

// Marks tokens whose byte range overlaps a supervised byte range.
std::vector<bool> SupervisedTokens(const Encoding& enc,
                                   const std::vector<std::pair<size_t, size_t>>& ranges) {
  std::vector<bool> sup(enc.ids.size(), false);
  size_t r = 0;
  for (size_t t = 0; t < enc.ids.size(); ++t) {
    if (enc.from_post_processor[t]) continue;
    auto [b, e] = enc.offsets[t];
    if (e <= b) continue;
    while (r < ranges.size() && ranges[r].second <= b) ++r;
    for (size_t k = r; k < ranges.size() && ranges[k].first < e; ++k) {
      if (ranges[k].second > b) {
        sup[t] = true;
        break;
      }
    }
  }
  return sup;
}

// Groups the final sequence into text runs that are / are not training
// targets, for the report.
json MaskedSegments(const Example& ex, const Tokenizer& tok) {
  json segs = json::array();
  size_t n = ex.input_ids.size();
  size_t start = 0;
  auto target = [&](size_t t) { return t > 0 && ex.labels[t - 1] != kIgnoreIndex; };
  for (size_t t = 1; t <= n; ++t) {
    if (t == n || target(t) != target(start)) {
      std::vector<int32_t> ids(ex.input_ids.begin() + start, ex.input_ids.begin() + t);
      segs.push_back({{"text", tok.Decode(ids, false)}, {"supervised", target(start)}, {"tokens", ids.size()}});
      start = t;
    }
  }
  return segs;
}

// "" when every id (and label other than -100) of a pre-tokenized example is in
// [0, vocab); else which one is not.
std::string OutOfVocab(const RawExample& raw, int32_t vocab) {
  auto check = [&](const std::vector<int32_t>& ids, const char* key, bool allow_ignore) -> std::string {
    for (size_t i = 0; i < ids.size(); ++i) {
      if (allow_ignore && ids[i] == kIgnoreIndex) continue;
      if (ids[i] < 0 || ids[i] >= vocab) {
        return std::string(key) + "[" + std::to_string(i) + "] = " + std::to_string(ids[i]) +
               " is outside the tokenizer's vocabulary [0, " + std::to_string(vocab) + ")" +
               (allow_ignore ? " and is not -100" : "");
      }
    }
    return "";
  };
  std::string e = check(raw.input_ids, "input_ids", false);
  return e.empty() ? check(raw.labels, "labels", true) : e;
}

}  // namespace

DataOptions DataOptions::FromSpec(const spec::DatasetSpec& d) {
  DataOptions o;
  o.format = d.format;
  o.chat_template = d.chat_template;
  o.train_on = d.train_on;
  o.max_seq_length = d.max_seq_length;
  o.packing = d.packing;
  o.max_bad_line_fraction = d.max_bad_line_fraction;
  return o;
}

PreparedDataset PrepareFromStream(std::istream& in, const DataOptions& opts, const Tokenizer& tok) {
  if (opts.train_on != "completions" && opts.train_on != "all") {
    throw DataError("dataset.train_on: must be completions or all (got '" + opts.train_on + "')");
  }
  if (opts.max_seq_length < 2) {
    throw DataError("dataset.max_seq_length: must be >= 2 (got " + std::to_string(opts.max_seq_length) + ")");
  }
  json report;
  LoadedDataset data;
  try {
    data = ReadJsonl(in, opts.format);
  } catch (const std::invalid_argument& e) {
    throw DataError(e.what());
  }
  report["format"] = {{"name", FormatName(data.format)}, {"reason", data.format_reason}};
  report["train_on"] = opts.train_on;
  report["max_seq_length"] = opts.max_seq_length;
  report["packing"] = opts.packing;
  json warnings = json::array();

  // Template (not needed for plain text).
  std::unique_ptr<ChatTemplate> tmpl;
  bool raw_prompt_completion = false;
  if (data.format == DatasetFormat::kTokens) {
    report["template"] = {{"name", nullptr},
                          {"reason", "format tokens is pre-tokenized: ids are used as given "
                                     "(no template, no BOS/EOS changes, no truncation)"}};
  } else if (data.format == DatasetFormat::kText) {
    report["template"] = {{"name", nullptr}, {"reason", "format text is not templated (text + EOS)"}};
  } else if (data.format == DatasetFormat::kPromptCompletion && opts.chat_template == "auto" &&
             tok.chat_template().empty()) {
    raw_prompt_completion = true;
    report["template"] = {{"name", nullptr},
                          {"reason", "chat_template auto and tokenizer_config.json has none: "
                                     "prompt + completion + EOS"}};
  } else {
    TemplateResolution res;
    try {
      res = ResolveChatTemplate(opts.chat_template, tok.chat_template());
    } catch (const std::invalid_argument& e) {
      report["template"] = {{"name", nullptr}, {"reason", e.what()}};
      throw DataError(e.what(), report);
    }
    tmpl = MakeChatTemplate(res.name);
    report["template"] = {{"name", res.name}, {"reason", res.reason}};
    if (res.source_appends_generation_prompt) {
      report["template"]["generation_prompt_omitted"] = true;
    }
    std::string eot = tmpl->EndOfTurn(tok.eos_token());
    if (tok.TokenToId(eot) < 0) {
      warnings.push_back("end-of-turn marker '" + eot + "' of template " + res.name +
                         " is not a single token of this tokenizer; it is trained as ordinary text");
    }
  }
  const int32_t bos = tok.bos_id();
  const int32_t eos = tok.eos_id();
  if (bos < 0) warnings.push_back("tokenizer has no BOS token; sequences start without one");
  if (eos < 0 && (data.format == DatasetFormat::kText || raw_prompt_completion)) {
    throw DataError("tokenizer has no EOS token (tokenizer_config.json eos_token), needed to end "
                    "text examples", report);
  }
  // A pad token that is also an end-of-turn/EOS token must stay supervised.
  std::optional<int32_t> pad = tok.pad_id();
  int32_t eot_id = tmpl ? tok.TokenToId(tmpl->EndOfTurn(tok.eos_token())) : -1;
  if (pad && (*pad == eos || *pad == eot_id)) pad.reset();

  Counters c;
  std::vector<Example> singles;
  std::vector<BadLine> bad = data.bad_lines;
  json first_example;
  const bool all = opts.train_on == "all";
  // Pre-tokenized lines the model cannot take as given: errors, not skips
  // (a wrong tokenizer or max_seq_length affects the whole file, and silently
  // truncating or dropping would train on data the user did not write).
  int too_long = 0, out_of_vocab = 0;
  std::string first_too_long, first_out_of_vocab;

  auto accept = [&](Example ex, int supervised, int line) {
    const size_t n = ex.input_ids.size();
    double frac = static_cast<double>(supervised) / static_cast<double>(n);
    c.histogram[std::min(9, static_cast<int>(frac * 10))]++;
    c.tokens += static_cast<int64_t>(n);
    c.supervised_tokens += supervised;
    ex.position_ids.resize(n);
    for (size_t t = 0; t < n; ++t) ex.position_ids[t] = static_cast<int32_t>(t);
    ex.segment_ids.assign(n, 0);
    if (first_example.is_null()) {
      first_example = {{"line", line},
                       {"tokens", n},
                       {"supervised_tokens", supervised},
                       {"segments", MaskedSegments(ex, tok)}};
    }
    singles.push_back(std::move(ex));
  };
  // An example with no supervised token is dropped and counted; the first few say why.
  auto drop = [&](int line, const std::string& why) {
    ++c.dropped_no_supervised;
    if (c.dropped_examples.size() < kReportedBadLines) c.dropped_examples.push_back({{"line", line}, {"reason", why}});
  };

  for (const RawExample& raw : data.examples) {
    if (data.format == DatasetFormat::kTokens) {
      const std::string where = "line " + std::to_string(raw.line) + ": ";
      const size_t n = raw.input_ids.size();
      if (n > static_cast<size_t>(opts.max_seq_length)) {
        if (too_long++ == 0) {
          first_too_long = where + std::to_string(n) + " ids, more than dataset.max_seq_length = " +
                           std::to_string(opts.max_seq_length);
        }
        continue;
      }
      std::string bad_id = OutOfVocab(raw, tok.vocab_size());
      if (!bad_id.empty()) {
        if (out_of_vocab++ == 0) first_out_of_vocab = where + bad_id;
        continue;
      }
      Example ex;
      ex.input_ids = raw.input_ids;
      ex.labels.assign(n, kIgnoreIndex);
      int supervised = 0;
      for (size_t t = 0; t + 1 < n; ++t) {
        const int32_t target = raw.labels.empty() ? raw.input_ids[t + 1] : raw.labels[t + 1];
        if (target != kIgnoreIndex) {
          ex.labels[t] = target;
          ++supervised;
        }
      }
      if (supervised == 0) {
        drop(raw.line, "no supervised token (one id only, or labels[1:] all -100)");
        continue;
      }
      accept(std::move(ex), supervised, raw.line);
      continue;
    }
    Rendered r;
    int assistant_turns = 0;
    try {
      switch (data.format) {
        case DatasetFormat::kText:
          r.segments.push_back({raw.text, true});
          r.append_eos = true;
          break;
        case DatasetFormat::kPromptCompletion:
          if (raw_prompt_completion) {
            if (!raw.prompt.empty()) r.segments.push_back({raw.prompt, false});
            r.segments.push_back({raw.completion, true});
            r.append_eos = true;
          } else {
            r.segments = tmpl->Render({{"user", raw.prompt}, {"assistant", raw.completion}},
                                      tok.bos_token(), tok.eos_token());
          }
          assistant_turns = 1;
          break;
        case DatasetFormat::kMessages:
        case DatasetFormat::kSharegpt:
          r.segments = tmpl->Render(raw.messages, tok.bos_token(), tok.eos_token());
          for (const auto& m : raw.messages) assistant_turns += m.role == "assistant";
          break;
        case DatasetFormat::kTokens:
          break;  // handled above: pre-tokenized ids are never rendered
      }
    } catch (const TemplateError& e) {
      bad.push_back({raw.line, e.what()});
      continue;
    }
    std::string text;
    std::vector<std::pair<size_t, size_t>> ranges;
    for (const TextSegment& s : r.segments) {
      if (all || s.assistant) ranges.emplace_back(text.size(), text.size() + s.text.size());
      text += s.text;
    }
    Encoding enc;
    try {
      enc = tok.EncodeWithOffsets(text, /*add_special_tokens=*/true);
    } catch (const std::invalid_argument& e) {
      bad.push_back({raw.line, e.what()});
      continue;
    }
    std::vector<bool> sup = SupervisedTokens(enc, ranges);
    std::vector<int32_t> ids = std::move(enc.ids);
    if (r.append_eos) {
      ids.push_back(eos);
      sup.push_back(true);
    }
    // BOS hygiene (counted below for the examples that are kept).
    int bos_removed = 0;
    bool bos_added = false;
    if (bos >= 0) {
      size_t lead = 0;
      while (lead < ids.size() && ids[lead] == bos) ++lead;
      if (lead > 1) {
        ids.erase(ids.begin(), ids.begin() + (lead - 1));
        sup.erase(sup.begin(), sup.begin() + (lead - 1));
        bos_removed = static_cast<int>(lead - 1);
      } else if (lead == 0) {
        ids.insert(ids.begin(), bos);
        sup.insert(sup.begin(), false);
        bos_added = true;
      }
      sup[0] = false;  // position 0 is never a target
    }
    // EOT check: every assistant turn should end with the end-of-turn token.
    if (eot_id >= 0 && !all && assistant_turns > 0) {
      int eots = 0;
      for (size_t t = 0; t < ids.size(); ++t) eots += sup[t] && ids[t] == eot_id;
      if (eots < assistant_turns) ++c.eot_missing;
    }
    bool was_truncated = false;
    if (ids.size() > static_cast<size_t>(opts.max_seq_length)) {
      ids.resize(opts.max_seq_length);
      sup.resize(opts.max_seq_length);
      ++c.truncated;
      was_truncated = true;
    }
    Example ex;
    ex.input_ids = ids;
    ex.labels.assign(ids.size(), kIgnoreIndex);
    int supervised = 0;
    for (size_t t = 0; t + 1 < ids.size(); ++t) {
      if (sup[t + 1] && !(pad && ids[t + 1] == *pad)) {
        ex.labels[t] = ids[t + 1];
        ++supervised;
      }
    }
    if (supervised == 0) {
      drop(raw.line, was_truncated ? "no supervised token left after truncation to max_seq_length "
                                     "(the prompt is longer than max_seq_length)"
                     : assistant_turns == 0 && !all && data.format != DatasetFormat::kText
                         ? "no assistant turn (nothing to supervise with train_on: completions)"
                         : "no supervised token");
      continue;
    }
    if (bos_removed > 0 || bos_added) ++c.bos_fixed;
    c.bos_duplicates_removed += bos_removed;
    c.bos_added += bos_added ? 1 : 0;
    accept(std::move(ex), supervised, raw.line);
  }

  std::sort(bad.begin(), bad.end(), [](const BadLine& a, const BadLine& b) { return a.line < b.line; });
  report["examples"] = singles.size();
  report["tokens"] = c.tokens;
  report["supervised_tokens"] = c.supervised_tokens;
  report["truncated"] = c.truncated;
  report["dropped_no_supervised"] = c.dropped_no_supervised;
  report["dropped_examples"] = c.dropped_examples;
  report["bos_fixed"] = c.bos_fixed;
  report["bos"] = {{"id", bos},
                   {"token", tok.bos_token()},
                   {"post_processor_adds_bos", tok.post_processor_adds_bos()},
                   {"duplicates_removed", c.bos_duplicates_removed},
                   {"added", c.bos_added}};
  report["eos"] = {{"id", eos}, {"token", tok.eos_token()}};
  if (eot_id >= 0) report["end_of_turn"] = {{"id", eot_id}, {"examples_missing", c.eot_missing}};
  report["bad_lines"] = BadLinesJson(bad, static_cast<size_t>(data.nonblank_lines));
  report["supervised_fraction_histogram"] = c.histogram;
  report["first_example"] = first_example;
  report["warnings"] = warnings;

  if (too_long > 0) {
    throw DataError("dataset.format tokens: " + first_too_long + " (" + std::to_string(too_long) +
                        " line(s) too long). Pre-tokenized sequences are never truncated: raise "
                        "dataset.max_seq_length or split the sequences",
                    report);
  }
  if (out_of_vocab > 0) {
    throw DataError("dataset.format tokens: " + first_out_of_vocab + " (" + std::to_string(out_of_vocab) +
                        " line(s) with ids outside the vocabulary). Tokenize with this model's tokenizer.json",
                    report);
  }
  double bad_frac = data.nonblank_lines > 0
                        ? static_cast<double>(bad.size()) / static_cast<double>(data.nonblank_lines)
                        : 0.0;
  if (bad_frac > opts.max_bad_line_fraction) {
    std::string msg = std::to_string(bad.size()) + " of " + std::to_string(data.nonblank_lines) +
                      " lines are bad (more than dataset.max_bad_line_fraction = " +
                      std::to_string(opts.max_bad_line_fraction) + ")";
    for (size_t i = 0; i < bad.size() && i < kReportedBadLines; ++i) {
      msg += "; line " + std::to_string(bad[i].line) + ": " + bad[i].reason;
    }
    throw DataError(msg, report);
  }
  if (singles.empty()) {
    throw DataError(
        "no example has a supervised token (training would see loss 0.0): " +
            std::to_string(c.dropped_no_supervised) +
            " dropped for having none. Check train_on, that conversations contain assistant turns, "
            "and max_seq_length",
        report);
  }

  PreparedDataset out;
  if (!opts.packing) {
    out.examples = std::move(singles);
  } else {
    Example cur;
    int32_t seg = 0;
    for (Example& ex : singles) {
      if (!cur.input_ids.empty() &&
          cur.input_ids.size() + ex.input_ids.size() > static_cast<size_t>(opts.max_seq_length)) {
        out.examples.push_back(std::move(cur));
        cur = Example();
        seg = 0;
      }
      cur.input_ids.insert(cur.input_ids.end(), ex.input_ids.begin(), ex.input_ids.end());
      cur.labels.insert(cur.labels.end(), ex.labels.begin(), ex.labels.end());
      cur.position_ids.insert(cur.position_ids.end(), ex.position_ids.begin(), ex.position_ids.end());
      cur.segment_ids.insert(cur.segment_ids.end(), ex.input_ids.size(), seg);
      ++seg;
    }
    if (!cur.input_ids.empty()) out.examples.push_back(std::move(cur));
  }
  report["sequences"] = out.examples.size();
  out.preflight_report = std::move(report);
  return out;
}

PreparedDataset PrepareDataset(const spec::JobSpec& spec, const Tokenizer& tok) {
  std::ifstream in(spec.dataset.path, std::ios::binary);
  if (!in) {
    throw DataError("dataset.path: cannot open " + spec.dataset.path);
  }
  PreparedDataset out = PrepareFromStream(in, DataOptions::FromSpec(spec.dataset), tok);
  out.preflight_report["dataset"] = spec.dataset.path;
  return out;
}

}  // namespace tune::data
