#pragma once
// Dictionary learning: a d x N dictionary of unit-norm atoms that OMP codes a stream
// of vectors (KV vectors of one layer, K or V) with small ||x − D c||².
//
// Every method alternates the same two steps on mini-batches of the stream:
//   coding   c = OMP(x; D, s)              (fixed codes: no gradient through OMP)
//   update   D from the batch and its codes, then atoms back to unit norm
// and differs only in the update:
//   lexico   Adam on the sphere, Lexico's rule (Kim et al., ICML 2025, arXiv
//            2412.08890; krafton-ai/lexico dictionary_learning/model.py): atoms
//            renormalised and the gradient's component along each atom removed
//            before the step; renormalised again after it (the reference forgets).
//   mod      Method of Optimal Directions (Engan, Aase, Husøy 1999) on statistics
//            with forgetting (Skretting & Engan's RLS-DL idea): A ← βA + CCᵀ,
//            B ← βB + XCᵀ, D = (B + λD_old)(A + λI)⁻¹ — the proximal term keeps atoms
//            the batch does not see where they were.
//   ksvd     approximate K-SVD (Rubinstein, Zibulevsky, Elad, Technion CS-2008-08):
//            per atom one alternating rank-1 step on the residual of the signals
//            that use it, d = E g / ||E g||, g = Eᵀ d, no SVD.
// Atoms that go unused, and the less used of two near-duplicates, are replaced by
// badly coded vectors, never by a direction close to an existing atom.
//
// Deterministic for a given seed and thread count.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "../coding/dictionary.hpp"
#include "../base/error.hpp"
#include "../coding/omp.hpp"

