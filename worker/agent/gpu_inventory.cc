#include "worker/agent/gpu_inventory.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "spdlog/spdlog.h"
#include "worker/agent/subprocess.h"

namespace tune::worker {
namespace {

// The few NVML declarations used here (ABI of libnvidia-ml.so.1; no header needed).
using NvmlReturn = int;  // nvmlReturn_t; 0 is NVML_SUCCESS.
using NvmlDevice = struct NvmlDeviceOpaque*;
struct NvmlMemory {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
};
struct NvmlUtilization {
  unsigned int gpu;
  unsigned int memory;
};
constexpr unsigned kNvmlStringSize = 256;  // > NVML_DEVICE_NAME_V2/UUID_V2_BUFFER_SIZE (96)

class NvmlProbe : public GpuProbe {
 public:
  ~NvmlProbe() override {
    if (shutdown_ != nullptr) shutdown_();
    if (lib_ != nullptr) dlclose(lib_);
  }

  static std::unique_ptr<GpuProbe> Open(std::string* why) {
    auto probe = std::unique_ptr<NvmlProbe>(new NvmlProbe());
    probe->lib_ = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (probe->lib_ == nullptr) {
      if (why) *why = absl::StrCat("libnvidia-ml.so.1 not loadable: ", dlerror());
      return nullptr;
    }
    std::string missing;
    auto sym = [&](const char* name, auto* fn) {
      *fn = reinterpret_cast<std::remove_pointer_t<decltype(fn)>>(dlsym(probe->lib_, name));
      if (*fn == nullptr) missing = name;
    };
    sym("nvmlInit_v2", &probe->init_);
    sym("nvmlShutdown", &probe->shutdown_);
    sym("nvmlDeviceGetCount_v2", &probe->get_count_);
    sym("nvmlDeviceGetHandleByIndex_v2", &probe->get_handle_);
    sym("nvmlDeviceGetName", &probe->get_name_);
    sym("nvmlDeviceGetMemoryInfo", &probe->get_memory_);
    sym("nvmlDeviceGetUUID", &probe->get_uuid_);
    sym("nvmlDeviceGetUtilizationRates", &probe->get_utilization_);
    sym("nvmlErrorString", &probe->error_string_);
    if (!missing.empty()) {
      if (why) *why = absl::StrCat("libnvidia-ml.so.1 lacks ", missing);
      probe->shutdown_ = nullptr;
      return nullptr;
    }
    NvmlReturn rc = probe->init_();
    if (rc != 0) {
      if (why) *why = absl::StrCat("nvmlInit_v2: ", probe->Error(rc));
      probe->shutdown_ = nullptr;
      return nullptr;
    }
    return probe;
  }

  absl::StatusOr<std::vector<GpuReading>> Read() override {
    unsigned count = 0;
    if (NvmlReturn rc = get_count_(&count); rc != 0) {
      return absl::UnavailableError(absl::StrCat("nvmlDeviceGetCount_v2: ", Error(rc)));
    }
    std::vector<GpuReading> out;
    for (unsigned i = 0; i < count; ++i) {
      NvmlDevice device = nullptr;
      // One broken GPU (fallen off the bus, being reset) must not hide the
      // others: it is left out, and said once.
      if (NvmlReturn rc = get_handle_(i, &device); rc != 0) {
        WarnOnce(i, "nvmlDeviceGetHandleByIndex_v2", rc);
        continue;
      }
      GpuReading g;
      g.index = static_cast<int>(i);
      char text[kNvmlStringSize] = {};
      if (get_name_(device, text, kNvmlStringSize) == 0) g.name = text;
      std::memset(text, 0, sizeof(text));
      if (get_uuid_(device, text, kNvmlStringSize) == 0) g.uuid = text;
      NvmlMemory memory{};
      if (NvmlReturn rc = get_memory_(device, &memory); rc != 0) {
        WarnOnce(i, "nvmlDeviceGetMemoryInfo", rc);
        g.memory_used_known = false;
      } else {
        g.memory_total_bytes = static_cast<int64_t>(memory.total);
        g.memory_used_bytes = static_cast<int64_t>(memory.used);
      }
      NvmlUtilization util{};
      // Not supported on every device (e.g. MIG instances): -1 then.
      if (get_utilization_(device, &util) == 0) g.utilization_percent = static_cast<int>(util.gpu);
      out.push_back(std::move(g));
    }
    return out;
  }

  std::string Source() const override { return "nvml"; }

 private:
  NvmlProbe() = default;
  std::string Error(NvmlReturn rc) const {
    const char* s = error_string_ ? error_string_(rc) : nullptr;
    return s ? std::string(s) : absl::StrCat("NVML error ", rc);
  }
  // Samples repeat every few seconds: a persistent per-GPU error is logged
  // the first time only. Read() runs on one thread at a time (see GpuProbe).
  void WarnOnce(unsigned index, const char* call, NvmlReturn rc) {
    if (warned_.insert({index, call}).second) {
      spdlog::warn("NVML {}(GPU {}): {}; leaving that reading out", call, index, Error(rc));
    }
  }

