#pragma once
// Batched Orthogonal Matching Pursuit: codes each vector x as x ≈ D[:, idx] · coef
// with at most s atoms of a Dictionary (unit-norm atoms, Gram matrix G = DᵀD).
//
// Algorithm: Batch-OMP (Rubinstein, Zibulevsky, Elad, "Efficient Implementation of
// the K-SVD Algorithm using Batch Orthogonal Matching Pursuit", Technion CS-2008-08):
// after α⁰ = Dᵀx only Gram columns are read, α = α⁰ − G[:, I] c for the atoms I
// chosen so far. The coefficients follow the inverse-Cholesky recursion of OMP v0
// (Zhu, Chen, Wu, "Efficient Implementations for Orthogonal Matching Pursuit",
// Electronics 9(9):1507, 2020): with G[I, I] = L Lᵀ and F = L⁻ᵀ (upper triangular),
//   w = Fᵀ G[I, j],  pivot G[j, j] − wᵀw,  y_k = (α⁰_j − wᵀy) / sqrt(pivot)
//   F gains the column f = (−F w, 1) / sqrt(pivot),  c += y_k f   (c = F y)
// so a step is a few independent dot products and axpys in fp32: no triangular
// solve (a chain of divisions) and no least-squares problem per step.
//
// Speed (N = 4096, d = 128, s = 8; see BENCHMARKS.md):
// - α⁰ for a chunk of vectors is one fp32 matrix product against atoms packed once
//   per encoder, near the FMA peak: about 80 % of the arithmetic.
// - The correlation pass of step k streams k Gram columns; in fp32 that is bound by
//   L2 bandwidth. So the pass reads the dictionary's fp16 copy of G and only
//   selects a *band*: every atom whose approximate |α| is within twice a rigorous
//   error bound of the approximate maximum. A band of one atom (most steps) is
//   provably the argmax; a wider band is re-scored exactly as d_nᵀr with the
//   residual r = x − D[:, I] c in fp32. So the atom chosen is the one an fp32 OMP
//   chooses; fp16 only saves bandwidth. When the band is too wide to list (the
//   residual is tiny next to the fp16 error) the step scores every atom as Dᵀr, and
//   later passes start from those exact correlations, weighing the Gram columns by
//   the coefficients' change since: the bound shrinks with the residual, so a vector
//   that one atom nearly explains (a few % of real keys) pays one such step, not s.
// - The pass fuses the update with the maximum: α is not stored, one instruction
//   per 16 atoms tracks maxima, and only the groups of 64 atoms that reach the band
//   are recomputed to name the candidates.
// - Each thread keeps a few vectors in flight, two phases per step: while one
//   vector sweeps the atoms, the Gram column another has just chosen and the
//   candidate atoms of the previous one are prefetched, hiding DRAM latency.
// - G[I, j] for the recursion are exact fp32 dot products of atoms, so no fp32 copy
//   of G (64 MiB at N = 4096) is read.
//
// Layout: the vectors to code are the columns of a d x B column-major matrix, i.e.
// B contiguous vectors of d floats, the natural [token][head_dim] layout of a KV
// cache. A row-major B x d matrix passes as its transpose() without a copy.
//
// Threads: OpenMP over chunks of vectors; each thread owns a workspace allocated
// once and reused, so encoding allocates nothing per vector. One OmpEncoder must not
// run encode() from two threads at once: use one encoder per calling thread.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "code_book.hpp"
#include "dictionary.hpp"
#include "../base/error.hpp"
#include "../base/fp8.hpp"
#include "../base/parallel.hpp"

// GCC 12 warns that the deliberately undefined pass-through operand inside its own
// AVX-512 intrinsics is uninitialised (GCC bug 105593); the warning is spurious.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace lexico {

struct OmpOptions {
  // s: the most atoms per vector, 1 <= s <= min(d, N, 255).
  int sparsity = 8;
  // Stop once ‖r‖ <= tolerance · ‖x‖ (0: use all s atoms unless the residual vanishes).
  float tolerance = 0.0f;
  // Skip an atom whose pivot 1 − ‖w‖² (squared sine of its angle to the span of the
  // atoms already chosen) is below this: near-collinear atoms would make the
  // coefficients explode. fp32 computes the pivot to ~1e-6, so stay well above that.
  float pivot_threshold = 1e-4f;
  // OpenMP threads; 0 means omp_get_max_threads().
  int threads = 0;
};

// Codes of B vectors with fixed `sparsity` slots each. Vector b uses slots
// [0, counts[b]) in the order the atoms were chosen; unused slots hold index 0 and
// coefficient 0, so they decode to nothing.
struct SparseCodes {
  int sparsity = 0;
  Eigen::Matrix<std::uint16_t, Eigen::Dynamic, Eigen::Dynamic> indices;  // sparsity x B
  Eigen::MatrixXf coefficients;                                          // sparsity x B
  Eigen::Matrix<std::uint8_t, Eigen::Dynamic, 1> counts;                 // B
  // Residual energy (‖r‖²) that each chosen atom removed, y_k² for the coordinates y of x
  // in the orthonormalised span of the atoms; 0 in unused slots. The first k atoms are
  // also the k-atom code's, so ‖x‖² − Σ_{i<k} gains(i, b) is its squared error.
  Eigen::MatrixXf gains;                                                 // sparsity x B

