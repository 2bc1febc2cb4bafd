#include "worker/trainer/checkpoint/state.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>

namespace tune::train {
namespace {

namespace fs = std::filesystem;

nlohmann::json NumberOrNull(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

void WriteTextFile(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.flush();
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

}  // namespace

void WriteTrainingState(const std::string& dir, const NamedTensors& lora, const AdamW& optimizer,
                        const TrainerState& state, const nlohmann::json& run_info, const torch::Device& device) {
  const fs::path d(dir);
  nlohmann::json names = nlohmann::json::array();
  {
    torch::serialize::OutputArchive archive;
    for (size_t i = 0; i < lora.size(); ++i) {
      archive.write("lora_" + std::to_string(i), lora[i].second.detach().to(torch::kCPU, torch::kFloat32));
      names.push_back(lora[i].first);
    }
    archive.save_to((d / "adapter.pt").string());
  }
  {
    torch::serialize::OutputArchive archive;
    optimizer.Save(archive);
    archive.save_to((d / "optimizer.pt").string());
  }
  {
    torch::serialize::OutputArchive archive;
    archive.write("cpu", at::detail::getDefaultCPUGenerator().get_state());
    if (device.is_cuda()) {
      archive.write("cuda", at::globalContext().defaultGenerator(device).get_state());
    }
    archive.save_to((d / "rng.pt").string());
  }
  nlohmann::json meta = run_info.is_object() ? run_info : nlohmann::json::object();
  meta["format_version"] = kCheckpointFormatVersion;
  meta["step"] = state.step;
  meta["data_position"] = {{"epoch", state.next_position.epoch}, {"index", state.next_position.index}};
  meta["lr_scale"] = state.lr_scale;
  meta["nan"] = {{"total", state.nan_total}, {"consecutive", state.nan_consecutive}, {"rollbacks", state.rollbacks}};
  meta["loss"] = NumberOrNull(state.last_loss);
  meta["optimizer_step"] = optimizer.step_count();
  meta["lora_names"] = names;
  WriteTextFile(d / "meta.json", meta.dump(2) + "\n");
}

LoadedTrainingState ReadTrainingState(const std::string& dir, AdamW* optimizer, const torch::Device& device) {
  const fs::path d(dir);
  LoadedTrainingState out;
  {
    std::ifstream in(d / "meta.json");
    if (!in) throw std::runtime_error("checkpoint " + dir + " has no readable meta.json");
    try {
      out.meta = nlohmann::json::parse(in);
    } catch (const std::exception& e) {
      throw std::runtime_error("checkpoint " + dir + "/meta.json is not valid JSON: " + e.what());
    }
  }
  const nlohmann::json& m = out.meta;
  try {
    if (m.at("format_version").get<int>() != kCheckpointFormatVersion) {
      throw std::runtime_error("unsupported format_version " + m.at("format_version").dump());
    }
    out.state.step = m.at("step").get<int64_t>();
    out.state.next_position.epoch = m.at("data_position").at("epoch").get<int64_t>();
    out.state.next_position.index = m.at("data_position").at("index").get<int64_t>();
    out.state.lr_scale = m.at("lr_scale").get<double>();
    out.state.nan_total = m.at("nan").at("total").get<int64_t>();
    out.state.nan_consecutive = m.at("nan").at("consecutive").get<int64_t>();
    out.state.rollbacks = m.at("nan").at("rollbacks").get<int64_t>();
    out.state.last_loss = m.at("loss").is_number() ? m.at("loss").get<double>() : std::nan("");
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error("checkpoint " + dir + "/meta.json: " + e.what());
  }
  {
    torch::serialize::InputArchive archive;
    archive.load_from((d / "adapter.pt").string());
    const auto& names = m.at("lora_names");
    for (size_t i = 0; i < names.size(); ++i) {
      torch::Tensor t;
      if (!archive.try_read("lora_" + std::to_string(i), t)) {
        throw std::runtime_error("checkpoint " + dir + "/adapter.pt lacks tensor " + std::to_string(i) + " (" +
                                 names[i].get<std::string>() + ")");
      }
      out.lora.emplace_back(names[i].get<std::string>(), t);
    }
  }
  {
    torch::serialize::InputArchive archive;
    archive.load_from((d / "optimizer.pt").string());
    optimizer->Load(archive);
  }
  if (optimizer->step_count() != m.value("optimizer_step", optimizer->step_count())) {
    throw std::runtime_error("checkpoint " + dir + ": optimizer.pt and meta.json disagree on the optimizer step");
  }
  {
    torch::serialize::InputArchive archive;
    archive.load_from((d / "rng.pt").string());
    torch::Tensor cpu_state;
    archive.read("cpu", cpu_state);
    // Generator is a handle: a copy shares (and so updates) the default one.
    at::Generator cpu_gen = at::detail::getDefaultCPUGenerator();
    cpu_gen.set_state(cpu_state);
    torch::Tensor cuda_state;
    if (device.is_cuda() && archive.try_read("cuda", cuda_state)) {
      at::Generator cuda_gen = at::globalContext().defaultGenerator(device);
      cuda_gen.set_state(cuda_state);
    }
  }
  return out;
}

}  // namespace tune::train
