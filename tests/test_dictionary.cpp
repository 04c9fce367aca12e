#include <lexico/coding/code_book.hpp>
#include <lexico/coding/dictionary.hpp>
#include <lexico/coding/dictionary_set.hpp>
#include <lexico/coding/key_metric.hpp>
#include <lexico/coding/value_metric.hpp>

#include <sys/resource.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include <gtest/gtest.h>

#include "test_util.hpp"

namespace {

using lexico_test::error_of;

namespace fs = std::filesystem;

lexico::Dictionary random_dictionary(int d, int n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Eigen::MatrixXf atoms(d, n);
  for (Eigen::Index i = 0; i < atoms.size(); ++i) atoms.data()[i] = normal(rng);
  return lexico::Dictionary(atoms, {{"model", "test"}, {"layer", "3"}, {"kind", "K"}});
}

std::string temp_path(const std::string& name) {
  return (fs::temp_directory_path() / ("lexico_test_" + std::to_string(::getpid()) + "_" + name)).string();
}

std::vector<char> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_all(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

void expect_load_error(const std::string& path, const std::string& fragment) {
  try {
    lexico::Dictionary::load(path);
    ADD_FAILURE() << "no error for " << fragment;
  } catch (const lexico::error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

TEST(Dictionary, AtomsAreUnitNormAndGramMatchesDefinition) {
  const auto dict = random_dictionary(16, 40, 1);
  EXPECT_EQ(dict.dim(), 16);
  EXPECT_EQ(dict.size(), 40);
  for (int j = 0; j < dict.size(); ++j) EXPECT_NEAR(dict.atoms().col(j).norm(), 1.0f, 1e-6f);
  const Eigen::MatrixXf g = dict.gram();
  for (int i = 0; i < 40; ++i)
    for (int j = 0; j < 40; ++j) EXPECT_NEAR(g(i, j), dict.atoms().col(i).dot(dict.atoms().col(j)), 1e-5f);
  // The encoder's fp16 form (code_book.hpp), in place or computed column by column.
  const lexico::CodeBook full(dict, lexico::GramPolicy::fp16), low(dict, lexico::GramPolicy::on_demand, 4);
  std::vector<Eigen::half> column(40);
  std::vector<float> scratch(64);
  for (int j = 0; j < 40; ++j) {
    low.copy_gram_column(j, column.data(), scratch.data());
    for (int i = 0; i < 40; ++i) {
      EXPECT_NEAR(static_cast<float>(full.gram_column(j)[i]), g(i, j), 1e-3f);
      EXPECT_EQ(static_cast<float>(column[static_cast<std::size_t>(i)]), static_cast<float>(full.gram_column(j)[i]));
    }
  }
  EXPECT_EQ(low.gram_column(0), nullptr);
}

TEST(Dictionary, CoherenceSeesPlantedDuplicate) {
  Eigen::MatrixXf atoms = Eigen::MatrixXf::Identity(8, 8);
  atoms.col(5) = atoms.col(2) + 0.01f * atoms.col(3);
  const lexico::Dictionary dict(atoms);
  EXPECT_NEAR(dict.max_coherence(), 1.0f / std::sqrt(1.0001f), 1e-5f);
}

TEST(Dictionary, RejectsImpossibleShapesAndValues) {
  EXPECT_THROW(lexico::Dictionary(Eigen::MatrixXf::Ones(300, 4)), lexico::error);
  EXPECT_THROW(lexico::Dictionary(Eigen::MatrixXf::Ones(4, 0)), lexico::error);
  Eigen::MatrixXf zero = Eigen::MatrixXf::Ones(4, 3);
  zero.col(1).setZero();
  EXPECT_THROW(lexico::Dictionary{zero}, lexico::error);
  Eigen::MatrixXf nan = Eigen::MatrixXf::Ones(4, 3);
  nan(2, 2) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(lexico::Dictionary{nan}, lexico::error);
}

TEST(Dictionary, SaveLoadRoundTripIsExact) {
  const auto dict = random_dictionary(32, 100, 2);
  const std::string path = temp_path("roundtrip.lexd");
  dict.save(path);
  const auto loaded = lexico::Dictionary::load(path);
  EXPECT_EQ(loaded.dim(), 32);
  EXPECT_EQ(loaded.size(), 100);
  EXPECT_EQ((loaded.atoms() - dict.atoms()).cwiseAbs().maxCoeff(), 0.0f);
  EXPECT_EQ(loaded.metadata().at("layer"), "3");
  EXPECT_EQ(loaded.metadata().at("kind"), "K");
  fs::remove(path);
}

TEST(Dictionary, DamagedFilesRaiseErrorsThatSayWhat) {
  const auto dict = random_dictionary(8, 10, 3);
  const std::string good = temp_path("good.lexd"), bad = temp_path("bad.lexd");
  dict.save(good);
  const std::vector<char> bytes = read_all(good);

  write_all(bad, std::vector<char>(bytes.begin(), bytes.begin() + static_cast<long>(bytes.size() / 2)));
  expect_load_error(bad, "truncated");

  std::vector<char> flipped = bytes;
  flipped[bytes.size() - 20] ^= 0x10;  // inside the atoms
  write_all(bad, flipped);
  expect_load_error(bad, "checksum");

  std::vector<char> magic = bytes;
  magic[0] = 'X';
  write_all(bad, magic);
  expect_load_error(bad, "bad magic");

  std::vector<char> version = bytes;
  version[8] = 7;
  write_all(bad, version);
  expect_load_error(bad, "format version 7");

  std::vector<char> huge = bytes;
  huge[12] = 0;
  huge[13] = 0x10;  // d = 4096
  write_all(bad, huge);
  expect_load_error(bad, "d = 4096");

  std::vector<char> longer = bytes;
  longer.push_back(0);
  write_all(bad, longer);
  expect_load_error(bad, "checksum");

  expect_load_error(temp_path("missing.lexd"), "cannot open");
  fs::remove(good);
  fs::remove(bad);
}

// A file header (magic, version, d, N, scalar type, metadata count) and what follows it.
std::string header(std::uint32_t d, std::uint32_t n, std::uint32_t entries, const std::string& rest = "") {
  std::string bytes("LEXDICT\0", 8);
  for (const std::uint32_t field : {1u, d, n, 0u, entries}) bytes.append(reinterpret_cast<const char*>(&field), 4);
  return bytes + rest;
}

TEST(Dictionary, HugeCountsAreRejectedBeforeAnythingIsAllocated) {
  const auto error = [](const std::string& bytes) {
    return error_of([&] { lexico::Dictionary::from_bytes(bytes, "huge.lexd"); });
  };
  // 64 MiB of atoms declared in a 100-byte file: refused by the size check that precedes
  // the allocation, not by the read that would follow it.
  std::string message = error(header(256, 65536, 0, std::string(64, '\0')));
  EXPECT_NE(message.find("huge.lexd"), std::string::npos) << message;
  EXPECT_NE(message.find("256 x 65536 atoms need 67108864 bytes"), std::string::npos) << message;
  message = error(header(8, 4, 0xffffffffu, std::string(64, '\0')));
  EXPECT_NE(message.find("huge.lexd': metadata count 4294967295"), std::string::npos) << message;
  const std::uint32_t length = 0x7fffffff;
  message = error(header(8, 4, 1, std::string(reinterpret_cast<const char*>(&length), 4) + std::string(64, '\0')));
  EXPECT_NE(message.find("huge.lexd': metadata key of 2147483647 bytes"), std::string::npos) << message;
  message = error(header(8, 4, 1).substr(0, 18));
  EXPECT_NE(message.find("huge.lexd: truncated: atom count"), std::string::npos) << message;
}

TEST(Dictionary, BytesAndFilesHoldTheSameDictionary) {
  const auto dict = random_dictionary(12, 30, 4);
  const std::string path = temp_path("bytes.lexd");
  dict.save(path);
  const std::vector<char> file = read_all(path);
  const std::string bytes = dict.to_bytes();
  EXPECT_EQ(std::string(file.begin(), file.end()), bytes);
  const auto from_file = lexico::Dictionary::load(path), from_bytes = lexico::Dictionary::from_bytes(bytes);
  EXPECT_EQ(from_file.atoms(), from_bytes.atoms());
  EXPECT_EQ(from_file.metadata(), from_bytes.metadata());
  fs::remove(path);
}

// The FNV-1a checksum of a file rewritten after its last 8 bytes were edited around.
void rehash(std::string& bytes) {
  lexico::detail::Fnv1a hash;
  hash.add(bytes.data(), bytes.size() - 8);
  std::memcpy(bytes.data() + bytes.size() - 8, &hash.state, 8);
}

TEST(Dictionary, Fp16FilesHoldExactlyTheAtomsTheCacheCodesWithInHalfTheBytes) {
  const auto dict = random_dictionary(32, 100, 7);
  const std::string wide = dict.to_bytes(), narrow = dict.to_bytes(lexico::AtomType::f16);
  EXPECT_EQ(wide.size() - narrow.size(), 2u * 32 * 100);  // 2 bytes per entry instead of 4
  std::uint32_t scalar = 0;
  std::memcpy(&scalar, narrow.data() + 20, 4);  // after magic, version, d and N
  EXPECT_EQ(scalar, 1u);
  const auto loaded = lexico::Dictionary::from_bytes(narrow, "narrow.lexd");
  // Bit for bit the atoms a CodeSpace makes of the fp32 dictionary, and rounding again
  // changes nothing.
  EXPECT_EQ(loaded.atoms(), dict.rounded_to_fp16().atoms());
  EXPECT_EQ(loaded.rounded_to_fp16().atoms(), loaded.atoms());
  EXPECT_EQ(loaded.metadata(), dict.metadata());
  EXPECT_EQ(lexico::Dictionary::from_bytes(loaded.to_bytes(lexico::AtomType::f16)).atoms(), loaded.atoms());

  std::string unknown = narrow;
  unknown[20] = 2;
  rehash(unknown);
  std::string message = error_of([&] { lexico::Dictionary::from_bytes(unknown, "u.lexd"); });
  EXPECT_NE(message.find("'u.lexd' has scalar type 2"), std::string::npos) << message;
  std::string nan = narrow;
  const std::uint16_t half_nan = 0x7e00;
  std::memcpy(nan.data() + nan.size() - 8 - 2 * 20, &half_nan, 2);  // an entry of the last atom
  rehash(nan);
  message = error_of([&] { lexico::Dictionary::from_bytes(nan, "n.lexd"); });
  EXPECT_NE(message.find("'n.lexd' atom 99 has a NaN or Inf entry"), std::string::npos) << message;
  std::string scaled = narrow;
  const std::uint16_t half_two = 0x4000;  // 2.0: that atom's norm is no longer 1
  std::memcpy(scaled.data() + scaled.size() - 8 - 2, &half_two, 2);
  rehash(scaled);
  message = error_of([&] { lexico::Dictionary::from_bytes(scaled, "s.lexd"); });
  EXPECT_NE(message.find("'s.lexd' atom 99 has norm"), std::string::npos) << message;
  EXPECT_THROW(lexico::parse_atom_type("bf16"), lexico::error);
  EXPECT_EQ(lexico::parse_atom_type(lexico::to_string(lexico::AtomType::f16)), lexico::AtomType::f16);
}

// Files of `folder` whose name holds ".tmp-" (AtomicFile's temporaries).
int temporaries_in(const fs::path& folder) {
  int count = 0;
  for (const auto& entry : fs::directory_iterator(folder))
    count += entry.path().filename().string().find(".tmp-") != std::string::npos;
  return count;
}

TEST(Dictionary, FailedSaveLeavesThePreviousFileAndNoTemporary) {
  const fs::path dir = temp_path("atomic");
  fs::create_directories(dir);
  const std::string path = (dir / "d.lexd").string();
  const auto old_dict = random_dictionary(4, 5, 5);
  old_dict.save(path);
  const std::vector<char> old_bytes = read_all(path);

  // The disk "fills" part-way through the new file: writes past 1 KB fail (EFBIG).
  const auto previous_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit previous_limit;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &previous_limit), 0);
  rlimit limit = previous_limit;
  limit.rlim_cur = 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limit), 0);
  const std::string message = error_of([&] { random_dictionary(32, 100, 6).save(path); });
  ::setrlimit(RLIMIT_FSIZE, &previous_limit);
  std::signal(SIGXFSZ, previous_handler);
  EXPECT_NE(message.find("write error"), std::string::npos) << message;
  EXPECT_EQ(read_all(path), old_bytes);
  EXPECT_EQ(temporaries_in(dir), 0);

