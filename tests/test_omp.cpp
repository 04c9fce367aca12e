// Tests of the batched OMP encoder against a naive OMP that solves the least-squares
// problem on the chosen atoms from scratch at every step, in double precision.

#include <lexico/model/safetensors.hpp>
#include <lexico/coding/omp.hpp>

#include <gtest/gtest.h>

#include <Eigen/QR>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace {

using lexico::Dictionary;
using lexico::OmpEncoder;
using lexico::OmpOptions;
using lexico::SparseCodes;

Eigen::MatrixXf gaussian(Eigen::Index rows, Eigen::Index cols, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  Eigen::MatrixXf m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

Dictionary random_dictionary(int d, int n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  return Dictionary(gaussian(d, n, rng));
}

// Textbook OMP: correlations Dᵀr, then the coefficients of x on the chosen atoms by
// a fresh least-squares solve (QR). Same stopping and skipping rules as the encoder:
// an atom whose squared distance to the span of the chosen ones is below
// pivot_threshold is skipped (unless skip is false), and the loop ends at s atoms,
// at ‖r‖ <= max(tolerance, 1e-6)·‖x‖ or when no atom correlates above 1e-6·‖x‖.
struct NaiveOmp {
  std::vector<int> atoms;
  Eigen::VectorXd coefs;
  Eigen::VectorXd residual;
};

Eigen::VectorXd least_squares(const Eigen::MatrixXd& atoms, const std::vector<int>& chosen, const Eigen::VectorXd& x) {
  Eigen::MatrixXd sub(atoms.rows(), static_cast<Eigen::Index>(chosen.size()));
  for (std::size_t i = 0; i < chosen.size(); ++i) sub.col(static_cast<Eigen::Index>(i)) = atoms.col(chosen[i]);
  return sub.colPivHouseholderQr().solve(x);
}

Eigen::VectorXd residual_of(const Eigen::MatrixXd& atoms, const std::vector<int>& chosen, const Eigen::VectorXd& coefs,
                            const Eigen::VectorXd& x) {
  Eigen::VectorXd r = x;
  for (std::size_t i = 0; i < chosen.size(); ++i) r -= coefs(static_cast<Eigen::Index>(i)) * atoms.col(chosen[i]);
  return r;
}

NaiveOmp naive_omp(const Eigen::MatrixXd& atoms, const Eigen::VectorXd& x, const OmpOptions& options,
                   bool skip = true) {
  NaiveOmp out;
  out.residual = x;
  out.coefs.resize(0);
  const double norm = x.norm();
  std::vector<bool> excluded(static_cast<std::size_t>(atoms.cols()), false);
  int rejections = 0;
  while (static_cast<int>(out.atoms.size()) < options.sparsity && norm > 0) {
    const Eigen::VectorXd correlations = atoms.transpose() * out.residual;
    int best = -1;
    for (Eigen::Index n = 0; n < atoms.cols(); ++n)
      if (!excluded[static_cast<std::size_t>(n)] &&
          (best < 0 || std::abs(correlations(n)) > std::abs(correlations(best))))
        best = static_cast<int>(n);
    if (best < 0 || std::abs(correlations(best)) <= 1e-6 * norm) break;
    excluded[static_cast<std::size_t>(best)] = true;
    if (skip && !out.atoms.empty()) {
      const Eigen::VectorXd projection = least_squares(atoms, out.atoms, atoms.col(best));
      const double distance2 = residual_of(atoms, out.atoms, projection, atoms.col(best)).squaredNorm();
      if (distance2 < options.pivot_threshold) {
        if (++rejections > options.sparsity) break;
        continue;
      }
    }
    out.atoms.push_back(best);
    out.coefs = least_squares(atoms, out.atoms, x);
    out.residual = residual_of(atoms, out.atoms, out.coefs, x);
    if (out.residual.norm() <= std::max<double>(options.tolerance, 1e-6) * norm) break;
  }
  return out;
}

// Compares the encoder with the naive OMP on every column of `vectors`. Where the two
// choose different atoms, the naive correlations of both must tie to within
// 1e-4·‖x‖ (fp32 against fp64 rounding); such vectors are counted, not compared
// further, and must be rare. Elsewhere the coefficients agree to 1e-4 relative.
void expect_agreement(const Dictionary& dictionary, const Eigen::MatrixXf& vectors, const OmpOptions& options,
                      const std::string& what) {
  OmpEncoder encoder(dictionary, options);
  const SparseCodes codes = encoder.encode(vectors);
  const Eigen::MatrixXd atoms = dictionary.atoms().cast<double>();
  int ties = 0;
  double worst_coef = 0.0;
  for (Eigen::Index b = 0; b < vectors.cols(); ++b) {
    const Eigen::VectorXd x = vectors.col(b).cast<double>();
    const NaiveOmp ref = naive_omp(atoms, x, options);
    const int count = codes.counts(b);
    std::size_t same = 0;
    while (same < ref.atoms.size() && static_cast<int>(same) < count &&
           codes.indices(static_cast<Eigen::Index>(same), b) == ref.atoms[same])
      ++same;
    if (same == ref.atoms.size() && static_cast<int>(same) == count) {
      const double scale = ref.coefs.cwiseAbs().maxCoeff();
      for (int i = 0; i < count; ++i) {
        const double error = std::abs(codes.coefficients(i, b) - ref.coefs(i)) / scale;
        worst_coef = std::max(worst_coef, error);
        ASSERT_LE(error, 1e-4) << what << ": vector " << b << " slot " << i << ": " << codes.coefficients(i, b)
                               << " vs naive " << ref.coefs(i);
      }
      continue;
    }
    // First divergence: both picks must be (near-)ties of the naive correlations.
    ASSERT_LT(static_cast<int>(same), count) << what << ": vector " << b << " stopped early at " << count;
    ASSERT_LT(same, ref.atoms.size()) << what << ": vector " << b << " went on past the naive OMP";
    const std::vector<int> prefix(ref.atoms.begin(), ref.atoms.begin() + static_cast<std::ptrdiff_t>(same));
    const Eigen::VectorXd r =
        prefix.empty() ? x : residual_of(atoms, prefix, least_squares(atoms, prefix, x), x);
    const double ours = std::abs(atoms.col(codes.indices(static_cast<Eigen::Index>(same), b)).dot(r));
    const double theirs = std::abs(atoms.col(ref.atoms[same]).dot(r));
    ASSERT_LE(theirs - ours, 1e-4 * x.norm())
        << what << ": vector " << b << " step " << same << " chose atom "
        << codes.indices(static_cast<Eigen::Index>(same), b) << " (|corr| " << ours << "), naive chose "
        << ref.atoms[same] << " (|corr| " << theirs << ")";
    ++ties;
  }
  EXPECT_LE(ties, std::max<Eigen::Index>(1, vectors.cols() / 50)) << what << ": too many near-ties";
  std::printf("[ %s ] %lld vectors, %d near-ties, worst coefficient error %.2e\n", what.c_str(),
              static_cast<long long>(vectors.cols()), ties, worst_coef);
}

// Real KV vectors: `count` vectors of dimension d from a raw little-endian f32 file
// laid out [layer][position][kv_head][head_dim], one vector per column.
Eigen::MatrixXf read_f32_vectors(const std::string& path, int d) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return {};
  const std::streamsize bytes = in.tellg();
  in.seekg(0);
  Eigen::MatrixXf out(d, bytes / 4 / d);
  in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size() * 4));
  return out;
}