  void* lib_ = nullptr;
  NvmlReturn (*init_)() = nullptr;
  NvmlReturn (*shutdown_)() = nullptr;
  NvmlReturn (*get_count_)(unsigned*) = nullptr;
  NvmlReturn (*get_handle_)(unsigned, NvmlDevice*) = nullptr;
  NvmlReturn (*get_name_)(NvmlDevice, char*, unsigned) = nullptr;
  NvmlReturn (*get_memory_)(NvmlDevice, NvmlMemory*) = nullptr;
  NvmlReturn (*get_uuid_)(NvmlDevice, char*, unsigned) = nullptr;
  NvmlReturn (*get_utilization_)(NvmlDevice, NvmlUtilization*) = nullptr;
  const char* (*error_string_)(NvmlReturn) = nullptr;
  std::set<std::pair<unsigned, std::string>> warned_;
};

class NvidiaSmiProbe : public GpuProbe {
 public:
  explicit NvidiaSmiProbe(std::string binary) : binary_(std::move(binary)) {}

  absl::StatusOr<std::vector<GpuReading>> Read() override {
    absl::StatusOr<CapturedRun> run = RunAndCapture(
        {binary_, "--query-gpu=index,name,memory.total,uuid,memory.used,utilization.gpu",
         "--format=csv,noheader,nounits"},
        absl::Seconds(10));
    if (!run.ok()) return run.status();
    if (run->exit_code != 0) {
      // nvidia-smi exits non-zero (9, "couldn't communicate with the driver")
      // on machines without a usable GPU.
      return absl::UnavailableError(
          absl::StrCat(binary_, " exited with code ", run->exit_code));
    }
    return ParseNvidiaSmiCsv(run->out);
  }

  std::string Source() const override { return "nvidia-smi"; }

 private:
  std::string binary_;
};

// "[N/A]", "[Not Supported]", "N/A" -> -1 instead of an error.
bool IsNotAvailable(absl::string_view field) {
  return absl::StartsWith(field, "[") || field == "N/A" || field.empty();
}

constexpr int64_t kMiB = 1024 * 1024;

}  // namespace

std::unique_ptr<GpuProbe> OpenNvmlProbe(std::string* why) { return NvmlProbe::Open(why); }

std::unique_ptr<GpuProbe> MakeNvidiaSmiProbe(std::string binary) {
  return std::make_unique<NvidiaSmiProbe>(std::move(binary));
}

absl::StatusOr<std::vector<GpuReading>> ParseNvidiaSmiCsv(std::string_view csv) {
  std::vector<GpuReading> out;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(absl::string_view(csv.data(), csv.size()), '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    std::vector<std::string> fields;
    for (absl::string_view f : absl::StrSplit(line, ',')) {
      fields.emplace_back(absl::StripAsciiWhitespace(f));
    }
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat(
          "nvidia-smi output line ", line_number, " ('", line, "'): ", what,
          "; expected 'index, name, memory.total [MiB], uuid, memory.used [MiB], "
          "utilization.gpu [%]'"));
    };
    // GPU names do not contain commas in practice, but tolerate it: the name
    // is everything between the first field and the last four.
    if (fields.size() < 6) return bad(absl::StrCat(fields.size(), " fields instead of 6"));
    const size_t n = fields.size();
    GpuReading g;
    if (!absl::SimpleAtoi(fields[0], &g.index) || g.index < 0) return bad("bad index");
    g.name = absl::StrJoin(fields.begin() + 1, fields.begin() + (n - 4), ",");
    int64_t total_mib = 0;
    if (!absl::SimpleAtoi(fields[n - 4], &total_mib) || total_mib < 0) {
      return bad("bad memory.total");
    }
    g.memory_total_bytes = total_mib * kMiB;
    g.uuid = fields[n - 3];
    int64_t used_mib = 0;
    if (IsNotAvailable(fields[n - 2])) {
      used_mib = 0;
      g.memory_used_known = false;
    } else if (!absl::SimpleAtoi(fields[n - 2], &used_mib) || used_mib < 0) {
      return bad("bad memory.used");
    }
    g.memory_used_bytes = used_mib * kMiB;
    if (IsNotAvailable(fields[n - 1])) {
      g.utilization_percent = -1;
    } else if (!absl::SimpleAtoi(fields[n - 1], &g.utilization_percent) ||
               g.utilization_percent < 0 || g.utilization_percent > 100) {
      return bad("bad utilization.gpu");
    }
    out.push_back(std::move(g));
  }
  std::sort(out.begin(), out.end(),
            [](const GpuReading& a, const GpuReading& b) { return a.index < b.index; });
  for (size_t i = 1; i < out.size(); ++i) {
    if (out[i].index == out[i - 1].index) {
      return absl::InvalidArgumentError(
          absl::StrCat("nvidia-smi output lists GPU ", out[i].index, " twice"));
    }
  }
  return out;
}