  // The target is a folder: the rename fails after the data was written and flushed.
  fs::create_directories(dir / "folder.lexd");
  EXPECT_THROW(old_dict.save((dir / "folder.lexd").string()), lexico::error);
  EXPECT_TRUE(fs::is_directory(dir / "folder.lexd"));
  EXPECT_EQ(temporaries_in(dir), 0);
  fs::remove_all(dir);
}

// Dictionary sets: a manifest and its files, on disk or in memory.

lexico::DictionarySetManifest set_manifest(int layers, int d, int n) {
  lexico::DictionarySetManifest m;
  m.model = "test";
  m.method = "none";
  m.layers = layers;
  m.head_dim = d;
  m.atoms = n;
  m.sparsity = 2;
  m.settings = {{"corpus", "x"}};
  m.errors = {{0, 'K', 2, 0.25, 1.0 / 3}};
  return m;
}

std::vector<lexico::LayerDictionaries> set_layers(int layers, int d, int n) {
  std::vector<lexico::LayerDictionaries> out;
  for (int l = 0; l < layers; ++l)
    out.push_back({std::make_shared<const lexico::Dictionary>(random_dictionary(d, n, 10 + 2 * l)),
                   std::make_shared<const lexico::Dictionary>(random_dictionary(d, n, 11 + 2 * l))});
  return out;
}