Eigen::MatrixXf read_proxy_vectors(const std::string& dir, char kind) {
  const std::string path = dir + "/golden/dev_window.safetensors";
  if (!std::ifstream(path)) return {};
  lexico::SafetensorsFile file(path);
  const auto& shape = file.tensor(std::string(1, kind) + ".0").shape;  // [kv_heads, positions, head_dim]
  const int d = static_cast<int>(shape[2]);
  Eigen::MatrixXf out(d, 0);
  for (int layer = 0; file.contains(std::string(1, kind) + "." + std::to_string(layer)); ++layer) {
    const std::vector<float> values = file.read_f32(std::string(1, kind) + "." + std::to_string(layer));
    const Eigen::Index first = out.cols();
    out.conservativeResize(d, first + static_cast<Eigen::Index>(values.size()) / d);
    std::copy(values.begin(), values.end(), out.col(first).data());
  }
  return out;
}

// Train-free dictionary of real vectors: `atoms` random vectors (normalised by
// Dictionary); `coded` other vectors to encode.
std::pair<Dictionary, Eigen::MatrixXf> split_real(const Eigen::MatrixXf& vectors, int atoms, int coded,
                                                  std::uint32_t seed) {
  std::vector<Eigen::Index> order(static_cast<std::size_t>(vectors.cols()));
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<Eigen::Index>(i);
  std::shuffle(order.begin(), order.end(), std::mt19937(seed));
  Eigen::MatrixXf dictionary(vectors.rows(), atoms), rest(vectors.rows(), coded);
  for (int i = 0; i < atoms; ++i) dictionary.col(i) = vectors.col(order[static_cast<std::size_t>(i)]);
  for (int i = 0; i < coded; ++i) rest.col(i) = vectors.col(order[static_cast<std::size_t>(atoms + i)]);
  return {Dictionary(dictionary), rest};
}

