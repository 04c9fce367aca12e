#pragma once
// Coding values for what the output projection keeps (output-aware value coding): a
// value reaches the residual stream as W_o,h · Σ_t p_t v_t, so its coding error e costs
// ‖W_o,h e‖² = eᵀ M e, M = W_o,hᵀ W_o,h, not ‖e‖². One dictionary serves every head of a
// layer, so M is the mean over the layer's query heads. With M = U Λ Uᵀ, the map
// T = Λ^{1/2} Uᵀ turns the metric into the plain norm (‖T e‖² = eᵀ M e): a cache codes T·v
// over value dictionaries of that space (OMP there minimises eᵀ M e) and, values entering
// attention only linearly, turns the attention over those codes back once per query head
// with T⁻¹. Unlike keys, values meet no rotation, so M need not be diagonal.
//
// A dictionary set carries U as a d-atom dictionary per layer (value_axes, orthonormal
// atoms) and √λ in its manifest (value_metric); lexico-train --value-metric computes
// them from the model's W_o.

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <Eigen/LU>
#include <Eigen/SVD>

#include "../base/error.hpp"
#include "../base/rows.hpp"
#include "dictionary.hpp"

namespace lexico {

// A layer's value metric: its axes U (d x d, orthonormal columns) and √λ along them.
struct ValueMetric {
  Eigen::MatrixXf axes;
  std::vector<float> scale;

  // T = diag(√λ) · Uᵀ.
  Eigen::MatrixXf map() const {
    Eigen::MatrixXf t = axes.transpose();
    for (Eigen::Index i = 0; i < t.rows(); ++i) t.row(i) *= scale[static_cast<std::size_t>(i)];
    return t;
  }
};

// The metric of one layer's output projection wo (dim x heads·head_dim, row-major as the
// model holds it): M = mean over heads of W_o,hᵀ W_o,h, eigenvalues over their mean raised to
// `power` (1: the metric itself; below 1 a milder one) and floored at `floor`.
inline ValueMetric value_metric_of_output(ConstRowsRef wo, int head_dim, double power = 1, double floor = 1e-4) {
  require(head_dim >= 1 && wo.cols() % head_dim == 0, "value_metric_of_output: W_o of ", wo.cols(),
          " columns is not whole heads of ", head_dim);
  require(power > 0 && power <= 4, "value_metric_of_output: power ", power, " outside (0, 4]");
  require(wo.allFinite(), "value_metric_of_output: W_o holds a NaN or Inf");
  const Eigen::Index heads = wo.cols() / head_dim;
  Eigen::MatrixXd m = Eigen::MatrixXd::Zero(head_dim, head_dim);
  for (Eigen::Index h = 0; h < heads; ++h) {
    const Eigen::MatrixXd block = wo.middleCols(h * head_dim, head_dim).cast<double>();
    m += block.transpose() * block;
  }
  m /= static_cast<double>(heads);
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(m);
  require(solver.info() == Eigen::Success, "value_metric_of_output: the eigendecomposition failed");
  const double mean = solver.eigenvalues().mean();
  require(mean > 0, "value_metric_of_output: W_o is zero");
  ValueMetric metric;
  metric.axes = solver.eigenvectors().cast<float>();
  for (Eigen::Index i = 0; i < head_dim; ++i)
    metric.scale.push_back(static_cast<float>(
        std::sqrt(std::max(floor, std::pow(std::max(0.0, solver.eigenvalues()[i]) / mean, power)))));
  return metric;
}

// T⁻¹ of a value map, checked: d x d, finite, and well conditioned enough that turning the
// attention back loses no more than fp32 can carry (condition number at most 1e6).
inline Eigen::MatrixXf inverse_value_map(const Eigen::MatrixXf& map, int dim, const std::string& where) {
  require(map.rows() == dim && map.cols() == dim, where, ": a map of ", map.rows(), " x ", map.cols(), " for dimension ",
          dim);
  require(map.allFinite(), where, ": the map holds a NaN or Inf");
  const Eigen::JacobiSVD<Eigen::MatrixXd> svd(map.cast<double>());
  const auto& sigma = svd.singularValues();
  require(sigma[0] > 0 && sigma[dim - 1] * 1e6 >= sigma[0], where, ": the map's condition number ",
          sigma[dim - 1] > 0 ? sigma[0] / sigma[dim - 1] : INFINITY, " is above 1e6");
  return map.cast<double>().inverse().cast<float>();
}

// A dictionary carried by a linear map: atoms T·a, normalised. OMP over it with mapped
// vectors is OMP in the map's metric over the original atoms.
inline Dictionary mapped(const Dictionary& dictionary, const Eigen::MatrixXf& map) {
  require(map.rows() == dictionary.dim() && map.cols() == dictionary.dim(), "mapped: a ", map.rows(), " x ",
          map.cols(), " map for atoms of ", dictionary.dim());
  return Dictionary(map * dictionary.atoms(), dictionary.metadata());
}

}  // namespace lexico
