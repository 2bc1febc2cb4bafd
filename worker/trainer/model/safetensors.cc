#include "worker/trainer/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>

namespace tune::model::safetensors {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Headers of real models are a few hundred KB; 100 MB is the safetensors
// library's own limit and keeps a corrupt length from allocating gigabytes.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1024 * 1024;

[[noreturn]] void Fail(const std::string& file, const std::string& what) {
  throw std::runtime_error("safetensors: " + file + ": " + what);
}

std::string ErrnoText() { return std::strerror(errno); }

struct DTypeEntry {
  const char* name;
  torch::ScalarType type;
};
constexpr DTypeEntry kDTypes[] = {
    {"BF16", torch::kBFloat16}, {"F16", torch::kFloat16}, {"F32", torch::kFloat32},
    {"F64", torch::kFloat64},   {"I64", torch::kInt64},   {"I32", torch::kInt32},
    {"U8", torch::kUInt8},      {"I8", torch::kInt8},     {"BOOL", torch::kBool},
};

// Writes all of `size` bytes or throws.
void WriteAll(int fd, const void* data, size_t size, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, std::min<size_t>(size, 1u << 30));
    if (n < 0) {
      if (errno == EINTR) continue;
      Fail(path, "write failed: " + ErrnoText());
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
}

void FsyncDir(const std::string& path) {
  std::string dir = fs::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

}  // namespace

torch::ScalarType ScalarTypeFromName(const std::string& dtype) {
  for (const auto& e : kDTypes) {
    if (dtype == e.name) return e.type;
  }
  throw std::runtime_error("unsupported safetensors dtype \"" + dtype +
                           "\" (supported: BF16, F16, F32, F64, I64, I32, U8, I8, BOOL)");
}

std::string NameFromScalarType(torch::ScalarType type) {
  for (const auto& e : kDTypes) {
    if (type == e.type) return e.name;
  }
  throw std::runtime_error(std::string("safetensors: cannot store dtype ") +
                           c10::toString(type));
}

// ---------------------------------------------------------------- File

std::unique_ptr<File> File::Open(const std::string& path) {
  std::unique_ptr<File> f(new File());
  f->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) Fail(path, "cannot open: " + ErrnoText());
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    Fail(path, "cannot stat: " + ErrnoText());
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    Fail(path, "file is " + std::to_string(file_size) +
                   " bytes, shorter than the 8-byte header length (truncated or not safetensors)");
  }
  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) Fail(path, "mmap failed: " + ErrnoText());
  f->map_ = map;
  f->map_size_ = file_size;
  const uint8_t* bytes = static_cast<const uint8_t*>(map);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];  // little-endian
  if (header_len > kMaxHeaderBytes || header_len > file_size - 8) {
    Fail(path, "header length " + std::to_string(header_len) + " does not fit a file of " +
                   std::to_string(file_size) + " bytes (truncated or not safetensors)");
  }
  json header;
  try {
    header = json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const std::exception& e) {
    Fail(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) Fail(path, "header must be a JSON object");
  f->data_ = bytes + 8 + header_len;
  const uint64_t data_size = file_size - 8 - header_len;

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) Fail(path, "__metadata__ must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) Fail(path, "__metadata__." + m.key() + " must be a string");
        f->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor \"" + name + "\": ";
    if (!v.is_object()) Fail(path, where + "entry must be an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) Fail(path, where + "missing string field dtype");
    if (!v.contains("shape") || !v["shape"].is_array()) Fail(path, where + "missing array field shape");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
      Fail(path, where + "data_offsets must be [begin, end]");
    TensorInfo info;
    info.name = name;
    info.dtype = v["dtype"].get<std::string>();
    try {
      info.scalar_type = ScalarTypeFromName(info.dtype);
    } catch (const std::exception& e) {
      Fail(path, where + e.what());
    }
    uint64_t count = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) Fail(path, where + "shape entries must be integers >= 0");
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && count > (uint64_t{1} << 62) / dim) Fail(path, where + "shape is absurdly large");
      count *= dim;
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    for (const auto& o : v["data_offsets"]) {
      if (!o.is_number_integer() || o.get<int64_t>() < 0) Fail(path, where + "data_offsets must be integers >= 0");
    }
    info.begin = v["data_offsets"][0].get<uint64_t>();
    info.end = v["data_offsets"][1].get<uint64_t>();
    if (info.end < info.begin) Fail(path, where + "data_offsets end < begin");
    if (info.end > data_size) {
      Fail(path, where + "data_offsets [" + std::to_string(info.begin) + ", " + std::to_string(info.end) +
                     ") exceed the data section of " + std::to_string(data_size) + " bytes (truncated file?)");
    }
    const uint64_t expect = count * c10::elementSize(info.scalar_type);
    if (info.end - info.begin != expect) {
      Fail(path, where + "holds " + std::to_string(info.end - info.begin) + " bytes but shape × " + info.dtype +
                     " needs " + std::to_string(expect));
    }
    f->tensors_.push_back(std::move(info));
  }
  std::sort(f->tensors_.begin(), f->tensors_.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.begin < b.begin || (a.begin == b.begin && a.end < b.end); });
  for (size_t i = 0; i < f->tensors_.size(); ++i) {
    if (i > 0 && f->tensors_[i].begin < f->tensors_[i - 1].end) {
      Fail(path, "tensors \"" + f->tensors_[i - 1].name + "\" and \"" + f->tensors_[i].name + "\" overlap in the data section");
    }
    f->index_[f->tensors_[i].name] = i;
  }
  return f;
}

