// File -> env -> flags configuration for every control-plane binary, on CLI11.
//
// Each binary declares its options once on a CLI::App with `->envname("TUNE_...")`
// and calls UseYamlConfigFile(app). CLI11 then applies, lowest to highest
// precedence: defaults in the Config struct, the YAML file named by --config
// (keys are the long option names without dashes, e.g. `heartbeat-timeout: 5`),
// environment variables, command-line flags. Unknown keys in the file are errors.
#ifndef TUNE_COMMON_CONTROL_CLI_CONFIG_H_
#define TUNE_COMMON_CONTROL_CLI_CONFIG_H_

#include <CLI/CLI.hpp>

namespace tune {

// Adds `--config FILE` (YAML) to `app`.
void UseYamlConfigFile(CLI::App& app);

}  // namespace tune

#endif  // TUNE_COMMON_CONTROL_CLI_CONFIG_H_