std::string shared_data(const std::string& relative) { return std::string(LEXICO_SHARED_DATA) + "/" + relative; }

TEST(Omp, AgreesWithNaiveOmpOnRandomData) {
  std::mt19937 rng(7);
  const Dictionary dictionary = random_dictionary(64, 1024, 1);
  const Eigen::MatrixXf vectors = gaussian(64, 300, rng);
  // s = 24 also runs the kernel whose column count is not fixed at compile time.
  // Fewer vectors at large s keep the naive reference (and sanitizer runs) quick.
  for (int s : {1, 4, 8, 16, 24}) {
    const Eigen::Index count = s <= 8 ? 300 : 60;
    expect_agreement(dictionary, vectors.leftCols(count), OmpOptions{s}, "random s=" + std::to_string(s));
  }
}

TEST(Omp, AgreesWithNaiveOmpOnWideDictionary) {
  std::mt19937 rng(8);
  const Dictionary dictionary = random_dictionary(128, 2048, 2);
  expect_agreement(dictionary, gaussian(128, 60, rng), OmpOptions{8}, "random d=128 N=2048 s=8");
}

TEST(Omp, AgreesWithNaiveOmpOnRealKeysAndValues) {
  int checked = 0;
  for (const char* model : {"proxy-lm-hd64", "proxy-lm-hd128"}) {
    for (char kind : {'k', 'v'}) {
      const Eigen::MatrixXf vectors = read_proxy_vectors(shared_data(model), kind);
      if (vectors.size() == 0) continue;
      auto [dictionary, coded] = split_real(vectors, 1024, 100, 11);
      expect_agreement(dictionary, coded, OmpOptions{8}, std::string(model) + " " + kind + " s=8");
      ++checked;
    }
  }
  struct Golden {
    const char* path;
    int head_dim, atoms, sparsity;
  };
  for (const Golden& g : {Golden{"stories260k/golden/k_cache.f32", 8, 256, 4},
                          Golden{"stories260k/golden/v_cache.f32", 8, 256, 4},
                          Golden{"tinystories-656k/golden/k_cache.f32", 16, 512, 6},
                          Golden{"tinystories-656k/golden/v_cache.f32", 16, 512, 6}}) {
    const Eigen::MatrixXf vectors = read_f32_vectors(shared_data(g.path), g.head_dim);
    if (vectors.size() == 0) continue;
    auto [dictionary, coded] = split_real(vectors, g.atoms, 150, 12);
    expect_agreement(dictionary, coded, OmpOptions{g.sparsity},
                     std::string(g.path) + " s=" + std::to_string(g.sparsity));
    ++checked;
  }
  if (checked == 0) GTEST_SKIP() << "no real KV vectors under " << LEXICO_SHARED_DATA;
}

// Vectors that one atom nearly explains (a repeated token's key that a learned atom
// matches, as in real KV caches): after the first atom the residual is far below the
// fp16 Gram's error at ‖x‖'s scale, so the encoder must re-base its pass on exact
// correlations and still follow the fp32 OMP: every atom the naive OMP takes, and a
// residual as small. The atoms are rounded to fp16 as a CodeSpace's are, so their
// norms differ from 1 by more than these residuals.
TEST(Omp, FollowsTheNaiveOmpWhenOneAtomNearlyExplainsTheVector) {
  std::mt19937 rng(21);
  const int d = 128, s = 8;
  const Dictionary dictionary = random_dictionary(d, 1024, 9).rounded_to_fp16();
  Eigen::MatrixXf vectors(d, 48);
  for (Eigen::Index b = 0; b < vectors.cols(); ++b) {
    const float noise = b % 3 == 0 ? 1e-2f : b % 3 == 1 ? 1e-3f : 3e-4f;
    const Eigen::VectorXf e = gaussian(d, 1, rng);
    vectors.col(b) = 30.0f * dictionary.atoms().col(static_cast<Eigen::Index>(b) * 17) + noise * 30.0f * e / e.norm();
  }
  const OmpOptions options{s};
  const SparseCodes codes = OmpEncoder(dictionary, options).encode(vectors);
  const Eigen::MatrixXf decoded = lexico::reconstruct(dictionary, codes);
  for (Eigen::Index b = 0; b < vectors.cols(); ++b) {
    const NaiveOmp ref = naive_omp(dictionary.atoms().cast<double>(), vectors.col(b).cast<double>(), options);
    ASSERT_EQ(codes.counts(b), static_cast<int>(ref.atoms.size())) << "vector " << b;
    EXPECT_EQ(codes.indices(0, b), ref.atoms[0]) << "vector " << b;
    const double ours = (vectors.col(b) - decoded.col(b)).cast<double>().norm(), theirs = ref.residual.norm();
    EXPECT_LE(ours, theirs * 1.02 + 1e-6 * vectors.col(b).norm()) << "vector " << b;
  }
}

