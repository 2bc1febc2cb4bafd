// Built-in chat template renderers for training data.
//
// Each renderer reproduces, character for character, what Hugging Face's
// `apply_chat_template(messages, tokenize=False, add_generation_prompt=False)`
// renders with the corresponding Jinja template (Python jinja2 semantics:
// `| trim` is Python's str.strip()). The output is split into segments that
// say which text is a training target (assistant content and its end-of-turn
// marker) so the labels can be masked.
//
// Built-in templates (the exact Jinja sources are in chat_template.cc and
// docs in worker/trainer/data/README.md):
//  * llama-3   Meta-Llama-3-Instruct: BOS, then per message
//              "<|start_header_id|>ROLE<|end_header_id|>\n\n" + trim(content) + "<|eot_id|>".
//  * llama-3.1 Meta-Llama-3.1-Instruct (no tools): BOS, a system turn that always
//              starts "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
//              followed by the trimmed first system message (if any), then turns as llama-3.
//  * chatml    "<|im_start|>ROLE\n" + content + "<|im_end|>\n" per message (no BOS in text).
//  * mistral   Mistral-7B-Instruct-v0.1: BOS, "[INST] " + user + " [/INST]", assistant + EOS;
//              roles must alternate user/assistant starting with user; no system role.
//  * alpaca    BOS, system message (or the Alpaca preamble) + "\n\n", then
//              "### Instruction:\n" + user + "\n\n" and "### Response:\n" + assistant + EOS + "\n\n".
//
// The generation prompt is never appended: these are training renders. The
// original Llama-3-Instruct tokenizer_config.json template appends the
// assistant header unconditionally (even with add_generation_prompt=false);
// `auto` recognises it, maps it to llama-3 and says so in the reason, and the
// header is not rendered (it would add an unsupervised, unterminated turn).
#ifndef TUNE_WORKER_TRAINER_DATA_CHAT_TEMPLATE_H_
#define TUNE_WORKER_TRAINER_DATA_CHAT_TEMPLATE_H_

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace tune::data {

struct Message {
  std::string role;  // system | user | assistant
  std::string content;
};

// A piece of rendered text; `assistant` marks what train_on=completions supervises.
struct TextSegment {
  std::string text;
  bool assistant = false;
};

// The template cannot render these messages (e.g. mistral with a system
// message); the message names the constraint. Reported as a bad line.
class TemplateError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class ChatTemplate {
 public:
  virtual ~ChatTemplate() = default;
  // "llama-3", "llama-3.1", "chatml", "mistral", "alpaca".
  virtual std::string name() const = 0;
  // Renders for training (never a generation prompt). `bos_token` /
  // `eos_token` are the tokenizer's token strings. Throws TemplateError.
  virtual std::vector<TextSegment> Render(const std::vector<Message>& messages,
                                          const std::string& bos_token,
                                          const std::string& eos_token) const = 0;
  // The text that ends an assistant turn ("<|eot_id|>", "<|im_end|>", or the EOS token).
  virtual std::string EndOfTurn(const std::string& eos_token) const = 0;
  // The Jinja source this renderer reproduces.
  virtual std::string JinjaSource() const = 0;
};

// Names accepted by MakeChatTemplate.
const std::vector<std::string>& BuiltinTemplateNames();

// Throws std::invalid_argument listing the known names.
std::unique_ptr<ChatTemplate> MakeChatTemplate(const std::string& name);

struct TemplateResolution {
  std::string name;    // built-in template name
  std::string reason;  // why (e.g. "tokenizer_config.json chat_template equals ...")
  // The source template appends the assistant header even without
  // add_generation_prompt (original Llama-3-Instruct); training renders omit it.
  bool source_appends_generation_prompt = false;
};

// Resolves dataset.chat_template. `requested` is "auto" or a built-in name;
// `tokenizer_template` is tokenizer_config.json's chat_template ("" if none).
// Throws std::invalid_argument (unknown name, auto without a template, or an
// unrecognised template) with a message that says how to fix it.
TemplateResolution ResolveChatTemplate(const std::string& requested,
                                       const std::string& tokenizer_template);

// Jinja whitespace normalisation used for recognition: whitespace control
// (`{%-`, `-%}`...), trim_blocks/lstrip_blocks (as Hugging Face compiles
// templates) and whitespace inside tags outside string literals are removed.
std::string NormalizeJinja(const std::string& source);

// Python str.strip(): removes leading/trailing characters for which Python's
// str.isspace() is true (includes U+001C..U+001F and U+0085; not U+FEFF/U+200B).
std::string PythonStrip(const std::string& s);

}  // namespace tune::data

#endif  // TUNE_WORKER_TRAINER_DATA_CHAT_TEMPLATE_H_
