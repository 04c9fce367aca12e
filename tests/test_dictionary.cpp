#include <lexico/coding/code_book.hpp>
#include <lexico/coding/dictionary.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>

#include <gtest/gtest.h>

namespace {

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

}  // namespace
