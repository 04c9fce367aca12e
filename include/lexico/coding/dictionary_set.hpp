#pragma once
// A model's trained dictionaries: per layer one key and one value dictionary, saved
// as Dictionary files beside a JSON manifest that says what they are and how well
// they code held-out vectors. load_dictionaries(dir) gives what LexicoCache takes.
//
// dir/manifest.json:
//   {"format": "lexico-dictionaries", "version": 1, "model": ..., "method": ...,
//    "layers": L, "head_dim": d, "atoms": N, "sparsity": s, "keys": "after_rope",
//    "settings": {"key": "value", ...},
//    "files": [{"layer": 0, "keys": "layer00.k.dict", "values": "layer00.v.dict"}, ...],
//    "errors": [{"layer": 0, "kind": "K", "sparsity": 8, "train": 0.31, "dev": 0.33}, ...],
//    "key_metric": [[d numbers], ...],      (optional: per layer √w of key_metric.hpp)
//    "value_metric": [[d numbers], ...]}    (optional: per layer √λ of value_metric.hpp,
//                                            with "value_axes": "layer00.vaxes.dict" in files)
// File names are relative to dir and may not leave it (no "..", no absolute path). Errors
// are mean ||x − x̂|| / ||x|| with FP8 coefficients. "keys" says whether the key
// dictionaries code keys before or after RoPE (what a cache must match); manifests
// written before it existed say so, if at all, in settings.keys, and still load.
//
// Sets are read through a Folder (on disk or in memory); the manifest is capped at
// json::Limits::config(). A set is written so that an interruption never leaves a
// manifest announcing dictionaries it does not describe: the new dictionaries are
// written to temporary files first (the previous set stays whole meanwhile), then the
// previous manifest is removed, the dictionaries are renamed into place, and the new
// manifest comes last.

#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include "code_space.hpp"
#include "dictionary.hpp"
#include "key_metric.hpp"
#include "value_metric.hpp"
#include "../base/error.hpp"
#include "../base/files.hpp"
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
inline std::string value_axes_file_name(int layer) {
  char name[32];
  std::snprintf(name, sizeof name, "layer%02d.vaxes.dict", layer);
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

// "name": [[numbers], ...] of per-layer vectors.
inline void write_layer_vectors(std::ostream& out, const char* name, const std::vector<std::vector<float>>& layers) {
  out << ",\n  \"" << name << "\": [";
  for (std::size_t l = 0; l < layers.size(); ++l) {
    out << (l ? ",\n    [" : "\n    [");
    for (std::size_t e = 0; e < layers[l].size(); ++e) out << (e ? ", " : "") << json_number(layers[l][e]);
    out << "]";
  }
  out << "\n  ]";
}

inline constexpr const char* manifest_name = "manifest.json";

// "after_rope" or "before_rope", from settings.keys (absent: after RoPE).
inline std::string manifest_key_form(const DictionarySetManifest& m, const std::string& what) {
  const auto found = m.settings.find("keys");
  if (found == m.settings.end()) return "after_rope";
  require(found->second == "after_rope" || found->second == "before_rope", what, ": settings.keys '", found->second,
          "' is neither after_rope nor before_rope");
  return found->second;
}

inline std::string join(const std::string& dir, const std::string& file) {
  return (std::filesystem::path(dir) / file).string();
}

}  // namespace detail

