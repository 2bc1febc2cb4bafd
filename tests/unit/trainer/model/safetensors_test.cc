// safetensors reader/writer: round trips, sharded directories, and header
// validation with errors that name the file and tensor.
#include "worker/trainer/model/safetensors.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include "tests/unit/trainer/model/test_util.h"

namespace tune::model::safetensors {
namespace {

using testing::TempDir;

// Writes a raw file: 8-byte LE length, header text, then `data_bytes` bytes.
void WriteRaw(const std::string& path, const std::string& header, size_t data_bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header;
  for (size_t i = 0; i < data_bytes; ++i) out.put('\0');
}

std::string OpenError(const std::string& path) {
  try {
    File::Open(path);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

TEST(Safetensors, RoundTripAllDtypes) {
  TempDir dir;
  torch::manual_seed(0);
  std::vector<std::pair<std::string, torch::Tensor>> ts = {
      {"b.bf16", torch::randn({3, 5}).to(torch::kBFloat16)},
      {"a.f32", torch::randn({7})},
      {"c.f16", torch::randn({2, 2, 3}).to(torch::kFloat16)},
      {"d.i64", torch::arange(0, 10, torch::kInt64)},
      {"e.u8", torch::randint(0, 255, {9}, torch::kUInt8)},
      {"f.empty", torch::zeros({0, 4})},
      {"g.scalar", torch::tensor(3.5f).reshape({})},
      {"h.noncontig", torch::randn({4, 6}).t()},
  };
  const std::string path = dir / "x.safetensors";
  SaveFile(path, ts, {{"format", "pt"}});
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  auto f = File::Open(path);
  EXPECT_EQ(f->metadata().at("format"), "pt");
  EXPECT_EQ(f->tensors().size(), ts.size());
  for (const auto& [name, t] : ts) {
    ASSERT_TRUE(f->Has(name)) << name;
    torch::Tensor got = f->Get(name);
    EXPECT_EQ(got.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(got.sizes(), t.sizes()) << name;
    EXPECT_TRUE(torch::equal(got, t)) << name;
    EXPECT_TRUE(torch::equal(f->View(name), t)) << name;
  }
  // The writer orders data by element size, so every tensor is aligned.
  for (const auto& info : f->tensors()) {
    EXPECT_EQ(info.begin % c10::elementSize(info.scalar_type), 0u) << info.name;
  }
  EXPECT_EQ(f->Info("b.bf16").dtype, "BF16");
  EXPECT_EQ(f->Info("c.f16").dtype, "F16");
  // Data section starts 8-byte aligned.
  std::ifstream in(path, std::ios::binary);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(in.get())) << (8 * i);
  EXPECT_EQ((8 + n) % 8, 0u);
  EXPECT_THROW(f->Info("nope"), std::runtime_error);
}

TEST(Safetensors, WriterRejectsDuplicatesAndUnsupportedDtypes) {
  TempDir dir;
  EXPECT_THROW(SaveFile(dir / "a.safetensors", {{"x", torch::ones({1})}, {"x", torch::ones({1})}}),
               std::runtime_error);
  EXPECT_THROW(SaveFile(dir / "b.safetensors", {{"c", torch::ones({1}, torch::kComplexFloat)}}), std::runtime_error);
}

TEST(Safetensors, TruncatedFileNamesFileAndTensor) {
  TempDir dir;
  const std::string path = dir / "t.safetensors";
  SaveFile(path, {{"w1", torch::ones({16})}, {"w2", torch::ones({16})}});
  const auto size = std::filesystem::file_size(path);
  std::filesystem::resize_file(path, size - 10);
  const std::string err = OpenError(path);
  EXPECT_NE(err.find(path), std::string::npos) << err;
  EXPECT_NE(err.find("\"w2\""), std::string::npos) << err;
  EXPECT_NE(err.find("truncated"), std::string::npos) << err;

  std::filesystem::resize_file(path, 5);
  EXPECT_NE(OpenError(path).find("shorter than the 8-byte header length"), std::string::npos);
}

TEST(Safetensors, HeaderLengthLargerThanFile) {
  TempDir dir;
  const std::string path = dir / "h.safetensors";
  {
    std::ofstream out(path, std::ios::binary);
    const uint64_t n = 1ull << 40;
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
    out << "{}";
  }
  EXPECT_NE(OpenError(path).find("does not fit a file"), std::string::npos) << OpenError(path);
}

TEST(Safetensors, BadDtypeIsNamed) {
  TempDir dir;
  const std::string path = dir / "d.safetensors";
  WriteRaw(path, R"({"w":{"dtype":"Q7","shape":[2],"data_offsets":[0,2]}})", 2);
  const std::string err = OpenError(path);
  EXPECT_NE(err.find("\"Q7\""), std::string::npos) << err;
  EXPECT_NE(err.find("tensor \"w\""), std::string::npos) << err;
}

TEST(Safetensors, BadOffsets) {
  TempDir dir;
  const std::string p1 = dir / "o1.safetensors";
  // Overlap.
  WriteRaw(p1, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12);
  EXPECT_NE(OpenError(p1).find("overlap"), std::string::npos) << OpenError(p1);
  // Byte count does not match the shape.
  const std::string p2 = dir / "o2.safetensors";
  WriteRaw(p2, R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8);
  EXPECT_NE(OpenError(p2).find("needs 12"), std::string::npos) << OpenError(p2);
  // end < begin.
  const std::string p3 = dir / "o3.safetensors";
  WriteRaw(p3, R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", 8);
  EXPECT_NE(OpenError(p3).find("end < begin"), std::string::npos) << OpenError(p3);
  // Not JSON / missing fields.
  const std::string p4 = dir / "o4.safetensors";
  WriteRaw(p4, R"({"a":)", 0);
  EXPECT_NE(OpenError(p4).find("not valid JSON"), std::string::npos);
  const std::string p5 = dir / "o5.safetensors";
  WriteRaw(p5, R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", 4);
  EXPECT_NE(OpenError(p5).find("shape"), std::string::npos);
}

TEST(Safetensors, ShardedDirectory) {
  TempDir dir;
  SaveFile(dir / "model-00001-of-00002.safetensors", {{"a", torch::ones({3})}, {"b", torch::zeros({2})}});
  SaveFile(dir / "model-00002-of-00002.safetensors", {{"c", torch::full({4}, 2.0)}});
  SaveIndex(dir / "model.safetensors.index.json", 36,
            {{"a", "model-00001-of-00002.safetensors"},
             {"b", "model-00001-of-00002.safetensors"},
             {"c", "model-00002-of-00002.safetensors"}});
  auto r = Reader::OpenDir(dir.path());
  EXPECT_EQ(r->Names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_TRUE(torch::equal(r->Get("c"), torch::full({4}, 2.0)));
  EXPECT_TRUE(torch::equal(r->View("a"), torch::ones({3})));
  EXPECT_THROW(r->Get("zzz"), std::runtime_error);

  // An index naming a tensor its shard lacks is rejected up front.
  SaveIndex(dir / "model.safetensors.index.json", 36,
            {{"a", "model-00001-of-00002.safetensors"}, {"d", "model-00002-of-00002.safetensors"}});
  try {
    Reader::OpenDir(dir.path());
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("\"d\""), std::string::npos) << e.what();
  }
  // A missing shard is named.
  SaveIndex(dir / "model.safetensors.index.json", 36, {{"a", "model-00009-of-00009.safetensors"}});
  try {
    Reader::OpenDir(dir.path());
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("model-00009-of-00009.safetensors"), std::string::npos) << e.what();
  }
}

TEST(Safetensors, EmptyDirectoryIsExplained) {
  TempDir dir;
  try {
    Reader::OpenDir(dir.path());
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("neither model.safetensors nor"), std::string::npos);
  }
}

}  // namespace
}  // namespace tune::model::safetensors