// The set of `layers` in memory, with `manifest` as its manifest.json.
lexico::MemoryFolder memory_set(const std::vector<lexico::LayerDictionaries>& layers, const std::string& manifest) {
  lexico::MemoryFolder folder("mem");
  folder.add("manifest.json", manifest);
  for (std::size_t l = 0; l < layers.size(); ++l) {
    folder.add(lexico::detail::dictionary_file_name(static_cast<int>(l), true), layers[l].keys->to_bytes());
    folder.add(lexico::detail::dictionary_file_name(static_cast<int>(l), false), layers[l].values->to_bytes());
  }
  return folder;
}

std::string replaced(std::string text, const std::string& from, const std::string& to) {
  const std::size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

TEST(DictionarySet, MemoryAndDiskLoadersGiveTheSameSet) {
  const fs::path dir = temp_path("set");
  const auto layers = set_layers(2, 8, 12);
  const auto manifest = set_manifest(2, 8, 12);
  lexico::save_dictionaries(dir.string(), layers, manifest);
  EXPECT_EQ(temporaries_in(dir), 0);
  lexico::MemoryFolder folder("mem");
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::vector<char> bytes = read_all(entry.path().string());
    folder.add(entry.path().filename().string(), std::string(bytes.begin(), bytes.end()));
  }
  const lexico::DictionarySet on_disk = lexico::load_dictionaries(dir.string()), in_memory = lexico::load_dictionaries(folder);
  EXPECT_EQ(lexico::manifest_json(on_disk.manifest), lexico::manifest_json(in_memory.manifest));
  EXPECT_EQ(lexico::manifest_json(on_disk.manifest), lexico::manifest_json(manifest));
  ASSERT_EQ(in_memory.layers.size(), 2u);
  for (std::size_t l = 0; l < 2; ++l) {
    EXPECT_EQ(on_disk.layers[l].keys->atoms(), in_memory.layers[l].keys->atoms());
    EXPECT_EQ(on_disk.layers[l].values->atoms(), in_memory.layers[l].values->atoms());
    EXPECT_EQ(in_memory.layers[l].keys->atoms(), layers[l].keys->atoms());
  }
  EXPECT_EQ(lexico::load_code_space(folder)->layers(), 2);
  // The same set with fp16 atoms: the rounded atoms, in half the bytes.
  lexico::save_dictionaries(dir.string(), layers, manifest, lexico::AtomType::f16);
  const lexico::DictionarySet narrow = lexico::load_dictionaries(dir.string());
  for (std::size_t l = 0; l < 2; ++l) {
    EXPECT_EQ(narrow.layers[l].keys->atoms(), layers[l].keys->rounded_to_fp16().atoms());
    EXPECT_EQ(narrow.layers[l].values->atoms(), layers[l].values->rounded_to_fp16().atoms());
  }
  EXPECT_EQ(fs::file_size(dir / "layer00.k.dict"), layers[0].keys->to_bytes().size() - 2u * 8 * 12);
  fs::remove_all(dir);
}