TEST(Omp, RecoversSparseSignalsExactly) {
  // d well above 2·s·ln N, where OMP recovers random supports with high probability.
  const int d = 128, n = 512, s = 6;
  const Dictionary dictionary = random_dictionary(d, n, 3);
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> atom(0, n - 1);
  std::uniform_real_distribution<float> magnitude(1.0f, 2.0f);
  const int count = 50;
  Eigen::MatrixXf vectors = Eigen::MatrixXf::Zero(d, count);
  std::vector<std::vector<int>> truth(count);
  for (int b = 0; b < count; ++b) {
    while (static_cast<int>(truth[b].size()) < s) {
      const int a = atom(rng);
      if (std::find(truth[b].begin(), truth[b].end(), a) != truth[b].end()) continue;
      truth[b].push_back(a);
      vectors.col(b) += (rng() % 2 ? 1.0f : -1.0f) * magnitude(rng) * dictionary.atoms().col(a);
    }
  }
  // With s = 12 the encoder must stop by itself once the residual vanishes.
  for (int sparsity : {s, 12}) {
    const SparseCodes codes = OmpEncoder(dictionary, OmpOptions{sparsity}).encode(vectors);
    const Eigen::MatrixXf rebuilt = lexico::reconstruct(dictionary, codes);
    for (int b = 0; b < count; ++b) {
      ASSERT_EQ(codes.counts(b), s) << "vector " << b << " with sparsity " << sparsity;
      std::vector<int> found(codes.indices.col(b).data(), codes.indices.col(b).data() + s);
      std::sort(found.begin(), found.end());
      std::vector<int> expected = truth[b];
      std::sort(expected.begin(), expected.end());
      EXPECT_EQ(found, expected) << "vector " << b;
      EXPECT_LE((rebuilt.col(b) - vectors.col(b)).norm(), 1e-5f * vectors.col(b).norm()) << "vector " << b;
    }
  }
}

TEST(Omp, ResidualNeverGrowsAndSupportsNest) {
  std::mt19937 rng(9);
  const Dictionary dictionary = random_dictionary(32, 256, 4);
  const Eigen::MatrixXf vectors = gaussian(32, 40, rng);
  Eigen::VectorXf previous = vectors.colwise().norm().transpose();
  SparseCodes longest = OmpEncoder(dictionary, OmpOptions{12}).encode(vectors);
  for (int s = 1; s <= 12; ++s) {
    const SparseCodes codes = OmpEncoder(dictionary, OmpOptions{s}).encode(vectors);
    const Eigen::MatrixXf rebuilt = lexico::reconstruct(dictionary, codes);
    for (Eigen::Index b = 0; b < vectors.cols(); ++b) {
      ASSERT_EQ(codes.counts(b), s);
      for (int i = 0; i < s; ++i) ASSERT_EQ(codes.indices(i, b), longest.indices(i, b)) << "greedy prefix";
      const float norm = (vectors.col(b) - rebuilt.col(b)).norm();
      EXPECT_LE(norm, previous(b) * (1 + 1e-6f)) << "vector " << b << " at s=" << s;
      previous(b) = norm;
    }
  }
}

