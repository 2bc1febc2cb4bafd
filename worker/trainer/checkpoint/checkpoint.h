// Atomic checkpoint directories (torch-free: the caller writes the files).
//
// Layout: <root>/step-000020/{meta.json, ...}. A checkpoint is written into
// <root>/.tmp-step-000020-<pid>/, every file in it and the directory itself
// are fsync'd, the directory is rename(2)d to its final name and <root> is
// fsync'd. A crash at any point leaves either the complete checkpoint or a
// .tmp-* directory, which readers ignore and the next commit removes. A
// directory counts as complete only when it is named step-NNNNNN and holds
// meta.json (written last by convention, but the rename is what makes it
// visible).
#ifndef TUNE_WORKER_TRAINER_CHECKPOINT_CHECKPOINT_H_
#define TUNE_WORKER_TRAINER_CHECKPOINT_CHECKPOINT_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace tune::train {

struct CheckpointRef {
  int64_t step = 0;
  std::string path;  // the final directory
};

// "step-000020" (at least 6 digits).
std::string CheckpointDirName(int64_t step);

// Complete checkpoints under `root`, ascending by step. Missing root: empty.
std::vector<CheckpointRef> ListCheckpoints(const std::string& root);
std::optional<CheckpointRef> LatestCheckpoint(const std::string& root);

// Writes checkpoint `step`: creates the temp dir, calls write_files(temp_dir),
// fsyncs, renames into place (replacing an existing checkpoint of the same
// step), fsyncs root, removes stale temp dirs and keeps only the newest
// `keep` checkpoints. Returns the final path. Throws std::runtime_error (with
// errno text) on I/O failure; the temp dir is removed then.
std::string CommitCheckpoint(const std::string& root, int64_t step, int keep,
                             const std::function<void(const std::string& dir)>& write_files);

// Removes all but the newest `keep` complete checkpoints.
void PruneCheckpoints(const std::string& root, int keep);

// fsync of one file or directory; throws std::runtime_error.
void FsyncPath(const std::string& path);

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_CHECKPOINT_CHECKPOINT_H_
