#include "worker/trainer/train/step_profiler.h"

#include <ATen/record_function.h>
#include <torch/torch.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/version.h>

#ifdef TUNE_TORCH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>

#include "worker/trainer/config.h"

namespace tune::train {
namespace {

namespace kp = torch::autograd::profiler;
namespace pi = torch::profiler::impl;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool Contains(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string Ms(int64_t ns) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", ns / 1e6);
  return buf;
}

std::string Pct(int64_t part, int64_t whole) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f%%", whole > 0 ? 100.0 * part / whole : 0.0);
  return buf;
}

// Kernel names can be whole template instantiations; the report keeps them readable.
std::string Shorten(const std::string& name, size_t width = 110) {
  return name.size() <= width ? name : name.substr(0, width - 3) + "...";
}

// The device's intervals [start, start + duration) swept in start order:
// their union's length (busy), and the gaps between them, each with the
// interval that ended last before it and the one that opens after it.
struct Gap {
  int64_t start, ns;
  const ProfiledEvent *before, *after;
};
struct DeviceTimeline {
  int64_t first = 0, end = 0, busy = 0, idle_between = 0;  // idle_between: the gaps' total
  std::vector<Gap> gaps;
};

DeviceTimeline Sweep(std::vector<const ProfiledEvent*> dev) {
  DeviceTimeline t;
  if (dev.empty()) return t;
  std::sort(dev.begin(), dev.end(), [](const auto* a, const auto* b) { return a->start_ns < b->start_ns; });
  t.first = t.end = dev.front()->start_ns;
  const ProfiledEvent* last = nullptr;
  for (const ProfiledEvent* e : dev) {
    if (last && e->start_ns > t.end) {
      t.gaps.push_back({t.end, e->start_ns - t.end, last, e});
      t.idle_between += e->start_ns - t.end;
    }
    if (!last || e->start_ns + e->duration_ns > t.end) {
      t.end = std::max(t.end, e->start_ns + e->duration_ns);
      last = e;
    }
  }
  t.busy = t.end - t.first - t.idle_between;
  return t;
}

constexpr int kGapRows = 12;  // longest gaps listed
// Marks the window's start in the profiler's own clock (StepProfiler).
constexpr char kWindowMarker[] = "tune::profile_window";

// Device idle in the window, whose times count from 0: before the first
// kernel, after the last, and in the timeline's gaps split by length, with
// the longest gaps and what ran around them: the kernels on either side and
// the longest and shortest host ops (on any thread) covering the gap's
// middle, which is what the host was doing while the device waited.
void AppendIdleGaps(std::ostringstream& o, DeviceTimeline t, const std::vector<const ProfiledEvent*>& host,
                    int64_t wall_ns) {
  std::vector<Gap>& gaps = t.gaps;
  const int64_t lead = std::max<int64_t>(0, t.first), tail = std::max<int64_t>(0, wall_ns - t.end);
  struct Bucket {
    const char* label;
    int64_t below_ns, ns = 0, count = 0;
  };
  Bucket buckets[] = {{"< 10 us", 10000}, {"10-100 us", 100000}, {"0.1-1 ms", 1000000}, {">= 1 ms", INT64_MAX}};
  for (const Gap& g : gaps) {
    for (Bucket& b : buckets) {
      if (g.ns < b.below_ns) {
        b.ns += g.ns;
        ++b.count;
        break;
      }
    }
  }
  o << "\ndevice idle: " << Ms(lead) << " ms before the first kernel, " << Ms(tail) << " ms after the last, "
    << Ms(t.idle_between) << " ms in " << gaps.size() << " gaps between kernels:";
  for (const Bucket& b : buckets) o << "  " << b.label << " " << Ms(b.ns) << " ms (" << b.count << ")";
  o << "\n";
  if (gaps.empty()) return;
  std::sort(gaps.begin(), gaps.end(), [](const Gap& a, const Gap& b) { return a.ns > b.ns; });
  o << "longest gaps (ms, at ms into the window, kernel before -> kernel after; the longest > shortest host op "
       "covering the gap's middle, any thread)\n";
  for (int i = 0; i < static_cast<int>(gaps.size()) && i < kGapRows; ++i) {
    const Gap& g = gaps[i];
    const int64_t mid = g.start + g.ns / 2;
    const ProfiledEvent *outer = nullptr, *inner = nullptr;
    for (const ProfiledEvent* h : host) {
      if (h->start_ns > mid || h->start_ns + h->duration_ns <= mid) continue;
      if (!outer || h->duration_ns > outer->duration_ns) outer = h;
      if (!inner || h->duration_ns < inner->duration_ns) inner = h;
    }
    std::string ops = "(no host op recorded)";
    if (outer) ops = Shorten(outer->name, 50) + (inner != outer ? " > " + Shorten(inner->name, 50) : "");
    char line[64];
    std::snprintf(line, sizeof line, "%8s %9s  ", Ms(g.ns).c_str(), Ms(g.start).c_str());
    o << line << Shorten(g.before->name, 60) << " -> " << Shorten(g.after->name, 60) << "; " << ops << "\n";
  }
}

}  // namespace