File::~File() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

const TensorInfo& File::Info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) Fail(path_, "no tensor named \"" + name + "\"");
  return tensors_[it->second];
}

torch::Tensor File::View(const std::string& name) const {
  const TensorInfo& info = Info(name);
  // from_blob wants a mutable pointer; the mapping is PROT_READ, so writing
  // would fault. Callers copy before mutating (documented in the header).
  void* ptr = const_cast<uint8_t*>(data_ + info.begin);
  if (info.end == info.begin) return torch::empty(info.shape, torch::TensorOptions().dtype(info.scalar_type));
  // Element alignment: the format guarantees 8-byte aligned headers when
  // written by the reference writer; unaligned data is copied instead.
  if (reinterpret_cast<uintptr_t>(ptr) % c10::elementSize(info.scalar_type) != 0) {
    auto t = torch::empty(info.shape, torch::TensorOptions().dtype(info.scalar_type));
    std::memcpy(t.data_ptr(), ptr, info.end - info.begin);
    return t;
  }
  return torch::from_blob(ptr, info.shape, torch::TensorOptions().dtype(info.scalar_type));
}

torch::Tensor File::Get(const std::string& name) const { return View(name).clone(); }

// ---------------------------------------------------------------- Reader

std::unique_ptr<Reader> Reader::OpenDir(const std::string& dir) {
  std::unique_ptr<Reader> r(new Reader());
  r->dir_ = dir;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    json j;
    try {
      in >> j;
    } catch (const std::exception& e) {
      Fail(index_path.string(), std::string("not valid JSON: ") + e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      Fail(index_path.string(), "missing object field weight_map");
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) Fail(index_path.string(), "weight_map." + it.key() + " must be a file name");
      const std::string file = it.value().get<std::string>();
      if (file.find('/') != std::string::npos || file == "..")
        Fail(index_path.string(), "weight_map." + it.key() + ": shard name \"" + file + "\" must be a plain file name");
      r->where_[it.key()] = (fs::path(dir) / file).string();
    }
    // Open every shard now so missing files or tensors are reported up front.
    for (const auto& [name, file] : r->where_) {
      File& f = r->FileFor(name);
      if (!f.Has(name)) Fail(file, "index lists tensor \"" + name + "\" but the shard does not hold it");
    }
  } else if (fs::exists(single)) {
    auto f = File::Open(single.string());
    for (const auto& t : f->tensors()) r->where_[t.name] = single.string();
    r->files_[single.string()] = std::move(f);
  } else {
    Fail(dir, "neither model.safetensors nor model.safetensors.index.json found in the model directory");
  }
  return r;
}