TEST(DictionarySet, FileNamesMayNotLeaveTheFolder) {
  const auto layers = set_layers(1, 8, 12);
  const std::string manifest = lexico::manifest_json(set_manifest(1, 8, 12));
  const struct {
    const char* name;
    const char* expected;
  } cases[] = {{"../x.dict", "leaves its folder"},
               {"/etc/passwd", "is absolute"},
               {"sub/../../x", "leaves its folder"},
               {"a\\b", "backslash"},
               {"", "empty file name"},
               {"missing.dict", "'missing.dict' does not exist in mem"}};
  for (const auto& c : cases) {
    const std::string text = replaced(manifest, "\"layer00.v.dict\"", lexico::json::quote(c.name));
    const std::string message = error_of([&] { lexico::load_dictionaries(memory_set(layers, text)); });
    EXPECT_NE(message.find("mem/manifest.json: files entry layer 0 values"), std::string::npos) << message;
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.name << " -> " << message;
  }
}

TEST(DictionarySet, RecordsTheKeyFormAndReadsManifestsWithoutIt) {
  const auto layers = set_layers(1, 8, 12);
  auto manifest = set_manifest(1, 8, 12);
  const std::string after = lexico::manifest_json(manifest);
  EXPECT_NE(after.find("\"keys\": \"after_rope\""), std::string::npos) << after;
  EXPECT_EQ(lexico::load_dictionaries(memory_set(layers, after)).manifest.settings, manifest.settings);
  manifest.settings["keys"] = "before_rope";
  manifest.settings["rope_theta"] = "10000";
  manifest.settings["rope_style"] = "rotate_half";
  const std::string before = lexico::manifest_json(manifest);
  EXPECT_NE(before.find("\"keys\": \"before_rope\""), std::string::npos) << before;
  EXPECT_TRUE(lexico::load_code_space(memory_set(layers, before))->key_rope().has_value());
  // Written before the field existed: settings alone say it.
  const std::string old = replaced(before, "\"keys\": \"before_rope\",\n", "");
  EXPECT_TRUE(lexico::load_code_space(memory_set(layers, old))->key_rope().has_value());
  const std::string contradicting = replaced(before, "\"keys\": \"before_rope\"", "\"keys\": \"after_rope\"");
  EXPECT_NE(error_of([&] { lexico::load_dictionaries(memory_set(layers, contradicting)); })
                .find("keys 'after_rope' but settings.keys 'before_rope'"),
            std::string::npos);
  manifest.settings["keys"] = "sideways";
  EXPECT_NE(error_of([&] { lexico::manifest_json(manifest); }).find("settings.keys 'sideways'"), std::string::npos);
}