  Eigen::Index vectors() const { return counts.size(); }
};

namespace detail {

inline void prefetch_bytes(const void* data, std::size_t bytes) {
#if defined(__GNUC__)
  const char* p = static_cast<const char*>(data);
  for (std::size_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset);
#else
  (void)data;
  (void)bytes;
#endif
}

// ---------------------------------------------------------------------------------
// The correlation pass: α̃ = base − Σ_i coefs[i] · G̃[:, j_i] with fp16 Gram columns G̃
// (base = α⁰ with the coefficients themselves, or exact correlations Dᵀr taken at an
// earlier step with the coefficients' change since), maximum of |α̃| over atoms not
// excluded, and the band of candidates.

// One bit per atom, 16 atoms per word: atoms already chosen or rejected.
inline bool is_excluded(const std::uint16_t* excluded, int atom) { return (excluded[atom >> 4] >> (atom & 15)) & 1; }
inline void exclude(std::uint16_t* excluded, int atom) {
  excluded[atom >> 4] = static_cast<std::uint16_t>(excluded[atom >> 4] | (1u << (atom & 15)));
}

struct PassInputs {
  const float* base;
  const Eigen::half* const* columns;
  const float* coefs;
  int k;
  const std::uint16_t* excluded;
  bool only_chosen_excluded;  // no atom was rejected: see correlation_band_avx512
  int n;
};

// `candidates` atoms (in increasing order) have approximate |α| >= largest − margin;
// candidates > cap means the band is too wide to list (or largest is not positive):
// the caller scores every atom exactly.
struct Band {
  float largest = 0.0f;
  int candidates = 0;
};


inline Band correlation_band_portable(const PassInputs& in, float margin, float* scratch, int* out, int cap) {
  constexpr int width = 64;  // a block of α small enough for registers / L1
  float alpha[width];
  float largest = 0.0f;
  for (int first = 0; first < in.n; first += width) {
    const int w = std::min(width, in.n - first);
    for (int t = 0; t < w; ++t) alpha[t] = in.base[first + t];
    for (int i = 0; i < in.k; ++i) {
      const float c = in.coefs[i];
      const Eigen::half* column = in.columns[i] + first;
      for (int t = 0; t < w; ++t) alpha[t] -= c * static_cast<float>(column[t]);
    }
    for (int t = 0; t < w; ++t) {
      const float magnitude = is_excluded(in.excluded, first + t) ? 0.0f : std::fabs(alpha[t]);
      scratch[first + t] = magnitude;
      largest = std::max(largest, magnitude);
    }
  }
  const float threshold = largest - margin;
  if (!(threshold > 0.0f)) return {largest, cap + 1};
  int count = 0;
  for (int i = 0; i < in.n; ++i) {
    if (scratch[i] < threshold) continue;
    if (count == cap) return {largest, cap + 1};
    out[count++] = i;
  }
  return {largest, count};
}

#if defined(__AVX512F__)

// AVX-512 pass. The sweep keeps, per group of 64 atoms, only the lane-wise maximum
// of |α̃| (in `group_max`); the groups whose maximum reaches the band are
// recomputed afterwards to name the candidates. K >= 0 fixes the number of columns
// at compile time (unrolled, coefficients in registers); K = -1 reads it at run
// time. `prefetch`, unless null, is an fp16 Gram column of n entries that another
// vector reads soon: it is fetched into L2 during this sweep.
// Masked = false skips the exclusion mask in the sweep, which is sound when only
// chosen atoms are excluded: the residual is orthogonal to them, so their |α̃| is
// near zero and does not survive collection, which masks. If fp32 error in the
// coefficients makes one of them the maximum anyway, collection finds no atom and the
// caller scores every atom exactly.
template <int K, bool Masked>
Band correlation_band_avx512(const PassInputs& in, float margin, const char* prefetch, float* group_max, int* out,
                             int cap) {
  constexpr int fixed = K > 0 ? K : 1;
  const int count = K >= 0 ? K : in.k;
  const int n = in.n;
  __m512 coef[fixed];
  const Eigen::half* column[fixed];
  if constexpr (K > 0) {
    for (int i = 0; i < K; ++i) {
      coef[i] = _mm512_set1_ps(in.coefs[i]);
      column[i] = in.columns[i];
    }
  }
  auto load_half = [](const Eigen::half* base, int first, __mmask16 lanes) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, base + first));
  };
  auto block = [&](int first, __mmask16 lanes, auto masked) {
    __m512 alpha = _mm512_maskz_loadu_ps(lanes, in.base + first);
    for (int i = 0; i < count; ++i) {
      if constexpr (K > 0) {
        alpha = _mm512_fnmadd_ps(coef[i], load_half(column[i], first, lanes), alpha);
      } else {
        alpha = _mm512_fnmadd_ps(_mm512_set1_ps(in.coefs[i]), load_half(in.columns[i], first, lanes), alpha);
      }
    }
    if constexpr (!decltype(masked)::value) return _mm512_abs_ps(alpha);  // lanes past n load as zero
    const __mmask16 keep = static_cast<__mmask16>(lanes & ~in.excluded[first >> 4]);
    return _mm512_mask_abs_ps(_mm512_setzero_ps(), keep, alpha);
  };
  const std::integral_constant<bool, Masked> sweep_mask;
  const std::true_type collect_mask;
  auto lanes_of = [n](int first) -> __mmask16 {
    const int left = n - first;
    return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << left) - 1);
  };

  __m512 running = _mm512_setzero_ps();
  int first = 0;
  for (; first + 64 <= n; first += 64) {
    if (prefetch) {
      const char* line = prefetch + 2 * static_cast<std::size_t>(first);  // 64 fp16 = 2 lines
      _mm_prefetch(line, _MM_HINT_T1);
      _mm_prefetch(line + 64, _MM_HINT_T1);
    }
    const __m512 m =
        _mm512_max_ps(_mm512_max_ps(block(first, 0xFFFF, sweep_mask), block(first + 16, 0xFFFF, sweep_mask)),
                      _mm512_max_ps(block(first + 32, 0xFFFF, sweep_mask), block(first + 48, 0xFFFF, sweep_mask)));
    _mm512_store_ps(group_max + (first >> 2), m);
    running = _mm512_max_ps(running, m);
  }
  if (first < n) {  // last, partial group
    __m512 m = _mm512_setzero_ps();
    for (int b = first; b < n; b += 16) m = _mm512_max_ps(m, block(b, lanes_of(b), sweep_mask));
    _mm512_store_ps(group_max + (first >> 2), m);
    running = _mm512_max_ps(running, m);
  }
  const float largest = _mm512_reduce_max_ps(running);
  const float threshold = largest - margin;
  if (!(threshold > 0.0f)) return {largest, cap + 1};

  const __m512 bar = _mm512_set1_ps(threshold);
  int found = 0;
  for (int group = 0; 64 * group < n; ++group) {
    if (!_mm512_cmp_ps_mask(_mm512_load_ps(group_max + 16 * group), bar, _CMP_GE_OQ)) continue;
    for (int b = 64 * group; b < std::min(n, 64 * group + 64); b += 16) {
      unsigned hits = _mm512_cmp_ps_mask(block(b, lanes_of(b), collect_mask), bar, _CMP_GE_OQ);
      for (; hits; hits &= hits - 1) {
        if (found == cap) return {largest, cap + 1};
        out[found++] = b + __builtin_ctz(hits);
      }
    }
  }
  // None found: the maximum was a chosen atom's (see Masked); score every atom exactly.
  return {largest, found > 0 ? found : cap + 1};
}

