// `tune-train` subcommands for inspecting the data pipeline (issue 4). Called
// from worker/trainer/main.cc with argv[0] = the subcommand name.
//
//   tune-train tokenize --tokenizer DIR [--json] [--add-special] [--decode [--skip-special]]
//       stdin: one text per line (--json: each line is a JSON string, so texts
//       may hold newlines); stdout: one JSON array of ids per line.
//       --add-special applies the post-processor (e.g. Llama 3.1's BOS).
//       --decode reverses: each line a JSON array of ids; prints the text
//       (a JSON string per line with --json).
//       Exit 0; 2 bad usage; 1 on a bad input line (stderr names the line).
//   tune-train render --config job.yaml [--limit N]
//       Prints up to N (default 10) sequences as fed to the model, one JSON
//       object a line: {"text", "ids", "labels", "position_ids", "segment_ids"}.
//   tune-train preflight --config job.yaml
//       Prints the preflight report (JSON). Exit 0 ok, 5 DataError (the
//       partial report is still printed, the reason goes to stderr), 2 spec
//       errors, 1 other failures (unreadable tokenizer...).
#ifndef TUNE_WORKER_TRAINER_DATA_CLI_H_
#define TUNE_WORKER_TRAINER_DATA_CLI_H_

namespace tune::data {

int RunTokenizeCommand(int argc, char** argv);
int RunRenderCommand(int argc, char** argv);
int RunPreflightCommand(int argc, char** argv);

}  // namespace tune::data

#endif  // TUNE_WORKER_TRAINER_DATA_CLI_H_