bool ParseProfileSteps(const std::string& text, int64_t* first, int64_t* last) {
  const size_t dash = text.find('-');
  auto parse = [](const std::string& t, int64_t* out) {
    if (t.empty() || t.size() > 12 || t.find_first_not_of("0123456789") != std::string::npos) return false;
    *out = std::stoll(t);
    return *out >= 1;
  };
  if (dash == std::string::npos) return parse(text, first) && (*last = *first, true);
  return parse(text.substr(0, dash), first) && parse(text.substr(dash + 1), last) && *first <= *last;
}

std::string KernelClass(const std::string& name) {
  const std::string n = Lower(name);
  if (Contains(n, "memcpy") || Contains(n, "memset")) return "copy";
  if (Contains(n, "flash") || Contains(n, "fmha") || Contains(n, "cudnn") || Contains(n, "attention") ||
      Contains(n, "sdpa")) {
    return "attention";
  }
  if (Contains(n, "gemm") || Contains(n, "cutlass") || Contains(n, "xmma") || Contains(n, "nvjet") ||
      Contains(n, "cublas")) {
    return "GEMM";
  }
  if (Contains(n, "tune::") || Contains(n, "nf4dequant") || Contains(n, "rmsnorm") || Contains(n, "ropekernel") ||
      Contains(n, "swiglu") || Contains(n, "ceforwardrows") || Contains(n, "cebackwardrows")) {
    return "tune kernels";
  }
  return "other";
}

