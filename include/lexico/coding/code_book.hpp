#pragma once
// What the OMP encoder reads of one dictionary, built once and shared by every encoder,
// cache and thread that codes with it (as hnswlib shares its space): the atoms, the
// atoms packed in panels for α⁰ = Dᵀx, and the Gram matrix G = DᵀD in the form a
// GramPolicy chooses.
//
//   GramPolicy::fp16       the whole of G in fp16, N² · 2 bytes (32 MiB at N = 4096): the
//                          encoder reads a chosen atom's column in place.
//   GramPolicy::on_demand  no G; a chosen atom's column is computed as Dᵀd_j (N·d
//                          multiply-adds) or copied from a bounded set of hot columns
//                          (3·d columns by default), so the whole book is about 7x the
//                          atoms' fp16 bytes.
// Both compute G's entries with the same fp32 kernel, so they give identical codes.
//
// Concurrency: immutable after construction but for the hot columns, which are guarded
// by a mutex; any number of threads may code with one CodeBook at once.

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "dictionary.hpp"
#include "../base/error.hpp"

// GCC 12 warns that the deliberately undefined pass-through operand inside its own
// AVX-512 intrinsics is uninitialised (GCC bug 105593); the warning is spurious.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace lexico {

namespace detail {

// Atoms rounded up to whole groups of 64 (pass scratch, α⁰ rows, exclusion words).
inline Eigen::Index padded_atoms(int n) { return (static_cast<Eigen::Index>(n) + 63) / 64 * 64; }

// α⁰ = Dᵀx for a chunk of vectors, in fp32: a low-precision product would widen the
// band (its error grows with ‖x‖, not with the residual) and cost more in exact
// re-scoring than it saves. Atoms are packed once per encoder in panels of 32: a
// panel (16 KiB at d = 128) stays in L1 while the chunk streams past it, 12 vectors
// at a time, so the product runs near the FMA peak.

constexpr int panel_atoms = 32;
// Vectors per tile: 2 x 12 accumulators, 2 panel rows and a broadcast fit in the
// 32 vector registers.
constexpr int tile_vectors = 12;

inline int panel_count(int n) { return (n + panel_atoms - 1) / panel_atoms; }

#if defined(__AVX512F__)
template <int V>
void project_tile(const float* panel, int d, const float* x, Eigen::Index x_stride, float* out,
                  Eigen::Index out_stride) {
  __m512 low[V], high[V];
  for (int v = 0; v < V; ++v) low[v] = high[v] = _mm512_setzero_ps();
  for (int k = 0; k < d; ++k) {
    const __m512 a = _mm512_loadu_ps(panel + panel_atoms * k), b = _mm512_loadu_ps(panel + panel_atoms * k + 16);
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      const __m512 xv = _mm512_set1_ps(x[v * x_stride + k]);
      low[v] = _mm512_fmadd_ps(a, xv, low[v]);
      high[v] = _mm512_fmadd_ps(b, xv, high[v]);
    }
  }
  for (int v = 0; v < V; ++v) {
    _mm512_storeu_ps(out + v * out_stride, low[v]);
    _mm512_storeu_ps(out + v * out_stride + 16, high[v]);
  }
}
#else
// Portable: the inner loop over a panel row vectorises as it stands.
template <int V>
void project_tile(const float* panel, int d, const float* x, Eigen::Index x_stride, float* out,
                  Eigen::Index out_stride) {
  for (int v = 0; v < V; ++v) {
    float acc[panel_atoms] = {};
    for (int k = 0; k < d; ++k) {
      const float xk = x[v * x_stride + k];
      for (int t = 0; t < panel_atoms; ++t) acc[t] += panel[panel_atoms * k + t] * xk;
    }
    std::copy(acc, acc + panel_atoms, out + v * out_stride);
  }
}
#endif

