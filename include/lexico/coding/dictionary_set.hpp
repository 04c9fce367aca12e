#pragma once
// A model's trained dictionaries: per layer one key and one value dictionary, saved
// as Dictionary files beside a JSON manifest that says what they are and how well
// they code held-out vectors. load_dictionaries(dir) gives what LexicoCache takes.
//
// dir/manifest.json:
//   {"format": "lexico-dictionaries", "version": 1, "model": ..., "method": ...,
//    "layers": L, "head_dim": d, "atoms": N, "sparsity": s,
//    "settings": {"key": "value", ...},
//    "files": [{"layer": 0, "keys": "layer00.k.dict", "values": "layer00.v.dict"}, ...],
//    "errors": [{"layer": 0, "kind": "K", "sparsity": 8, "train": 0.31, "dev": 0.33}, ...]}
// File names are relative to dir. Errors are mean ||x − x̂|| / ||x|| with FP8
// coefficients.

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "code_space.hpp"
#include "dictionary.hpp"
#include "../base/error.hpp"
#include "../base/json.hpp"

namespace lexico {

struct DictionarySet {
  DictionarySetManifest manifest;
  std::vector<LayerDictionaries> layers;
};

namespace detail {

inline const char* dictionary_set_format = "lexico-dictionaries";
inline constexpr int dictionary_set_version = 1;

inline std::string dictionary_file_name(int layer, bool keys) {
  char name[32];
  std::snprintf(name, sizeof name, "layer%02d.%s.dict", layer, keys ? "k" : "v");
  return name;
}

inline int manifest_int(const json::Value& value, const std::string& what, int low, int high) {
  const std::int64_t n = value.as_int(what);
  require(n >= low && n <= high, what, " = ", n, " outside [", low, ", ", high, "]");
  return static_cast<int>(n);
}

// %.17g: doubles survive the round trip exactly.
inline std::string json_number(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.17g", value);
  return text;
}

}  // namespace detail

// Writes manifest.json into dir (which must exist).
inline void save_manifest(const std::string& dir, const DictionarySetManifest& m) {
  std::ostringstream out;
  out << "{\n  \"format\": " << json::quote(detail::dictionary_set_format)
      << ",\n  \"version\": " << detail::dictionary_set_version << ",\n  \"model\": " << json::quote(m.model)
      << ",\n  \"method\": " << json::quote(m.method) << ",\n  \"layers\": " << m.layers
      << ",\n  \"head_dim\": " << m.head_dim << ",\n  \"atoms\": " << m.atoms << ",\n  \"sparsity\": " << m.sparsity
      << ",\n  \"settings\": {";
  const char* separator = "\n    ";
  for (const auto& [key, value] : m.settings) {
    out << separator << json::quote(key) << ": " << json::quote(value);
    separator = ",\n    ";
  }
  out << "\n  },\n  \"files\": [";
  for (int l = 0; l < m.layers; ++l)
    out << (l ? ",\n    " : "\n    ") << "{\"layer\": " << l << ", \"keys\": "
        << json::quote(detail::dictionary_file_name(l, true))
        << ", \"values\": " << json::quote(detail::dictionary_file_name(l, false)) << "}";
  out << "\n  ],\n  \"errors\": [";
  for (std::size_t i = 0; i < m.errors.size(); ++i) {
    const DictionaryError& e = m.errors[i];
    out << (i ? ",\n    " : "\n    ") << "{\"layer\": " << e.layer << ", \"kind\": \"" << e.kind
        << "\", \"sparsity\": " << e.sparsity << ", \"train\": " << detail::json_number(e.train)
        << ", \"dev\": " << detail::json_number(e.dev) << "}";
  }
  out << "\n  ]\n}\n";
  const std::string path = (std::filesystem::path(dir) / "manifest.json").string();
  std::ofstream file(path, std::ios::binary);
  require(file.good(), "save_manifest: cannot open '", path, "' for writing");
  file << out.str();
  file.close();
  require(!file.fail(), "save_manifest: writing '", path, "' failed");
}

// Writes every layer's dictionaries and the manifest into dir (created if needed).
inline void save_dictionaries(const std::string& dir, const std::vector<LayerDictionaries>& layers,
                              const DictionarySetManifest& manifest) {
  require(static_cast<int>(layers.size()) == manifest.layers, "save_dictionaries: ", layers.size(),
          " layers of dictionaries, the manifest says ", manifest.layers);
  std::filesystem::create_directories(dir);
  for (int l = 0; l < manifest.layers; ++l) {
    const LayerDictionaries& layer = layers[static_cast<std::size_t>(l)];
    require(layer.keys && layer.values, "save_dictionaries: layer ", l, " lacks a key or value dictionary");
    layer.keys->save((std::filesystem::path(dir) / detail::dictionary_file_name(l, true)).string());
    layer.values->save((std::filesystem::path(dir) / detail::dictionary_file_name(l, false)).string());
  }
  save_manifest(dir, manifest);
}

namespace detail {

inline std::string manifest_path(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "manifest.json").string();
  require(std::filesystem::exists(path), "load_dictionaries: '", dir, "' has no manifest.json (not a dictionary set)");
  return path;
}

inline DictionarySetManifest parse_manifest(const json::Value& root, const std::string& path) {
  require(root.is_object(), path, ": must hold a JSON object");
  const std::string format = root.at("format", path).as_string(path + ": format");
  require(format == dictionary_set_format, path, ": format '", format, "', expected '", dictionary_set_format, "'");
  const int version = manifest_int(root.at("version", path), path + ": version", 0, 1 << 30);
  require(version == dictionary_set_version, path, ": version ", version, ", this build reads version ",
          dictionary_set_version);
  DictionarySetManifest m;
  m.model = root.at("model", path).as_string(path + ": model");
  m.method = root.at("method", path).as_string(path + ": method");
  m.layers = manifest_int(root.at("layers", path), path + ": layers", 1, 1 << 16);
  m.head_dim = manifest_int(root.at("head_dim", path), path + ": head_dim", 1, Dictionary::max_dim);
  m.atoms = manifest_int(root.at("atoms", path), path + ": atoms", 1, Dictionary::max_atoms);
  m.sparsity = manifest_int(root.at("sparsity", path), path + ": sparsity", 1, 255);
  for (const auto& [key, value] : root.at("settings", path).as_object(path + ": settings"))
    m.settings[key] = value.as_string(path + ": settings." + key);
  for (const json::Value& entry : root.at("errors", path).as_array(path + ": errors")) {
    const std::string where = path + ": errors entry";
    DictionaryError e;
    e.layer = manifest_int(entry.at("layer", where), where + " layer", 0, m.layers - 1);
    const std::string kind = entry.at("kind", where).as_string(where + " kind");
    require(kind == "K" || kind == "V", where, ": kind '", kind, "', expected \"K\" or \"V\"");
    e.kind = kind[0];
    e.sparsity = manifest_int(entry.at("sparsity", where), where + " sparsity", 1, 255);
    e.train = entry.at("train", where).as_double(where + " train");
    e.dev = entry.at("dev", where).as_double(where + " dev");
    m.errors.push_back(e);
  }
  return m;
}

}  // namespace detail