TEST(Omp, ToleranceStopsEarlyAndReportsCount) {
  std::mt19937 rng(10);
  const Dictionary dictionary = random_dictionary(32, 512, 5);
  // Vectors of 1 to 10 atoms plus a little noise: their codes need different counts.
  Eigen::MatrixXf vectors = 0.01f * gaussian(32, 60, rng);
  for (Eigen::Index b = 0; b < vectors.cols(); ++b)
    for (int i = 0; i <= b % 10; ++i) vectors.col(b) += gaussian(1, 1, rng)(0) * dictionary.atoms().col(rng() % 512);
  const float tolerance = 0.2f;
  const int s = 16;
  const SparseCodes codes = OmpEncoder(dictionary, OmpOptions{s, tolerance}).encode(vectors);
  const Eigen::MatrixXf rebuilt = lexico::reconstruct(dictionary, codes);
  int early = 0;
  for (Eigen::Index b = 0; b < vectors.cols(); ++b) {
    const int count = codes.counts(b);
    const float norm = vectors.col(b).norm();
    ASSERT_GE(count, 1);
    EXPECT_LE((vectors.col(b) - rebuilt.col(b)).norm(), tolerance * norm * (1 + 1e-5f)) << "vector " << b;
    for (int i = count; i < s; ++i) {
      EXPECT_EQ(codes.coefficients(i, b), 0.0f);
      EXPECT_EQ(codes.indices(i, b), 0);
    }
    if (count < s) ++early;
    if (count > 1) {  // one atom fewer would not have met the tolerance
      const SparseCodes shorter = OmpEncoder(dictionary, OmpOptions{count - 1}).encode(vectors.col(b));
      const Eigen::VectorXf partial = lexico::reconstruct(dictionary, shorter).col(0);
      EXPECT_GT((vectors.col(b) - partial).norm(), tolerance * norm * (1 - 1e-5f)) << "vector " << b;
    }
  }
  EXPECT_GT(early, 50);
  // Agreement with the naive OMP holds in tolerance mode too.
  expect_agreement(dictionary, vectors, OmpOptions{s, tolerance}, "tolerance 0.2");
}

// A dictionary with a near-duplicate pair: e1 and a = cos θ e1 + sin θ e_d (θ = 1e-3),
// the other atoms e2..e_{d-1}, plus random atoms. x = e1 + e_d lies in span(e1, a), so
// a plain OMP picks a, then e1, and needs coefficients ~ 1/θ.
TEST(Omp, NearDuplicateAtomsKeepCoefficientsBounded) {
  const int d = 16;
  const float theta = 1e-3f;
  Eigen::MatrixXf atoms = Eigen::MatrixXf::Zero(d, d);
  for (int i = 0; i < d - 1; ++i) atoms(i, i) = 1.0f;
  atoms(0, d - 1) = std::cos(theta);
  atoms(d - 1, d - 1) = std::sin(theta);
  const Dictionary dictionary(atoms);
  Eigen::MatrixXf vectors = Eigen::MatrixXf::Zero(d, 3);
  vectors(0, 0) = vectors(d - 1, 0) = 1.0f;                    // e1 + e_d
  vectors(0, 1) = 5.0f, vectors(d - 1, 1) = -3.0f, vectors(2, 1) = 1.0f;
  vectors.col(2) = 1e3f * vectors.col(0);

  const OmpOptions options{4};
  const Eigen::MatrixXd exact = dictionary.atoms().cast<double>();
  const NaiveOmp plain = naive_omp(exact, vectors.col(0).cast<double>(), options, /*skip=*/false);
  EXPECT_GT(plain.coefs.cwiseAbs().maxCoeff(), 100.0) << "the plain OMP should blow up here";

  const SparseCodes codes = OmpEncoder(dictionary, options).encode(vectors);
  for (Eigen::Index b = 0; b < vectors.cols(); ++b) {
    const float norm = vectors.col(b).norm();
    for (int i = 0; i < codes.counts(b); ++i) {
      ASSERT_TRUE(std::isfinite(codes.coefficients(i, b)));
      EXPECT_LE(std::abs(codes.coefficients(i, b)), 10 * norm) << "vector " << b << " slot " << i;
    }
    const std::vector<std::uint16_t> chosen(codes.indices.col(b).data(),
                                            codes.indices.col(b).data() + codes.counts(b));
    const bool has_e1 = std::count(chosen.begin(), chosen.end(), 0) > 0;
    const bool has_a = std::count(chosen.begin(), chosen.end(), d - 1) > 0;
    EXPECT_FALSE(has_e1 && has_a) << "vector " << b << " uses both near-duplicates";
  }

  // Exactly repeated atoms in a random dictionary: no NaN, bounded, never both.
  std::mt19937 rng(12);
  Eigen::MatrixXf repeated = gaussian(d, 64, rng);
  for (int i = 0; i < 8; ++i) repeated.col(32 + i) = repeated.col(i);
  const Dictionary twins(repeated);
  const Eigen::MatrixXf x = twins.atoms().leftCols(8) * gaussian(8, 20, rng);
  const SparseCodes twin_codes = OmpEncoder(twins, OmpOptions{8}).encode(x);
  for (Eigen::Index b = 0; b < x.cols(); ++b)
    for (int i = 0; i < twin_codes.counts(b); ++i) {
      ASSERT_TRUE(std::isfinite(twin_codes.coefficients(i, b)));
      EXPECT_LE(std::abs(twin_codes.coefficients(i, b)), 10 * x.col(b).norm());
      for (int j = 0; j < i; ++j) {
        const int a = twin_codes.indices(i, b), c = twin_codes.indices(j, b);
        EXPECT_FALSE(std::abs(a - c) == 32 && std::min(a, c) < 8) << "twins " << a << " and " << c;
      }
    }
}

