// Shared atom budgets: the greedy split against hand-computed cases, shortened codes
// against an independent least-squares solve, and the point of it all: a pooled batch
// codes with no more total error than s atoms each, for the same number of atoms.

#include <gtest/gtest.h>

#include <Eigen/SVD>
#include <numeric>
#include <random>
#include <vector>

#include <lexico/coding/atom_budget.hpp>

#include "test_util.hpp"

namespace {

using lexico::Dictionary;
using lexico::OmpEncoder;
using lexico::OmpOptions;
using lexico::SparseCodes;

// Codes whose only content is their gains (what share_atoms reads).
SparseCodes codes_with_gains(const Eigen::MatrixXf& gains) {
  SparseCodes codes;
  codes.sparsity = static_cast<int>(gains.rows());
  codes.gains = gains;
  codes.indices.setZero(gains.rows(), gains.cols());
  codes.coefficients.setZero(gains.rows(), gains.cols());
  codes.counts.setConstant(gains.cols(), static_cast<std::uint8_t>(gains.rows()));
  return codes;
}

TEST(ShareAtoms, GivesEachAtomToTheLargestNextGain) {
  Eigen::MatrixXf gains(3, 3);  // column b: the energy vector b's 1st, 2nd, 3rd atom removes
  gains << 9, 4, 1,
           1, 3, 0.5f,
           0.5f, 2, 0.1f;
  const SparseCodes codes = codes_with_gains(gains);
  std::vector<int> keep;
  lexico::share_atoms(codes, 0, 3, 4, keep);  // 9 (b0), 4, 3, 2 (b1)
  EXPECT_EQ(keep, (std::vector<int>{1, 3, 0}));
  lexico::share_atoms(codes, 0, 3, 6, keep);  // then 1 (b0 before b2: ties go to the lower column), 1 (b2)
  EXPECT_EQ(keep, (std::vector<int>{2, 3, 1}));
  lexico::share_atoms(codes, 0, 3, 100, keep);  // more budget than atoms: every code whole
  EXPECT_EQ(keep, (std::vector<int>{3, 3, 3}));
  lexico::share_atoms(codes, 1, 2, 2, keep);  // columns 1 and 2 only: 4, 3 (b1)
  EXPECT_EQ(keep, (std::vector<int>{2, 0}));
}

TEST(ShareAtoms, RespectsEachCodesLength) {
  Eigen::MatrixXf gains(3, 2);
  gains << 5, 1,
           0, 1,
           0, 1;
  SparseCodes codes = codes_with_gains(gains);
  codes.counts(0) = 1;  // OMP stopped after one atom: it cannot be given a second
  std::vector<int> keep;
  lexico::share_atoms(codes, 0, 2, 3, keep);
  EXPECT_EQ(keep, (std::vector<int>{1, 2}));
}

TEST(ShareAtoms, RejectsBadColumnsAndCodesWithoutGains) {
  const SparseCodes codes = codes_with_gains(Eigen::MatrixXf::Ones(2, 4));
  std::vector<int> keep;
  EXPECT_NE(lexico_test::error_of([&] { lexico::share_atoms(codes, 2, 3, 1, keep); }).find("columns [2, 5)"),
            std::string::npos);
  EXPECT_NE(lexico_test::error_of([&] { lexico::share_atoms(codes, 0, 4, -1, keep); }).find("budget -1"),
            std::string::npos);
  SparseCodes bare = codes;
  bare.gains.resize(0, 0);
  EXPECT_NE(lexico_test::error_of([&] { lexico::share_atoms(bare, 0, 4, 1, keep); }).find("no gains"),
            std::string::npos);
}

Dictionary random_dictionary(int d, int n, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  Eigen::MatrixXf atoms(d, n);
  for (Eigen::Index i = 0; i < atoms.size(); ++i) atoms.data()[i] = normal(rng);
  return Dictionary(atoms);
}

// Vectors of uneven difficulty: some are sparse in the dictionary, some are not.
Eigen::MatrixXf uneven_vectors(const Dictionary& dict, Eigen::Index count, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> atom(0, dict.size() - 1);
  Eigen::MatrixXf x(dict.dim(), count);
  for (Eigen::Index b = 0; b < count; ++b) {
    if (b % 3 == 0) {
      x.col(b).setZero();
      for (int j = 0; j < 2; ++j) x.col(b) += normal(rng) * dict.atoms().col(atom(rng));
    } else {
      for (int i = 0; i < dict.dim(); ++i) x(i, b) = normal(rng) * (b % 3 == 1 ? 1.0f : 3.0f);
    }
  }
  return x;
}

TEST(ShortenCodes, FitsLeastSquaresOnTheKeptAtomsAndMatchesTheGains) {
  std::mt19937 rng(3);
  const Dictionary dict = random_dictionary(24, 96, rng);
  const Eigen::MatrixXf x = uneven_vectors(dict, 30, rng);
  SparseCodes codes = OmpEncoder(dict, OmpOptions{10}).encode(x);
  const SparseCodes full = codes;
  std::vector<int> keep(30);
  for (std::size_t b = 0; b < keep.size(); ++b) keep[b] = static_cast<int>(b % 11) % (codes.counts(b) + 1);
  lexico::shorten_codes(dict, x, 0, keep, codes);
  for (Eigen::Index b = 0; b < 30; ++b) {
    const int k = keep[static_cast<std::size_t>(b)];
    ASSERT_EQ(codes.counts(b), k);
    Eigen::MatrixXd atoms(dict.dim(), k);
    for (int j = 0; j < k; ++j) {
      ASSERT_EQ(codes.indices(j, b), full.indices(j, b)) << "the kept atoms are the code's first k";
      atoms.col(j) = dict.atoms().col(codes.indices(j, b)).cast<double>();
    }
    const Eigen::VectorXd xb = x.col(b).cast<double>();
    Eigen::VectorXd want = Eigen::VectorXd::Zero(k);
    if (k > 0) want = atoms.jacobiSvd(Eigen::ComputeThinU | Eigen::ComputeThinV).solve(xb);
    for (int j = 0; j < k; ++j)
      EXPECT_NEAR(codes.coefficients(j, b), want(j), 1e-3 * (1 + std::abs(want(j)))) << "vector " << b;
    for (int j = k; j < codes.sparsity; ++j) EXPECT_EQ(codes.coefficients(j, b), 0.0f);
    // The k-atom residual is what the gains of the first k atoms promised.
    const double residual = (xb - atoms * want).squaredNorm();
    const double promised = xb.squaredNorm() - full.gains.col(b).head(k).cast<double>().sum();
    EXPECT_NEAR(residual, promised, 1e-3 * xb.squaredNorm()) << "vector " << b;
  }
  keep[0] = full.counts(0) + 1;
  EXPECT_NE(lexico_test::error_of([&] { lexico::shorten_codes(dict, x, 0, keep, codes); }).find("cannot keep"),
            std::string::npos);
}

double squared_error(const Dictionary& dict, const Eigen::MatrixXf& x, const SparseCodes& codes) {
  double total = 0;
  for (Eigen::Index b = 0; b < x.cols(); ++b) {
    Eigen::VectorXd xhat = Eigen::VectorXd::Zero(dict.dim());
    for (int j = 0; j < codes.counts(b); ++j)
      xhat += static_cast<double>(codes.coefficients(j, b)) * dict.atoms().col(codes.indices(j, b)).cast<double>();
    total += (x.col(b).cast<double>() - xhat).squaredNorm();
  }
  return total;
}

TEST(ShareAtoms, PooledBatchHasNoMoreErrorThanFixedSparsityForTheSameAtoms) {
  std::mt19937 rng(8);
  const Dictionary dict = random_dictionary(32, 128, rng);
  const Eigen::MatrixXf x = uneven_vectors(dict, 60, rng);
  const int s = 4;
  const SparseCodes fixed = OmpEncoder(dict, OmpOptions{s}).encode(x);
  SparseCodes pooled = OmpEncoder(dict, OmpOptions{2 * s}).encode(x);
  std::vector<int> keep;
  lexico::share_atoms(pooled, 0, x.cols(), s * x.cols(), keep);
  lexico::shorten_codes(dict, x, 0, keep, pooled);
  EXPECT_EQ(std::accumulate(keep.begin(), keep.end(), 0), s * x.cols());
  const double fixed_error = squared_error(dict, x, fixed), pooled_error = squared_error(dict, x, pooled);
  EXPECT_LT(pooled_error, 0.95 * fixed_error) << "uneven vectors: moving atoms must pay";
  // The sparse vectors (b % 3 == 0, two atoms) need no more than two.
  for (Eigen::Index b = 0; b < x.cols(); b += 3) EXPECT_LE(keep[static_cast<std::size_t>(b)], 2) << "vector " << b;
}

}  // namespace