// Reads dir/manifest.json only.
inline DictionarySetManifest load_manifest(const std::string& dir) {
  const std::string path = detail::manifest_path(dir);
  return detail::parse_manifest(json::parse_file(path), path);
}

// Every layer's key and value dictionaries, checked against the manifest.
inline DictionarySet load_dictionaries(const std::string& dir) {
  const std::string path = detail::manifest_path(dir);
  const json::Value root = json::parse_file(path);
  DictionarySet set;
  set.manifest = detail::parse_manifest(root, path);
  const DictionarySetManifest& m = set.manifest;
  const json::Value::Array& files = root.at("files", path).as_array(path + ": files");
  require(static_cast<int>(files.size()) == m.layers, path, ": ", files.size(), " file entries for ", m.layers,
          " layers");
  set.layers.resize(static_cast<std::size_t>(m.layers));
  std::vector<char> seen(static_cast<std::size_t>(m.layers), 0);
  for (const json::Value& entry : files) {
    const std::string where = path + ": files entry";
    const int l = detail::manifest_int(entry.at("layer", where), where + " layer", 0, m.layers - 1);
    require(!seen[static_cast<std::size_t>(l)], path, ": layer ", l, " is listed twice");
    seen[static_cast<std::size_t>(l)] = 1;
    auto load = [&](const char* key) {
      const std::string file = entry.at(key, where).as_string(where + " " + key);
      auto dictionary = std::make_shared<const Dictionary>(Dictionary::load((std::filesystem::path(dir) / file).string()));
      require(dictionary->dim() == m.head_dim && dictionary->size() == m.atoms, path, ": layer ", l, " ", key, " '",
              file, "' is ", dictionary->dim(), " x ", dictionary->size(), ", the manifest says ", m.head_dim, " x ",
              m.atoms);
      return dictionary;
    };
    set.layers[static_cast<std::size_t>(l)] = {load("keys"), load("values")};
  }
  return set;
}

}  // namespace lexico

namespace lexico {

// The CodeSpace of the dictionary set in `dir`: its dictionaries, with the RoPE of a set
// trained on keys before RoPE (unless options name one) and its manifest.
inline std::shared_ptr<const CodeSpace> load_code_space(const std::string& dir, CodeSpaceOptions options = {}) {
  DictionarySet set = load_dictionaries(dir);
  if (!options.key_rope) options.key_rope = manifest_key_rope(set.manifest, set.manifest.head_dim);
  return std::make_shared<const CodeSpace>(set.layers, std::move(options), std::move(set.manifest));
}

}  // namespace lexico
