// Undoing least squares' shrinkage (coding/unshrink.hpp) on a hand-computed example, and
// in the Lexico cache: with unshrink = 1 a coded vector's component along itself is the
// vector's own energy again.
#include <lexico/cache/lexico_cache.hpp>
#include <lexico/coding/unshrink.hpp>

#include <cmath>
#include <random>

#include <gtest/gtest.h>

namespace {

// Two orthonormal atoms of R^3 and x = (3, 4, 12): the least-squares code is (3, 4), so
// x̂ = (3, 4, 0), ⟨x, x̂⟩ = 25 and ‖x‖² = 169.
TEST(Unshrink, ScalesCodesByTheHandComputedFactor) {
  Eigen::MatrixXf atoms = Eigen::MatrixXf::Zero(3, 2);
  atoms(0, 0) = atoms(1, 1) = 1.0f;
  const lexico::Dictionary dictionary(atoms);
  Eigen::MatrixXf x(3, 2);
  x << 3, 1, 4, 0, 12, 0;
  const auto codes = [] {
    lexico::SparseCodes c;
    c.sparsity = 2;
    c.indices.setZero(2, 2);
    c.coefficients.setZero(2, 2);
    c.counts.setZero(2);
    c.indices(1, 0) = 1;
    c.coefficients(0, 0) = 3;
    c.coefficients(1, 0) = 4;
    c.counts(0) = 2;  // column 1 holds no atom: it keeps its (zero) coefficients
    return c;
  };
  for (const auto& [power, factor] : {std::pair{1.0f, 169.0f / 25.0f}, {0.5f, 13.0f / 5.0f}, {0.0f, 1.0f}}) {
    lexico::SparseCodes c = codes();
    lexico::unshrink_codes(dictionary, x, power, c);
    EXPECT_FLOAT_EQ(c.coefficients(0, 0), 3 * factor) << "power " << power;
    EXPECT_FLOAT_EQ(c.coefficients(1, 0), 4 * factor) << "power " << power;
    EXPECT_EQ(c.coefficients.col(1).squaredNorm(), 0.0f);
  }
  lexico::SparseCodes c = codes();
  EXPECT_THROW(lexico::unshrink_codes(dictionary, x, 1.5f, c), lexico::error);
  EXPECT_THROW(lexico::unshrink_codes(dictionary, x.leftCols(1), 1.0f, c), lexico::error);
  lexico::LexicoOptions bad;
  bad.value_unshrink = -0.5f;
  try {
    lexico::LexicoCache cache({1, 1, 3}, {{std::make_shared<const lexico::Dictionary>(atoms),
                                           std::make_shared<const lexico::Dictionary>(atoms)}}, bad);
    ADD_FAILURE() << "a negative power was accepted";
  } catch (const lexico::error& e) {
    EXPECT_NE(std::string(e.what()).find("unshrink powers must be in [0, 1]"), std::string::npos) << e.what();
  }
}

// Random vectors over a random dictionary at s = 3 (relative error about 0.6): plain codes
// keep ⟨x, x̂⟩ / ‖x‖² = 1 − ε² well below 1, unshrunk ones bring it to 1 up to the FP8
// rounding of the coefficients, with the same atoms.
TEST(Unshrink, CachedCodesKeepTheirVectorsEnergyAlongThemselves) {
  const int d = 32, n = 96, tokens = 200;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  Eigen::MatrixXf atoms(d, n);
  for (Eigen::Index i = 0; i < atoms.size(); ++i) atoms.data()[i] = normal(rng);
  const auto dictionary = std::make_shared<const lexico::Dictionary>(atoms);
  lexico::RowMatrix keys(tokens, d), values(tokens, d);
  for (Eigen::Index i = 0; i < keys.size(); ++i) keys.data()[i] = normal(rng), values.data()[i] = normal(rng);
  const auto ratios = [&](float power) {
    lexico::LexicoOptions options;
    options.key_sparsity = options.value_sparsity = 3;
    options.buffer = 0;
    options.key_unshrink = options.value_unshrink = power;
    lexico::LexicoCache cache({1, 1, d}, {{dictionary, dictionary}}, options);
    for (Eigen::Index t = 0; t < tokens; ++t) cache.append(0, keys.row(t).data(), values.row(t).data());
    std::vector<double> out;
    std::vector<std::vector<int>> atoms_used;
    const lexico::Dictionary& dict = cache.key_dictionary(0);
    cache.key_codes(0, 0).for_each_row([&](std::size_t r, lexico::CodeStore::Indices index,
                                           const std::uint8_t* coefficient, int count, float scale) {
      Eigen::VectorXd decoded = Eigen::VectorXd::Zero(d);
      std::vector<int> used;
      for (int i = 0; i < count; ++i) {
        decoded += static_cast<double>(lexico::fp8_e4m3_decode(coefficient[i]) * scale) *
                   dict.atoms().col(index[i]).cast<double>();
        used.push_back(index[i]);
      }
      Eigen::VectorXd x(d);  // the fp16 key the cache coded
      for (int i = 0; i < d; ++i) x(i) = static_cast<float>(Eigen::half(keys(static_cast<Eigen::Index>(r), i)));
      out.push_back(x.dot(decoded) / x.squaredNorm());
      atoms_used.push_back(used);
    });
    return std::make_pair(out, atoms_used);
  };
  const auto [plain, plain_atoms] = ratios(0.0f);
  const auto [unshrunk, unshrunk_atoms] = ratios(1.0f);
  ASSERT_EQ(plain.size(), static_cast<std::size_t>(tokens));
  EXPECT_EQ(plain_atoms, unshrunk_atoms);
  double plain_mean = 0, worst = 0;
  for (std::size_t t = 0; t < plain.size(); ++t) {
    plain_mean += plain[t] / static_cast<double>(plain.size());
    worst = std::max(worst, std::abs(unshrunk[t] - 1.0));
  }
  EXPECT_LT(plain_mean, 0.8);
  EXPECT_LT(worst, 0.07);  // FP8 E4M3 rounds each coefficient to 1/16 relative at most
}

}  // namespace