template <int... Vs>
void project_tile_dispatch(std::integer_sequence<int, Vs...>, int vectors, const float* panel, int d, const float* x,
                           Eigen::Index x_stride, float* out, Eigen::Index out_stride) {
  using Tile = void (*)(const float*, int, const float*, Eigen::Index, float*, Eigen::Index);
  static constexpr Tile tiles[] = {&project_tile<Vs + 1>...};
  tiles[vectors - 1](panel, d, x, x_stride, out, out_stride);
}

// Atoms in panels of 32: panel p, row k holds entry k of atoms 32p..32p+31 (zero
// past N).
class PackedAtoms {
 public:
  explicit PackedAtoms(const Eigen::MatrixXf& atoms)
      : d_(static_cast<int>(atoms.rows())),
        n_(static_cast<int>(atoms.cols())),
        data_(Eigen::VectorXf::Zero(static_cast<Eigen::Index>(panel_count(n_)) * d_ * panel_atoms)) {
    for (Eigen::Index atom = 0; atom < atoms.cols(); ++atom)
      for (Eigen::Index k = 0; k < atoms.rows(); ++k)
        data_((atom / panel_atoms * d_ + k) * panel_atoms + atom % panel_atoms) = atoms(k, atom);
  }

  std::size_t bytes() const { return sizeof(float) * static_cast<std::size_t>(data_.size()); }

  // α⁰ of `count` vectors of d floats, `x_stride` apart, into `out` (column-major,
  // `out_stride` floats per vector, rows rounded up to whole panels).
  void project(const float* x, Eigen::Index x_stride, int count, float* out, Eigen::Index out_stride) const {
#if defined(__AVX512F__)
    if (count == 1) return project_one(x, out);
#endif
    for (int p = 0; p < panel_count(n_); ++p) {
      const float* panel = data_.data() + static_cast<Eigen::Index>(p) * d_ * panel_atoms;
      for (int v0 = 0; v0 < count; v0 += tile_vectors) {
        project_tile_dispatch(std::make_integer_sequence<int, tile_vectors>{}, std::min(tile_vectors, count - v0),
                              panel, d_, x + v0 * x_stride, x_stride, out + p * panel_atoms + v0 * out_stride,
                              out_stride);
      }
    }
  }

 private:
#if defined(__AVX512F__)
  // One vector (an exact re-scoring, a Gram column): a tile of one vector has two
  // accumulators, so it waits on FMA latency; four panels at a time give eight chains.
  void project_one(const float* x, float* out) const {
    constexpr int panels = 4;
    const int count = panel_count(n_);
    int p = 0;
    for (; p + panels <= count; p += panels) {
      const float* panel = data_.data() + static_cast<Eigen::Index>(p) * d_ * panel_atoms;
      __m512 acc[2 * panels];
      for (__m512& a : acc) a = _mm512_setzero_ps();
      for (int k = 0; k < d_; ++k) {
        const __m512 xv = _mm512_set1_ps(x[k]);
#pragma GCC unroll 4
        for (int q = 0; q < panels; ++q) {
          const float* row = panel + static_cast<Eigen::Index>(q) * d_ * panel_atoms + panel_atoms * k;
          acc[2 * q] = _mm512_fmadd_ps(_mm512_loadu_ps(row), xv, acc[2 * q]);
          acc[2 * q + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(row + 16), xv, acc[2 * q + 1]);
        }
      }
      for (int q = 0; q < 2 * panels; ++q) _mm512_storeu_ps(out + p * panel_atoms + 16 * q, acc[q]);
    }
    for (; p < count; ++p)
      project_tile<1>(data_.data() + static_cast<Eigen::Index>(p) * d_ * panel_atoms, d_, x, d_, out + p * panel_atoms,
                      0);
  }
#endif

  int d_, n_;
  Eigen::VectorXf data_;
};