namespace lexico {

enum class TrainMethod { lexico, mod, ksvd };
enum class TrainInit { samples, kmeans_pp };

inline const char* to_string(TrainMethod method) {
  switch (method) {
    case TrainMethod::lexico: return "lexico";
    case TrainMethod::mod: return "mod";
    case TrainMethod::ksvd: return "ksvd";
  }
  return "?";
}

inline const char* to_string(TrainInit init) { return init == TrainInit::samples ? "samples" : "kmeans++"; }

inline TrainMethod parse_train_method(const std::string& name) {
  for (const TrainMethod m : {TrainMethod::lexico, TrainMethod::mod, TrainMethod::ksvd})
    if (name == to_string(m)) return m;
  throw error(detail::concat("unknown training method '", name, "' (expected lexico, mod or ksvd)"));
}

inline TrainInit parse_train_init(const std::string& name) {
  for (const TrainInit i : {TrainInit::samples, TrainInit::kmeans_pp})
    if (name == to_string(i)) return i;
  throw error(detail::concat("unknown initialisation '", name, "' (expected samples or kmeans++)"));
}

struct TrainOptions {
  int atoms = 4096;   // N
  int sparsity = 8;   // s used for coding while training
  TrainMethod method = TrainMethod::ksvd;
  TrainInit init = TrainInit::kmeans_pp;
  Eigen::Index vectors = Eigen::Index(1) << 20;  // vectors drawn from the stream in all
  Eigen::Index batch = 0;                        // vectors per update; 0: default_batch(method)
  Eigen::Index init_sample = 0;                  // vectors seen by the initialisation; 0: 8N
  // lexico: Adam with cosine decay to 0 over the run; 0 = default_learning_rate.
  float learning_rate = 0.0f;
  float beta1 = 0.9f, beta2 = 0.999f, adam_epsilon = 1e-8f;
  // mod: statistics decay by exp(−batch / memory); λ = ridge · mean(diag A).
  Eigen::Index mod_memory = Eigen::Index(1) << 18;
  float mod_ridge = 1e-3f;
  // Atom upkeep, checked every dead_window vectors: atoms used at most dead_usage
  // times in the window, and the less used atom of any pair with |cos| above
  // duplicate_coherence, are replaced; a replacement must have |cos| below
  // accept_coherence with every atom.
  Eigen::Index dead_window = Eigen::Index(1) << 16;
  Eigen::Index dead_usage = 0;
  float duplicate_coherence = 0.99f;
  float accept_coherence = 0.95f;
  std::uint64_t seed = 0;
  int threads = 0;  // OpenMP threads for OMP coding; 0: all
};

inline Eigen::Index default_batch(TrainMethod method) {
  switch (method) {
    case TrainMethod::lexico: return 4096;
    case TrainMethod::mod: return 32768;
    case TrainMethod::ksvd: return 32768;
  }
  return 4096;
}

// Adam's step size for batches of thousands: the reference's 1e-4 is for 64 vectors
// and 560 k steps; ~100x fewer, larger steps need a larger rate. On proxy KV vectors
// (N = 1024..4096, batches of 1024..4096) 5e-3 coded better than 2e-3.
inline float default_learning_rate() { return 5e-3f; }

// An endless stream of d-dimensional vectors (after a pass over its data it starts
// another, reshuffled).
class VectorSource {
 public:
  virtual ~VectorSource() = default;
  virtual int dim() const = 0;
  // Fills every column of `out` (dim() x B) with the next B vectors.
  virtual void next(Eigen::Ref<Eigen::MatrixXf> out) = 0;
};

namespace detail {

// Fisher–Yates with the library's own draw, so the order is the same everywhere.
inline std::uint64_t draw_below(std::mt19937_64& rng, std::uint64_t bound) {
  // Rejection keeps the draw unbiased; bound is tiny next to 2^64.
  const std::uint64_t limit = std::numeric_limits<std::uint64_t>::max() - std::numeric_limits<std::uint64_t>::max() % bound;
  std::uint64_t value;
  do value = rng();
  while (value >= limit);
  return value % bound;
}

template <typename Index>
void shuffle(std::vector<Index>& items, std::mt19937_64& rng) {
  for (std::size_t i = items.size(); i > 1; --i)
    std::swap(items[i - 1], items[static_cast<std::size_t>(draw_below(rng, i))]);
}

inline double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

}  // namespace detail

// The columns of a d x M matrix, in a new random order every pass.
class MatrixSource final : public VectorSource {
 public:
  MatrixSource(Eigen::MatrixXf vectors, std::uint64_t seed) : vectors_(std::move(vectors)), rng_(seed) {
    require(vectors_.cols() > 0 && vectors_.rows() > 0, "MatrixSource: no vectors");
    order_.resize(static_cast<std::size_t>(vectors_.cols()));
    std::iota(order_.begin(), order_.end(), Eigen::Index(0));
    position_ = order_.size();
  }
  int dim() const override { return static_cast<int>(vectors_.rows()); }
  void next(Eigen::Ref<Eigen::MatrixXf> out) override {
    require(out.rows() == vectors_.rows(), "MatrixSource::next: asked for dimension ", out.rows(), ", holds ",
            vectors_.rows());
    for (Eigen::Index b = 0; b < out.cols(); ++b) {
      if (position_ == order_.size()) {
        detail::shuffle(order_, rng_);
        position_ = 0;
      }
      out.col(b) = vectors_.col(order_[position_++]);
    }
  }

