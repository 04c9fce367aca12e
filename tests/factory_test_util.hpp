#pragma once
// Caches made by name for tests: a dictionary set of random atoms for Lexico, and the
// options that make every registered cache usable.

#include <unistd.h>

#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <lexico/cache/factory.hpp>
#include <lexico/coding/dictionary_set.hpp>

namespace lexico_test {

using lexico::CacheOptions;

// A dictionary set of random atoms for `shape`, saved once per shape in a temp dir.
inline std::string random_dictionary_dir(const lexico::CacheShape& shape, const std::map<std::string, std::string>& settings = {},
                                  const std::string& tag = "") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("lexico_factory_" + std::to_string(::getpid()) + "_" +
                                                    std::to_string(shape.layers) + "x" + std::to_string(shape.head_dim) + tag);
  if (fs::exists(dir / "manifest.json")) return dir.string();
  fs::create_directories(dir);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  auto random_dictionary = [&] {
    Eigen::MatrixXf atoms(shape.head_dim, 64);
    for (Eigen::Index i = 0; i < atoms.size(); ++i) atoms.data()[i] = normal(rng);
    return std::make_shared<const lexico::Dictionary>(atoms);
  };
  std::vector<lexico::LayerDictionaries> layers;
  for (int l = 0; l < shape.layers; ++l) layers.push_back({random_dictionary(), random_dictionary()});
  lexico::DictionarySetManifest manifest;
  manifest.model = "random";
  manifest.method = "none";
  manifest.layers = shape.layers;
  manifest.head_dim = shape.head_dim;
  manifest.atoms = 64;
  manifest.sparsity = 8;
  manifest.settings = settings;
  lexico::save_dictionaries(dir.string(), layers, manifest);
  return dir.string();
}

// Options that make every registered cache usable (budgets and dictionaries are required).
inline CacheOptions minimal(const std::string& name, const lexico::CacheShape& shape) {
  if (name == "lexico") return CacheOptions({{"dict", random_dictionary_dir(shape)}, {"buffer", "8"}});
  for (const auto& info : lexico::cache_type(name).options)
    if (info.key == "budget") return CacheOptions({{"budget", "0.5"}});
  return {};
}

}  // namespace lexico_test