TEST(Omp, ZeroAndTinyVectors) {
  const Dictionary dictionary = random_dictionary(16, 128, 6);
  std::mt19937 rng(13);
  Eigen::MatrixXf vectors = Eigen::MatrixXf::Zero(16, 3);
  vectors.col(1) = 1e-30f * gaussian(16, 1, rng);
  vectors.col(2) = dictionary.atoms().col(7) * 1e-20f;
  const SparseCodes codes = OmpEncoder(dictionary, OmpOptions{4}).encode(vectors);
  EXPECT_EQ(codes.counts(0), 0);
  EXPECT_TRUE(codes.coefficients.allFinite());
  EXPECT_EQ(codes.coefficients.col(0).cwiseAbs().maxCoeff(), 0.0f);
  EXPECT_GE(codes.counts(1), 1);
  ASSERT_GE(codes.counts(2), 1);
  EXPECT_EQ(codes.indices(0, 2), 7);
  EXPECT_NEAR(codes.coefficients(0, 2), 1e-20f, 1e-25f);
  EXPECT_EQ(OmpEncoder(dictionary, OmpOptions{4}).encode(Eigen::MatrixXf(16, 0)).vectors(), 0);
}

// Runs f, which must throw lexico::error with `expected` in its message.
template <typename F>
void expect_error(F&& f, const std::string& expected) {
  std::string message = "(no lexico::error thrown)";
  try {
    f();
  } catch (const lexico::error& e) {
    message = e.what();
  }
  EXPECT_NE(message.find(expected), std::string::npos) << "message: " << message << "\nexpected: " << expected;
}

TEST(Omp, BadInputThrowsWithContext) {
  const Dictionary dictionary = random_dictionary(16, 64, 7);
  expect_error([&] { OmpEncoder(dictionary, OmpOptions{17}); }, "exceeds the dimension d = 16");
  expect_error([&] { OmpEncoder(random_dictionary(16, 8, 1), OmpOptions{12}); }, "exceeds the atom count N = 8");
  expect_error([&] { OmpEncoder(dictionary, OmpOptions{0}); }, "sparsity s = 0");
  expect_error([&] { OmpEncoder(random_dictionary(256, 300, 1), OmpOptions{256}); }, "sparsity s = 256");
  expect_error([&] { OmpEncoder(dictionary, OmpOptions{4, -0.1f}); }, "tolerance");
  expect_error([&] { OmpEncoder(dictionary, OmpOptions{4, std::nanf("")}); }, "tolerance");
  expect_error([&] { OmpEncoder(dictionary, OmpOptions{4, 0.0f, 1.5f}); }, "pivot_threshold");
  expect_error([&] { OmpEncoder(dictionary, OmpOptions{4, 0.0f, 1e-4f, -1}); }, "threads");
  // More than 65,536 atoms cannot be indexed by uint16; the dictionary refuses them.
  expect_error([&] { Dictionary(Eigen::MatrixXf::Ones(1, 65537)); }, "65536");

  OmpEncoder encoder(dictionary, OmpOptions{4});
  expect_error([&] { encoder.encode(Eigen::MatrixXf::Ones(15, 3)); },
               "vectors have dimension 15, the dictionary has d = 16");
  Eigen::MatrixXf bad = Eigen::MatrixXf::Ones(16, 5);
  bad(4, 3) = std::nanf("");
  expect_error([&] { encoder.encode(bad); }, "vector 3 has nan at entry 4");
  bad(4, 3) = -std::numeric_limits<float>::infinity();
  expect_error([&] { encoder.encode(bad); }, "vector 3 has -inf at entry 4");
  bad(4, 3) = 1e19f;
  expect_error([&] { encoder.encode(bad); }, "vector 3 has norm");
  // The output is untouched when the input is refused.
  SparseCodes codes;
  EXPECT_THROW(encoder.encode(bad, codes), lexico::error);
  EXPECT_EQ(codes.vectors(), 0);
}