 private:
  Eigen::MatrixXf vectors_;
  std::mt19937_64 rng_;
  std::vector<Eigen::Index> order_;
  std::size_t position_ = 0;
};

namespace detail {

// Scales columns to unit norm; a zero column stays zero (the trainer replaces it).
inline void normalise_columns(Eigen::MatrixXf& atoms) {
  for (Eigen::Index j = 0; j < atoms.cols(); ++j) {
    const float norm = atoms.col(j).norm();
    if (norm > 0) atoms.col(j) /= norm;
  }
}

// R = X − D C, one column per vector.
inline void code_residual(const Eigen::MatrixXf& atoms, const Eigen::Ref<const Eigen::MatrixXf>& vectors,
                          const SparseCodes& codes, Eigen::MatrixXf& residual) {
  residual = vectors;
  const Eigen::Index count = vectors.cols();
#pragma omp parallel for schedule(static) if (count >= 4096)
  for (Eigen::Index b = 0; b < count; ++b)
    for (int i = 0; i < codes.counts(b); ++i) residual.col(b) -= codes.coefficients(i, b) * atoms.col(codes.indices(i, b));
}

// Mean of ||r|| / ||x|| over the vectors with ||x|| > 0.
inline double mean_relative_error(const Eigen::Ref<const Eigen::MatrixXf>& vectors, const Eigen::MatrixXf& residual) {
  double sum = 0;
  Eigen::Index counted = 0;
  for (Eigen::Index b = 0; b < vectors.cols(); ++b) {
    const double norm = vectors.col(b).norm();
    if (norm > 0) {
      sum += residual.col(b).norm() / norm;
      ++counted;
    }
  }
  return counted ? sum / static_cast<double>(counted) : 0.0;
}

}  // namespace detail

// Mean relative error ||x − x̂|| / ||x|| of the vectors (d x M, zero vectors
// skipped) coded by OMP with `sparsity` atoms; with fp8, the coefficients go through
// the stored form (FP8 E4M3 with a per-vector scale) before reconstruction.
inline double relative_coding_error(const Dictionary& dictionary, const Eigen::Ref<const Eigen::MatrixXf>& vectors,
                                    int sparsity, bool fp8, int threads = 0) {
  OmpOptions options;
  options.sparsity = sparsity;
  options.threads = threads;
  OmpEncoder encoder(dictionary, options);
  SparseCodes codes = encoder.encode(vectors);
  if (fp8) codes = stored_precision(std::move(codes));
  Eigen::MatrixXf residual;
  detail::code_residual(dictionary.atoms(), vectors, codes, residual);
  return detail::mean_relative_error(vectors, residual);
}

// Adam on the unit sphere, one moment pair per atom entry and a step count per atom
// (a replaced atom restarts its bias correction).
class SphereAdam {
 public:
  SphereAdam(Eigen::Index dim, Eigen::Index atoms, float beta1 = 0.9f, float beta2 = 0.999f, float epsilon = 1e-8f)
      : m_(Eigen::MatrixXf::Zero(dim, atoms)), v_(Eigen::MatrixXf::Zero(dim, atoms)),
        steps_(static_cast<std::size_t>(atoms), 0), beta1_(beta1), beta2_(beta2), epsilon_(epsilon) {
    require(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1 && epsilon > 0, "SphereAdam: betas must lie in [0, 1) ",
            "and epsilon be positive (got ", beta1, ", ", beta2, ", ", epsilon, ")");
  }

  // `gradient` is ∂loss/∂D at the current atoms; it is projected in place.
  void step(Eigen::MatrixXf& atoms, Eigen::MatrixXf& gradient, float learning_rate) {
    require(atoms.rows() == m_.rows() && atoms.cols() == m_.cols() && gradient.rows() == atoms.rows() &&
                gradient.cols() == atoms.cols(),
            "SphereAdam::step: atoms ", atoms.rows(), "x", atoms.cols(), ", gradient ", gradient.rows(), "x",
            gradient.cols(), ", state ", m_.rows(), "x", m_.cols());
    detail::normalise_columns(atoms);
    for (Eigen::Index j = 0; j < atoms.cols(); ++j) {
      // Only the tangential part moves the atom on the sphere.
      gradient.col(j) -= atoms.col(j).dot(gradient.col(j)) * atoms.col(j);
      const int t = ++steps_[static_cast<std::size_t>(j)];
      m_.col(j) = beta1_ * m_.col(j) + (1 - beta1_) * gradient.col(j);
      v_.col(j) = beta2_ * v_.col(j) + (1 - beta2_) * gradient.col(j).cwiseAbs2();
      const float correct1 = 1 - std::pow(beta1_, static_cast<float>(t));
      const float correct2 = 1 - std::pow(beta2_, static_cast<float>(t));
      atoms.col(j).array() -=
          learning_rate * (m_.col(j).array() / correct1) / ((v_.col(j).array() / correct2).sqrt() + epsilon_);
    }
    detail::normalise_columns(atoms);
  }

  void reset(Eigen::Index atom) {
    m_.col(atom).setZero();
    v_.col(atom).setZero();
    steps_[static_cast<std::size_t>(atom)] = 0;
  }