template <bool Masked, int... Ks>
Band correlation_band_dispatch(std::integer_sequence<int, Ks...>, const PassInputs& in, float margin,
                               const char* prefetch, float* scratch, int* out, int cap) {
  using Kernel = Band (*)(const PassInputs&, float, const char*, float*, int*, int);
  static constexpr Kernel fixed[] = {&correlation_band_avx512<Ks, Masked>...};
  const Kernel kernel =
      in.k < static_cast<int>(sizeof...(Ks)) ? fixed[in.k] : &correlation_band_avx512<-1, Masked>;
  return kernel(in, margin, prefetch, scratch, out, cap);
}

#endif  // __AVX512F__

inline Band correlation_band(const PassInputs& in, float margin, const char* prefetch, float* scratch, int* out,
                             int cap) {
#if defined(__AVX512F__)
  constexpr auto fixed_counts = std::make_integer_sequence<int, 17>{};
  return in.only_chosen_excluded
             ? correlation_band_dispatch<false>(fixed_counts, in, margin, prefetch, scratch, out, cap)
             : correlation_band_dispatch<true>(fixed_counts, in, margin, prefetch, scratch, out, cap);
#else
  (void)prefetch;
  return correlation_band_portable(in, margin, scratch, out, cap);
#endif
}

}  // namespace detail

