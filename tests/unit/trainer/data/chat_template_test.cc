// Chat templates: renders equal Hugging Face's jinja2 output (expected strings
// derived by hand from the template sources), recognition, Python strip.
#include "worker/trainer/data/chat_template.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

namespace tune::data {
namespace {

std::string Join(const std::vector<TextSegment>& segs) {
  std::string s;
  for (const auto& x : segs) s += x.text;
  return s;
}
std::string Assistant(const std::vector<TextSegment>& segs) {
  std::string s;
  for (const auto& x : segs)
    if (x.assistant) s += x.text + "|";
  return s;
}

const std::vector<Message> kConv = {
    {"system", " You are helpful. "}, {"user", "Hi\n"}, {"assistant", " Hello! "}};

TEST(ChatTemplateTest, Llama3) {
  auto t = MakeChatTemplate("llama-3");
  auto segs = t->Render(kConv, "<|begin_of_text|>", "<|eot_id|>");
  EXPECT_EQ(Join(segs),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>");
  EXPECT_EQ(Assistant(segs), "Hello!<|eot_id|>|");
}

TEST(ChatTemplateTest, Llama31SystemHeader) {
  auto t = MakeChatTemplate("llama-3.1");
  EXPECT_EQ(Join(t->Render(kConv, "<|begin_of_text|>", "<|eot_id|>")),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
            "You are helpful.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>");
  // No system message: the header block is still there, with an empty system text.
  EXPECT_EQ(Join(t->Render({{"user", "Q"}, {"assistant", "A"}}, "<|begin_of_text|>", "<|eot_id|>")),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>");
}

TEST(ChatTemplateTest, ChatmlDoesNotTrim) {
  auto t = MakeChatTemplate("chatml");
  auto segs = t->Render({{"user", "Q "}, {"assistant", " A"}}, "<s>", "</s>");
  EXPECT_EQ(Join(segs), "<|im_start|>user\nQ <|im_end|>\n<|im_start|>assistant\n A<|im_end|>\n");
  EXPECT_EQ(Assistant(segs), " A<|im_end|>|");
}

TEST(ChatTemplateTest, MistralAndItsRoleRules) {
  auto t = MakeChatTemplate("mistral");
  EXPECT_EQ(Join(t->Render({{"user", "Q1"}, {"assistant", "A1"}, {"user", "Q2"}, {"assistant", "A2"}},
                           "<s>", "</s>")),
            "<s>[INST] Q1 [/INST]A1</s>[INST] Q2 [/INST]A2</s>");
  EXPECT_THROW(t->Render(kConv, "<s>", "</s>"), TemplateError);  // system at index 0
  EXPECT_THROW(t->Render({{"user", "a"}, {"user", "b"}}, "<s>", "</s>"), TemplateError);
}

TEST(ChatTemplateTest, Alpaca) {
  auto t = MakeChatTemplate("alpaca");
  EXPECT_EQ(Join(t->Render({{"user", "Q"}, {"assistant", "A"}}, "<s>", "</s>")),
            "<s>Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nQ\n\n### Response:\nA</s>\n\n");
  auto segs = t->Render({{"system", "Sys"}, {"user", "Q"}, {"assistant", "A"}}, "<s>", "</s>");
  EXPECT_EQ(Join(segs), "<s>Sys\n\n### Instruction:\nQ\n\n### Response:\nA</s>\n\n");
  EXPECT_EQ(Assistant(segs), "A</s>|");
}

TEST(ChatTemplateTest, PythonStripSemantics) {
  // Python's str.isspace: NEL and U+001C..U+001F are spaces; U+FEFF and U+200B are not.
  EXPECT_EQ(PythonStrip("\xC2\x85 x \x1C"), "x");
  EXPECT_EQ(PythonStrip("\xEF\xBB\xBFx\xE2\x80\x8B"), "\xEF\xBB\xBFx\xE2\x80\x8B");
  EXPECT_EQ(PythonStrip("\xE3\x80\x80y\xE2\x80\xA8"), "y");  // U+3000, U+2028
  EXPECT_EQ(PythonStrip("   "), "");
  EXPECT_EQ(PythonStrip(""), "");
}

TEST(ChatTemplateTest, RecognisesBothPackageTemplates) {
  const std::string assets = TUNE_ASSETS_DIR;
  for (const char* dir : {"llama3", "llama3_1"}) {
    std::ifstream in(assets + "/" + dir + "/tokenizer_config.json");
    if (!in) GTEST_SKIP() << "assets missing in " << assets;
    nlohmann::json cfg = nlohmann::json::parse(in);
    TemplateResolution r = ResolveChatTemplate("auto", cfg["chat_template"].get<std::string>());
    EXPECT_EQ(r.name, "llama-3") << dir;
    EXPECT_EQ(r.source_appends_generation_prompt, std::string(dir) == "llama3") << dir << ": " << r.reason;
    EXPECT_NE(r.reason.find("tokenizer_config.json"), std::string::npos);
  }
}

TEST(ChatTemplateTest, RecognitionIgnoresJinjaWhitespaceOnly) {
  const std::string chatml_multiline =
      "{%- for message in messages %}\n"
      "    {{- '<|im_start|>' + message['role'] + '\\n' }}\n";
  // Different output text ('\\n' escape vs newline char) must not match chatml.
  EXPECT_THROW(ResolveChatTemplate("auto", chatml_multiline), std::invalid_argument);
  const std::string spaced =
      "{%  for message in messages  %}{{ '<|im_start|>'  +  message['role'] + '\n' + "
      "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ "
      "'<|im_start|>assistant\n' }}{% endif %}";
  EXPECT_EQ(ResolveChatTemplate("auto", spaced).name, "chatml");
  for (const auto& name : BuiltinTemplateNames()) {
    EXPECT_EQ(ResolveChatTemplate("auto", MakeChatTemplate(name)->JinjaSource()).name, name);
  }
}

TEST(ChatTemplateTest, Llama31Signature) {
  const std::string meta_like =
      "{{- bos_token }}\n{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}\n"
      "{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n"
      "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
      "{%- endif %}{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
      "{{- \"Cutting Knowledge Date: December 2023\\n\" }}{{- \"Today Date: \" + date_string + \"\\n\\n\" }}"
      "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
      "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}";
  EXPECT_EQ(ResolveChatTemplate("auto", meta_like).name, "llama-3.1");
}

TEST(ChatTemplateTest, UnknownAndMissingFailClearly) {
  try {
    ResolveChatTemplate("auto", "{{ messages | tojson }}");
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("refusing to guess"), std::string::npos);
  }
  EXPECT_THROW(ResolveChatTemplate("auto", ""), std::invalid_argument);
  EXPECT_THROW(ResolveChatTemplate("vicuna", ""), std::invalid_argument);
  EXPECT_EQ(ResolveChatTemplate("chatml", "").name, "chatml");
}

TEST(ChatTemplateTest, NormalizeJinjaWhitespaceControl) {
  EXPECT_EQ(NormalizeJinja("a  {%- if x -%}  b {% endif %}\nc"), "a{%ifx%}b {%endif%}c");
  EXPECT_EQ(NormalizeJinja("{# comment #}{{ 'a b' }}"), "{{'a b'}}");
  EXPECT_EQ(NormalizeJinja("x\n    {% if y %}"), "x\n{%ify%}");
}

// Renders with real jinja2 (HF's environment settings) and compares. Skips
// only when python3 or jinja2 is unavailable.
nlohmann::json JinjaRender(const std::string& source, const std::vector<std::vector<Message>>& convs,
                           const std::string& bos, const std::string& eos, int* rc) {
  nlohmann::json req = {{"template", source}, {"bos_token", bos}, {"eos_token", eos}};
  req["conversations"] = nlohmann::json::array();
  for (const auto& c : convs) {
    nlohmann::json arr = nlohmann::json::array();
    for (const auto& m : c) arr.push_back({{"role", m.role}, {"content", m.content}});
    req["conversations"].push_back(arr);
  }
  char in_path[] = "/tmp/tune_render_req_XXXXXX";
  int fd = mkstemp(in_path);
  std::string body = req.dump();
  if (fd < 0 || write(fd, body.data(), body.size()) != static_cast<ssize_t>(body.size())) {
    *rc = -1;
    return nullptr;
  }
  close(fd);
  std::string cmd = std::string("python3 '") + TUNE_SOURCE_DIR +
                    "/tests/unit/trainer/data/testdata/render_reference.py' < " + in_path + " 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while (p && (n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int status = p ? pclose(p) : -1;
  unlink(in_path);
  *rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (*rc != 0) return nullptr;
  return nlohmann::json::parse(out);
}

std::vector<std::vector<Message>> TrickyConversations() {
  return {
      kConv,
      {{"user", "\xC2\x85 NEL and \x1C FS are Python spaces \xC2\x85"}, {"assistant", "\xEF\xBB\xBF BOM is not \xE2\x80\x8B"}},
      {{"user", "  multi\nline\r\n  "}, {"assistant", "\t\ttabs\t"}, {"user", "again"}, {"assistant", "\xE3\x80\x80ideographic\xE3\x80\x80"}},
      {{"system", "sys only"}},
      {{"user", "Q1"}, {"assistant", "A1"}, {"user", "Q2"}, {"assistant", "A2"}},
      {{"assistant", "starts with assistant"}},
      {{"system", "s1"}, {"system", "s2"}, {"user", "u"}, {"assistant", "a"}},
      {{"user", "<|eot_id|> inside {{ braces }} {% raw %}"}, {"assistant", "'quotes' \"double\""}},
  };
}

TEST(ChatTemplateTest, EqualsJinja2Rendering) {
  auto convs = TrickyConversations();
  for (const auto& name : BuiltinTemplateNames()) {
    auto t = MakeChatTemplate(name);
    const std::string bos = "<|begin_of_text|>", eos = "<|eot_id|>";
    int rc = 0;
    nlohmann::json ref = JinjaRender(t->JinjaSource(), convs, bos, eos, &rc);
    if (rc == 3 || rc == 127) GTEST_SKIP() << "python3 with jinja2 not available";
    ASSERT_EQ(rc, 0) << name;
    ASSERT_EQ(ref.size(), convs.size());
    for (size_t i = 0; i < convs.size(); ++i) {
      if (ref[i].contains("error")) {
        EXPECT_THROW(t->Render(convs[i], bos, eos), TemplateError) << name << " conv " << i;
      } else {
        EXPECT_EQ(Join(t->Render(convs[i], bos, eos)), ref[i]["text"].get<std::string>())
            << name << " conv " << i;
      }
    }
  }
}

TEST(ChatTemplateTest, PackageTemplatesEqualJinja2Rendering) {
  const std::string assets = TUNE_ASSETS_DIR;
  auto convs = TrickyConversations();
  auto t = MakeChatTemplate("llama-3");
  for (const char* dir : {"llama3", "llama3_1"}) {
    std::ifstream in(assets + "/" + dir + "/tokenizer_config.json");
    if (!in) GTEST_SKIP() << "assets missing in " << assets;
    nlohmann::json cfg = nlohmann::json::parse(in);
    int rc = 0;
    nlohmann::json ref = JinjaRender(cfg["chat_template"], convs, cfg["bos_token"], cfg["eos_token"], &rc);
    if (rc == 3 || rc == 127) GTEST_SKIP() << "python3 with jinja2 not available";
    ASSERT_EQ(rc, 0);
    // The original template appends the assistant header unconditionally; the
    // training render is the HF render without it.
    const std::string suffix =
        std::string(dir) == "llama3" ? "<|start_header_id|>assistant<|end_header_id|>\n\n" : "";
    for (size_t i = 0; i < convs.size(); ++i) {
      EXPECT_EQ(Join(t->Render(convs[i], cfg["bos_token"], cfg["eos_token"])) + suffix,
                ref[i]["text"].get<std::string>())
          << dir << " conv " << i;
    }
  }
}

}  // namespace
}  // namespace tune::data
