#include "worker/trainer/data/cli.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "common/jobspec/job_spec.h"
#include "worker/trainer/data/prepare.h"
#include "worker/trainer/data/tokenizer.h"

namespace tune::data {
namespace {

using json = nlohmann::json;

constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;
constexpr int kExitData = 5;

std::string Dump(const json& j, int indent = -1) {
  return j.dump(indent, ' ', false, json::error_handler_t::replace);
}

// Loads and validates the job spec; prints errors and returns false on failure.
bool LoadSpec(const std::string& path, spec::JobSpec* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::cerr << path << ": cannot open the job spec\n";
    return false;
  }
  std::stringstream ss;
  ss << in.rdbuf();
  auto errors = spec::ParseJobSpec(ss.str(), out);
  if (errors.empty()) {
    spec::ValidateOptions vo;
    // Relative paths in the spec are relative to the spec file.
    vo.base_dir = std::filesystem::absolute(path).parent_path().string();
    errors = spec::ValidateJobSpec(out, vo);
  }
  if (!errors.empty()) {
    std::cerr << spec::FormatErrors(errors, path) << "\n";
    return false;
  }
  return true;
}

struct ConfigArgs {
  std::string config;
  std::string tokenizer;  // default: the spec's model dir
  long limit = 10;
};

bool ParseConfigArgs(int argc, char** argv, bool with_limit, ConfigArgs* a) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&](std::string* out) {
      if (i + 1 >= argc) {
        std::cerr << argv[0] << ": " << arg << " needs a value\n";
        return false;
      }
      *out = argv[++i];
      return true;
    };
    std::string v;
    if (arg == "--config") {
      if (!value(&a->config)) return false;
    } else if (arg == "--tokenizer") {
      if (!value(&a->tokenizer)) return false;
    } else if (with_limit && arg == "--limit") {
      if (!value(&v)) return false;
      char* end = nullptr;
      a->limit = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || a->limit < 0) {
        std::cerr << argv[0] << ": --limit must be a non-negative integer (got '" << v << "')\n";
        return false;
      }
    } else {
      std::cerr << argv[0] << ": unknown argument '" << arg << "'\nusage: tune-train " << argv[0]
                << " --config job.yaml" << (with_limit ? " [--limit N]" : "") << " [--tokenizer DIR]\n";
      return false;
    }
  }
  if (a->config.empty()) {
    std::cerr << argv[0] << ": --config job.yaml is required\n";
    return false;
  }
  return true;
}

// Shared by render/preflight: spec -> tokenizer -> PrepareDataset.
int Prepare(const ConfigArgs& a, PreparedDataset* out, json* failed_report,
            std::unique_ptr<Tokenizer>* tok_out = nullptr) {
  spec::JobSpec spec;
  if (!LoadSpec(a.config, &spec)) return kExitUsage;
  std::unique_ptr<Tokenizer> tok;
  try {
    tok = Tokenizer::FromDir(a.tokenizer.empty() ? spec.model : a.tokenizer);
  } catch (const std::exception& e) {
    std::cerr << "tokenizer: " << e.what() << "\n";
    return kExitFailure;
  }
  try {
    *out = PrepareDataset(spec, *tok);
  } catch (const DataError& e) {
    std::cerr << "preflight failed: " << e.what() << "\n";
    if (failed_report) *failed_report = e.report();
    return kExitData;
  } catch (const std::exception& e) {
    std::cerr << "preflight: " << e.what() << "\n";
    return kExitFailure;
  }
  if (tok_out) *tok_out = std::move(tok);
  return kExitOk;
}

}  // namespace

int RunTokenizeCommand(int argc, char** argv) {
  std::string dir;
  bool as_json = false, add_special = false, decode = false, skip_special = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--tokenizer" && i + 1 < argc) dir = argv[++i];
    else if (arg == "--json") as_json = true;
    else if (arg == "--add-special") add_special = true;
    else if (arg == "--decode") decode = true;
    else if (arg == "--skip-special") skip_special = true;
    else {
      std::cerr << "tokenize: unknown argument '" << arg
                << "'\nusage: tune-train tokenize --tokenizer DIR [--json] [--add-special] "
                   "[--decode [--skip-special]]\n";
      return kExitUsage;
    }
  }
  if (dir.empty()) {
    std::cerr << "tokenize: --tokenizer DIR is required (a folder with tokenizer.json)\n";
    return kExitUsage;
  }
  std::unique_ptr<Tokenizer> tok;
  try {
    tok = Tokenizer::FromDir(dir);
  } catch (const std::exception& e) {
    std::cerr << "tokenize: " << e.what() << "\n";
    return kExitFailure;
  }
  std::string line;
  long lineno = 0;
  while (std::getline(std::cin, line)) {
    ++lineno;
    try {
      if (decode) {
        json j = json::parse(line);
        std::vector<int32_t> ids = j.get<std::vector<int32_t>>();
        std::string text = tok->Decode(ids, skip_special);
        std::cout << (as_json ? Dump(json(text)) : text) << '\n';
      } else {
        std::string text = as_json ? json::parse(line).get<std::string>() : line;
        std::cout << Dump(json(tok->Encode(text, add_special))) << '\n';
      }
    } catch (const std::exception& e) {
      std::cout.flush();
      std::cerr << "tokenize: stdin line " << lineno << ": " << e.what() << "\n";
      return kExitFailure;
    }
  }
  std::cout.flush();
  return kExitOk;
}

int RunRenderCommand(int argc, char** argv) {
  ConfigArgs a;
  if (!ParseConfigArgs(argc, argv, true, &a)) return kExitUsage;
  PreparedDataset ds;
  std::unique_ptr<Tokenizer> tok;
  int rc = Prepare(a, &ds, nullptr, &tok);
  if (rc != kExitOk) return rc;
  for (size_t i = 0; i < ds.examples.size() && static_cast<long>(i) < a.limit; ++i) {
    const Example& ex = ds.examples[i];
    json j = {{"text", tok->Decode(ex.input_ids, false)},
              {"ids", ex.input_ids},
              {"labels", ex.labels},
              {"position_ids", ex.position_ids},
              {"segment_ids", ex.segment_ids}};
    std::cout << Dump(j) << '\n';
  }
  return kExitOk;
}

int RunPreflightCommand(int argc, char** argv) {
  ConfigArgs a;
  if (!ParseConfigArgs(argc, argv, false, &a)) return kExitUsage;
  PreparedDataset ds;
  json failed;
  int rc = Prepare(a, &ds, &failed);
  if (rc == kExitData) {
    if (!failed.is_null()) std::cout << Dump(failed, 2) << '\n';
    return rc;
  }
  if (rc != kExitOk) return rc;
  std::cout << Dump(ds.preflight_report, 2) << '\n';
  return kExitOk;
}

}  // namespace tune::data