namespace detail {

// Most candidates re-scored one by one; a wider band scores all atoms as Dᵀr.
inline constexpr int omp_max_candidates = 64;

// Vectors per chunk: whole tiles whose α⁰ fits in ~512 KiB, so that it stays in L2
// while its vectors are coded (2 tiles at N = 4096: measured a few % faster than 8).
inline Eigen::Index omp_chunk(int n) {
  const Eigen::Index tile_bytes = tile_vectors * padded_atoms(n) * Eigen::Index(sizeof(float));
  return std::clamp<Eigen::Index>((Eigen::Index(512) << 10) / tile_bytes, 1, 8) * tile_vectors;
}

// Per-vector state of the greedy loop; the arrays live in the thread's workspace.
struct OmpVectorState {
  const float* x = nullptr;
  const float* alpha0 = nullptr;
  // Where the pass starts: α⁰ with base_coefs all zero, or after a step that scored
  // every atom exactly, that step's Dᵀr (in `rebased`) and the coefficients it was
  // taken at. The pass then weighs the fp16 Gram columns by the coefficients' change
  // only, so its error bound follows the residual instead of staying at ‖x‖'s scale.
  const float* base = nullptr;
  float* rebased = nullptr;     // padded N
  float* base_coefs = nullptr;  // s
  float* delta = nullptr;       // s: coefs − base_coefs, the pass's weights
  float base_norm = 0;          // ‖x‖, or the residual norm of the rebased step
  float norm = 0, stop_norm = 0;
  double energy = 0;      // ‖x‖² − ‖y‖², the residual energy as the recursion sees it
  int count = 0, rejections = 0;
  int band = 0;           // candidates of the surveyed step; > omp_max_candidates: score all
  float band_floor = 0;   // lower bound on the best candidate's exact |α|
  bool active = false;    // more atoms to choose
  bool residual_current = false;
  int* atoms = nullptr;
  const Eigen::half** columns = nullptr;  // fp16 Gram columns of the chosen atoms
  Eigen::half* own_columns = nullptr;     // GramPolicy::on_demand: s x N, the columns themselves
  float* coefs = nullptr;
  float* y = nullptr;
  float* inverse = nullptr;   // F = L⁻ᵀ, column-major s x s, upper triangle
  float* w = nullptr;         // scratch of a step: G[I, j], then Fᵀ G[I, j]
  float* chosen = nullptr;    // D[:, I], d x s column-major: contiguous for the small products
  float* residual = nullptr;  // r = x − D[:, I] c, d floats, when residual_current
  int* candidates = nullptr;
  std::uint16_t* excluded = nullptr;
};

}  // namespace detail

// The buffers one thread needs to run OMP: grown to the largest (N, d, s) it has served,
// never shrunk, so coding allocates nothing once warm. The states point into its own
// buffers, so it is neither copied nor moved.
class OmpWorkspace {
 public:
  // Vectors one thread keeps in flight (see the file comment).
  static constexpr int lockstep = 4;

  OmpWorkspace() = default;
  OmpWorkspace(const OmpWorkspace&) = delete;
  OmpWorkspace& operator=(const OmpWorkspace&) = delete;

  void prepare(int n, int dim, int sparsity, Eigen::Index chunk, bool own_columns) {
    const Eigen::Index rows = detail::padded_atoms(n);
    const std::size_t s = static_cast<std::size_t>(sparsity), d = static_cast<std::size_t>(dim);
    const std::size_t words = static_cast<std::size_t>(rows / 16);
    if (alpha0.rows() < rows || alpha0.cols() < chunk) alpha0.resize(std::max(rows, alpha0.rows()), std::max(chunk, alpha0.cols()));
    if (scratch.size() < rows) scratch.resize(rows), exact.resize(rows);
    grow(atoms, lockstep * s);
    grow(candidates, lockstep * static_cast<std::size_t>(detail::omp_max_candidates));
    grow(columns, lockstep * s);
    grow(coefs, lockstep * s);
    grow(y, lockstep * s);
    grow(inverse, lockstep * s * s);
    grow(w, lockstep * s);
    grow(base_coefs, lockstep * s);
    grow(delta, lockstep * s);
    grow(rebased, lockstep * static_cast<std::size_t>(rows));
    grow(chosen, lockstep * d * s);
    grow(residual, lockstep * d);
    grow(excluded, lockstep * words);
    if (own_columns) grow(gram_columns, lockstep * s * static_cast<std::size_t>(n));
    for (std::size_t v = 0; v < lockstep; ++v) {
      detail::OmpVectorState& state = states[v];
      state.atoms = atoms.data() + v * s;
      state.candidates = candidates.data() + v * detail::omp_max_candidates;
      state.columns = columns.data() + v * s;
      state.own_columns = own_columns ? gram_columns.data() + v * s * static_cast<std::size_t>(n) : nullptr;
      state.coefs = coefs.data() + v * s;
      state.y = y.data() + v * s;
      state.inverse = inverse.data() + v * s * s;
      state.w = w.data() + v * s;
      state.base_coefs = base_coefs.data() + v * s;
      state.delta = delta.data() + v * s;
      state.rebased = rebased.data() + v * static_cast<std::size_t>(rows);
      state.chosen = chosen.data() + v * d * s;
      state.residual = residual.data() + v * d;
      state.excluded = excluded.data() + v * words;
    }
  }

  std::size_t bytes() const {
    return sizeof(float) * static_cast<std::size_t>(alpha0.size() + scratch.size() + exact.size() + coefs.size() +
                                                     y.size() + inverse.size() + w.size() + chosen.size() +
                                                     residual.size() + base_coefs.size() + delta.size() +
                                                     rebased.size()) +
           sizeof(int) * (atoms.size() + candidates.size()) + sizeof(void*) * columns.size() +
           sizeof(std::uint16_t) * excluded.size() + sizeof(Eigen::half) * gram_columns.size();
  }

  Eigen::MatrixXf alpha0;  // padded N x chunk: α⁰ of the current chunk
  Eigen::VectorXf scratch;  // pass scratch
  Eigen::VectorXf exact;    // padded N: scratch of a Gram column computed on demand
  detail::OmpVectorState states[lockstep];

 private:
  template <typename T>
  static void grow(std::vector<T>& buffer, std::size_t size) {
    if (buffer.size() < size) buffer.resize(size);
  }