// A bounded set of fp16 Gram columns, replaced by the CLOCK rule (a column read since
// the hand last passed survives one more turn). Callers copy a column out under the
// lock, so replacing one never pulls data from under a reader.
class HotColumns {
 public:
  HotColumns(int atoms, int capacity)
      : atoms_(atoms), capacity_(capacity), data_(static_cast<std::size_t>(capacity) * static_cast<std::size_t>(atoms)),
        slot_of_(static_cast<std::size_t>(atoms), -1), atom_of_(static_cast<std::size_t>(capacity), -1),
        referenced_(static_cast<std::size_t>(capacity), 0) {}

  bool copy(int atom, Eigen::half* out) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const int slot = slot_of_[static_cast<std::size_t>(atom)];
    if (slot < 0) {
      ++misses_;
      return false;
    }
    ++hits_;
    referenced_[static_cast<std::size_t>(slot)] = 1;
    std::memcpy(out, column(slot), sizeof(Eigen::half) * static_cast<std::size_t>(atoms_));
    return true;
  }

  void insert(int atom, const Eigen::half* values) const {
    if (capacity_ == 0) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (slot_of_[static_cast<std::size_t>(atom)] >= 0) return;  // another thread was first
    while (referenced_[static_cast<std::size_t>(hand_)]) {
      referenced_[static_cast<std::size_t>(hand_)] = 0;
      hand_ = (hand_ + 1) % capacity_;
    }
    const int slot = hand_;
    hand_ = (hand_ + 1) % capacity_;
    if (const int old = atom_of_[static_cast<std::size_t>(slot)]; old >= 0) slot_of_[static_cast<std::size_t>(old)] = -1;
    atom_of_[static_cast<std::size_t>(slot)] = atom;
    slot_of_[static_cast<std::size_t>(atom)] = slot;
    std::memcpy(column(slot), values, sizeof(Eigen::half) * static_cast<std::size_t>(atoms_));
  }

  std::size_t bytes() const {
    return sizeof(Eigen::half) * data_.size() + sizeof(int) * (slot_of_.size() + atom_of_.size()) + referenced_.size();
  }
  std::uint64_t hits() const { return hits_; }
  std::uint64_t misses() const { return misses_; }

 private:
  Eigen::half* column(int slot) const {
    return data_.data() + static_cast<std::size_t>(slot) * static_cast<std::size_t>(atoms_);
  }

  int atoms_, capacity_;
  mutable std::mutex mutex_;
  mutable std::vector<Eigen::half> data_;
  mutable std::vector<int> slot_of_, atom_of_;
  mutable std::vector<std::uint8_t> referenced_;
  mutable int hand_ = 0;
  mutable std::atomic<std::uint64_t> hits_{0}, misses_{0};
};

}  // namespace detail

enum class GramPolicy { fp16, on_demand };

inline std::string to_string(GramPolicy policy) { return policy == GramPolicy::fp16 ? "fp16" : "on_demand"; }

inline GramPolicy parse_gram_policy(const std::string& name) {
  require(name == "fp16" || name == "on_demand", "Gram policy '", name, "' is neither fp16 nor on_demand");
  return name == "fp16" ? GramPolicy::fp16 : GramPolicy::on_demand;
}

class CodeBook {
 public:
  // hot_columns: columns kept by GramPolicy::on_demand (-1: 3·d; ignored by fp16).
  explicit CodeBook(std::shared_ptr<const Dictionary> dictionary, GramPolicy policy = GramPolicy::fp16,
                    int hot_columns = -1)
      : dictionary_(std::move(dictionary)), policy_(policy), packed_(checked(dictionary_).atoms()) {
    const int n = dictionary_->size(), d = dictionary_->dim();
    atoms_fp16_.resize(static_cast<std::size_t>(n) * static_cast<std::size_t>(d));
    for (std::size_t i = 0; i < atoms_fp16_.size(); ++i) atoms_fp16_[i] = Eigen::half(dictionary_->atoms().data()[i]);
    if (policy_ == GramPolicy::fp16) {
      gram_.resize(static_cast<std::size_t>(n) * static_cast<std::size_t>(n));
      build_gram();
    } else {
      const int capacity = std::min(n, hot_columns < 0 ? 3 * d : hot_columns);
      hot_ = std::make_unique<detail::HotColumns>(n, capacity);
    }
  }
  explicit CodeBook(const Dictionary& dictionary, GramPolicy policy = GramPolicy::fp16, int hot_columns = -1)
      : CodeBook(std::make_shared<const Dictionary>(dictionary), policy, hot_columns) {}
  CodeBook(const CodeBook&) = delete;
  CodeBook& operator=(const CodeBook&) = delete;

