#pragma once
// Undoing least squares' shrinkage of a code along its own vector. OMP's coefficients are
// the projection of x on the chosen atoms, so x̂ = Dc is shorter than x: ⟨x, x̂⟩ = ‖x̂‖² =
// ‖x‖²(1 − ε²) at relative error ε. A query that matches x (an induction head looking
// for the token to copy) scores the coded key ε² lower, relative to the exact key's score,
// and attention that should land on one earlier token spreads out; the value it then
// reads is short by the same factor. Scaling the code by γ = (‖x‖² / ⟨x, x̂⟩)^p moves
// x̂ back along itself: p = 1 restores ⟨x, γx̂⟩ = ‖x‖², p = 0.5 the norm (for a
// least-squares code), p = 0 leaves the code alone. It costs no byte: the coefficients are
// scaled before they are stored.

#include <Eigen/Core>
#include <cmath>

#include "../base/error.hpp"
#include "dictionary.hpp"
#include "omp.hpp"

namespace lexico {

// Scales each column's coefficients of `codes` (codes of `vectors`, d x B, over
// `dictionary`) by (‖x‖² / ⟨x, x̂⟩)^power; a column with ⟨x, x̂⟩ <= 0 (no atom, or a code
// that does not point along x) keeps its coefficients.
inline void unshrink_codes(const Dictionary& dictionary, const Eigen::Ref<const Eigen::MatrixXf>& vectors,
                           float power, SparseCodes& codes) {
  require(vectors.rows() == dictionary.dim() && vectors.cols() == codes.vectors(), "unshrink_codes: vectors are ",
          vectors.rows(), " x ", vectors.cols(), ", expected ", dictionary.dim(), " x ", codes.vectors());
  require(power >= 0 && power <= 1, "unshrink_codes: the power must be in [0, 1] (got ", power, ")");
  if (power == 0) return;
  Eigen::VectorXf decoded(dictionary.dim());
  for (Eigen::Index b = 0; b < codes.vectors(); ++b) {
    decoded.setZero();
    for (int j = 0; j < codes.counts(b); ++j)
      decoded += codes.coefficients(j, b) * dictionary.atoms().col(codes.indices(j, b));
    const double along = static_cast<double>(vectors.col(b).dot(decoded));
    const double energy = static_cast<double>(vectors.col(b).squaredNorm());
    if (!(along > 0) || !std::isfinite(energy)) continue;
    const auto scale = static_cast<float>(std::pow(energy / along, static_cast<double>(power)));
    codes.coefficients.col(b).head(codes.counts(b)) *= scale;
  }
}

}  // namespace lexico
