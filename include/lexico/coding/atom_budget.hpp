#pragma once
// An atom budget shared by vectors coded together: instead of s atoms for every vector,
// a group of B vectors gets s·B atoms in all, and each atom goes to the vector whose
// residual energy it lowers most. Vectors the dictionary codes well give atoms to those
// it codes badly; the stored bytes stay those of s atoms per vector on average (plus a
// count per row).
//
// OMP's k-th atom removes gains(k, b) = y_k² of residual energy (SparseCodes), and the
// first k atoms of a code are the k-atom code's atoms, so every split of the budget can
// be read off one encoding at the largest sparsity; only the coefficients of a shortened
// code must be fitted again.

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <queue>
#include <utility>
#include <vector>

#include "dictionary.hpp"
#include "../base/error.hpp"
#include "omp.hpp"

namespace lexico {

// keep[b] for the columns [first, first + count) of `codes`: atoms each keeps, at most
// its own count, summing to min(budget, Σ counts). Greedy on the gain of each vector's
// next atom, ties to the lower column: optimal whenever gains fall with k, as OMP's do
// but for rare exceptions.
inline void share_atoms(const SparseCodes& codes, Eigen::Index first, Eigen::Index count, Eigen::Index budget,
                        std::vector<int>& keep) {
  require(first >= 0 && count >= 0 && first + count <= codes.vectors() && budget >= 0,
          "share_atoms: columns [", first, ", ", first + count, ") of ", codes.vectors(), " codes, budget ", budget);
  require(codes.gains.rows() == codes.sparsity && codes.gains.cols() == codes.vectors(),
          "share_atoms: the codes carry no gains (", codes.gains.rows(), " x ", codes.gains.cols(), ")");
  keep.assign(static_cast<std::size_t>(count), 0);
  using Entry = std::pair<float, Eigen::Index>;  // (gain of the next atom, -column)
  std::priority_queue<Entry> next;
  for (Eigen::Index b = 0; b < count; ++b)
    if (codes.counts(first + b) > 0) next.push({codes.gains(0, first + b), -b});
  for (Eigen::Index spent = 0; spent < budget && !next.empty(); ++spent) {
    const Eigen::Index b = -next.top().second;
    next.pop();
    const int k = ++keep[static_cast<std::size_t>(b)];
    if (k < codes.counts(first + b)) next.push({codes.gains(k, first + b), -b});
  }
}

// Shortens the codes of columns [first, first + keep.size()) to keep[b] atoms, with the
// least-squares coefficients of `vectors` (d x B, the vectors that were coded) on them.
inline void shorten_codes(const Dictionary& dictionary, const Eigen::Ref<const Eigen::MatrixXf>& vectors,
                          Eigen::Index first, const std::vector<int>& keep, SparseCodes& codes) {
  const int d = dictionary.dim();
  require(vectors.rows() == d && vectors.cols() == codes.vectors(), "shorten_codes: vectors are ", vectors.rows(),
          " x ", vectors.cols(), ", expected ", d, " x ", codes.vectors());
  Eigen::MatrixXf chosen(d, codes.sparsity);
  Eigen::LLT<Eigen::MatrixXf> gram;
  for (std::size_t i = 0; i < keep.size(); ++i) {
    const Eigen::Index b = first + static_cast<Eigen::Index>(i);
    const int k = keep[i], had = codes.counts(b);
    require(k >= 0 && k <= had, "shorten_codes: column ", b, " cannot keep ", k, " of its ", had, " atoms");
    if (k == had) continue;
    if (k > 0) {
      for (int j = 0; j < k; ++j) chosen.col(j) = dictionary.atoms().col(codes.indices(j, b));
      const auto atoms = chosen.leftCols(k);
      gram.compute(atoms.transpose() * atoms);  // OMP kept these atoms well apart: positive definite
      codes.coefficients.col(b).head(k) = gram.solve(atoms.transpose() * vectors.col(b));
    }
    for (int j = k; j < had; ++j) {
      codes.indices(j, b) = 0;
      codes.coefficients(j, b) = 0.0f;
      codes.gains(j, b) = 0.0f;
    }
    codes.counts(b) = static_cast<std::uint8_t>(k);
  }
}

}  // namespace lexico