std::unique_ptr<Reader> Reader::OpenFile(const std::string& path) {
  std::unique_ptr<Reader> r(new Reader());
  r->dir_ = fs::path(path).parent_path().string();
  auto f = File::Open(path);
  for (const auto& t : f->tensors()) r->where_[t.name] = path;
  r->files_[path] = std::move(f);
  return r;
}

std::vector<std::string> Reader::Names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [name, file] : where_) out.push_back(name);
  return out;
}

File& Reader::FileFor(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) Fail(dir_, "model has no tensor named \"" + name + "\"");
  auto f = files_.find(it->second);
  if (f == files_.end()) f = files_.emplace(it->second, File::Open(it->second)).first;
  return *f->second;
}

const TensorInfo& Reader::Info(const std::string& name) const { return FileFor(name).Info(name); }
torch::Tensor Reader::View(const std::string& name) const { return FileFor(name).View(name); }
torch::Tensor Reader::Get(const std::string& name) const { return FileFor(name).Get(name); }

// ---------------------------------------------------------------- Writer

void SaveFile(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
              const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> cpu;
  cpu.reserve(tensors.size());
  std::set<std::string> seen;
  uint64_t offset = 0;
  // Data in order of decreasing element size (stable), like the reference
  // writer: every tensor then starts at a multiple of its element size, so
  // readers can map it without copying.
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const auto& ta = tensors[a].second;
    const auto& tb = tensors[b].second;
    const size_t ea = ta.defined() ? ta.element_size() : 0, eb = tb.defined() ? tb.element_size() : 0;
    return ea > eb;
  });
  for (size_t oi : order) {
    const auto& [name, t] = tensors[oi];
    if (name.empty() || name == "__metadata__") Fail(path, "invalid tensor name \"" + name + "\"");
    if (!seen.insert(name).second) Fail(path, "duplicate tensor name \"" + name + "\"");
    if (!t.defined()) Fail(path, "tensor \"" + name + "\" is undefined");
    std::string dtype;
    try {
      dtype = NameFromScalarType(t.scalar_type());
    } catch (const std::exception& e) {
      Fail(path, "tensor \"" + name + "\": " + e.what());
    }
    torch::Tensor c = t.detach().to(torch::kCPU).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(c.numel()) * c.element_size();
    header[name] = {{"dtype", dtype}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    cpu.push_back(std::move(c));
  }
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');  // keeps data 8-byte aligned

  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) Fail(tmp, "cannot create: " + ErrnoText());
  try {
    uint8_t len[8];
    uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>((n >> (8 * i)) & 0xff);
    WriteAll(fd, len, 8, tmp);
    WriteAll(fd, h.data(), h.size(), tmp);
    for (const auto& c : cpu) {
      if (c.numel() > 0) WriteAll(fd, c.data_ptr(), static_cast<size_t>(c.numel()) * c.element_size(), tmp);
    }
    if (::fsync(fd) != 0) Fail(tmp, "fsync failed: " + ErrnoText());
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) Fail(tmp, "close failed: " + ErrnoText());
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    Fail(path, "rename from .tmp failed: " + ErrnoText());
  }
  FsyncDir(path);
}

void SaveIndex(const std::string& path, uint64_t total_size, const std::map<std::string, std::string>& weight_map) {
  json j = {{"metadata", {{"total_size", total_size}}}, {"weight_map", weight_map}};
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) Fail(tmp, "cannot create: " + ErrnoText());
    out << j.dump(2) << "\n";
    out.flush();
    if (!out) Fail(tmp, "write failed");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) Fail(path, "rename from .tmp failed: " + ErrnoText());
}

}  // namespace tune::model::safetensors