TEST(DictionarySet, SharedFilesLoadOnceAndManifestsAreCapped) {
  const auto layers = set_layers(1, 8, 12);
  std::string manifest = lexico::manifest_json(set_manifest(3, 8, 12));
  for (const char* layer : {"01", "02"})
    for (const char* kind : {".k.dict", ".v.dict"})
      manifest = replaced(manifest, std::string("layer") + layer + kind, std::string("layer00") + kind);
  const lexico::DictionarySet set = lexico::load_dictionaries(memory_set(layers, manifest));
  ASSERT_EQ(set.layers.size(), 3u);
  EXPECT_EQ(set.layers[2].keys, set.layers[0].keys);
  EXPECT_NE(set.layers[2].values, set.layers[2].keys);

  const std::string big = replaced(manifest, "\"corpus\": \"x\"", "\"corpus\": \"" + std::string(1 << 20, 'x') + "\"");
  const std::string message = error_of([&] { lexico::load_dictionaries(memory_set(layers, big)); });
  EXPECT_NE(message.find("mem/manifest.json: "), std::string::npos) << message;
  EXPECT_NE(message.find("above the limit of 1048576"), std::string::npos) << message;
}

TEST(DictionarySet, RewritingASetLeavesNoTemporaryAndRefusesMismatchedDictionaries) {
  const fs::path dir = temp_path("rewrite");
  lexico::save_dictionaries(dir.string(), set_layers(2, 8, 12), set_manifest(2, 8, 12));
  const auto newer = set_layers(1, 8, 16);
  lexico::save_dictionaries(dir.string(), newer, set_manifest(1, 8, 16));
  EXPECT_EQ(temporaries_in(dir), 0);
  const lexico::DictionarySet set = lexico::load_dictionaries(dir.string());
  EXPECT_EQ(set.manifest.layers, 1);
  EXPECT_EQ(set.layers[0].keys->atoms(), newer[0].keys->atoms());
  // Dictionaries that do not match their manifest are refused before anything is written.
  const std::string message = error_of([&] { lexico::save_dictionaries(dir.string(), set_layers(1, 8, 12), set_manifest(1, 8, 16)); });
  EXPECT_NE(message.find("layer 0 keys is 8 x 12, the manifest says 8 x 16"), std::string::npos) << message;
  EXPECT_EQ(lexico::load_dictionaries(dir.string()).layers[0].keys->atoms(), newer[0].keys->atoms());
  EXPECT_EQ(temporaries_in(dir), 0);
  fs::remove_all(dir);
}

}  // namespace