TEST(Omp, StoredPrecisionRoundTripsAndNeverOverflows) {
  std::mt19937 rng(14);
  const Dictionary dictionary = random_dictionary(32, 256, 8);
  Eigen::MatrixXf vectors = gaussian(32, 50, rng);
  vectors.col(0) *= 1e6f / vectors.col(0).norm();   // coefficients far above 448
  vectors.col(1) *= 1e-6f / vectors.col(1).norm();  // and far below 2^-9
  vectors.col(2).setZero();
  const SparseCodes codes = OmpEncoder(dictionary, OmpOptions{8}).encode(vectors);
  const SparseCodes back = lexico::stored_precision(codes);
  ASSERT_EQ(back.vectors(), codes.vectors());
  EXPECT_EQ(back.indices, codes.indices);
  EXPECT_EQ(back.counts, codes.counts);
  ASSERT_TRUE(back.coefficients.allFinite());
  for (Eigen::Index b = 0; b < codes.vectors(); ++b) {
    const float largest = codes.coefficients.col(b).cwiseAbs().maxCoeff();
    for (int i = 0; i < 8; ++i) {
      const float c = codes.coefficients(i, b), r = back.coefficients(i, b);
      // E4M3: 3 mantissa bits (relative step 2^-3, rounding error <= 2^-4); the
      // largest coefficient maps into [224, 448], so subnormals start 2^-9·largest/224.
      EXPECT_LE(std::abs(r - c), std::max(std::abs(c) / 16, largest / 224 / 1024)) << b << "," << i;
    }
  }
  const Eigen::MatrixXf original = lexico::reconstruct(dictionary, codes);
  const Eigen::MatrixXf decoded = lexico::reconstruct(dictionary, back);
  EXPECT_LE((original.col(0) - decoded.col(0)).norm(), 0.1f * original.col(0).norm());
  EXPECT_EQ(back.coefficients.col(2).cwiseAbs().maxCoeff(), 0.0f);
}

TEST(Omp, ThreadsChunksAndLayoutsGiveTheSameCodes) {
  std::mt19937 rng(15);
  const Dictionary dictionary = random_dictionary(48, 300, 9);  // N not a multiple of 32 or 64
  const Eigen::MatrixXf vectors = gaussian(48, 157, rng);
  const SparseCodes one = OmpEncoder(dictionary, OmpOptions{7, 0.0f, 1e-4f, 1}).encode(vectors);
  const SparseCodes two = OmpEncoder(dictionary, OmpOptions{7, 0.0f, 1e-4f, 2}).encode(vectors);
  EXPECT_EQ(one.indices, two.indices);
  EXPECT_EQ(one.coefficients, two.coefficients);
  EXPECT_EQ(one.counts, two.counts);
  OmpEncoder encoder(dictionary, OmpOptions{7});
  for (Eigen::Index first : {0, 5, 100}) {
    for (Eigen::Index count : {1, 3, 13, 57}) {
      if (first + count > vectors.cols()) continue;
      const SparseCodes part = encoder.encode(vectors.middleCols(first, count));
      EXPECT_EQ(part.indices, one.indices.middleCols(first, count)) << first << "+" << count;
      EXPECT_EQ(part.coefficients, one.coefficients.middleCols(first, count)) << first << "+" << count;
    }
  }
  // A row-major tokens x d buffer (the KV-cache layout) passes as its transpose,
  // viewed in place.
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const RowMajor tokens = vectors.transpose();
  const Eigen::Ref<const Eigen::MatrixXf> view = tokens.transpose();
  EXPECT_EQ(view.data(), tokens.data());
  const SparseCodes from_rows = encoder.encode(view);
  EXPECT_EQ(from_rows.indices, one.indices);
}

}  // namespace
