#include <gtest/gtest.h>

#include "test_util.hpp"

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include <lexico/base/files.hpp>
#include <lexico/model/safetensors.hpp>

namespace {

namespace fs = std::filesystem;
using lexico::MemoryBytes;
using lexico::MemoryFolder;
using lexico::SafetensorsCheckpoint;
using lexico::SafetensorsFile;
using lexico::SafetensorsWriter;

using lexico_test::error_of;

class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("lexico_safetensors_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // A file with this header text and `data_bytes` bytes of data; `length` overrides
  // the header length field.
  std::string raw(const std::string& name, const std::string& header, std::size_t data_bytes,
                  std::uint64_t length = UINT64_MAX, const void* data = nullptr) const {
    const std::string p = path(name);
    std::ofstream out(p, std::ios::binary);
    const std::uint64_t n = length == UINT64_MAX ? header.size() : length;
    unsigned char bytes[8];
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<unsigned char>(n >> (8 * i));
    out.write(reinterpret_cast<const char*>(bytes), 8);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    std::vector<char> payload(data_bytes, 0);
    if (data) std::memcpy(payload.data(), data, data_bytes);
    out.write(payload.data(), static_cast<std::streamsize>(payload.size()));
    return p;
  }

  // The error opening a file with this header; checks it names the file and `tensor`.
  std::string open_error(const std::string& header, std::size_t data_bytes, const std::string& tensor) const {
    const std::string p = raw("bad.safetensors", header, data_bytes);
    const std::string message = error_of([&] { SafetensorsFile file(p); });
    EXPECT_NE(message.find(p), std::string::npos) << message;
    if (!tensor.empty()) {
      EXPECT_NE(message.find("'" + tensor + "'"), std::string::npos) << message;
    }
    return message;
  }

  fs::path dir_;
};

TEST_F(Safetensors, WriterRoundTrip) {
  const std::vector<float> weights = {1.5f, -2.0f, 3.25f, 0.0f, 1e-30f, -7.0f};
  const std::vector<std::int32_t> tokens = {0, 5, -1, 2147483647};
  SafetensorsWriter writer;
  writer.add_metadata("format", "pt");
  writer.add_metadata("note", "quote \" and \\ and\nnewline");
  writer.add("w", {2, 3}, weights.data());
  writer.add("tokens", {4}, tokens.data());
  writer.add("empty", {0, 8}, static_cast<const float*>(nullptr));
  writer.write(path("rt.safetensors"));

  SafetensorsFile file(path("rt.safetensors"));
  ASSERT_EQ(file.tensors().size(), 3u);
  EXPECT_EQ(file.tensors()[0].name, "w");  // header order is kept
  EXPECT_EQ(file.tensor("w").shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(file.read_f32("w"), weights);
  EXPECT_EQ(file.read_i32("tokens"), tokens);
  EXPECT_TRUE(file.read_f32("empty").empty());
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.metadata().at("note"), "quote \" and \\ and\nnewline");
}

TEST_F(Safetensors, WriterRejectsDuplicatesAndReservedNames) {
  const float x = 1;
  SafetensorsWriter writer;
  writer.add("a", {1}, &x);
  EXPECT_NE(error_of([&] { writer.add("a", {1}, &x); }).find("'a' added twice"), std::string::npos);
  EXPECT_NE(error_of([&] { writer.add("__metadata__", {1}, &x); }).find("reserved"), std::string::npos);
  EXPECT_NE(error_of([&] { writer.write("/nonexistent-dir/x.safetensors"); }).find("/nonexistent-dir/x.safetensors"),
            std::string::npos);
}

TEST_F(Safetensors, ConvertsF16AndBF16) {
  // fp16: 1, -2, 65504 (max), 2^-24 (smallest subnormal); bf16: 0.5, -3, 1e38-ish, tiny
  const std::uint16_t half[] = {0x3C00, 0xC000, 0x7BFF, 0x0001};
  const std::uint16_t bf16[] = {0x3F00, 0xC040, 0x7E96, 0x0080};
  unsigned char data[16];
  std::memcpy(data, half, 8);
  std::memcpy(data + 8, bf16, 8);
  const std::string p = raw("halves.safetensors",
                            R"({"h":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},)"
                            R"("b":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]}})",
                            16, UINT64_MAX, data);
  SafetensorsFile file(p);
  EXPECT_EQ(file.read_f32("h"), (std::vector<float>{1.0f, -2.0f, 65504.0f, 5.9604645e-8f}));
  const std::vector<float> b = file.read_f32("b");
  EXPECT_EQ(b[0], 0.5f);
  EXPECT_EQ(b[1], -3.0f);
  std::uint32_t bits;
  std::memcpy(&bits, &b[2], 4);
  EXPECT_EQ(bits, 0x7E960000u);
  std::memcpy(&bits, &b[3], 4);
  EXPECT_EQ(bits, 0x00800000u);
  EXPECT_NE(error_of([&] { file.read_i32("h"); }).find("'h' has dtype F16, expected I32"), std::string::npos);
}

TEST_F(Safetensors, TruncatedFiles) {
  {
    std::ofstream(path("tiny.safetensors"), std::ios::binary) << "abc";
    const std::string m = error_of([&] { SafetensorsFile f(path("tiny.safetensors")); });
    EXPECT_NE(m.find(path("tiny.safetensors")), std::string::npos) << m;
    EXPECT_NE(m.find("truncated"), std::string::npos) << m;
  }
  {
    const std::string p = raw("long.safetensors", "{}", 0, 1000);
    const std::string m = error_of([&] { SafetensorsFile f(p); });
    EXPECT_NE(m.find(p), std::string::npos) << m;
    EXPECT_NE(m.find("header length 1000 runs beyond the end of the file"), std::string::npos) << m;
  }
  // The data area ends before the tensor's data does.
  EXPECT_NE(open_error(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 12, "w").find("outside the data area"),
            std::string::npos);
}

TEST_F(Safetensors, CorruptHeadersNameFileAndTensor) {
  const struct {
    const char* header;
    std::size_t data;
    const char* tensor;
    const char* expected;
  } cases[] = {
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 8, "w", "outside the data area"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       12, "b", "overlaps tensor 'a'"},
      {R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8, "w", "unsupported dtype 'Q4'"},
      {R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8, "w", "unsupported dtype 'F64'"},
      {R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, "w", "needs 12 bytes but data_offsets span 8"},
      {R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,4]}})", 8, "w", "needs 8 bytes"},
      {R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, "w", "non-negative"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8, "w", "end before they begin"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8, "w", "two non-negative integers"},
      {R"({"w":{"dtype":"F32","shape":[2]}})", 8, "w", "needs dtype, shape and data_offsets"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":1}})", 8, "w", "unexpected header key"},
      {R"({"w":{"dtype":1,"shape":[2],"data_offsets":[0,8]}})", 8, "w", "dtype: expected a string"},
      {R"({"w":[1,2]})", 8, "w", "must be an object"},
      {R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8, "w", "too large"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)", 8, "", "JSON error at offset"},
      {R"([1,2])", 8, "", "header must be a JSON object"},
      {R"({"__metadata__":{"k":1}})", 0, "", "__metadata__ value of 'k'"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
       8, "", "duplicate key \"w\""},
  };
  for (const auto& c : cases) {
    const std::string message = open_error(c.header, c.data, c.tensor);
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.header << "\n -> " << message;
  }
}