// A key metric survives the manifest's round trip and reaches the CodeSpace; a metric
// with the wrong shape, a bad entry, a RoPE pair split, or no rope_style is refused with
// the manifest's name.
TEST(DictionarySet, KeyMetricRoundTripsAndIsChecked) {
  const int d = 8;
  const auto layers = set_layers(2, d, 12);
  lexico::DictionarySetManifest manifest = set_manifest(2, d, 12);
  manifest.settings["rope_style"] = "rotate_half";
  const std::vector<float> layer0 = {1, 2, 0.5f, 0.25f, 1, 2, 0.5f, 0.25f};  // rotate_half pairs (e, e + 4)
  manifest.key_metric = {layer0, std::vector<float>(d, 1.5f)};
  const std::string text = lexico::manifest_json(manifest);
  const lexico::MemoryFolder folder = memory_set(layers, text);
  const lexico::DictionarySet set = lexico::load_dictionaries(folder);
  EXPECT_EQ(set.manifest.key_metric, manifest.key_metric);
  EXPECT_EQ(lexico::manifest_json(set.manifest), text);
  const auto space = lexico::load_code_space(folder);
  ASSERT_NE(space->key_scale(0), nullptr);
  EXPECT_EQ(*space->key_scale(0), layer0);
  EXPECT_FLOAT_EQ((*space->key_inverse_scale(0))[3], 4.0f);

  const struct {
    const char* from;
    const char* to;
    const char* expected;
  } cases[] = {{"[1, 2, 0.5, 0.25, 1, 2, 0.5, 0.25]", "[1, 2, 0.5, 0.25, 1, 2, 0.5]", "layer 0: 7 entries for head_dim 8"},
               {"[1, 2, 0.5, 0.25, 1, 2, 0.5, 0.25]", "[1, 2, 0.5, 0.25, 1, 2, 0.5, -1]", "entry 7 = -1"},
               {"[1, 2, 0.5, 0.25, 1, 2, 0.5, 0.25]", "[1, 2, 0.5, 0.25, 1, 2, 0.5, 0.3]",
                "entries 3 and 7 form a rotate_half RoPE pair"},
               {"\"rope_style\": \"rotate_half\"", "\"rope_style\": \"interleaved\"",
                "entries 0 and 1 form a interleaved RoPE pair"},
               {"\"rope_style\": \"rotate_half\"", "\"other\": \"x\"", "needs settings.rope_style"}};
  for (const auto& c : cases) {
    const std::string message =
        error_of([&] { lexico::load_dictionaries(memory_set(layers, replaced(text, c.from, c.to))); });
    EXPECT_NE(message.find("mem/manifest.json: key_metric"), std::string::npos) << message;
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.expected << " -> " << message;
  }
  const std::string extra_layer = replaced(text, "\n  ]\n}", ",\n    [1, 1, 1, 1, 1, 1, 1, 1]\n  ]\n}");
  EXPECT_NE(error_of([&] { lexico::load_dictionaries(memory_set(layers, extra_layer)); }).find("lists 3 layers of 2"),
            std::string::npos);
}