absl::StatusOr<std::vector<GpuReading>> SelectGpus(const GpuSelection& selection,
                                                   const std::vector<GpuReading>& found) {
  switch (selection.mode) {
    case GpuSelection::Mode::kAll:
      return found;
    case GpuSelection::Mode::kNone:
      return std::vector<GpuReading>{};
    case GpuSelection::Mode::kList:
      break;
  }
  std::vector<GpuReading> out;
  for (int index : selection.indices) {
    auto it = std::find_if(found.begin(), found.end(),
                           [&](const GpuReading& g) { return g.index == index; });
    if (it == found.end()) {
      std::vector<int> present;
      for (const GpuReading& g : found) present.push_back(g.index);
      return absl::NotFoundError(absl::StrCat(
          "--gpus: GPU ", index, " does not exist on this machine (found: ",
          present.empty() ? "none" : absl::StrJoin(present, ","),
          "); list existing indices, or use --gpus all / none."));
    }
    out.push_back(*it);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<GpuInventory>> GpuInventory::Discover(
    const GpuSelection& selection, const std::string& nvidia_smi) {
  if (selection.mode == GpuSelection::Mode::kNone) {
    return std::make_unique<GpuInventory>(nullptr, std::vector<GpuReading>{});
  }
  std::unique_ptr<GpuProbe> probe;
  std::vector<GpuReading> found;
  std::string why;
  if (std::unique_ptr<GpuProbe> nvml = OpenNvmlProbe(&why)) {
    absl::StatusOr<std::vector<GpuReading>> r = nvml->Read();
    if (r.ok()) {
      probe = std::move(nvml);
      found = *std::move(r);
    } else {
      why = std::string(r.status().message());
    }
  }
  if (probe == nullptr) {
    spdlog::debug("NVML unavailable ({}); trying {}", why, nvidia_smi);
    std::unique_ptr<GpuProbe> smi = MakeNvidiaSmiProbe(nvidia_smi);
    absl::StatusOr<std::vector<GpuReading>> r = smi->Read();
    if (r.ok()) {
      probe = std::move(smi);
      found = *std::move(r);
    } else if (absl::IsInvalidArgument(r.status())) {
      return r.status();  // nvidia-smi ran but said something we cannot read
    } else {
      spdlog::info("no GPUs: NVML unavailable ({}), {}", why, r.status().ToString());
    }
  }
  if (selection.mode == GpuSelection::Mode::kList && found.empty()) {
    return absl::NotFoundError(absl::StrCat(
        "--gpus: GPUs ", absl::StrJoin(selection.indices, ","),
        " were requested but no GPU was found (", why,
        "); install the NVIDIA driver or use --gpus none with --cpu-slots N."));
  }
  absl::StatusOr<std::vector<GpuReading>> offered = SelectGpus(selection, found);
  if (!offered.ok()) return offered.status();
  return std::make_unique<GpuInventory>(std::move(probe), *std::move(offered));
}

GpuInventory::GpuInventory(std::unique_ptr<GpuProbe> probe, std::vector<GpuReading> offered)
    : probe_(std::move(probe)), offered_(std::move(offered)) {}

std::vector<GpuReading> GpuInventory::Sample() {
  std::vector<GpuReading> out;
  absl::StatusOr<std::vector<GpuReading>> fresh =
      probe_ != nullptr && !offered_.empty() ? probe_->Read()
                                             : absl::StatusOr<std::vector<GpuReading>>(
                                                   std::vector<GpuReading>{});
  if (!fresh.ok()) spdlog::warn("GPU sample via {} failed: {}", source(), fresh.status().ToString());
  for (const GpuReading& g : offered_) {
    GpuReading r = g;
    r.memory_used_bytes = 0;
    r.memory_used_known = false;
    r.utilization_percent = -1;
    if (fresh.ok()) {
      for (const GpuReading& f : *fresh) {
        if (f.index != g.index) continue;
        r.utilization_percent = f.utilization_percent;
        if (f.memory_used_known) {
          r.memory_used_bytes = f.memory_used_bytes;
          r.memory_total_bytes = f.memory_total_bytes;
          r.memory_used_known = true;
        }
      }
    }
    out.push_back(std::move(r));
  }
  return out;
}

GpuSampler::GpuSampler(GpuInventory* inventory, absl::Duration period)
    : inventory_(inventory), period_(period) {
  for (GpuReading g : inventory_->offered()) {
    g.memory_used_bytes = 0;
    g.memory_used_known = false;
    g.utilization_percent = -1;
    latest_.push_back(std::move(g));
  }
  if (inventory_->offered().empty()) return;  // nothing to sample
  thread_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      lock.unlock();
      std::vector<GpuReading> sample = inventory_->Sample();
      lock.lock();
      latest_ = std::move(sample);
      cv_.wait_for(lock, absl::ToChronoNanoseconds(period_), [this] { return stop_; });
    }
  });
}

GpuSampler::~GpuSampler() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::vector<GpuReading> GpuSampler::Latest() const {
  std::lock_guard<std::mutex> lock(mu_);
  return latest_;
}

}  // namespace tune::worker