  const Dictionary& dictionary() const { return *dictionary_; }
  const std::shared_ptr<const Dictionary>& shared_dictionary() const { return dictionary_; }
  const detail::PackedAtoms& packed() const { return packed_; }
  // The atoms in fp16, atom after atom (N x d): what attention streams. Exact when the
  // dictionary was rounded to fp16 (a CodeSpace's books are).
  const Eigen::half* atoms_fp16() const { return atoms_fp16_.data(); }
  GramPolicy policy() const { return policy_; }
  int dim() const { return dictionary_->dim(); }
  int size() const { return dictionary_->size(); }

  // Column j of G in fp16, in place (GramPolicy::fp16), else null.
  const Eigen::half* gram_column(int j) const {
    return gram_.empty() ? nullptr : gram_.data() + static_cast<std::size_t>(j) * static_cast<std::size_t>(size());
  }

  // Column j of G in fp16 into `out` (N entries); `scratch` holds padded_atoms(N) floats.
  void copy_gram_column(int j, Eigen::half* out, float* scratch) const {
    if (const Eigen::half* column = gram_column(j)) {
      std::copy(column, column + size(), out);
      return;
    }
    if (hot_->copy(j, out)) return;
    packed_.project(dictionary_->atoms().col(j).data(), dim(), 1, scratch, detail::padded_atoms(size()));
    for (int i = 0; i < size(); ++i) out[i] = Eigen::half(scratch[i]);
    hot_->insert(j, out);
  }

  // Bytes held: atoms, packed atoms and the Gram form.
  std::size_t bytes() const {
    return sizeof(float) * static_cast<std::size_t>(dictionary_->atoms().size()) + packed_.bytes() +
           sizeof(Eigen::half) * (atoms_fp16_.size() + gram_.size()) + (hot_ ? hot_->bytes() : 0);
  }
  // Hot-column lookups so far (GramPolicy::on_demand).
  std::uint64_t column_hits() const { return hot_ ? hot_->hits() : 0; }
  std::uint64_t column_misses() const { return hot_ ? hot_->misses() : 0; }

 private:
  static const Dictionary& checked(const std::shared_ptr<const Dictionary>& dictionary) {
    require(dictionary != nullptr, "CodeBook: no dictionary");
    return *dictionary;
  }

  // G column by column with the packed kernel: the same sums copy_gram_column computes.
  void build_gram() {
    const int n = size(), d = dim();
    const Eigen::Index rows = detail::padded_atoms(n);
    constexpr int block = 4 * detail::tile_vectors;
#pragma omp parallel
    {
      Eigen::MatrixXf columns(rows, block);
#pragma omp for schedule(dynamic, 1)
      for (int first = 0; first < n; first += block) {
        const int count = std::min(block, n - first);
        packed_.project(dictionary_->atoms().col(first).data(), d, count, columns.data(), rows);
        for (int c = 0; c < count; ++c) {
          Eigen::half* out = gram_.data() + static_cast<std::size_t>(first + c) * static_cast<std::size_t>(n);
          for (int i = 0; i < n; ++i) out[i] = Eigen::half(columns(i, c));
        }
      }
    }
  }

  std::shared_ptr<const Dictionary> dictionary_;
  GramPolicy policy_;
  detail::PackedAtoms packed_;
  std::vector<Eigen::half> atoms_fp16_;        // N x d
  std::vector<Eigen::half> gram_;              // GramPolicy::fp16: N x N, column-major
  std::unique_ptr<detail::HotColumns> hot_;    // GramPolicy::on_demand
};

}  // namespace lexico

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