 private:
  Eigen::MatrixXf m_, v_;
  std::vector<int> steps_;
  float beta1_, beta2_, epsilon_;
};

// Puts badly coded vectors in place of the atoms listed in `dead`. Candidates (d x M)
// are tried from the largest `badness` down; one is accepted only if its direction
// has |cos| < accept_coherence with every atom that stays and every atom placed
// before it, so no replacement nearly duplicates an atom. Returns the atoms replaced
// (a dead atom for which no candidate qualifies keeps its value).
inline std::vector<Eigen::Index> replace_atoms(Eigen::MatrixXf& atoms, const std::vector<Eigen::Index>& dead,
                                               const Eigen::Ref<const Eigen::MatrixXf>& candidates,
                                               const Eigen::Ref<const Eigen::VectorXf>& badness,
                                               float accept_coherence) {
  require(candidates.rows() == atoms.rows() && badness.size() == candidates.cols(), "replace_atoms: ",
          candidates.rows(), "x", candidates.cols(), " candidates and ", badness.size(), " badness values for ",
          atoms.rows(), "-dimensional atoms");
  std::vector<Eigen::Index> order(static_cast<std::size_t>(candidates.cols()));
  std::iota(order.begin(), order.end(), Eigen::Index(0));
  std::stable_sort(order.begin(), order.end(), [&](Eigen::Index a, Eigen::Index b) { return badness(a) > badness(b); });

  // Atoms still waiting for a replacement do not count in the coherence check.
  std::vector<char> pending(static_cast<std::size_t>(atoms.cols()), 0);
  for (const Eigen::Index j : dead) {
    require(j >= 0 && j < atoms.cols(), "replace_atoms: atom ", j, " outside [0, ", atoms.cols(), ")");
    pending[static_cast<std::size_t>(j)] = 1;
  }
  std::vector<Eigen::Index> replaced;
  std::size_t next = 0;
  Eigen::VectorXf direction(atoms.rows());
  for (const Eigen::Index j : dead) {
    for (; next < order.size(); ++next) {
      const float norm = candidates.col(order[next]).norm();
      if (!(norm > 0)) continue;
      direction = candidates.col(order[next]) / norm;
      const Eigen::VectorXf cosines = (atoms.transpose() * direction).cwiseAbs();
      bool distinct = true;
      for (Eigen::Index i = 0; i < atoms.cols() && distinct; ++i)
        distinct = pending[static_cast<std::size_t>(i)] || cosines(i) < accept_coherence;
      if (!distinct) continue;
      atoms.col(j) = direction;
      pending[static_cast<std::size_t>(j)] = 0;
      replaced.push_back(j);
      ++next;
      break;
    }
  }
  return replaced;
}

// Initial atoms from a sample of vectors (d x M, M >= N): `samples` takes random
// vectors, `kmeans_pp` draws each next vector with probability proportional to the
// energy it keeps after projection on the closest atom so far, ||x||² − max_j <a_j, x>²
// (k-means++ seeding, Arthur & Vassilvitskii 2007, with the sign-free rank-1 distance
// that OMP sees). Both skip zero vectors and directions within accept_coherence of a
// chosen atom. Data whose directions cluster too tightly to give N distinct ones (keys
// before RoPE in some layers) gets random unit atoms for the rest, which training uses
// or replaces like any other; `random_atoms`, if given, receives how many.
inline Eigen::MatrixXf initial_atoms(const Eigen::Ref<const Eigen::MatrixXf>& sample, int atoms, TrainInit init,
                                     std::uint64_t seed, float accept_coherence = 0.95f,
                                     Eigen::Index* random_atoms = nullptr) {
  const Eigen::Index count = sample.cols();
  require(atoms >= 1 && count >= atoms, "initial_atoms: ", atoms, " atoms need at least as many sample vectors, got ",
          count);
  std::mt19937_64 rng(seed);
  Eigen::MatrixXf chosen(sample.rows(), atoms);
  int filled = 0;
  auto accept = [&](Eigen::Index m) {
    const float norm = sample.col(m).norm();
    if (!(norm > 0)) return false;
    const Eigen::VectorXf direction = sample.col(m) / norm;
    if (filled > 0 && (chosen.leftCols(filled).transpose() * direction).cwiseAbs().maxCoeff() >= accept_coherence)
      return false;
    chosen.col(filled++) = direction;
    return true;
  };

  if (init == TrainInit::samples) {
    std::vector<Eigen::Index> order(static_cast<std::size_t>(count));
    std::iota(order.begin(), order.end(), Eigen::Index(0));
    detail::shuffle(order, rng);
    for (std::size_t i = 0; i < order.size() && filled < atoms; ++i) accept(order[i]);
  } else {
    const Eigen::VectorXd energy = sample.colwise().squaredNorm().transpose().cast<double>();
    Eigen::VectorXd left = energy;  // energy outside the closest chosen atom
    int failures = 0;
    while (filled < atoms && failures < 64) {
      const double total = left.sum();
      if (!(total > 0)) break;
      double target = detail::uniform01(rng) * total;
      Eigen::Index m = 0;
      while (m + 1 < count && target >= left(m)) target -= left(m++);
      if (!accept(m)) {
        left(m) = 0;  // a zero or near-duplicate direction: never draw it again
        ++failures;
        continue;
      }
      failures = 0;
      // One thread: N short passes would each pay a parallel region's barrier.
      const Eigen::VectorXf& atom = chosen.col(filled - 1);
      for (Eigen::Index i = 0; i < count; ++i) {
        const double projection = atom.dot(sample.col(i));
        left(i) = std::min(left(i), std::max(0.0, energy(i) - projection * projection));
      }
    }
    // Data that a few directions explain fully: fill up with random vectors.
    std::vector<Eigen::Index> order(static_cast<std::size_t>(count));
    std::iota(order.begin(), order.end(), Eigen::Index(0));
    detail::shuffle(order, rng);
    for (std::size_t i = 0; i < order.size() && filled < atoms; ++i) accept(order[i]);
  }
  require(filled > 0, "initial_atoms: every one of the ", count, " sample vectors is zero");
  const int from_sample = filled;
  std::normal_distribution<float> normal;
  for (int tries = 0; filled < atoms; ++tries) {
    require(tries < 64 * atoms, "initial_atoms: found no ", atoms, " directions pairwise |cos| < ", accept_coherence,
            " in dimension ", sample.rows());
    Eigen::VectorXf direction(sample.rows());
    for (Eigen::Index i = 0; i < direction.size(); ++i) direction(i) = normal(rng);
    direction.normalize();
    if ((chosen.leftCols(filled).transpose() * direction).cwiseAbs().maxCoeff() < accept_coherence)
      chosen.col(filled++) = direction;
  }
  if (random_atoms) *random_atoms = atoms - from_sample;
  return chosen;
}

// What one training step saw.
struct TrainProgress {
  Eigen::Index vectors = 0;  // drawn so far
  Eigen::Index total = 0;    // to draw in all
  double batch_error = 0;    // mean ||x − Dc|| / ||x|| of the batch, coded before the update
  Eigen::Index replaced = 0; // atoms replaced so far
  double seconds = 0;        // since training began
};
using TrainCallback = std::function<void(const TrainProgress&)>;

namespace detail {

// One dictionary update from a coded batch; `residual` is X − D C on entry and may
// be used as scratch.
class AtomUpdate {
 public:
  virtual ~AtomUpdate() = default;
  virtual void update(Eigen::MatrixXf& atoms, const Eigen::Ref<const Eigen::MatrixXf>& vectors, SparseCodes& codes,
                      Eigen::MatrixXf& residual, double progress) = 0;
  // Forgets what the update knew about a replaced atom.
  virtual void reset(Eigen::Index atom) = 0;
};

class AdamUpdate final : public AtomUpdate {
 public:
  AdamUpdate(Eigen::Index dim, const TrainOptions& options)
      : adam_(dim, options.atoms, options.beta1, options.beta2, options.adam_epsilon),
        rate_(options.learning_rate > 0 ? options.learning_rate : default_learning_rate()) {}