// QueryEnergy by hand: one layer, d = 4, a token with two query heads [1, 0, 0, 0] and
// [0, 2, 0, 0]; energies per dimension 1, 4, 0, 0 over a mean of 1.25.
TEST(KeyMetric, QueryEnergyScalesByHand) {
  lexico::QueryEnergy energy(1, 4);
  lexico::RowMatrix queries(1, 8);
  queries << 1, 0, 0, 0, 0, 2, 0, 0;
  energy.add(0, queries);
  EXPECT_EQ(energy.count(0), 2);
  // rotate_half pairs (0, 2) and (1, 3): w = 1 / 2.5 and 4 / 2.5.
  const std::vector<float> half = energy.scale(0, lexico::RopeStyle::rotate_half);
  const std::vector<float> want_half = {std::sqrt(0.4f), std::sqrt(1.6f), std::sqrt(0.4f), std::sqrt(1.6f)};
  for (int e = 0; e < 4; ++e) EXPECT_NEAR(half[static_cast<std::size_t>(e)], want_half[static_cast<std::size_t>(e)], 1e-6);
  // interleaved pairs (0, 1) and (2, 3): w = 5 / 2.5, and 0 floored at 1e-4.
  const std::vector<float> paired = energy.scale(0, lexico::RopeStyle::interleaved);
  EXPECT_NEAR(paired[0], std::sqrt(2.0f), 1e-6);
  EXPECT_NEAR(paired[1], std::sqrt(2.0f), 1e-6);
  EXPECT_NEAR(paired[3], 0.01f, 1e-7);
  // power 0.5: w^0.5.
  EXPECT_NEAR(energy.scale(0, lexico::RopeStyle::rotate_half, 0.5)[1], std::pow(1.6f, 0.25f), 1e-6);
  EXPECT_NE(error_of([&] { energy.add(0, lexico::RowMatrix(1, 6)); }).find("not whole heads of 4"), std::string::npos);
  EXPECT_NE(error_of([&] { lexico::QueryEnergy(2, 4).scale(1, lexico::RopeStyle::rotate_half); })
                .find("no queries seen in layer 1"),
            std::string::npos);
}

// Mapping a dictionary: atoms T·a with unit norm, so OMP over it with mapped vectors is
// OMP in the map's metric; the key metric's map is diag(√w).
TEST(KeyMetric, MappedDictionaryHoldsMappedUnitAtoms) {
  const lexico::Dictionary plain = random_dictionary(4, 6, 3);
  const std::vector<float> scale = {2, 1, 0.5f, 1};
  const lexico::Dictionary white = lexico::mapped(plain, lexico::key_map(scale));
  Eigen::MatrixXf t(4, 4);
  t << 1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 3, 1, 1, 0, 0, 1;
  const lexico::Dictionary general = lexico::mapped(plain, t);
  for (int j = 0; j < 6; ++j) {
    Eigen::VectorXf want = plain.atoms().col(j);
    for (int e = 0; e < 4; ++e) want[e] *= scale[static_cast<std::size_t>(e)];
    EXPECT_LT((white.atoms().col(j) - want.normalized()).norm(), 1e-6);
    EXPECT_LT((general.atoms().col(j) - (t * plain.atoms().col(j)).normalized()).norm(), 1e-6);
  }
}

