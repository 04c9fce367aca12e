#pragma once
// Coding keys for what attention sees (query-aware key coding): a query scores a key
// through qᵀR(Δ)k, so a key's coding error e = k − k̂ costs E[(qᵀR(Δ)e)²] = eᵀ M e with
// M = E[R(Δ)ᵀ q qᵀ R(Δ)], not ‖e‖². Where the query's phase relative to the key spreads
// over each RoPE frequency pair (it does for all but the slowest pairs over a window), M
// is diagonal and equal on the two dimensions of a pair: w_pair = E[q_a² + q_b²] / 2.
//
// A set's key metric is √w per layer and dimension. Being constant on every pair it
// commutes with every rotation, so a cache may code k' = √w ⊙ k over a dictionary of
// the whitened space (OMP there minimises exactly eᵀ diag(w) e) and score the code with
// the query turned back, (q ⊘ √w)ᵀ R(Δ) k̂': no other change to attention, keys before or
// after RoPE alike. A dictionary set carries its metric in the manifest (key_metric);
// lexico-train --key-metric measures it from the training windows' queries and trains
// the key dictionaries on whitened keys.

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "../base/error.hpp"
#include "../base/rope.hpp"
#include "../base/rows.hpp"

namespace lexico {

// Sums of squared query entries per layer and head dimension, over every query head
// and token shown to it.
class QueryEnergy {
 public:
  QueryEnergy(int layers, int head_dim)
      : head_dim_(head_dim), sums_(static_cast<std::size_t>(layers), std::vector<double>(static_cast<std::size_t>(head_dim))),
        counts_(static_cast<std::size_t>(layers), 0) {
    require(layers >= 1 && head_dim >= 2 && head_dim % 2 == 0, "QueryEnergy: ", layers, " layers of head_dim ",
            head_dim, " (needs at least one layer and an even head_dim)");
  }

  // queries: T x (heads · head_dim), a token's query heads side by side.
  void add(int layer, ConstRowsRef queries) {
    require(layer >= 0 && layer < layers(), "QueryEnergy::add: layer ", layer, " of ", layers());
    require(queries.cols() % head_dim_ == 0, "QueryEnergy::add: rows of ", queries.cols(),
            " floats are not whole heads of ", head_dim_);
    std::vector<double>& sum = sums_[static_cast<std::size_t>(layer)];
    for (Eigen::Index t = 0; t < queries.rows(); ++t)
      for (Eigen::Index c = 0; c < queries.cols(); ++c) {
        const double x = queries(t, c);
        sum[static_cast<std::size_t>(c % head_dim_)] += x * x;
      }
    counts_[static_cast<std::size_t>(layer)] += queries.rows() * (queries.cols() / head_dim_);
  }

  int layers() const { return static_cast<int>(sums_.size()); }
  int head_dim() const { return head_dim_; }
  Eigen::Index count(int layer) const { return counts_[static_cast<std::size_t>(layer)]; }

  // √w of one layer for keys under `style`'s pairs, w the pair energy over its mean raised
  // to `power` (1: the metric above; below 1 a milder one, between it and plain coding),
  // floored at `floor` (a pair no query uses would otherwise make the turned-back query
  // divide by zero). OMP's choices do not depend on w's overall scale.
  std::vector<float> scale(int layer, RopeStyle style, double power = 1, double floor = 1e-4) const {
    require(power > 0 && power <= 4, "QueryEnergy::scale: power ", power, " outside (0, 4]");
    require(layer >= 0 && layer < layers(), "QueryEnergy::scale: layer ", layer, " of ", layers());
    require(count(layer) > 0, "QueryEnergy::scale: no queries seen in layer ", layer);
    const std::vector<double>& sum = sums_[static_cast<std::size_t>(layer)];
    double mean = 0;
    for (const double s : sum) mean += s;
    mean /= static_cast<double>(head_dim_);
    require(std::isfinite(mean) && mean > 0, "QueryEnergy::scale: layer ", layer, " has queries of energy ", mean);
    std::vector<float> out(static_cast<std::size_t>(head_dim_));
    for (int e = 0; e < head_dim_; ++e) {
      const double energy = (sum[static_cast<std::size_t>(e)] +
                             sum[static_cast<std::size_t>(rope_partner(e, head_dim_, style))]) / (2 * mean);
      const double w = std::max(floor, std::pow(energy, power));
      out[static_cast<std::size_t>(e)] = static_cast<float>(std::sqrt(w));
    }
    return out;
  }

 private:
  int head_dim_;
  std::vector<std::vector<double>> sums_;
  std::vector<Eigen::Index> counts_;
};

// Checks one layer's √w: d finite entries in [1e-6, 1e6] and, given a RoPE style, equal
// on each of its pairs (else the metric would not commute with the rotation).
inline void check_metric_scale(const std::vector<float>& scale, int head_dim, const RopeStyle* style,
                               const std::string& where) {
  require(static_cast<int>(scale.size()) == head_dim, where, ": ", scale.size(), " entries for head_dim ", head_dim);
  for (int e = 0; e < head_dim; ++e) {
    const float s = scale[static_cast<std::size_t>(e)];
    require(std::isfinite(s) && s >= 1e-6f && s <= 1e6f, where, ": entry ", e, " = ", s,
            " is not a scale in [1e-6, 1e6]");
  }
  for (int e = 0; style && e < head_dim; ++e) {
    const int partner = rope_partner(e, head_dim, *style);
    require(scale[static_cast<std::size_t>(e)] == scale[static_cast<std::size_t>(partner)], where, ": entries ", e,
            " and ", partner, " form a ", to_string(*style),
            " RoPE pair but differ, so the metric would not commute with the rotation");
  }
}

// The metric's map diag(√w) as a matrix (what value_metric.hpp's `mapped` and a
// training source take).
inline Eigen::MatrixXf key_map(const std::vector<float>& scale) {
  const Eigen::Index d = static_cast<Eigen::Index>(scale.size());
  Eigen::MatrixXf map = Eigen::MatrixXf::Zero(d, d);
  for (Eigen::Index e = 0; e < d; ++e) map(e, e) = scale[static_cast<std::size_t>(e)];
  return map;
}

}  // namespace lexico