// The text of manifest.json.
inline std::string manifest_json(const DictionarySetManifest& m) {
  std::ostringstream out;
  out << "{\n  \"format\": " << json::quote(detail::dictionary_set_format)
      << ",\n  \"version\": " << detail::dictionary_set_version << ",\n  \"model\": " << json::quote(m.model)
      << ",\n  \"method\": " << json::quote(m.method) << ",\n  \"layers\": " << m.layers
      << ",\n  \"head_dim\": " << m.head_dim << ",\n  \"atoms\": " << m.atoms << ",\n  \"sparsity\": " << m.sparsity
      << ",\n  \"keys\": " << json::quote(detail::manifest_key_form(m, "save_manifest")) << ",\n  \"settings\": {";
  const char* separator = "\n    ";
  for (const auto& [key, value] : m.settings) {
    out << separator << json::quote(key) << ": " << json::quote(value);
    separator = ",\n    ";
  }
  out << "\n  },\n  \"files\": [";
  for (int l = 0; l < m.layers; ++l)
    out << (l ? ",\n    " : "\n    ") << "{\"layer\": " << l << ", \"keys\": "
        << json::quote(detail::dictionary_file_name(l, true))
        << ", \"values\": " << json::quote(detail::dictionary_file_name(l, false))
        << (m.value_metric.empty() ? "" : ", \"value_axes\": " + json::quote(detail::value_axes_file_name(l))) << "}";
  out << "\n  ],\n  \"errors\": [";
  for (std::size_t i = 0; i < m.errors.size(); ++i) {
    const DictionaryError& e = m.errors[i];
    out << (i ? ",\n    " : "\n    ") << "{\"layer\": " << e.layer << ", \"kind\": \"" << e.kind
        << "\", \"sparsity\": " << e.sparsity << ", \"train\": " << detail::json_number(e.train)
        << ", \"dev\": " << detail::json_number(e.dev) << "}";
  }
  out << "\n  ]";
  if (!m.key_metric.empty()) detail::write_layer_vectors(out, "key_metric", m.key_metric);
  if (!m.value_metric.empty()) detail::write_layer_vectors(out, "value_metric", m.value_metric);
  out << "\n}\n";
  return out.str();
}

// Writes manifest.json into dir (which must exist), atomically.
inline void save_manifest(const std::string& dir, const DictionarySetManifest& m) {
  write_file_atomically(detail::join(dir, detail::manifest_name), manifest_json(m));
}

// Writes every layer's dictionaries, their atoms as `atom_type`, and the manifest into
// dir (created if needed); see the top of this file for what an interruption leaves.
inline void save_dictionaries(const std::string& dir, const std::vector<LayerDictionaries>& layers,
                              const DictionarySetManifest& manifest, AtomType atom_type = AtomType::f32) {
  require(static_cast<int>(layers.size()) == manifest.layers, "save_dictionaries: ", layers.size(),
          " layers of dictionaries, the manifest says ", manifest.layers);
  const std::string text = manifest_json(manifest);
  std::filesystem::create_directories(dir);
  std::vector<std::unique_ptr<AtomicFile>> staged;
  for (int l = 0; l < manifest.layers; ++l) {
    const LayerDictionaries& layer = layers[static_cast<std::size_t>(l)];
    require(layer.keys && layer.values, "save_dictionaries: layer ", l, " lacks a key or value dictionary");
    for (const bool keys : {true, false}) {
      const Dictionary& dictionary = keys ? *layer.keys : *layer.values;
      // A set that would not load is refused before anything is written.
      require(dictionary.dim() == manifest.head_dim && dictionary.size() == manifest.atoms, "save_dictionaries: layer ",
              l, keys ? " keys" : " values", " is ", dictionary.dim(), " x ", dictionary.size(), ", the manifest says ",
              manifest.head_dim, " x ", manifest.atoms);
      staged.push_back(std::make_unique<AtomicFile>(detail::join(dir, detail::dictionary_file_name(l, keys))));
      staged.back()->write(dictionary.to_bytes(atom_type));
    }
    if (manifest.value_metric.empty()) continue;
    require(layer.value_axes && layer.value_axes->dim() == manifest.head_dim &&
                layer.value_axes->size() == manifest.head_dim,
            "save_dictionaries: layer ", l, " needs value axes of ", manifest.head_dim, " x ", manifest.head_dim,
            " for its value metric");
    staged.push_back(std::make_unique<AtomicFile>(detail::join(dir, detail::value_axes_file_name(l))));
    staged.back()->write(layer.value_axes->to_bytes(AtomType::f32));  // the map keeps full precision
  }
  const std::string manifest_path = detail::join(dir, detail::manifest_name);
  std::error_code ec;
  std::filesystem::remove(manifest_path, ec);
  require(!ec, "save_dictionaries: cannot remove the previous '", manifest_path, "': ", ec.message());
  for (const auto& file : staged) file->commit();
  write_file_atomically(manifest_path, text);
}

