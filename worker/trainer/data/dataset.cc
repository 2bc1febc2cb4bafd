#include "worker/trainer/data/dataset.h"

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <optional>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace tune::data {
namespace {

using json = nlohmann::json;

// Thrown while converting one line; becomes a BadLine.
struct LineError {
  std::string reason;
};

std::optional<DatasetFormat> Detect(const json& j, std::string* key) {
  if (!j.is_object()) return std::nullopt;
  if (j.contains("messages")) { *key = "\"messages\""; return DatasetFormat::kMessages; }
  if (j.contains("conversations")) { *key = "\"conversations\""; return DatasetFormat::kSharegpt; }
  if (j.contains("prompt") && j.contains("completion")) {
    *key = "\"prompt\" and \"completion\"";
    return DatasetFormat::kPromptCompletion;
  }
  if (j.contains("text")) { *key = "\"text\""; return DatasetFormat::kText; }
  if (j.contains("input_ids")) { *key = "\"input_ids\""; return DatasetFormat::kTokens; }
  return std::nullopt;
}

const std::string& RequireString(const json& obj, const std::string& key, const std::string& where) {
  if (!obj.contains(key)) throw LineError{where + "missing key \"" + key + "\""};
  const json& v = obj[key];
  if (!v.is_string()) {
    throw LineError{where + "\"" + key + "\" must be a string (got " + std::string(v.type_name()) + ")"};
  }
  return v.get_ref<const std::string&>();
}

std::vector<Message> ConvertMessages(const json& j) {
  if (!j.contains("messages")) throw LineError{"missing key \"messages\" (format is messages)"};
  const json& arr = j["messages"];
  if (!arr.is_array()) throw LineError{"\"messages\" must be an array of {role, content}"};
  if (arr.empty()) throw LineError{"\"messages\" is empty (an empty conversation has nothing to train on)"};
  std::vector<Message> out;
  for (size_t i = 0; i < arr.size(); ++i) {
    std::string where = "messages[" + std::to_string(i) + "]: ";
    if (!arr[i].is_object()) throw LineError{where + "must be an object {role, content}"};
    std::string role = RequireString(arr[i], "role", where);
    if (role != "system" && role != "user" && role != "assistant") {
      std::string hint = (role == "human" || role == "gpt")
                             ? " (ShareGPT role names: use {\"conversations\": [{\"from\", \"value\"}]} "
                               "or map them to user/assistant)"
                             : "";
      throw LineError{where + "role '" + role + "' is not one of system, user, assistant" + hint};
    }
    out.push_back(Message{role, RequireString(arr[i], "content", where)});
  }
  return out;
}

std::vector<Message> ConvertSharegpt(const json& j) {
  if (!j.contains("conversations")) throw LineError{"missing key \"conversations\" (format is sharegpt)"};
  const json& arr = j["conversations"];
  if (!arr.is_array()) throw LineError{"\"conversations\" must be an array of {from, value}"};
  if (arr.empty()) {
    throw LineError{"\"conversations\" is empty (an empty conversation has nothing to train on)"};
  }
  std::vector<Message> out;
  for (size_t i = 0; i < arr.size(); ++i) {
    std::string where = "conversations[" + std::to_string(i) + "]: ";
    if (!arr[i].is_object()) throw LineError{where + "must be an object {from, value}"};
    std::string from = RequireString(arr[i], "from", where);
    std::string role;
    if (from == "human" || from == "user") role = "user";
    else if (from == "gpt" || from == "assistant") role = "assistant";
    else if (from == "system") role = "system";
    else throw LineError{where + "from '" + from + "' is not one of human, gpt, system"};
    out.push_back(Message{role, RequireString(arr[i], "value", where)});
  }
  return out;
}

// An array of integers that fit int32 (range against the vocabulary is
// checked later, where the tokenizer is known).
std::vector<int32_t> ConvertIds(const json& j, const std::string& key) {
  const json& arr = j[key];
  if (!arr.is_array()) {
    throw LineError{"\"" + key + "\" must be an array of token ids (got " + std::string(arr.type_name()) + ")"};
  }
  std::vector<int32_t> out;
  out.reserve(arr.size());
  for (size_t i = 0; i < arr.size(); ++i) {
    const json& v = arr[i];
    // Unsigned values above INT64_MAX would wrap in get<int64_t>(): range-check them as unsigned.
    const bool fits = v.is_number_integer() &&
                      (v.is_number_unsigned() ? v.get<uint64_t>() <= static_cast<uint64_t>(INT32_MAX)
                                              : v.get<int64_t>() >= INT32_MIN && v.get<int64_t>() <= INT32_MAX);
    if (!fits) {
      throw LineError{key + "[" + std::to_string(i) + "] must be an integer token id (got " + v.dump() + ")"};
    }
    out.push_back(static_cast<int32_t>(v.get<int64_t>()));
  }
  return out;
}

RawExample Convert(const json& j, DatasetFormat f, int line) {
  if (!j.is_object()) throw LineError{"not a JSON object"};
  RawExample ex;
  ex.line = line;
  switch (f) {
    case DatasetFormat::kText:
      ex.text = RequireString(j, "text", "");
      if (ex.text.empty()) throw LineError{"\"text\" is empty"};
      break;
    case DatasetFormat::kPromptCompletion:
      ex.prompt = RequireString(j, "prompt", "");
      ex.completion = RequireString(j, "completion", "");
      if (ex.completion.empty()) throw LineError{"\"completion\" is empty (nothing to supervise)"};
      break;
    case DatasetFormat::kMessages:
      ex.messages = ConvertMessages(j);
      break;
    case DatasetFormat::kSharegpt:
      ex.messages = ConvertSharegpt(j);
      break;
    case DatasetFormat::kTokens:
      if (!j.contains("input_ids")) throw LineError{"missing key \"input_ids\" (format is tokens)"};
      ex.input_ids = ConvertIds(j, "input_ids");
      if (ex.input_ids.empty()) throw LineError{"\"input_ids\" is empty"};
      if (j.contains("labels")) {
        ex.labels = ConvertIds(j, "labels");
        if (ex.labels.size() != ex.input_ids.size()) {
          throw LineError{"\"labels\" has " + std::to_string(ex.labels.size()) + " entries but \"input_ids\" has " +
                          std::to_string(ex.input_ids.size()) + "; they must be the same length (-100 = not supervised)"};
        }
      }
      break;
  }
  return ex;
}

bool IsBlank(const std::string& s) {
  return s.find_first_not_of(" \t\r\n") == std::string::npos;
}

}  // namespace

const char* FormatName(DatasetFormat f) {
  switch (f) {
    case DatasetFormat::kText: return "text";
    case DatasetFormat::kPromptCompletion: return "prompt_completion";
    case DatasetFormat::kMessages: return "messages";
    case DatasetFormat::kSharegpt: return "sharegpt";
    case DatasetFormat::kTokens: return "tokens";
  }
  return "?";
}

LoadedDataset ReadJsonl(std::istream& in, const std::string& format) {
  LoadedDataset out;
  std::optional<DatasetFormat> fmt;
  if (format == "text") fmt = DatasetFormat::kText;
  else if (format == "prompt_completion") fmt = DatasetFormat::kPromptCompletion;
  else if (format == "messages") fmt = DatasetFormat::kMessages;
  else if (format == "sharegpt") fmt = DatasetFormat::kSharegpt;
  else if (format == "tokens") fmt = DatasetFormat::kTokens;
  else if (format != "auto") {
    throw std::invalid_argument("dataset.format: unknown format '" + format +
                                "'; use auto, text, prompt_completion, messages, sharegpt or tokens");
  }
  if (fmt) out.format_reason = "dataset.format: " + format;
  // Lines before the format is known are kept parsed until detection.
  std::vector<std::pair<int, json>> pending;
  std::string line;
  int lineno = 0;
  auto handle = [&](int n, const json& j) {
    try {
      out.examples.push_back(Convert(j, *fmt, n));
    } catch (const LineError& e) {
      out.bad_lines.push_back({n, e.reason});
    }
  };
  while (std::getline(in, line)) {
    ++lineno;
    if (IsBlank(line)) continue;
    ++out.nonblank_lines;
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      std::string what = e.what();
      out.bad_lines.push_back({lineno, "invalid JSON: " + what});
      continue;
    }
    if (!fmt) {
      std::string key;
      fmt = Detect(j, &key);
      if (!fmt) {
        pending.emplace_back(lineno, std::move(j));
        continue;
      }
      out.format_reason = "auto: line " + std::to_string(lineno) + " has key " + key + " -> " +
                          FormatName(*fmt);
      for (auto& [n, pj] : pending) handle(n, pj);
      pending.clear();
    }
    handle(lineno, j);
  }
  if (!fmt) {
    if (out.nonblank_lines == 0) {
      throw std::invalid_argument("dataset is empty (no non-blank lines)");
    }
    throw std::invalid_argument(
        "dataset.format is auto but no line is a JSON object with \"messages\", \"conversations\", "
        "\"prompt\"+\"completion\", \"text\" or \"input_ids\"; fix the data or set dataset.format");
  }
  out.format = *fmt;
  // Bad lines were appended out of order when detection came late.
  std::sort(out.bad_lines.begin(), out.bad_lines.end(),
            [](const BadLine& a, const BadLine& b) { return a.line < b.line; });
  std::sort(out.examples.begin(), out.examples.end(),
            [](const RawExample& a, const RawExample& b) { return a.line < b.line; });
  return out;
}

LoadedDataset ReadJsonlFile(const std::string& path, const std::string& format) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("dataset.path: cannot open " + path);
  return ReadJsonl(in, format);
}

}  // namespace tune::data
