#include "common/control/cli_config.h"

#include <yaml-cpp/yaml.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace tune {
namespace {

// CLI11 config reader for YAML files: top-level `key: value` pairs (lists become
// repeated values). Nested mappings are rejected: the binaries' options are flat.
class YamlConfig : public CLI::Config {
 public:
  explicit YamlConfig(const CLI::App* app) : app_(app) {}

  std::string to_config(const CLI::App* app, bool default_also, bool write_description,
                        std::string prefix) const override {
    YAML::Emitter out;
    out << YAML::BeginMap;
    for (const CLI::Option* opt : app->get_options()) {
      if (opt->get_lnames().empty() || opt->get_configurable() == false) continue;
      std::string name = opt->get_lnames()[0];
      if (name == "help" || name == "config") continue;
      std::vector<std::string> vals = opt->reduced_results();
      if (vals.empty() && default_also) vals.push_back(opt->get_default_str());
      if (vals.empty()) continue;
      out << YAML::Key << name << YAML::Value << (vals.size() == 1 ? vals[0] : CLI::detail::join(vals));
    }
    out << YAML::EndMap;
    return out.c_str();
  }

  std::vector<CLI::ConfigItem> from_config(std::istream& input) const override {
    YAML::Node root;
    try {
      root = YAML::Load(input);
    } catch (const YAML::Exception& e) {
      throw CLI::ParseError("config file: line " + std::to_string(e.mark.line + 1) + ": " + e.msg,
                            CLI::ExitCodes::ConversionError);
    }
    std::vector<CLI::ConfigItem> items;
    if (root.IsNull()) return items;
    if (!root.IsMap()) {
      throw CLI::ParseError("config file: must be a mapping of option: value", CLI::ExitCodes::ConversionError);
    }
    for (const auto& kv : root) {
      CLI::ConfigItem item;
      item.name = kv.first.Scalar();
      if (kv.second.IsSequence()) {
        for (const auto& v : kv.second) item.inputs.push_back(v.Scalar());
      } else if (kv.second.IsScalar()) {
        item.inputs.push_back(kv.second.Scalar());
      } else {
        throw CLI::ParseError("config file: line " + std::to_string(kv.first.Mark().line + 1) + ": '" +
                                  item.name + "' must be a value or a list",
                              CLI::ExitCodes::ConversionError);
      }
      // CLI11 applies the file before environment variables; skip keys whose option
      // is set in the environment so that env beats file, as documented.
      const CLI::Option* opt = nullptr;
      try {
        opt = app_->get_option("--" + item.name);
      } catch (const CLI::OptionNotFound&) {
      }
      if (opt != nullptr && !opt->get_envname().empty() && std::getenv(opt->get_envname().c_str()) != nullptr) {
        continue;
      }
      items.push_back(std::move(item));
    }
    return items;
  }

 private:
  const CLI::App* app_;
};

}  // namespace

void UseYamlConfigFile(CLI::App& app) {
  app.config_formatter(std::make_shared<YamlConfig>(&app));
  app.set_config("--config", "", "YAML file of options (keys = long flag names); env TUNE_* and flags override it");
  // Unknown keys in the file are errors, not silently ignored.
  app.allow_config_extras(CLI::config_extras_mode::error);
}

}  // namespace tune