  std::vector<int> atoms, candidates;
  std::vector<const Eigen::half*> columns;
  std::vector<float> coefs, y, inverse, w, chosen, residual, base_coefs, delta, rebased;
  std::vector<std::uint16_t> excluded;
  std::vector<Eigen::half> gram_columns;
};

// Workspaces lent to the threads that code, returned when their call ends: a pool holds
// as many as threads ever coded at once through it, however many encoders and caches
// share it. Thread-safe.
class OmpWorkspacePool {
 public:
  class Lease {
   public:
    Lease(OmpWorkspacePool& pool, std::unique_ptr<OmpWorkspace> workspace)
        : pool_(&pool), workspace_(std::move(workspace)) {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { pool_->give_back(std::move(workspace_)); }
    OmpWorkspace& operator*() const { return *workspace_; }

   private:
    OmpWorkspacePool* pool_;
    std::unique_ptr<OmpWorkspace> workspace_;
  };

  Lease acquire() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) {
      ++created_;
      return Lease(*this, std::make_unique<OmpWorkspace>());
    }
    std::unique_ptr<OmpWorkspace> workspace = std::move(free_.back());
    free_.pop_back();
    return Lease(*this, std::move(workspace));
  }

  // Workspaces ever made (the most threads that coded at once) and the bytes of those idle now.
  std::size_t created() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return created_;
  }
  std::size_t idle_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::size_t total = 0;
    for (const auto& workspace : free_) total += workspace->bytes();
    return total;
  }

 private:
  void give_back(std::unique_ptr<OmpWorkspace> workspace) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(std::move(workspace));
  }

  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<OmpWorkspace>> free_;
  std::size_t created_ = 0;
};

class OmpEncoder {
 public:
  // Vectors whose norm exceeds this are refused, so that ‖x‖² stays finite in fp32.
  static constexpr double max_vector_norm = 1e18;
  // A vector stops once its residual, or the largest correlation of any atom with
  // it, falls to this fraction of ‖x‖: further atoms would only fit rounding noise.
  static constexpr float negligible = 1e-6f;
  // Most candidates re-scored one by one; a wider band scores all atoms as Dᵀr.
  static constexpr int max_candidates = detail::omp_max_candidates;

  // Codes over a shared CodeBook with workspaces lent by a shared pool (a CodeSpace's);
  // without a pool the encoder keeps its own.
  OmpEncoder(std::shared_ptr<const CodeBook> book, const OmpOptions& options,
             std::shared_ptr<OmpWorkspacePool> pool = nullptr)
      : book_(std::move(book)), options_(options),
        pool_(pool ? std::move(pool) : std::make_shared<OmpWorkspacePool>()) {
    require(book_ != nullptr, "OmpEncoder: no code book");
    const int d = book_->dim(), n = book_->size(), s = options_.sparsity;
    require(n >= 1 && n <= 65536, "OmpEncoder: the dictionary has N = ", n, " atoms; uint16 indices allow 1 to 65536");
    require(s >= 1 && s <= 255, "OmpEncoder: sparsity s = ", s, " outside [1, 255]");
    require(s <= d, "OmpEncoder: sparsity s = ", s, " exceeds the dimension d = ", d,
            " (more than d atoms cannot be linearly independent)");
    require(s <= n, "OmpEncoder: sparsity s = ", s, " exceeds the atom count N = ", n);
    require(std::isfinite(options_.tolerance) && options_.tolerance >= 0.0f && options_.tolerance < 1.0f,
            "OmpEncoder: tolerance = ", options_.tolerance, " outside [0, 1)");
    require(std::isfinite(options_.pivot_threshold) && options_.pivot_threshold >= 0.0f &&
                options_.pivot_threshold < 1.0f,
            "OmpEncoder: pivot_threshold = ", options_.pivot_threshold, " outside [0, 1)");
    require(options_.threads >= 0, "OmpEncoder: threads = ", options_.threads, " is negative");

    // Bound of the pass, with Δc the coefficients' change since the base was taken and
    // ρ the norm of the vector the base correlates (‖x‖ for α⁰, else that step's ‖r‖):
    //   |α̃_n − α_n| <= half_error·Σ|Δc| + base_slack·(ρ + Σ|Δc|) + residual_slack·(‖x‖ + Σ|c|).
    // fp16 rounds G entries of magnitude <= 1 by at most 2^-11. base_slack covers the
    // d-term fp32 dot products of the base, of G and of the exact re-scoring (γ_d =
    // d·2^-24 each; Σ|d_i v_i| <= ‖v‖ for unit atoms, and ‖r‖ <= ρ + Σ|Δc|) and the
    // k + 1 roundings of the pass; residual_slack the fp32 residuals r = x − D[:, I] c
    // behind a rebased base and behind the re-scoring (k + 1 roundings each).
    constexpr float unit = 1.0f / (1 << 24);
    half_error_ = 1.0f / 2048;
    base_slack_ = (2.0f * static_cast<float>(d) + static_cast<float>(s) + 2.0f) * unit;
    residual_slack_ = (2.0f * static_cast<float>(s) + 2.0f) * unit;
    chunk_ = detail::omp_chunk(n);
  }

  // A private book (fp16 Gram) and pool: for one-off coding such as training.
  OmpEncoder(const Dictionary& dictionary, const OmpOptions& options)
      : OmpEncoder(std::make_shared<const CodeBook>(dictionary), options) {}

