#include "worker/trainer/checkpoint/checkpoint.h"

#include <ftw.h>
#include <sys/stat.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace tune::train {
namespace {

// Deletes a directory tree with nftw(3), not std::filesystem::remove_all: pip builds of
// libtorch 2.x export their own copies of the std::filesystem removal symbols, and
// remove_all crashed inside libtorch.so on the CUDA host. Missing paths are fine.
void RemoveTree(const std::string& path) {
  ::nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int, struct FTW*) { ::remove(p); return 0; }, 16,
      FTW_DEPTH | FTW_PHYS);
}

}  // namespace

namespace {

namespace fs = std::filesystem;

std::optional<int64_t> ParseStepDir(const std::string& name) {
  if (name.size() < 6 || name.compare(0, 5, "step-") != 0) return std::nullopt;
  int64_t v = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    v = v * 10 + (name[i] - '0');
  }
  return v;
}

}  // namespace

std::string CheckpointDirName(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step-%06lld", static_cast<long long>(step));
  return buf;
}

void FsyncPath(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + path + " for fsync: " + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw std::runtime_error("fsync " + path + " failed: " + std::strerror(err));
}

std::vector<CheckpointRef> ListCheckpoints(const std::string& root) {
  std::vector<CheckpointRef> out;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    if (!entry.is_directory()) continue;
    const auto step = ParseStepDir(entry.path().filename().string());
    if (!step) continue;
    if (!fs::exists(entry.path() / "meta.json")) continue;
    out.push_back(CheckpointRef{*step, entry.path().string()});
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.step < b.step; });
  return out;
}

std::optional<CheckpointRef> LatestCheckpoint(const std::string& root) {
  auto all = ListCheckpoints(root);
  if (all.empty()) return std::nullopt;
  return all.back();
}

void PruneCheckpoints(const std::string& root, int keep) {
  auto all = ListCheckpoints(root);
  const size_t k = static_cast<size_t>(std::max(1, keep));
  if (all.size() <= k) return;
  for (size_t i = 0; i + k < all.size(); ++i) {
    std::error_code ec;
    RemoveTree(all[i].path);
  }
}

std::string CommitCheckpoint(const std::string& root, int64_t step, int keep,
                             const std::function<void(const std::string& dir)>& write_files) {
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) throw std::runtime_error("cannot create checkpoint dir " + root + ": " + ec.message());
  // Leftovers of a crashed writer are never valid checkpoints.
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(".tmp-", 0) == 0 || name.rfind(".old-", 0) == 0) RemoveTree(entry.path().string());
  }
  const std::string name = CheckpointDirName(step);
  const fs::path tmp = fs::path(root) / (".tmp-" + name + "-" + std::to_string(::getpid()));
  const fs::path final_dir = fs::path(root) / name;
  RemoveTree(tmp.string());
  if (!fs::create_directory(tmp, ec)) {
    throw std::runtime_error("cannot create " + tmp.string() + ": " + ec.message());
  }
  try {
    write_files(tmp.string());
    for (const auto& entry : fs::recursive_directory_iterator(tmp)) {
      if (entry.is_regular_file() || entry.is_directory()) FsyncPath(entry.path().string());
    }
    FsyncPath(tmp.string());
    // rename(2) cannot replace a non-empty directory: move an existing
    // checkpoint of the same step aside first (it stays complete until then).
    fs::path old;
    if (fs::exists(final_dir)) {
      old = fs::path(root) / (".old-" + name + "-" + std::to_string(::getpid()));
      if (::rename(final_dir.c_str(), old.c_str()) != 0) {
        throw std::runtime_error("cannot move old " + final_dir.string() + " aside: " + std::strerror(errno));
      }
    }
    if (::rename(tmp.c_str(), final_dir.c_str()) != 0) {
      throw std::runtime_error("cannot rename " + tmp.string() + " to " + final_dir.string() + ": " +
                               std::strerror(errno));
    }
    FsyncPath(root);
    if (!old.empty()) RemoveTree(old.string());
  } catch (...) {
    RemoveTree(tmp.string());
    throw;
  }
  PruneCheckpoints(root, keep);
  return final_dir.string();
}

}  // namespace tune::train