TEST_F(Safetensors, ReadErrors) {
  const std::string p = raw("ok.safetensors", R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8);
  SafetensorsFile file(p);
  std::vector<float> small(1);
  const std::string wrong_size = error_of([&] { file.read_f32("w", small.data(), small.size()); });
  EXPECT_NE(wrong_size.find(p), std::string::npos);
  EXPECT_NE(wrong_size.find("'w' holds 2 elements"), std::string::npos) << wrong_size;
  const std::string missing = error_of([&] { file.read_f32("nope"); });
  EXPECT_NE(missing.find(p + ": no tensor 'nope'"), std::string::npos) << missing;
  // The file shrinks after its header was read.
  fs::resize_file(p, fs::file_size(p) - 4);
  const std::string shrunk = error_of([&] { file.read_f32("w"); });
  EXPECT_NE(shrunk.find("'w': file truncated"), std::string::npos) << shrunk;
  EXPECT_NE(error_of([&] { SafetensorsFile f(path("missing.safetensors")); }).find("cannot open"), std::string::npos);
}

TEST_F(Safetensors, ShardedCheckpoint) {
  const std::vector<float> a = {1, 2, 3}, b = {4, 5};
  SafetensorsWriter first, second;
  first.add("a", {3}, a.data());
  second.add("b", {1, 2}, b.data());
  first.write(path("m-1.safetensors"));
  second.write(path("m-2.safetensors"));
  std::ofstream(path("model.safetensors.index.json"))
      << R"({"metadata":{"total_size":20},"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors"}})";

  for (const std::string& where : {dir_.string(), path("model.safetensors.index.json")}) {
    SafetensorsCheckpoint ckpt(where);
    EXPECT_EQ(ckpt.names(), (std::vector<std::string>{"a", "b"}));
    EXPECT_EQ(ckpt.read_f32("a"), a);
    EXPECT_EQ(ckpt.read_f32("b"), b);
    EXPECT_EQ(ckpt.tensor("b").shape, (std::vector<std::int64_t>{1, 2}));
    EXPECT_EQ(ckpt.file_of("b").path(), path("m-2.safetensors"));
    EXPECT_NE(error_of([&] { ckpt.read_f32("c"); }).find("no tensor 'c'"), std::string::npos);
  }

  std::ofstream(path("model.safetensors.index.json"), std::ios::trunc)
      << R"({"weight_map":{"a":"m-2.safetensors"}})";
  const std::string wrong = error_of([&] { SafetensorsCheckpoint c(dir_.string()); });
  EXPECT_NE(wrong.find("model.safetensors.index.json: tensor 'a' is mapped to m-2.safetensors"), std::string::npos)
      << wrong;
  std::ofstream(path("model.safetensors.index.json"), std::ios::trunc) << R"({"weight_map":{"a":"m-9.safetensors"}})";
  EXPECT_NE(error_of([&] { SafetensorsCheckpoint c(dir_.string()); }).find("m-9.safetensors: cannot open"),
            std::string::npos);
  std::ofstream(path("model.safetensors.index.json"), std::ios::trunc) << R"({"weight_map":{"a":3}})";
  EXPECT_NE(error_of([&] { SafetensorsCheckpoint c(dir_.string()); }).find("weight_map entry 'a'"), std::string::npos);
  fs::remove(path("model.safetensors.index.json"));
  EXPECT_NE(error_of([&] { SafetensorsCheckpoint c(dir_.string()); }).find("neither"), std::string::npos);
}