  const Dictionary& dictionary() const { return book_->dictionary(); }
  const CodeBook& book() const { return *book_; }
  const OmpOptions& options() const { return options_; }

  // Codes the columns of `vectors` (d x B). Throws lexico::error, before writing
  // anything, on a dimension mismatch or a vector with a NaN/Inf entry or a norm
  // above max_vector_norm. May run from several threads at once (workspaces come from
  // the pool, one per OpenMP thread for the call).
  void encode(const Eigen::Ref<const Eigen::MatrixXf>& vectors, SparseCodes& codes) const {
    validate(vectors);
    const Eigen::Index count = vectors.cols();
    const int s = options_.sparsity;
    codes.sparsity = s;
    codes.indices.resize(s, count);
    codes.coefficients.resize(s, count);
    codes.gains.resize(s, count);
    codes.counts.resize(count);
    if (count == 0) return;

    const Eigen::Index chunks = (count + chunk_ - 1) / chunk_;
    const int threads = static_cast<int>(std::min<Eigen::Index>(thread_budget(options_.threads), chunks));
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      const OmpWorkspacePool::Lease lease = pool_->acquire();
      Workspace& workspace = *lease;
      workspace.prepare(book_->size(), book_->dim(), s, chunk_, book_->policy() == GramPolicy::on_demand);
#pragma omp for schedule(dynamic, 1)
      for (Eigen::Index chunk = 0; chunk < chunks; ++chunk) {
        const Eigen::Index first = chunk * chunk_;
        encode_chunk(vectors, first, std::min(chunk_, count - first), workspace, codes);
      }
    }
  }

  SparseCodes encode(const Eigen::Ref<const Eigen::MatrixXf>& vectors) const {
    SparseCodes codes;
    encode(vectors, codes);
    return codes;
  }

 private:
  using VectorState = detail::OmpVectorState;
  using Workspace = OmpWorkspace;
  static constexpr int lockstep = OmpWorkspace::lockstep;

  void validate(const Eigen::Ref<const Eigen::MatrixXf>& vectors) const {
    require(vectors.rows() == book_->dim(), "OmpEncoder::encode: vectors have dimension ", vectors.rows(),
            ", the dictionary has d = ", book_->dim(), " (pass a d x B matrix, one vector per column)");
    // Fast path: ‖x‖ <= sqrt(d) · max |x_i| <= 16 · max |x_i| as d <= 256.
    if (vectors.allFinite() && (vectors.size() == 0 || vectors.cwiseAbs().maxCoeff() <= max_vector_norm / 16)) return;
    for (Eigen::Index b = 0; b < vectors.cols(); ++b) {
      for (Eigen::Index i = 0; i < vectors.rows(); ++i)
        require(std::isfinite(vectors(i, b)), "OmpEncoder::encode: vector ", b, " has ", vectors(i, b), " at entry ",
                i);
      const double norm = vectors.col(b).cast<double>().norm();
      require(norm <= max_vector_norm, "OmpEncoder::encode: vector ", b, " has norm ", norm, ", above the ",
              max_vector_norm, " that fp32 OMP handles");
    }
  }

  void encode_chunk(const Eigen::Ref<const Eigen::MatrixXf>& vectors, Eigen::Index first, Eigen::Index count,
                    Workspace& workspace, SparseCodes& codes) const {
    // α⁰ = Dᵀx of the whole chunk as one matrix product.
    book_->packed().project(vectors.col(first).data(), vectors.outerStride(), static_cast<int>(count), workspace.alpha0.data(),
                    workspace.alpha0.outerStride());
    // Up to `lockstep` vectors in flight; a slot whose vector is done takes the next.
    Eigen::Index next = 0, slot_vector[lockstep];
    int live = 0;
    auto refill = [&](int slot) {
      for (; next < count; ++next) {
        VectorState& state = workspace.states[slot];
        start_vector(state, vectors.col(first + next).data(), workspace.alpha0.col(next).data());
        slot_vector[slot] = next;
        if (state.active) {
          ++next;
          return true;
        }
        write_codes(state, first + next, codes);  // a zero vector: nothing to choose
      }
      return false;
    };
    bool filled[lockstep];
    for (int slot = 0; slot < lockstep; ++slot) live += (filled[slot] = refill(slot));
    // Round-robin, two phases per step: the sweep of one vector overlaps the memory
    // latency of the step surveyed just before (its candidates' atoms, prefetched)
    // and of the Gram column chosen last, which its vector reads a few sweeps on.
    int pending = -1;
    const char* last_column = nullptr;
    while (live > 0) {
      for (int slot = 0; slot < lockstep; ++slot) {
        if (!filled[slot]) continue;
        const bool sweep = slot != pending;
        if (sweep) survey(workspace.states[slot], live > 1 ? last_column : nullptr, workspace.scratch.data());
        if (pending >= 0) {
          VectorState& state = workspace.states[pending];
          if (const char* column = advance(state, workspace)) last_column = column;
          if (!state.active) {
            write_codes(state, first + slot_vector[pending], codes);
            if (!(filled[pending] = refill(pending))) --live;
          }
        }
        pending = sweep ? slot : -1;
      }
    }
  }

  void start_vector(VectorState& state, const float* x, const float* alpha0) const {
    const int d = book_->dim();
    state.x = x;
    state.alpha0 = alpha0;
    state.energy = Eigen::Map<const Eigen::VectorXf>(x, d).cast<double>().squaredNorm();
    state.norm = static_cast<float>(std::sqrt(state.energy));
    state.base = alpha0;
    state.base_norm = state.norm;
    std::fill_n(state.base_coefs, options_.sparsity, 0.0f);
    state.stop_norm = std::max(options_.tolerance, negligible) * state.norm;
    state.count = 0;
    state.rejections = 0;
    state.active = state.norm > 0;
    std::copy(x, x + d, state.residual);
    state.residual_current = true;
    std::fill_n(state.excluded, detail::padded_atoms(book_->size()) / 16, std::uint16_t(0));
  }

  // Phase 1 of a step: the band of candidates for the next atom, from the
  // low-precision pass; prefetches the candidates' atoms for phase 2.
  void survey(VectorState& state, const char* prefetch, float* scratch) const {
    const int k = state.count, d = book_->dim();
    float sum_coefs = 0.0f, sum_delta = 0.0f;
    for (int i = 0; i < k; ++i) {
      state.delta[i] = state.coefs[i] - state.base_coefs[i];
      sum_coefs += std::fabs(state.coefs[i]);
      sum_delta += std::fabs(state.delta[i]);
    }
    const float bound = half_error_ * sum_delta + base_slack_ * (state.base_norm + sum_delta) +
                        residual_slack_ * (state.norm + sum_coefs);
    const detail::PassInputs in{state.base,     state.columns,        state.delta,       k,
                                state.excluded, state.rejections == 0, book_->size()};
    const detail::Band band =
        detail::correlation_band(in, 2.0f * bound, prefetch, scratch, state.candidates, max_candidates);
    state.band = band.candidates;
    state.band_floor = band.largest - bound;
    if (band.candidates > 1 && band.candidates <= max_candidates)
      for (int c = 0; c < band.candidates; ++c)
        detail::prefetch_bytes(book_->dictionary().atoms().col(state.candidates[c]).data(), sizeof(float) * d);
  }

  // Phase 2: re-score the band exactly, extend the inverse Cholesky factor, update
  // the coefficients and the residual. Returns the fp16 Gram column of the accepted atom
  // when the vector goes on (to be prefetched), else null.
  const char* advance(VectorState& state, Workspace& workspace) const {
    const int s = options_.sparsity, d = book_->dim(), n = book_->size(), k = state.count;
    const Eigen::MatrixXf& atoms = book_->dictionary().atoms();
    Eigen::Map<Eigen::VectorXf> residual(state.residual, d);

    int j = -1;
    if (state.band == 1 && state.band_floor > negligible * state.norm) {
      j = state.candidates[0];  // the band is the answer: no residual needed
    } else {
      update_residual(state);
      float alpha_j = 0.0f;
      if (state.band <= max_candidates) {
        for (int c = 0; c < state.band; ++c) {
          const int atom = state.candidates[c];
          const float alpha = atoms.col(atom).dot(residual);
          if (j < 0 || std::fabs(alpha) > std::fabs(alpha_j)) j = atom, alpha_j = alpha;
        }
      } else {
        // Every atom exactly; later passes start from these correlations (see `base`).
        book_->packed().project(state.residual, d, 1, state.rebased, detail::padded_atoms(n));
        for (int atom = 0; atom < n; ++atom)
          if (!detail::is_excluded(state.excluded, atom) &&
              (j < 0 || std::fabs(state.rebased[atom]) > std::fabs(alpha_j)))
            j = atom, alpha_j = state.rebased[atom];
        state.base = state.rebased;
        state.base_norm = residual.norm();
        std::copy(state.coefs, state.coefs + k, state.base_coefs);
      }
      if (j < 0 || std::fabs(alpha_j) <= negligible * state.norm) {
        state.active = false;
        return nullptr;
      }
    }
    detail::exclude(state.excluded, j);

    // w = Fᵀ G[I, j], with G[I, j] = D[:, I]ᵀ d_j as exact fp32 dot products.
    const Eigen::Map<const Eigen::VectorXf> atom_j(atoms.col(j).data(), d);
    float* w = state.w;
    for (int i = 0; i < k; ++i) w[i] = Eigen::Map<const Eigen::VectorXf>(state.chosen + i * d, d).dot(atom_j);
    float w2 = 0.0f, wy = 0.0f;
    for (int i = k - 1; i >= 0; --i) {  // top down: w[i] reads w[0..i] before they change
      const float* f = state.inverse + i * s;
      float value = 0.0f;
      for (int l = 0; l <= i; ++l) value += f[l] * w[l];
      w[i] = value;
      w2 += value * value;
      wy += value * state.y[i];
    }
    // G[j, j] itself, not 1: a CodeSpace's atoms are rounded to fp16, so their norms are
    // 1 only to ~2^-11, and a unit diagonal would leave that much of each coefficient
    // in the residual (above the whole residual of a vector one atom nearly explains).
    const float pivot = atom_j.squaredNorm() - w2;
    if (!(pivot >= options_.pivot_threshold)) {
      // Nearly in the span of the chosen atoms: skip it and take the next best.
      if (++state.rejections > s) state.active = false;
      return nullptr;
    }
    const float scale = 1.0f / std::sqrt(pivot);

    // New column f = (−F w, 1)·scale of F; then y_k and c += y_k f.
    float* f = state.inverse + k * s;
    std::fill_n(f, k, 0.0f);
    for (int i = 0; i < k; ++i) {
      const float* fi = state.inverse + i * s;
      for (int l = 0; l <= i; ++l) f[l] -= fi[l] * w[i];
    }
    for (int l = 0; l < k; ++l) f[l] *= scale;
    f[k] = scale;
    const float yk = (state.alpha0[j] - wy) * scale;
    state.y[k] = yk;
    for (int l = 0; l < k; ++l) state.coefs[l] += yk * f[l];
    state.coefs[k] = yk * scale;
    state.atoms[k] = j;
    if (const Eigen::half* column = book_->gram_column(j)) {
      state.columns[k] = column;
    } else {  // GramPolicy::on_demand: the column goes into the vector's own slot k
      Eigen::half* own = state.own_columns + static_cast<std::size_t>(k) * static_cast<std::size_t>(n);
      book_->copy_gram_column(j, own, workspace.exact.data());
      state.columns[k] = own;
    }
    Eigen::Map<Eigen::VectorXf>(state.chosen + k * d, d) = atom_j;
    state.count = k + 1;
    state.residual_current = false;
    state.energy -= static_cast<double>(yk) * yk;

    // Stop at s atoms or once ‖r‖ <= stop_norm. The energy from y decides while it
    // is clearly above the bar (its fp32 error is far below the 1 % of ‖x‖² margin);
    // near the bar the residual itself decides.
    bool done = state.count == s;
    const double bar = static_cast<double>(state.stop_norm) * state.stop_norm;
    if (!done && state.energy <= bar + 1e-2 * static_cast<double>(state.norm) * state.norm) {
      update_residual(state);
      done = residual.norm() <= state.stop_norm;
    }
    if (done) {
      state.active = false;
      return nullptr;
    }
    return reinterpret_cast<const char*>(state.columns[k]);
  }

  // r = x − D[:, I] c for the current coefficients, one pass over d per block.
  void update_residual(VectorState& state) const {
    if (state.residual_current) return;
    const int d = book_->dim(), count = state.count;
    for (int first = 0; first < d; first += 16) {
      const int width = std::min(16, d - first);
      float block[16];
      for (int t = 0; t < width; ++t) block[t] = state.x[first + t];
      for (int i = 0; i < count; ++i) {
        const float c = state.coefs[i];
        const float* atom = state.chosen + i * d + first;
        for (int t = 0; t < width; ++t) block[t] -= c * atom[t];
      }
      std::copy(block, block + width, state.residual + first);
    }
    state.residual_current = true;
  }

  void write_codes(const VectorState& state, Eigen::Index b, SparseCodes& codes) const {
    const int s = options_.sparsity;
    for (int i = 0; i < s; ++i) {
      const bool used = i < state.count;
      codes.indices(i, b) = static_cast<std::uint16_t>(used ? state.atoms[i] : 0);
      codes.coefficients(i, b) = used ? state.coefs[i] : 0.0f;
      codes.gains(i, b) = used ? state.y[i] * state.y[i] : 0.0f;
    }
    codes.counts(b) = static_cast<std::uint8_t>(state.count);
  }

  std::shared_ptr<const CodeBook> book_;
  OmpOptions options_;
  std::shared_ptr<OmpWorkspacePool> pool_;
  float half_error_ = 0, base_slack_ = 0, residual_slack_ = 0;
  Eigen::Index chunk_ = 0;
};