  void update(Eigen::MatrixXf& atoms, const Eigen::Ref<const Eigen::MatrixXf>&, SparseCodes& codes,
              Eigen::MatrixXf& residual, double progress) override {
    // ∂/∂D of mean_b ||x_b − D c_b||² is −(2/B) R Cᵀ: column j gathers the residuals
    // of the vectors that use atom j.
    gradient_.setZero(atoms.rows(), atoms.cols());
    const float scale = -2.0f / static_cast<float>(std::max<Eigen::Index>(1, residual.cols()));
    for (Eigen::Index b = 0; b < residual.cols(); ++b)
      for (int i = 0; i < codes.counts(b); ++i)
        gradient_.col(codes.indices(i, b)) += (scale * codes.coefficients(i, b)) * residual.col(b);
    const double cosine = 0.5 * (1 + std::cos(3.14159265358979323846 * std::min(1.0, progress)));
    adam_.step(atoms, gradient_, static_cast<float>(rate_ * cosine));
  }
  void reset(Eigen::Index atom) override { adam_.reset(atom); }

 private:
  SphereAdam adam_;
  double rate_;
  Eigen::MatrixXf gradient_;
};

class ModUpdate final : public AtomUpdate {
 public:
  ModUpdate(Eigen::Index dim, const TrainOptions& options)
      : gram_(Eigen::MatrixXf::Zero(options.atoms, options.atoms)), cross_(Eigen::MatrixXf::Zero(dim, options.atoms)),
        memory_(static_cast<double>(options.mod_memory)), ridge_(options.mod_ridge) {
    require(options.mod_memory > 0 && options.mod_ridge > 0, "mod: memory and ridge must be positive (got ",
            options.mod_memory, ", ", options.mod_ridge, ")");
  }