namespace detail {

// A metric's scales from the manifest's `name` (d numbers per layer, key_metric.hpp's
// checks with `pairs`), or none when it has no such entry.
inline std::vector<std::vector<float>> read_layer_scales(const json::Value& root, const char* name,
                                                         const DictionarySetManifest& m, const std::string& path,
                                                         const RopeStyle* pairs) {
  std::vector<std::vector<float>> out;
  const json::Value* metric = root.find(name);
  if (!metric) return out;
  const std::string where = concat(path, ": ", name);
  const json::Value::Array& layers = metric->as_array(where);
  require(static_cast<int>(layers.size()) == m.layers, where, " lists ", layers.size(), " layers of ", m.layers);
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const std::string layer_where = concat(where, " layer ", l);
    std::vector<float> scale;
    for (const json::Value& x : layers[l].as_array(layer_where)) scale.push_back(static_cast<float>(x.as_double(layer_where)));
    check_metric_scale(scale, m.head_dim, pairs, layer_where);
    out.push_back(std::move(scale));
  }
  return out;
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
  const std::string setting = manifest_key_form(m, path);
  if (const json::Value* keys = root.find("keys")) {
    const std::string& form = keys->as_string(path + ": keys");
    require(form == "after_rope" || form == "before_rope", path, ": keys '", form,
            "' is neither after_rope nor before_rope");
    require(form == setting, path, ": keys '", form, "' but settings.keys '", setting, "'");
  }
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
  if (root.find("key_metric")) {
    const auto style = m.settings.find("rope_style");
    require(style != m.settings.end(), path, ": key_metric needs settings.rope_style (which dimensions RoPE pairs)");
    const RopeStyle pairs = parse_rope_style(style->second);
    m.key_metric = read_layer_scales(root, "key_metric", m, path, &pairs);
  }
  m.value_metric = read_layer_scales(root, "value_metric", m, path, nullptr);
  return m;
}

// The manifest of `folder`, parsed under the size and value caps of small JSON files.
inline json::Value read_manifest(const Folder& folder, std::string& path) {
  require(folder.contains(manifest_name), "load_dictionaries: '", folder.name(),
          "' has no manifest.json (not a dictionary set)");
  const std::unique_ptr<ByteSource> file = folder.open(manifest_name);
  path = file->name();
  return json::parse(*file, json::Limits::config());
}

// The folder of the set in `dir`; a missing folder is reported as a missing set.
inline DiskFolder set_folder(const std::string& dir) {
  std::error_code ec;
  require(std::filesystem::is_regular_file(join(dir, manifest_name), ec), "load_dictionaries: '", dir,
          "' has no manifest.json (not a dictionary set)");
  return DiskFolder(dir);
}

}  // namespace detail

// Reads the manifest only.
inline DictionarySetManifest load_manifest(const Folder& folder) {
  std::string path;
  const json::Value root = detail::read_manifest(folder, path);
  return detail::parse_manifest(root, path);
}
inline DictionarySetManifest load_manifest(const std::string& dir) { return load_manifest(detail::set_folder(dir)); }

