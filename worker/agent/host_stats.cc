#include "worker/agent/host_stats.h"

#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "spdlog/spdlog.h"

namespace tune::worker {
namespace {

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

}  // namespace

absl::StatusOr<HostMemory> ParseMeminfo(std::string_view text) {
  std::optional<int64_t> total, available;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(absl::string_view(text.data(), text.size()), '\n')) {
    ++line_number;
    const size_t colon = line.find(':');
    if (colon == absl::string_view::npos) continue;
    const absl::string_view key = line.substr(0, colon);
    std::optional<int64_t>* slot =
        key == "MemTotal" ? &total : key == "MemAvailable" ? &available : nullptr;
    if (slot == nullptr) continue;
    // "   16318412 kB": the kernel always reports these two in kB.
    std::vector<absl::string_view> parts =
        absl::StrSplit(absl::StripAsciiWhitespace(line.substr(colon + 1)), ' ', absl::SkipEmpty());
    int64_t kib = 0;
    if (parts.size() != 2 || parts[1] != "kB" || !absl::SimpleAtoi(parts[0], &kib) || kib < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "meminfo line ", line_number, " ('", line, "'): expected '", key, ": <number> kB'"));
    }
    *slot = kib * 1024;
  }
  if (!total || !available) {
    return absl::InvalidArgumentError(absl::StrCat(
        "meminfo has no ", !total ? "MemTotal" : "MemAvailable",
        " line; the host's memory cannot be reported (MemAvailable needs Linux >= 3.14)"));
  }
  if (*available > *total) {
    return absl::InvalidArgumentError(absl::StrCat("meminfo: MemAvailable (", *available,
                                                   " B) exceeds MemTotal (", *total, " B)"));
  }
  return HostMemory{*total, *available};
}

absl::StatusOr<CpuTimes> ParseProcStatCpu(std::string_view text) {
  const absl::string_view all(text.data(), text.size());
  const absl::string_view line = all.substr(0, all.find('\n'));
  std::vector<absl::string_view> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stat line 1 ('", line, "'): ", why,
        "; expected 'cpu user nice system idle [iowait irq softirq steal ...]'"));
  };
  if (fields.empty() || fields[0] != "cpu") return bad("not the aggregate cpu line");
  if (fields.size() < 5) return bad(absl::StrCat(fields.size() - 1, " numbers, need at least 4"));
  // user nice system idle iowait irq softirq steal guest guest_nice: guest
  // time is already counted in user/nice, so only the first eight add up.
  uint64_t v[8] = {};
  for (size_t i = 1; i < fields.size() && i <= 8; ++i) {
    if (!absl::SimpleAtoi(fields[i], &v[i - 1])) return bad(absl::StrCat("field ", i, " is not a number"));
  }
  CpuTimes t;
  const uint64_t idle = v[3] + v[4];
  t.busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
  t.total = t.busy + idle;
  return t;
}

std::optional<double> CpuUtilization(const CpuTimes& earlier, const CpuTimes& later) {
  if (later.total <= earlier.total || later.busy < earlier.busy) return std::nullopt;
  const double ratio = static_cast<double>(later.busy - earlier.busy) /
                       static_cast<double>(later.total - earlier.total);
  return ratio > 1 ? 1.0 : ratio;
}

HostSampler::HostSampler(std::string proc_dir) : proc_dir_(std::move(proc_dir)) {
  std::lock_guard<std::mutex> lock(mu_);
  previous_ = ReadCpuLocked();
}

std::optional<CpuTimes> HostSampler::ReadCpuLocked() {
  absl::StatusOr<std::string> text = ReadWholeFile(proc_dir_ + "/stat");
  absl::StatusOr<CpuTimes> times =
      text.ok() ? ParseProcStatCpu(*text) : absl::StatusOr<CpuTimes>(text.status());
  if (!times.ok()) {
    if (!warned_cpu_) spdlog::warn("host CPU utilisation unknown: {}", times.status().ToString());
    warned_cpu_ = true;
    return std::nullopt;
  }
  return *times;
}

HostSampler::Reading HostSampler::Read() {
  std::lock_guard<std::mutex> lock(mu_);
  Reading r;
  absl::StatusOr<std::string> meminfo = ReadWholeFile(proc_dir_ + "/meminfo");
  absl::StatusOr<HostMemory> memory =
      meminfo.ok() ? ParseMeminfo(*meminfo) : absl::StatusOr<HostMemory>(meminfo.status());
  if (memory.ok()) {
    r.memory = *memory;
  } else if (!warned_memory_) {
    spdlog::warn("host memory unknown: {}", memory.status().ToString());
    warned_memory_ = true;
  }
  std::optional<CpuTimes> now = ReadCpuLocked();
  if (now && previous_) {
    // Two scrapes within one jiffy (10 ms) measure nothing: keep the last value.
    if (std::optional<double> u = CpuUtilization(*previous_, *now)) last_utilization_ = u;
  }
  if (now && !(previous_ && now->total == previous_->total)) previous_ = now;
  r.utilization = now ? last_utilization_ : std::nullopt;
  return r;
}

}  // namespace tune::worker