  void update(Eigen::MatrixXf& atoms, const Eigen::Ref<const Eigen::MatrixXf>& vectors, SparseCodes& codes,
              Eigen::MatrixXf&, double) override {
    const float decay = static_cast<float>(std::exp(-static_cast<double>(vectors.cols()) / memory_));
    gram_ *= decay;
    cross_ *= decay;
    for (Eigen::Index b = 0; b < vectors.cols(); ++b) {
      const int count = codes.counts(b);
      for (int i = 0; i < count; ++i) {
        const int a = codes.indices(i, b);
        const float ca = codes.coefficients(i, b);
        cross_.col(a) += ca * vectors.col(b);
        for (int k = 0; k < count; ++k) gram_(codes.indices(k, b), a) += ca * codes.coefficients(k, b);
      }
    }
    // Dᵀ = (A + λI)⁻¹ (B + λ D_old)ᵀ; A + λI is symmetric positive definite.
    const float lambda = ridge_ * std::max(gram_.diagonal().mean(), std::numeric_limits<float>::min());
    system_ = gram_;
    system_.diagonal().array() += lambda;
    rhs_.noalias() = (cross_ + lambda * atoms).transpose();
    Eigen::LLT<Eigen::MatrixXf> factor(system_);
    require(factor.info() == Eigen::Success, "mod: the regularised code Gram matrix is not positive definite");
    atoms.noalias() = factor.solve(rhs_).transpose();
    detail::normalise_columns(atoms);
  }

  void reset(Eigen::Index atom) override {
    gram_.row(atom).setZero();
    gram_.col(atom).setZero();
    cross_.col(atom).setZero();
  }

 private:
  Eigen::MatrixXf gram_;   // A = Σ c cᵀ, N x N
  Eigen::MatrixXf cross_;  // B = Σ x cᵀ, d x N
  Eigen::MatrixXf system_, rhs_;
  double memory_;
  float ridge_;
};

class KsvdUpdate final : public AtomUpdate {
 public:
  void update(Eigen::MatrixXf& atoms, const Eigen::Ref<const Eigen::MatrixXf>&, SparseCodes& codes,
              Eigen::MatrixXf& residual, double) override {
    // Who uses each atom: (vector, slot) pairs grouped by atom (counting sort).
    const Eigen::Index n = atoms.cols();
    start_.assign(static_cast<std::size_t>(n + 1), 0);
    for (Eigen::Index b = 0; b < codes.vectors(); ++b)
      for (int i = 0; i < codes.counts(b); ++i) ++start_[codes.indices(i, b) + 1u];
    std::partial_sum(start_.begin(), start_.end(), start_.begin());
    users_.resize(static_cast<std::size_t>(start_.back()));
    std::vector<Eigen::Index> fill(start_.begin(), start_.end() - 1);
    for (Eigen::Index b = 0; b < codes.vectors(); ++b)
      for (int i = 0; i < codes.counts(b); ++i)
        users_[static_cast<std::size_t>(fill[codes.indices(i, b)]++)] = {b, i};

    // Atoms in turn (Gauss–Seidel), the residual kept exact: E_I = R_I + d gᵀ,
    // d = E_I g / ||E_I g||, g = E_Iᵀ d, R_I = E_I − d gᵀ.
    Eigen::VectorXf direction(atoms.rows());
    for (Eigen::Index j = 0; j < n; ++j) {
      const auto first = users_.begin() + start_[static_cast<std::size_t>(j)];
      const auto last = users_.begin() + start_[static_cast<std::size_t>(j) + 1];
      if (first == last) continue;
      direction.setZero();
      for (auto u = first; u != last; ++u) {
        const float g = codes.coefficients(u->slot, u->vector);
        residual.col(u->vector) += g * atoms.col(j);
        direction += g * residual.col(u->vector);
      }
      const float norm = direction.norm();
      if (norm > 0) atoms.col(j) = direction / norm;
      for (auto u = first; u != last; ++u) {
        const float g = atoms.col(j).dot(residual.col(u->vector));
        codes.coefficients(u->slot, u->vector) = g;
        residual.col(u->vector) -= g * atoms.col(j);
      }
    }
  }
  void reset(Eigen::Index) override {}

