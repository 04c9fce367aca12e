#pragma once
// The per-model state of Lexico, built once per dictionary set and shared by reference
// by every sequence's cache (as Spectra holds its operator and hnswlib its space): per
// layer a CodeBook for keys and one for values (atoms, packed panels, the Gram form of
// the chosen GramPolicy), the manifest's settings (keys coded before or after RoPE and
// the RoPE, dev errors for per-layer sparsities), the thread budget for coding, and
// the pool that lends OMP workspaces to the threads that code.
//
// Concurrency: immutable after construction; the workspace pool and the on-demand Gram
// columns are internally synchronised. Any number of caches on any threads may code
// and attend with one CodeSpace at once.

#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "code_book.hpp"
#include "dictionary.hpp"
#include "../base/error.hpp"
#include "key_metric.hpp"
#include "value_metric.hpp"
#include "omp.hpp"
#include "../base/rope.hpp"

namespace lexico {

// A layer's key and value dictionaries.
struct LayerDictionaries {
  std::shared_ptr<const Dictionary> keys, values;
  // The value metric's axes (value_metric.hpp), d orthonormal atoms, or null.
  std::shared_ptr<const Dictionary> value_axes = nullptr;
};

// Relative coding error of one dictionary at one sparsity (FP8 coefficients).
struct DictionaryError {
  int layer = 0;
  char kind = 'K';  // 'K' keys, 'V' values
  int sparsity = 0;
  double train = 0, dev = 0;
};

// What a dictionary set's manifest says (dictionary_set.hpp reads and writes it).
struct DictionarySetManifest {
  std::string model;   // where the vectors came from
  std::string method;  // training method
  int layers = 0, head_dim = 0, atoms = 0, sparsity = 0;
  std::map<std::string, std::string> settings;  // training configuration and data, free-form
  std::vector<DictionaryError> errors;
  // Per layer √w of the key metric (key_metric.hpp) the key dictionaries were trained in,
  // d entries each; empty: plain keys. Its RoPE pairs are settings.rope_style's.
  std::vector<std::vector<float>> key_metric;
  // Per layer √λ of the value metric (value_metric.hpp) along the layer's value_axes;
  // empty: plain values.
  std::vector<std::vector<float>> value_metric;
};

// The RoPE a dictionary set's keys were taken before (settings keys=before_rope, with
// rope_theta and rope_style), or none for sets trained on keys after RoPE.
inline std::optional<Rope> manifest_key_rope(const DictionarySetManifest& manifest, int head_dim) {
  const auto setting = [&](const std::string& key) {
    const auto found = manifest.settings.find(key);
    return found == manifest.settings.end() ? std::string() : found->second;
  };
  const std::string keys = setting("keys");
  require(keys.empty() || keys == "after_rope" || keys == "before_rope", "dictionary set of ", manifest.model,
          ": manifest setting keys='", keys, "' is neither after_rope nor before_rope");
  if (keys != "before_rope") return std::nullopt;
  require(!setting("rope_theta").empty() && !setting("rope_style").empty(), "dictionary set of ", manifest.model,
          ": key dictionaries trained before RoPE but the manifest lacks rope_theta or rope_style");
  char* end = nullptr;
  const std::string theta = setting("rope_theta");
  const float value = std::strtof(theta.c_str(), &end);
  require(end != theta.c_str() && *end == '\0', "dictionary set of ", manifest.model, ": rope_theta '", theta,
          "' is not a number");
  return Rope(head_dim, value, parse_rope_style(setting("rope_style")));
}

struct CodeSpaceOptions {
  GramPolicy gram = GramPolicy::fp16;
  int hot_columns = -1;  // GramPolicy::on_demand: Gram columns kept per dictionary (-1: 3·d)
  int threads = 0;       // OpenMP threads that code one flush (0: the OpenMP default)
  // Keys are coded before this RoPE (dictionaries from lexico-train --keys-before-rope);
  // from a manifest it is read from the set's settings.
  std::optional<Rope> key_rope;
  // Per layer √w of a key metric (key_metric.hpp; lexico-train --key-metric) whose space the
  // key dictionaries belong to, d entries each, or empty; from a manifest, its key_metric.
  std::vector<std::vector<float>> key_metric;
  // Per layer the value metric's map T (d x d, value_metric.hpp; lexico-train
  // --value-metric) into the space of the value dictionaries, or empty; from a manifest,
  // diag(value_metric) · value_axesᵀ.
  std::vector<Eigen::MatrixXf> value_metric;
};

class CodeSpace {
 public:
  CodeSpace(const std::vector<LayerDictionaries>& layers, CodeSpaceOptions options = {},
            DictionarySetManifest manifest = {})
      : options_(std::move(options)), manifest_(std::move(manifest)),
        workspaces_(std::make_shared<OmpWorkspacePool>()) {
    require(!layers.empty(), "CodeSpace: no layers of dictionaries");
    require(options_.threads >= 0, "CodeSpace: threads = ", options_.threads, " is negative");
    // One book per distinct dictionary: a set that repeats a dictionary holds it once.
    // Books hold the atoms rounded to fp16 (Dictionary::rounded_to_fp16), which attention
    // streams as fp16.
    std::map<const Dictionary*, std::shared_ptr<const CodeBook>> made;
    const auto book = [&](const std::shared_ptr<const Dictionary>& dictionary) {
      auto& slot = made[dictionary.get()];
      if (!slot)
        slot = std::make_shared<const CodeBook>(std::make_shared<const Dictionary>(dictionary->rounded_to_fp16()),
                                                options_.gram, options_.hot_columns);
      return slot;
    };
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const LayerDictionaries& layer = layers[l];
      require(layer.keys && layer.values, "CodeSpace: layer ", l, " lacks a key or value dictionary");
      require(layer.keys->dim() == layers.front().keys->dim() && layer.values->dim() == layer.keys->dim(),
              "CodeSpace: layer ", l, " has dictionaries of dimension ", layer.keys->dim(), " and ",
              layer.values->dim(), ", layer 0 of ", layers.front().keys->dim());
      keys_.push_back(book(layer.keys));
      values_.push_back(book(layer.values));
    }
    require(!options_.key_rope || options_.key_rope->head_dim() == dim(), "CodeSpace: RoPE head_dim ",
            options_.key_rope ? options_.key_rope->head_dim() : 0, " differs from the dictionaries' dimension ", dim());
    const auto& metric = options_.key_metric;
    require(metric.empty() || static_cast<int>(metric.size()) == this->layers(), "CodeSpace: a key metric of ",
            metric.size(), " layers for ", this->layers(), " layers of dictionaries");
    for (std::size_t l = 0; l < metric.size(); ++l) {
      // Keys before RoPE need a metric that commutes with the rotation (equal on its pairs).
      const RopeStyle style = options_.key_rope ? options_.key_rope->style() : RopeStyle::rotate_half;
      check_metric_scale(metric[l], dim(), options_.key_rope ? &style : nullptr,
                      detail::concat("CodeSpace: key metric of layer ", l));
      key_inverse_scale_.emplace_back(metric[l].size());
      for (std::size_t e = 0; e < metric[l].size(); ++e) key_inverse_scale_.back()[e] = 1.0f / metric[l][e];
      key_map_.push_back(key_map(metric[l]));
    }
    const auto& value_metric = options_.value_metric;
    require(value_metric.empty() || static_cast<int>(value_metric.size()) == this->layers(),
            "CodeSpace: a value metric of ", value_metric.size(), " layers for ", this->layers(),
            " layers of dictionaries");
    for (std::size_t l = 0; l < value_metric.size(); ++l)
      value_inverse_.push_back(inverse_value_map(value_metric[l], dim(), detail::concat("CodeSpace: value metric of layer ", l)));
  }
  CodeSpace(const CodeSpace&) = delete;
  CodeSpace& operator=(const CodeSpace&) = delete;