// The same bytes from memory and from a file: the same header, tensors and values.
TEST_F(Safetensors, InMemoryAndFileAgree) {
  const std::vector<float> weights = {1.5f, -2.0f, 3.25f, 0.0f, 1e-30f, -7.0f};
  const std::vector<std::int32_t> tokens = {0, 5, -1, 2147483647};
  SafetensorsWriter writer;
  writer.add_metadata("format", "pt");
  writer.add("w", {2, 3}, weights.data());
  writer.add("tokens", {4}, tokens.data());
  writer.write(path("w.safetensors"));
  const std::string bytes = writer.bytes();
  std::ifstream in(path("w.safetensors"), std::ios::binary);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()), bytes);

  const SafetensorsFile disk(path("w.safetensors"));
  const SafetensorsFile memory(std::make_shared<MemoryBytes>(bytes, "mem.safetensors"));
  EXPECT_EQ(memory.path(), "mem.safetensors");
  ASSERT_EQ(memory.tensors().size(), disk.tensors().size());
  for (std::size_t i = 0; i < disk.tensors().size(); ++i) {
    const auto& a = disk.tensors()[i];
    const auto& b = memory.tensors()[i];
    EXPECT_EQ(a.name, b.name);
    EXPECT_EQ(a.shape, b.shape);
    EXPECT_EQ(a.dtype, b.dtype);
  }
  EXPECT_EQ(memory.read_f32("w"), disk.read_f32("w"));
  EXPECT_EQ(memory.read_i32("tokens"), tokens);
  EXPECT_EQ(memory.metadata(), disk.metadata());
  // Errors name the in-memory source as they name a file.
  const std::string truncated = bytes.substr(0, bytes.size() - 4);
  const std::string m = error_of([&] { SafetensorsFile f(std::make_shared<MemoryBytes>(truncated, "cut.safetensors")); });
  EXPECT_NE(m.find("cut.safetensors: tensor 'tokens': data_offsets [24, 40) outside the data area of 36 bytes"),
            std::string::npos)
      << m;
}

TEST_F(Safetensors, CheckpointInMemoryFolderAgreesWithDisk) {
  const std::vector<float> a = {1, 2, 3}, b = {4, 5};
  SafetensorsWriter first, second;
  first.add("a", {3}, a.data());
  second.add("b", {1, 2}, b.data());
  const std::string index = R"({"weight_map":{"a":"m-1.safetensors","b":"sub/m-2.safetensors"}})";
  first.write(path("m-1.safetensors"));
  fs::create_directories(dir_ / "sub");
  second.write(path("sub/m-2.safetensors"));
  std::ofstream(path("model.safetensors.index.json")) << index;
  MemoryFolder folder("mem");
  folder.add("m-1.safetensors", first.bytes()).add("sub/m-2.safetensors", second.bytes());
  folder.add("model.safetensors.index.json", index);

  const SafetensorsCheckpoint disk(dir_.string()), memory(folder);
  EXPECT_EQ(memory.names(), disk.names());
  EXPECT_EQ(memory.read_f32("a"), a);
  EXPECT_EQ(memory.read_f32("b"), disk.read_f32("b"));
  EXPECT_EQ(memory.file_of("b").path(), "mem/sub/m-2.safetensors");
  EXPECT_EQ(SafetensorsCheckpoint(folder, "m-1.safetensors").names(), std::vector<std::string>{"a"});
  EXPECT_NE(error_of([] { SafetensorsCheckpoint c(MemoryFolder("empty")); })
                .find("empty: neither model.safetensors.index.json nor model.safetensors found"),
            std::string::npos);
}