 private:
  struct User {
    Eigen::Index vector;
    int slot;
  };
  std::vector<Eigen::Index> start_;
  std::vector<User> users_;
};

inline std::unique_ptr<AtomUpdate> make_update(Eigen::Index dim, const TrainOptions& options) {
  switch (options.method) {
    case TrainMethod::lexico: return std::make_unique<AdamUpdate>(dim, options);
    case TrainMethod::mod: return std::make_unique<ModUpdate>(dim, options);
    case TrainMethod::ksvd: return std::make_unique<KsvdUpdate>();
  }
  throw error("unknown training method");
}

}  // namespace detail

// Trains one dictionary step by step: code a batch, update, keep atoms alive.
class DictionaryTrainer {
 public:
  DictionaryTrainer(Eigen::MatrixXf initial, const TrainOptions& options)
      : atoms_(std::move(initial)), options_(options), update_(detail::make_update(atoms_.rows(), options)),
        usage_(Eigen::VectorXi::Zero(atoms_.cols())) {
    require(atoms_.cols() == options.atoms, "DictionaryTrainer: ", atoms_.cols(), " initial atoms, options ask for ",
            options.atoms);
    require(options.sparsity >= 1 && options.sparsity <= std::min<Eigen::Index>(atoms_.rows(), atoms_.cols()),
            "DictionaryTrainer: sparsity ", options.sparsity, " outside [1, min(d, N)] = [1, ",
            std::min<Eigen::Index>(atoms_.rows(), atoms_.cols()), "]");
    require(options.dead_window > 0 && options.dead_usage >= 0 && options.accept_coherence > 0 &&
                options.accept_coherence <= options.duplicate_coherence && options.duplicate_coherence <= 1,
            "DictionaryTrainer: need dead_window > 0, dead_usage >= 0 and 0 < accept_coherence <= ",
            "duplicate_coherence <= 1");
    detail::normalise_columns(atoms_);
  }

  const Eigen::MatrixXf& atoms() const { return atoms_; }
  Eigen::Index replaced() const { return replaced_; }

  // One step on a batch (d x B); `progress` in [0, 1] drives the learning-rate
  // schedule. Returns the batch's mean relative error before the update.
  double step(const Eigen::Ref<const Eigen::MatrixXf>& batch, double progress) {
    require(batch.rows() == atoms_.rows() && batch.cols() > 0, "DictionaryTrainer::step: batch is ", batch.rows(),
            "x", batch.cols(), ", atoms have dimension ", atoms_.rows());
    const Dictionary current(atoms_);
    OmpOptions coding;
    coding.sparsity = options_.sparsity;
    coding.threads = options_.threads;
    OmpEncoder(current, coding).encode(batch, codes_);
    detail::code_residual(current.atoms(), batch, codes_, residual_);
    const double error = detail::mean_relative_error(batch, residual_);
    energy_ = residual_.colwise().squaredNorm().transpose();
    for (Eigen::Index b = 0; b < batch.cols(); ++b)
      for (int i = 0; i < codes_.counts(b); ++i) ++usage_(codes_.indices(i, b));

    update_->update(atoms_, batch, codes_, residual_, progress);

    since_check_ += batch.cols();
    if (since_check_ >= options_.dead_window) {
      keep_atoms_alive(current.gram(), batch);
      since_check_ = 0;
      usage_.setZero();
    }
    return error;
  }