// The metric of an output projection by hand: one head of d = 2, W_o = [[2, 0], [0, 1]]
// gives M = diag(4, 1), eigenvalues over their mean 1.6 and 0.4 (ascending: 0.4 first, on
// the second axis); two heads average their blocks.
TEST(ValueMetric, OutputMetricByHand) {
  lexico::RowMatrix wo(2, 2);
  wo << 2, 0, 0, 1;
  const lexico::ValueMetric metric = lexico::value_metric_of_output(wo, 2);
  EXPECT_NEAR(metric.scale[0], std::sqrt(0.4f), 1e-6);
  EXPECT_NEAR(metric.scale[1], std::sqrt(1.6f), 1e-6);
  EXPECT_NEAR(std::abs(metric.axes(1, 0)), 1.0f, 1e-6);
  EXPECT_NEAR(std::abs(metric.axes(0, 1)), 1.0f, 1e-6);
  // T = diag(√λ) Uᵀ: ‖T e‖² = eᵀ M e / mean eigenvalue.
  const Eigen::Vector2f e(0.3f, -0.7f);
  EXPECT_NEAR((metric.map() * e).squaredNorm(), (4 * 0.09f + 0.49f) / 2.5f, 1e-6);
  lexico::RowMatrix two(2, 4);
  two << 2, 0, 0, 0, 0, 1, 0, 2;  // head 0: diag(2, 1); head 1: [[0, 0], [0, 2]]
  const lexico::ValueMetric pooled = lexico::value_metric_of_output(two, 2);
  // M = (diag(4, 1) + diag(0, 4)) / 2 = diag(2, 2.5), mean 2.25.
  EXPECT_NEAR(pooled.scale[0], std::sqrt(2.0f / 2.25f), 1e-6);
  EXPECT_NEAR(pooled.scale[1], std::sqrt(2.5f / 2.25f), 1e-6);
  EXPECT_NE(error_of([&] { lexico::value_metric_of_output(lexico::RowMatrix(2, 3), 2); }).find("not whole heads of 2"),
            std::string::npos);
}

// A value metric (axes files and √λ) survives save and load, reaches the CodeSpace as
// T = diag(√λ) Uᵀ, and a set without its axes files is refused.
TEST(DictionarySet, ValueMetricRoundTrips) {
  const fs::path dir = temp_path("value_metric_set");
  const int d = 8;
  auto layers = set_layers(2, d, 12);
  lexico::DictionarySetManifest manifest = set_manifest(2, d, 12);
  std::vector<lexico::ValueMetric> metrics;
  for (int l = 0; l < 2; ++l) {
    lexico::RowMatrix wo = lexico::RowMatrix::Random(16, 2 * d);
    metrics.push_back(lexico::value_metric_of_output(wo, d));
    manifest.value_metric.push_back(metrics.back().scale);
    layers[static_cast<std::size_t>(l)].value_axes = std::make_shared<const lexico::Dictionary>(metrics.back().axes);
  }
  lexico::save_dictionaries(dir.string(), layers, manifest, lexico::AtomType::f16);
  const auto space = lexico::load_code_space(dir.string());
  for (int l = 0; l < 2; ++l) {
    ASSERT_NE(space->coding_map(l, false), nullptr);
    EXPECT_LT((*space->coding_map(l, false) - metrics[static_cast<std::size_t>(l)].map()).norm(), 1e-5);
    EXPECT_LT((*space->value_inverse(l) * *space->coding_map(l, false) - Eigen::MatrixXf::Identity(d, d)).norm(), 1e-4);
  }
  EXPECT_EQ(space->coding_map(0, true), nullptr);
  fs::remove(dir / "layer01.vaxes.dict");
  EXPECT_NE(error_of([&] { lexico::load_dictionaries(dir.string()); }).find("layer 1 value_axes"), std::string::npos);
  fs::remove_all(dir);
}