  int layers() const { return static_cast<int>(keys_.size()); }
  int dim() const { return keys_.front()->dim(); }
  const CodeBook& keys(int layer) const { return *keys_[checked(layer)]; }
  const CodeBook& values(int layer) const { return *values_[checked(layer)]; }
  const std::shared_ptr<const CodeBook>& key_book(int layer) const { return keys_[checked(layer)]; }
  const std::shared_ptr<const CodeBook>& value_book(int layer) const { return values_[checked(layer)]; }
  const std::optional<Rope>& key_rope() const { return options_.key_rope; }
  const CodeSpaceOptions& options() const { return options_; }
  const DictionarySetManifest& manifest() const { return manifest_; }
  // The key metric's √w of a layer (key_metric.hpp) and its reciprocal, d entries each, or
  // null when the set codes plain keys: a cache codes √w ⊙ k and scores those codes with
  // queries multiplied by 1/√w.
  const std::vector<float>* key_scale(int layer) const {
    return options_.key_metric.empty() ? nullptr : &options_.key_metric[checked(layer)];
  }
  const std::vector<float>* key_inverse_scale(int layer) const {
    return key_inverse_scale_.empty() ? nullptr : &key_inverse_scale_[checked(layer)];
  }
  // The map into the space a layer's key or value dictionaries code in (diag(√w) of the
  // key metric, T of the value metric), or null for plain vectors.
  const Eigen::MatrixXf* coding_map(int layer, bool keys) const {
    const auto& maps = keys ? key_map_ : options_.value_metric;
    return maps.empty() ? nullptr : &maps[checked(layer)];
  }
  // T⁻¹ of a layer's value metric (value_metric.hpp), or null: a cache turns the attention
  // over coded values back with it.
  const Eigen::MatrixXf* value_inverse(int layer) const {
    return value_inverse_.empty() ? nullptr : &value_inverse_[checked(layer)];
  }
  const std::shared_ptr<OmpWorkspacePool>& workspaces() const { return workspaces_; }

  // An encoder over one layer's keys or values with this space's books, pool and threads.
  OmpEncoder encoder(int layer, bool keys, int sparsity, float tolerance) const {
    OmpOptions options;
    options.sparsity = sparsity;
    options.tolerance = tolerance;
    options.threads = options_.threads;
    return OmpEncoder(keys ? key_book(layer) : value_book(layer), options, workspaces_);
  }

  // Shared bytes: every distinct book once, plus the idle workspaces of the pool (those
  // lent out are counted by nobody while a call runs).
  std::size_t bytes() const {
    std::set<const CodeBook*> counted;
    std::size_t total = workspaces_->idle_bytes();
    for (const auto* books : {&keys_, &values_})
      for (const auto& book : *books)
        if (counted.insert(book.get()).second) total += book->bytes();
    return total;
  }

 private:
  std::size_t checked(int layer) const {
    require(layer >= 0 && layer < layers(), "CodeSpace: layer ", layer, " out of range [0, ", layers(), ")");
    return static_cast<std::size_t>(layer);
  }

  CodeSpaceOptions options_;
  DictionarySetManifest manifest_;
  std::vector<std::shared_ptr<const CodeBook>> keys_, values_;
  std::vector<std::vector<float>> key_inverse_scale_;  // per layer 1/√w (empty: no key metric)
  std::vector<Eigen::MatrixXf> key_map_;               // per layer diag(√w)
  std::vector<Eigen::MatrixXf> value_inverse_;         // per layer T⁻¹ (empty: no value metric)
  std::shared_ptr<OmpWorkspacePool> workspaces_;
};

}  // namespace lexico
