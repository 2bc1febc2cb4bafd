// safetensors: the Hugging Face tensor file format, read through mmap and
// written atomically.
//
// File layout (https://github.com/huggingface/safetensors):
//   [8 bytes: little-endian uint64 N][N bytes: UTF-8 JSON header][data]
//   header = {"__metadata__": {"k": "v", ...},            (optional)
//             "<tensor name>": {"dtype": "BF16", "shape": [..],
//                               "data_offsets": [begin, end]}, ...}
//   Offsets are relative to the first data byte, row-major, little-endian.
//
// Contract of the reader: every structural property is validated when a file
// is opened (header length vs file size, JSON shape, dtype known, offsets in
// range and non-overlapping, byte size == product(shape) * element size), so a
// tensor handed out is always backed by valid bytes. Every error is a
// std::runtime_error whose message names the file and, where relevant, the
// tensor and the field.
//
// Supported dtypes: BF16, F16, F32 (model weights), I64, U8, I32, F64 (our own
// NF4 storage, optimizer/checkpoint state). Anything else is rejected by name.
#ifndef TUNE_WORKER_TRAINER_MODEL_SAFETENSORS_H_
#define TUNE_WORKER_TRAINER_MODEL_SAFETENSORS_H_

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tune::model::safetensors {

struct TensorInfo {
  std::string name;
  std::string dtype;            // safetensors spelling: "BF16", "F32", ...
  torch::ScalarType scalar_type;
  std::vector<int64_t> shape;
  uint64_t begin = 0;           // relative to the data section
  uint64_t end = 0;
};

// Maps a safetensors dtype name to a torch dtype; throws for unsupported names.
torch::ScalarType ScalarTypeFromName(const std::string& dtype);
// Inverse; throws for torch dtypes this format (as we use it) does not carry.
std::string NameFromScalarType(torch::ScalarType type);

// One mmap'd .safetensors file. Not copyable; tensors returned by View() borrow
// the mapping and must not outlive the File.
class File {
 public:
  // Opens, maps and validates `path`. Throws std::runtime_error.
  static std::unique_ptr<File> Open(const std::string& path);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  // Tensors in header order (sorted by data offset).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool Has(const std::string& name) const { return index_.count(name) > 0; }
  // Throws naming the file when absent.
  const TensorInfo& Info(const std::string& name) const;
  // Zero-copy CPU tensor over the mapping (read-only: do not write into it).
  torch::Tensor View(const std::string& name) const;
  // An owned CPU copy in the file's dtype.
  torch::Tensor Get(const std::string& name) const;

 private:
  File() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // first data byte
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// All weights of a model directory: either one model.safetensors or the
// shards listed by model.safetensors.index.json ("weight_map": name -> file).
// Shards are opened lazily and kept mapped (mapping costs address space, not
// RAM: pages are read on demand and can be dropped by the kernel).
class Reader {
 public:
  // Throws when the directory holds neither model.safetensors nor an index,
  // when the index is malformed, or a listed shard is missing / lacks a tensor.
  static std::unique_ptr<Reader> OpenDir(const std::string& dir);
  // A single file (tests, checkpoints).
  static std::unique_ptr<Reader> OpenFile(const std::string& path);

  std::vector<std::string> Names() const;  // sorted
  bool Has(const std::string& name) const { return where_.count(name) > 0; }
  const TensorInfo& Info(const std::string& name) const;
  torch::Tensor View(const std::string& name) const;
  torch::Tensor Get(const std::string& name) const;

 private:
  File& FileFor(const std::string& name) const;
  std::string dir_;
  std::map<std::string, std::string> where_;  // tensor -> shard path
  mutable std::map<std::string, std::unique_ptr<File>> files_;
};

// Writes one .safetensors file holding `tensors` (any device/dtype among the
// supported ones; made contiguous CPU before writing) in the given order.
// Writes `path`.tmp, fsyncs, then renames over `path` so a crash never leaves
// a half-written file under the final name. Header padded to 8 bytes.
// Throws std::runtime_error (duplicate names, unsupported dtype, I/O errors).
void SaveFile(const std::string& path,
              const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
              const std::map<std::string, std::string>& metadata = {});

// Writes model.safetensors.index.json for a sharded save:
// {"metadata": {"total_size": N}, "weight_map": {name: file}}.
void SaveIndex(const std::string& path, uint64_t total_size,
               const std::map<std::string, std::string>& weight_map);

}  // namespace tune::model::safetensors

#endif  // TUNE_WORKER_TRAINER_MODEL_SAFETENSORS_H_