// Shard names from the index stay inside the checkpoint's folder, on disk and in memory;
// the error names the index and the tensor whose entry is at fault.
TEST_F(Safetensors, ShardNamesAreConfinedToTheFolder) {
  const float x = 1;
  SafetensorsWriter shard;
  shard.add("x.weight", {1}, &x);
  shard.write(path("inside.safetensors"));
  fs::create_directories(dir_ / "model");
  fs::create_directories(dir_ / "model" / "folder.safetensors");
  const std::string index = path("model/model.safetensors.index.json");
  const struct {
    const char* shard;
    const char* expected;
  } cases[] = {
      {"../inside.safetensors", "file name '../inside.safetensors' leaves its folder"},
      {"/etc/passwd", "file name '/etc/passwd' is absolute"},
      {"", "empty file name"},
      {"a/./b", "leaves its folder or has an empty, '.' or '..' component"},
      {"a\\\\..\\\\b", "holds a backslash"},
  };
  for (const auto& c : cases) {
    const std::string json = std::string(R"({"weight_map":{"x.weight":")") + c.shard + "\"}}";
    std::ofstream(index, std::ios::trunc) << json;
    MemoryFolder memory("mem");
    memory.add("model.safetensors.index.json", json);
    for (const std::string& m : {error_of([&] { SafetensorsCheckpoint ckpt(dir_.string() + "/model"); }),
                                 error_of([&] { SafetensorsCheckpoint ckpt(index); }),
                                 error_of([&] { SafetensorsCheckpoint ckpt(memory); })}) {
      EXPECT_NE(m.find("model.safetensors.index.json: weight_map entry 'x.weight': "), std::string::npos) << m;
      EXPECT_NE(m.find(c.expected), std::string::npos) << c.shard << " -> " << m;
    }
  }
  // A shard that names a folder is refused when opened, never read as bytes.
  std::ofstream(index, std::ios::trunc) << R"({"weight_map":{"x.weight":"folder.safetensors"}})";
  const std::string folder = error_of([&] { SafetensorsCheckpoint ckpt(index); });
  EXPECT_NE(folder.find("folder.safetensors: not a regular file"), std::string::npos) << folder;
  EXPECT_NE(error_of([&] { SafetensorsFile f(dir_.string()); }).find(": not a regular file"), std::string::npos);
}

TEST_F(Safetensors, IndexSizeIsCapped) {
  MemoryFolder folder("mem");
  folder.add("model.safetensors.index.json", std::string((16u << 20) + 1, ' '));
  const std::string m = error_of([&] { SafetensorsCheckpoint c(folder); });
  EXPECT_NE(m.find("mem/model.safetensors.index.json: 16777217 bytes, above the limit of 16777216"), std::string::npos)
      << m;
}

TEST(SafetensorsData, BundledTinyStories656K) {
  SafetensorsCheckpoint ckpt(LEXICO_REPO_DATA "/tinystories-656k");
  EXPECT_EQ(ckpt.names().size(), 20u);
  EXPECT_EQ(ckpt.file_of("lm_head.weight").metadata().at("model.embed_tokens.weight"), "lm_head.weight");
  const auto& t = ckpt.tensor("lm_head.weight");
  EXPECT_EQ(t.shape, (std::vector<std::int64_t>{2048, 128}));
  EXPECT_EQ(ckpt.read_f32("model.norm.weight").size(), 128u);
}

TEST(SafetensorsData, ShardedBF16Proxy) {
  const std::string dir = LEXICO_SHARED_DATA "/proxy-lm-hd64";
  if (!fs::exists(dir)) GTEST_SKIP() << "shared data not found at " << dir;
  SafetensorsCheckpoint ckpt(dir);
  EXPECT_EQ(ckpt.names().size(), 2u + 8u * 9u + 1u);
  EXPECT_EQ(ckpt.tensor("model.layers.7.mlp.down_proj.weight").dtype, lexico::SafetensorsDtype::BF16);
  const std::vector<float> norm = ckpt.read_f32("model.norm.weight");
  ASSERT_EQ(norm.size(), 512u);
  for (const float x : norm) {
    std::uint32_t bits;
    std::memcpy(&bits, &x, 4);
    EXPECT_EQ(bits & 0xFFFFu, 0u);  // bf16 widened exactly
  }
  SafetensorsFile golden(dir + "/golden/dev_window.safetensors");
  EXPECT_EQ(golden.read_i32("tokens").size(), 1024u);
  EXPECT_EQ(golden.read_i32("tokens")[0], 0);  // BOS
}

}  // namespace