  // The dictionary, atoms at unit norm.
  Dictionary dictionary(DictionaryMetadata metadata = {}) const { return Dictionary(atoms_, std::move(metadata)); }

 private:
  void keep_atoms_alive(const Eigen::MatrixXf& gram, const Eigen::Ref<const Eigen::MatrixXf>& batch) {
    const Eigen::Index n = atoms_.cols();
    std::vector<char> dead(static_cast<std::size_t>(n), 0);
    for (Eigen::Index j = 0; j < n; ++j)
      dead[static_cast<std::size_t>(j)] = usage_(j) <= options_.dead_usage || !(atoms_.col(j).squaredNorm() > 0);
    for (Eigen::Index j = 0; j < n; ++j)
      for (Eigen::Index i = 0; i < j; ++i)
        if (std::fabs(gram(i, j)) > options_.duplicate_coherence && !dead[static_cast<std::size_t>(i)] &&
            !dead[static_cast<std::size_t>(j)])
          dead[static_cast<std::size_t>(usage_(i) < usage_(j) ? i : j)] = 1;
    std::vector<Eigen::Index> list;
    for (Eigen::Index j = 0; j < n; ++j)
      if (dead[static_cast<std::size_t>(j)]) list.push_back(j);
    if (list.empty()) return;
    for (const Eigen::Index j : replace_atoms(atoms_, list, batch, energy_, options_.accept_coherence)) {
      update_->reset(j);
      ++replaced_;
    }
  }

  Eigen::MatrixXf atoms_;
  TrainOptions options_;
  std::unique_ptr<detail::AtomUpdate> update_;
  SparseCodes codes_;
  Eigen::MatrixXf residual_;
  Eigen::VectorXf energy_;  // ||x − D c||² of the last batch
  Eigen::VectorXi usage_;   // codes that used each atom since the last check
  Eigen::Index since_check_ = 0;
  Eigen::Index replaced_ = 0;
};

struct TrainResult {
  Dictionary dictionary;
  double last_error = 0;  // mean relative error of the final tenth of the batches
  Eigen::Index replaced = 0;
  double seconds = 0;
  Eigen::Index random_atoms = 0;  // initial atoms drawn at random (see initial_atoms)
};

// Initialises from the stream and trains on options.vectors vectors of it.
inline TrainResult train_dictionary(VectorSource& source, const TrainOptions& options,
                                    const TrainCallback& callback = {}, DictionaryMetadata metadata = {}) {
  const auto begin = std::chrono::steady_clock::now();
  const Eigen::Index batch = options.batch > 0 ? options.batch : default_batch(options.method);
  require(options.vectors > 0, "train_dictionary: options.vectors must be positive");
  const Eigen::Index init_count = options.init_sample > 0 ? options.init_sample : Eigen::Index(8) * options.atoms;
  Eigen::MatrixXf buffer(source.dim(), std::max(batch, init_count));
  source.next(buffer.leftCols(init_count));
  Eigen::Index random_atoms = 0;
  DictionaryTrainer trainer(initial_atoms(buffer.leftCols(init_count), options.atoms, options.init, options.seed,
                                          options.accept_coherence, &random_atoms),
                            options);
  TrainProgress progress;
  progress.total = options.vectors;
  double tail_sum = 0;
  Eigen::Index tail_batches = 0;
  while (progress.vectors < options.vectors) {
    const Eigen::Index take = std::min(batch, options.vectors - progress.vectors);
    source.next(buffer.leftCols(take));
    const double fraction = static_cast<double>(progress.vectors) / static_cast<double>(options.vectors);
    progress.batch_error = trainer.step(buffer.leftCols(take), fraction);
    progress.vectors += take;
    progress.replaced = trainer.replaced();
    progress.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
    if (10 * progress.vectors > 9 * options.vectors) {
      tail_sum += progress.batch_error;
      ++tail_batches;
    }
    if (callback) callback(progress);
  }
  return {trainer.dictionary(std::move(metadata)), tail_batches ? tail_sum / static_cast<double>(tail_batches) : 0.0,
          trainer.replaced(), progress.seconds, random_atoms};
}

}  // namespace lexico