// Every layer's key and value dictionaries, checked against the manifest. A file named by
// several layers is read once and shared.
inline DictionarySet load_dictionaries(const Folder& folder) {
  std::string path;
  const json::Value root = detail::read_manifest(folder, path);
  DictionarySet set;
  set.manifest = detail::parse_manifest(root, path);
  const DictionarySetManifest& m = set.manifest;
  const json::Value::Array& files = root.at("files", path).as_array(path + ": files");
  require(static_cast<int>(files.size()) == m.layers, path, ": ", files.size(), " file entries for ", m.layers,
          " layers");
  set.layers.resize(static_cast<std::size_t>(m.layers));
  std::vector<char> seen(static_cast<std::size_t>(m.layers), 0);
  std::map<std::string, std::shared_ptr<const Dictionary>> loaded;
  for (const json::Value& entry : files) {
    const std::string where = path + ": files entry";
    const int l = detail::manifest_int(entry.at("layer", where), where + " layer", 0, m.layers - 1);
    require(!seen[static_cast<std::size_t>(l)], path, ": layer ", l, " is listed twice");
    seen[static_cast<std::size_t>(l)] = 1;
    auto load = [&](const char* key) {
      const std::string what = detail::concat(where, " layer ", l, " ", key);
      const std::string& file = entry.at(key, where).as_string(what);
      Folder::check_name(file, what);
      std::shared_ptr<const Dictionary>& dictionary = loaded[file];
      if (!dictionary) {
        require(folder.contains(file), what, ": '", file, "' does not exist in ", folder.name());
        dictionary = std::make_shared<const Dictionary>(Dictionary::load(*folder.open(file)));
      }
      require(dictionary->dim() == m.head_dim && dictionary->size() == m.atoms, path, ": layer ", l, " ", key, " '",
              file, "' is ", dictionary->dim(), " x ", dictionary->size(), ", the manifest says ", m.head_dim, " x ",
              m.atoms);
      return dictionary;
    };
    LayerDictionaries& layer = set.layers[static_cast<std::size_t>(l)];
    layer = {load("keys"), load("values"), nullptr};
    require(m.value_metric.empty() == !entry.find("value_axes"), where, " layer ", l,
            m.value_metric.empty() ? ": value_axes without a value_metric" : ": a value_metric needs value_axes");
    if (!m.value_metric.empty()) {
      const std::string what = detail::concat(where, " layer ", l, " value_axes");
      const std::string& file = entry.at("value_axes", where).as_string(what);
      Folder::check_name(file, what);
      require(folder.contains(file), what, ": '", file, "' does not exist in ", folder.name());
      layer.value_axes = std::make_shared<const Dictionary>(Dictionary::load(*folder.open(file)));
      require(layer.value_axes->dim() == m.head_dim && layer.value_axes->size() == m.head_dim, what, " '", file,
              "' is ", layer.value_axes->dim(), " x ", layer.value_axes->size(), ", expected ", m.head_dim, " x ",
              m.head_dim);
    }
  }
  return set;
}
inline DictionarySet load_dictionaries(const std::string& dir) { return load_dictionaries(detail::set_folder(dir)); }

}  // namespace lexico

namespace lexico {

// The CodeSpace of the dictionary set in `dir` (or a Folder): its dictionaries, with the
// RoPE of a set trained on keys before RoPE (unless options name one) and its manifest.
inline std::shared_ptr<const CodeSpace> load_code_space(const Folder& folder, CodeSpaceOptions options = {}) {
  DictionarySet set = load_dictionaries(folder);
  if (!options.key_rope) options.key_rope = manifest_key_rope(set.manifest, set.manifest.head_dim);
  if (options.key_metric.empty()) options.key_metric = set.manifest.key_metric;
  if (options.value_metric.empty())
    for (std::size_t l = 0; l < set.manifest.value_metric.size(); ++l)
      options.value_metric.push_back(ValueMetric{set.layers[l].value_axes->atoms(), set.manifest.value_metric[l]}.map());
  return std::make_shared<const CodeSpace>(set.layers, std::move(options), std::move(set.manifest));
}
inline std::shared_ptr<const CodeSpace> load_code_space(const std::string& dir, CodeSpaceOptions options = {}) {
  return load_code_space(detail::set_folder(dir), std::move(options));
}

}  // namespace lexico