std::string FormatProfileReport(const std::vector<ProfiledEvent>& events, int64_t wall_ns, int64_t first,
                                int64_t last, int64_t steps, int top) {
  struct Agg {
    int64_t ns = 0, count = 0;
  };
  std::map<std::string, Agg> by_name, by_class;
  std::vector<const ProfiledEvent*> dev, host;
  int64_t device_total = 0;
  bool any_device = false;
  for (const auto& e : events) any_device = any_device || (e.on_device && !e.annotation);
  for (const auto& e : events) {
    if (!e.on_device) host.push_back(&e);
    if (e.on_device != any_device || e.annotation) continue;
    Agg& a = by_name[e.name];
    a.ns += e.duration_ns;
    ++a.count;
    if (!any_device) continue;
    Agg& c = by_class[KernelClass(e.name)];
    c.ns += e.duration_ns;
    ++c.count;
    device_total += e.duration_ns;
    dev.push_back(&e);
  }
  const DeviceTimeline timeline = Sweep(dev);
  steps = std::max<int64_t>(steps, 1);
  std::ostringstream o;
  o << "tune-train profile: steps " << first << "-" << last << " (" << steps << " step" << (steps > 1 ? "s" : "")
    << "), wall " << Ms(wall_ns) << " ms, " << Ms(wall_ns / steps) << " ms per step\n";
  std::vector<std::pair<std::string, Agg>> rows(by_name.begin(), by_name.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  if (any_device) {
    const int64_t busy = timeline.busy;
    o << "device busy " << Ms(busy) << " ms (" << Pct(busy, wall_ns) << " of wall), idle " << Ms(wall_ns - busy)
      << " ms; kernel + copy time " << Ms(device_total) << " ms in " << dev.size() << " launches\n\n";
    o << "by class                 ms   share   launches\n";
    std::vector<std::pair<std::string, Agg>> classes(by_class.begin(), by_class.end());
    std::sort(classes.begin(), classes.end(), [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
    for (const auto& [name, a] : classes) {
      char line[160];
      std::snprintf(line, sizeof line, "%-18s %10s %7s %10lld\n", name.c_str(), Ms(a.ns).c_str(),
                    Pct(a.ns, device_total).c_str(), static_cast<long long>(a.count));
      o << line;
    }
    o << "\ntop kernels (total ms, share of kernel time, launches, class, name)\n";
  } else {
    o << "no device events (CPU run): aten ops by inclusive time (children counted in their parents too)\n";
  }
  const int64_t denominator = any_device ? device_total : wall_ns;
  for (int i = 0; i < static_cast<int>(rows.size()) && i < top; ++i) {
    const auto& [name, a] = rows[i];
    char line[64];
    std::snprintf(line, sizeof line, "%10s %7s %7lld  ", Ms(a.ns).c_str(), Pct(a.ns, denominator).c_str(),
                  static_cast<long long>(a.count));
    o << line << (any_device ? KernelClass(name) + "  " : "") << Shorten(name) << "\n";
  }
  if (any_device) AppendIdleGaps(o, timeline, host, wall_ns);
  return o.str();
}

StepProfiler::StepProfiler(int64_t first, int64_t last, std::string out)
    : first_(first), last_(last), out_(std::move(out)) {
  if (out_.empty()) return;
  std::ofstream probe(out_);
  if (!probe) throw ConfigError("--profile-out: cannot write " + out_ + " (does its directory exist?)");
}

StepProfiler::~StepProfiler() {
  if (running_) kp::disableProfiler();
}

namespace {

void SyncDevice(bool use_cuda) {
#ifdef TUNE_TORCH_CUDA
  if (use_cuda) c10::cuda::device_synchronize();
#else
  (void)use_cuda;
#endif
}

pi::ProfilerConfig Config() { return pi::ProfilerConfig(pi::ProfilerState::KINETO, false, false); }

std::set<pi::ActivityType> Activities(bool use_cuda) {
  std::set<pi::ActivityType> a{pi::ActivityType::CPU};
  if (use_cuda) a.insert(pi::ActivityType::CUDA);
  return a;
}

}  // namespace

void StepProfiler::BeforeStep(int64_t step, bool use_cuda) {
  if (out_.empty() || running_ || done_ || step < first_ || step > last_) return;
  SyncDevice(use_cuda);
  kp::prepareProfiler(Config(), Activities(use_cuda));
  kp::enableProfiler(Config(), Activities(use_cuda));
  running_ = true;
  first_run_ = step;
  t0_ns_ = NowNs();
  { RECORD_USER_SCOPE(kWindowMarker); }  // the window's start in the profiler's clock (Write)
}

void StepProfiler::AfterStep(int64_t step, bool use_cuda, bool final_step) {
  if (!running_) return;
  ++steps_run_;
  last_run_ = step;
  if (step >= last_ || final_step) Write(use_cuda);
}

void StepProfiler::Finish(bool use_cuda) {
  if (running_) Write(use_cuda);
}

void StepProfiler::Write(bool use_cuda) {
  SyncDevice(use_cuda);
  const int64_t wall = NowNs() - t0_ns_;
  running_ = false;
  done_ = true;
  std::unique_ptr<kp::ProfilerResult> result = kp::disableProfiler();
  std::vector<ProfiledEvent> events;
  int64_t origin = INT64_MAX, marker = -1;
  for (const auto& e : result->events()) {
    ProfiledEvent p;
    p.name = e.name();
    p.on_device = e.deviceType() != c10::DeviceType::CPU;
    // libkineto::ActivityType::GPU_USER_ANNOTATION (2 in every libkineto):
    // torch >= 2 reports each user scope's kernels as one device span.
    p.annotation = p.on_device && e.activityType() == 2;
#if TORCH_VERSION_MAJOR >= 2
    p.start_ns = static_cast<int64_t>(e.startNs());
    p.duration_ns = static_cast<int64_t>(e.durationNs());
#else
    p.start_ns = static_cast<int64_t>(e.startUs()) * 1000;
    p.duration_ns = static_cast<int64_t>(e.durationUs()) * 1000;
#endif
    origin = std::min(origin, p.start_ns);
    if (!p.on_device && p.name == kWindowMarker) {
      marker = p.start_ns;
      continue;
    }
    events.push_back(std::move(p));
  }
  // Times from the window's start (the marker; else the first event).
  if (marker >= 0) origin = marker;
  for (ProfiledEvent& p : events) p.start_ns -= origin;
  std::string report = FormatProfileReport(events, wall, first_run_, last_run_, steps_run_);
  if (first_run_ != first_ || last_run_ != last_) {
    report += "\n(asked for steps " + std::to_string(first_) + "-" + std::to_string(last_) +
              "; training ran steps " + std::to_string(first_run_) + "-" + std::to_string(last_run_) +
              " inside that window)\n";
  }
  try {
    result->save(out_ + ".trace.json");
    report += "\nChrome trace: " + out_ + ".trace.json\n";
  } catch (const c10::Error&) {
    report += "\n(no Chrome trace: this libtorch was built without Kineto)\n";
  }
  std::ofstream f(out_);
  f << report;
  if (!f) throw std::runtime_error("--profile-out: cannot write " + out_);
}

}  // namespace tune::train
