#pragma once
// Atoms per layer from the dictionaries' measured errors. Instead of s atoms in every
// layer, L layers get L·s in all, each atom going to the layer where it lowers the squared
// relative coding error of keys plus values the most. Layers whose dictionaries code worse
// (in the proxies here the last ones, with 2-4x the error of the first) get more atoms;
// the bytes stay those of s atoms per layer on average, up to index rounding.
//
// The errors are the manifest's dev errors (vectors held out of training, not evaluation
// text), interpolated log-linearly in s between the sparsities lexico-train measured
// (relative error falls roughly as a power of s) and extended below the lowest along the
// same power law, capped at 1 (no code is worse than none); no layer goes above the
// highest measured sparsity.

#include <algorithm>
#include <cmath>
#include <map>
#include <utility>
#include <vector>

#include "code_space.hpp"
#include "../base/error.hpp"

namespace lexico {

// Measured dev errors of one layer and kind, by sparsity, with log-linear interpolation.
class ErrorCurve {
 public:
  void add(int sparsity, double error) {
    require(sparsity >= 1 && std::isfinite(error) && error > 0, "ErrorCurve: error ", error, " at sparsity ",
            sparsity, " must be finite and positive");
    points_[sparsity] = error;
  }
  bool empty() const { return points_.empty(); }
  std::size_t points() const { return points_.size(); }
  int highest() const { return points_.rbegin()->first; }

  // The error at s in [1, highest()]: below lowest() along the first two points' power law.
  double at(int s) const {
    require(points_.size() >= 2 && s >= 1 && s <= highest(), "ErrorCurve: sparsity ", s, " outside [1, ",
            empty() ? 0 : highest(), "] or fewer than two measured sparsities (", points_.size(), ")");
    auto above = points_.lower_bound(s);
    if (above->first == s) return above->second;
    if (above == points_.begin()) ++above;  // extrapolate along the first segment
    const auto below = std::prev(above);
    const double t = (std::log(s) - std::log(below->first)) / (std::log(above->first) - std::log(below->first));
    return std::min(1.0, std::exp((1 - t) * std::log(below->second) + t * std::log(above->second)));
  }

 private:
  std::map<int, double> points_;
};

// Sparsity of each layer (keys and values alike), `sparsity` on average, from the manifest's
// dev errors: greedy on the next atom's gain, optimal while errors² fall convexly in s.
inline std::vector<int> allocate_layer_sparsity(const DictionarySetManifest& manifest, int sparsity) {
  const int layers = manifest.layers;
  require(layers >= 1, "allocate_layer_sparsity: the manifest lists ", layers, " layers");
  std::vector<std::pair<ErrorCurve, ErrorCurve>> curves(static_cast<std::size_t>(layers));  // keys, values
  for (const DictionaryError& e : manifest.errors) {
    require(e.layer >= 0 && e.layer < layers && (e.kind == 'K' || e.kind == 'V'), "allocate_layer_sparsity: error entry "
            "for layer ", e.layer, " kind '", e.kind, "' does not fit a manifest of ", layers, " layers");
    auto& pair = curves[static_cast<std::size_t>(e.layer)];
    (e.kind == 'K' ? pair.first : pair.second).add(e.sparsity, e.dev);
  }
  std::vector<int> high(static_cast<std::size_t>(layers));  // every layer starts from 1 atom
  const long long least = layers;
  long long most = 0;
  for (int l = 0; l < layers; ++l) {
    const auto& [keys, values] = curves[static_cast<std::size_t>(l)];
    require(!keys.empty() && !values.empty(), "allocate_layer_sparsity: the manifest has no key or no value errors "
            "for layer ", l, " (lexico-train records them)");
    require(keys.points() >= 2 && values.points() >= 2, "allocate_layer_sparsity: layer ", l,
            "'s errors are measured at one sparsity only; atoms cannot be weighed");
    high[static_cast<std::size_t>(l)] = std::min(keys.highest(), values.highest());
    most += high[static_cast<std::size_t>(l)];
  }
  const long long budget = static_cast<long long>(sparsity) * layers;
  require(budget >= least && budget <= most, "allocate_layer_sparsity: mean sparsity ", sparsity,
          " outside what the measured errors cover (", static_cast<double>(least) / layers, " to ",
          static_cast<double>(most) / layers, " on average)");
  auto cost = [&](int l, int s) {
    const auto& [keys, values] = curves[static_cast<std::size_t>(l)];
    const double key_error = keys.at(s), value_error = values.at(s);
    return key_error * key_error + value_error * value_error;
  };
  std::vector<int> chosen(static_cast<std::size_t>(layers), 1);
  for (long long spent = least; spent < budget; ++spent) {
    int best = -1;
    double best_gain = 0;
    for (int l = 0; l < layers; ++l) {
      const int s = chosen[static_cast<std::size_t>(l)];
      if (s >= high[static_cast<std::size_t>(l)]) continue;
      const double gain = cost(l, s) - cost(l, s + 1);
      if (best < 0 || gain > best_gain) best = l, best_gain = gain;
    }
    ++chosen[static_cast<std::size_t>(best)];
  }
  return chosen;
}

}  // namespace lexico