// The codes with their coefficients as storage keeps them (codes.hpp): FP8 E4M3 with one
// power-of-two scale per vector (E8M0). A power of two rather than an fp16 scale: E4M3
// is a floating format, so scaling by 2^e is exact and costs no precision; it only moves
// the vector's largest coefficient into [224, 448], which makes overflow impossible.
inline SparseCodes stored_precision(SparseCodes codes) {
  const int s = codes.sparsity;
  std::vector<std::uint8_t> fp8(static_cast<std::size_t>(s));
  for (Eigen::Index b = 0; b < codes.vectors(); ++b) {
    const std::uint8_t scale = fp8_encode_scaled(codes.coefficients.col(b).data(), s, fp8.data());
    fp8_decode_scaled(fp8.data(), s, scale, codes.coefficients.col(b).data());
  }
  return codes;
}

// D[:, idx] · coef for every vector: d x B.
inline Eigen::MatrixXf reconstruct(const Dictionary& dictionary, const SparseCodes& codes) {
  Eigen::MatrixXf out(dictionary.dim(), codes.vectors());
  for (Eigen::Index b = 0; b < codes.vectors(); ++b)
    dictionary.combine(
        codes.counts(b), [&](int i) { return codes.indices(i, b); }, [&](int i) { return codes.coefficients(i, b); },
        out.col(b).data());
  return out;
}

}  // namespace lexico

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
