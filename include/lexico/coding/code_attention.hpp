#pragma once
// Attention on sparse codes (Lexico): u = Dᵀq for many queries in one product, scores of
// coded keys gathered from it, values accumulated in atom space and combined by one
// product, and the decoding of stored codes (for keys coded before RoPE, which must be
// rotated to their positions before a query can score them).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "../base/error.hpp"
#include "../base/fp8.hpp"
#include "../base/half.hpp"
#include "../base/kernels.hpp"
#include "../base/parallel.hpp"
#include "../base/rope.hpp"
#include "../base/rows.hpp"
#include "code_book.hpp"
#include "codes.hpp"
#include "dictionary.hpp"

namespace lexico {

namespace detail {

// The Group values of one atom's table row (or weights row) as one vector, so a
// single load serves every query head of the GQA group. (GCC ignores a vector_size
// that depends on a template parameter, hence one specialisation per size.)
template <int Group>
struct GroupVector;
template <>
struct GroupVector<1> {
  using type = float;
};
template <>
struct GroupVector<2> {
  using type = float __attribute__((vector_size(8)));
};
template <>
struct GroupVector<4> {
  using type = float __attribute__((vector_size(16)));
};
template <>
struct GroupVector<8> {
  using type = float __attribute__((vector_size(32)));
};

// Row r of a code store against the group's table: the table holds, for atom a, the
// Group values <atom a, query g> side by side.
template <int Group>
void code_scores_grouped(const CodeStore& codes, const float* table, Eigen::Index table_ld, int /*group*/,
                         float* scores, Eigen::Index ld) {
  using Vector = typename GroupVector<Group>::type;
  const auto& fp8 = fp8_e4m3_table();
  codes.for_each_row([&](std::size_t r, CodeStore::Indices index, const std::uint8_t* coefficient, int count,
                         float scale) {
    Vector sum{};
    for (int i = 0; i < count; ++i) {
      Vector u;
      std::memcpy(&u, table + index[i] * table_ld, sizeof u);
      sum += u * fp8[coefficient[i]];
    }
    static_assert(sizeof(Vector) == sizeof(float) * Group, "one lane per query of the group");
    float lanes[Group];
    std::memcpy(lanes, &sum, sizeof lanes);
    for (int g = 0; g < Group; ++g) scores[g * ld + static_cast<Eigen::Index>(r)] = lanes[g] * scale;
  });
}

template <int Group>
void code_accumulate_grouped(const CodeStore& codes, const float* probabilities, Eigen::Index ld, int /*group*/,
                             float* weights, Eigen::Index weights_ld) {
  using Vector = typename GroupVector<Group>::type;
  const auto& fp8 = fp8_e4m3_table();
  codes.for_each_row([&](std::size_t r, CodeStore::Indices index, const std::uint8_t* coefficient, int count,
                         float scale) {
    float lanes[Group];
    for (int g = 0; g < Group; ++g) lanes[g] = probabilities[g * ld + static_cast<Eigen::Index>(r)] * scale;
    Vector p;
    std::memcpy(&p, lanes, sizeof p);
    for (int i = 0; i < count; ++i) {
      float* w = weights + index[i] * weights_ld;
      Vector sum;
      std::memcpy(&sum, w, sizeof sum);
      sum += p * fp8[coefficient[i]];
      std::memcpy(w, &sum, sizeof sum);
    }
  });
}

// Any group size, one query at a time.
inline void code_scores_any(const CodeStore& codes, const float* table, Eigen::Index table_ld, int group,
                            float* scores, Eigen::Index ld) {
  const auto& fp8 = fp8_e4m3_table();
  codes.for_each_row([&](std::size_t r, CodeStore::Indices index, const std::uint8_t* coefficient, int count,
                         float scale) {
    for (int g = 0; g < group; ++g) {
      float sum = 0.0f;
      for (int i = 0; i < count; ++i) sum += fp8[coefficient[i]] * table[index[i] * table_ld + g];
      scores[g * ld + static_cast<Eigen::Index>(r)] = sum * scale;
    }
  });
}

inline void code_accumulate_any(const CodeStore& codes, const float* probabilities, Eigen::Index ld, int group,
                                float* weights, Eigen::Index weights_ld) {
  const auto& fp8 = fp8_e4m3_table();
  codes.for_each_row([&](std::size_t r, CodeStore::Indices index, const std::uint8_t* coefficient, int count,
                         float scale) {
    for (int g = 0; g < group; ++g) {
      const float p = probabilities[g * ld + static_cast<Eigen::Index>(r)] * scale;
      for (int i = 0; i < count; ++i) weights[index[i] * weights_ld + g] += p * fp8[coefficient[i]];
    }
  });
}

template <template <int> class Kernel, typename... Args>
void dispatch_group(int group, Args&&... args) {
  switch (group) {
    case 1: return Kernel<1>::run(group, std::forward<Args>(args)...);
    case 2: return Kernel<2>::run(group, std::forward<Args>(args)...);
    case 4: return Kernel<4>::run(group, std::forward<Args>(args)...);
    case 8: return Kernel<8>::run(group, std::forward<Args>(args)...);
    default: return Kernel<0>::run(group, std::forward<Args>(args)...);
  }
}

template <int Group>
struct CodeScores {
  static void run(int group, const CodeStore& codes, const float* table, Eigen::Index table_ld, float* scores,
                  Eigen::Index ld) {
    if constexpr (Group > 0) code_scores_grouped<Group>(codes, table, table_ld, group, scores, ld);
    else code_scores_any(codes, table, table_ld, group, scores, ld);
  }
};

template <int Group>
struct CodeAccumulate {
  static void run(int group, const CodeStore& codes, const float* probabilities, Eigen::Index ld, float* weights,
                  Eigen::Index weights_ld) {
    if constexpr (Group > 0) code_accumulate_grouped<Group>(codes, probabilities, ld, group, weights, weights_ld);
    else code_accumulate_any(codes, probabilities, ld, group, weights, weights_ld);
  }
};

}  // namespace detail

// Queries up to which atom_table and add_atom_combination take a path of their own
// rather than a matrix product, which would first repack the whole N x d dictionary.
inline constexpr Eigen::Index small_combination = 16;

// u = Dᵀq for M queries at once: table (N x M, row-major) = atomsᵀ · queriesᵀ, queries
// M x d row-major. One matrix product streams the atoms once for every query (of every
// head and, batched, of every sequence), in blocks of atoms over `threads` threads.
inline void atom_table(const CodeBook& book, ConstRowsRef queries, RowMatrix& table, int threads = 0) {
  const Eigen::MatrixXf& atoms = book.dictionary().atoms();
  table.resize(atoms.cols(), queries.rows());
  if (queries.rows() <= small_combination) {
    // A few queries: the encoder's packed panels (no repacking of the dictionary per call).
    thread_local Eigen::MatrixXf contiguous, projected;
    contiguous = queries.transpose();
    projected.resize(detail::padded_atoms(book.size()), queries.rows());
    book.packed().project(contiguous.data(), contiguous.outerStride(), static_cast<int>(queries.rows()),
                          projected.data(), projected.outerStride());
    table = projected.topRows(atoms.cols());
    return;
  }
  constexpr Eigen::Index block = 256;
  const Eigen::Index blocks = (atoms.cols() + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(thread_budget(threads)) if (blocks > 1 && queries.rows() >= 16)
  for (Eigen::Index b = 0; b < blocks; ++b) {
    serial_eigen_products();
    const Eigen::Index first = b * block, count = std::min(block, atoms.cols() - first);
    table.middleRows(first, count).noalias() = atoms.middleCols(first, count).transpose() * queries.transpose();
  }
}

// out (M x d, row-major) += (D · weights)ᵀ for weights laid out like atom_table's table.
inline void add_atom_combination(const CodeBook& book, const RowMatrix& weights, RowsRef out, int threads = 0) {
  const Eigen::MatrixXf& atoms = book.dictionary().atoms();
  if (weights.cols() <= small_combination) {
    // A few queries (one sequence's decode step): one pass over the fp16 atoms that carry
    // any weight, each added to every query's output; a matrix product would first repack
    // the whole N x d fp32 dictionary, which costs more than this pass.
    const int d = book.dim(), m = static_cast<int>(weights.cols());
    thread_local std::vector<float> sum, atom;
    thread_local std::vector<int> used;
    sum.assign(static_cast<std::size_t>(m * d), 0.0f);
    atom.resize(static_cast<std::size_t>(d));
    used.clear();
    detail::nonzero_rows(weights.data(), atoms.cols(), m, used);
    // Column ranges on separate threads: each writes its own columns of every output.
    const int ranges = std::max(1, std::min(thread_budget(threads), d / 32));
    const int width = d / ranges;
    const bool fast = d % ranges == 0 && detail::fp16_combination_fits(width, m);
    // The calling thread's buffers: inside the region a thread_local names the worker's own.
    const int* atom_list = used.data();
    const long atom_count = static_cast<long>(used.size());
    float* sums = sum.data();
#pragma omp parallel for schedule(static) num_threads(ranges) if (fast && ranges > 1 && atom_count >= 256)
    for (int r = 0; r < ranges; ++r)
      if (fast)
        detail::fp16_combination(reinterpret_cast<const std::uint16_t*>(book.atoms_fp16()) + r * width, d, width,
                                 atom_list, atom_count, weights.data(), m, sums + r * width);
    if (!fast)
      for (int a : used) {
        const float* w = weights.data() + static_cast<Eigen::Index>(a) * m;
        to_float(book.atoms_fp16() + static_cast<Eigen::Index>(a) * d, atom.data(), d);
        for (int g = 0; g < m; ++g) {
          float* o = sum.data() + g * d;
          for (int e = 0; e < d; ++e) o[e] += w[g] * atom[static_cast<std::size_t>(e)];
        }
      }
    out += Eigen::Map<const RowMatrix>(sum.data(), m, d);
    return;
  }
  constexpr Eigen::Index block = 32;
  const Eigen::Index blocks = (weights.cols() + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(thread_budget(threads)) if (blocks > 1)
  for (Eigen::Index b = 0; b < blocks; ++b) {
    serial_eigen_products();
    const Eigen::Index first = b * block, count = std::min(block, weights.cols() - first);
    out.middleRows(first, count).noalias() += weights.middleCols(first, count).transpose() * atoms.transpose();
  }
}

// Scores of coded keys: scores[g * ld + t] = Σ_i coef_ti · table[idx_ti * table_ld + g],
// where the table holds u = Dᵀq for each query g of the group (atom a's row: table_ld apart).
inline void code_scores(const CodeStore& codes, const float* table, Eigen::Index table_ld, int group, float* scores,
                        Eigen::Index ld) {
  require(group >= 1 && group <= max_gqa_group, "code_scores: GQA group of ", group, " query heads above ",
          max_gqa_group);
  detail::dispatch_group<detail::CodeScores>(group, codes, table, table_ld, scores, ld);
}

// Values in code space: weights[idx_ti * weights_ld + g] += p[g * ld + t] · coef_ti, so
// the output is D_v · weights, one dense product after the pass over the tokens.
inline void code_accumulate(const CodeStore& codes, const float* probabilities, Eigen::Index ld, int group,
                            float* weights, Eigen::Index weights_ld) {
  require(group >= 1 && group <= max_gqa_group, "code_accumulate: GQA group of ", group, " query heads above ",
          max_gqa_group);
  detail::dispatch_group<detail::CodeAccumulate>(group, codes, probabilities, ld, weights, weights_ld);
}

namespace detail {

// One stored row as a vector (Dictionary::combine with the row's FP8 coefficients).
inline void decode_row(const Dictionary& dictionary, CodeStore::Indices index, const std::uint8_t* coefficient,
                       int entries, float scale, float* out) {
  const auto& fp8 = fp8_e4m3_table();
  dictionary.combine(
      entries, [&](int i) { return index[i]; }, [&](int i) { return fp8[coefficient[i]] * scale; }, out);
}

}  // namespace detail

// The vectors of rows [first, first + count) of a code store: out is count x d, row-major.
inline void decode_codes(const CodeStore& codes, const Dictionary& dictionary, std::size_t first, std::size_t count,
                         float* out) {
  require(first <= codes.rows() && count <= codes.rows() - first, "decode_codes: rows [", first, ", ", first + count,
          ") asked of ", codes.rows());
  const std::size_t d = static_cast<std::size_t>(dictionary.dim());
  codes.for_each_row([&](std::size_t r, CodeStore::Indices index, const std::uint8_t* coefficient, int entries,
                         float scale) {
    if (r >= first && r - first < count)
      detail::decode_row(dictionary, index, coefficient, entries, scale, out + (r - first) * d);
  });
}

// scores[g * ld + t] = <query g, R(first + t) key t> for keys before RoPE (count x d,
// row-major, rotated here in place) at positions first, first + 1, ...
inline void rotated_scores(const Rope& rope, std::int64_t first, Eigen::Ref<RowMatrix> keys, const float* queries,
                           int group, float* scores, Eigen::Index ld) {
  rope.rotate_rows(first, keys.data(), keys.rows(), keys.outerStride(), 1);
  const Eigen::Map<const RowMatrix> q(queries, group, keys.cols());
  Eigen::Map<RowMatrix, 0, Eigen::OuterStride<>> out(scores, group, keys.rows(), Eigen::OuterStride<>(ld));
  out.noalias() = q * keys.transpose();
}

namespace detail {

#if defined(__AVX512F__)
// rotated_code_scores for rotate_half RoPE, d = 16·Chunks and groups up to 8, in registers: blocks of 16
// rows, whose atoms are prefetched while the block's rows are listed; each key decoded
// into Chunks vectors, rotated, dotted with the group's queries into one vector of
// partial sums per (row, query), and the block's sums reduced together (sum_lanes16).
// The rotation is split, qᵀR(p + t)k = (R(p)ᵀq)ᵀ(R(t)k) with p a RopeRun block's first
// position: the queries turn back once per block of Rope::run_block positions and a key
// turns by the step table's R(t), so no angle is computed per token (measured 0.7x the
// time of turning every key by its own computed angle).
template <int Chunks>
void rotated_code_scores_avx512(const CodeStore& codes, const Eigen::half* atoms, const Rope& rope, std::int64_t first,
                                const float* queries, int group, float* scores, Eigen::Index ld) {
  constexpr int d = 16 * Chunks, half = Chunks / 2;
  const auto& fp8 = fp8_e4m3_table();
  RopeRun run(rope, first);
  alignas(64) float cos[d / 2], sin[d / 2], turned[8][d];
  int step = Rope::run_block;  // position in the current RopeRun block
  struct Row {  // a code row as its atoms' addresses and coefficients (up to 255 atoms)
    const std::uint16_t* atom[255];
    float coefficient[255];
    int entries;
  };
  thread_local std::vector<Row> block(16);
  __m512 partial[8][16];
  Eigen::Index done = 0;
  int filled = 0;
  const auto score_block = [&] {
    for (int r = 0; r < filled; ++r) {
      const Row& row = block[static_cast<std::size_t>(r)];
      __m512 key[Chunks];
      for (int c = 0; c < Chunks; ++c) key[c] = _mm512_setzero_ps();
      for (int i = 0; i < row.entries; ++i) {
        const __m512 coefficient = _mm512_set1_ps(row.coefficient[i]);
        for (int c = 0; c < Chunks; ++c) key[c] = _mm512_fmadd_ps(coefficient, load_fp16x16(row.atom[i] + 16 * c), key[c]);
      }
      if (step == Rope::run_block) {
        run.next_block(cos, sin);
        for (int g = 0; g < group; ++g) {
          std::copy(queries + g * d, queries + (g + 1) * d, turned[g]);
          rope.rotate(turned[g], cos, sin, /*inverse=*/true);
        }
        step = 0;
      }
      const float* step_cos = rope.step_cos(step);
      const float* step_sin = rope.step_sin(step);
      ++step;
      __m512 rotated[Chunks];
      for (int c = 0; c < half; ++c) {
        const __m512 cs = _mm512_loadu_ps(step_cos + 16 * c), sn = _mm512_loadu_ps(step_sin + 16 * c);
        rotated[c] = _mm512_fmsub_ps(key[c], cs, _mm512_mul_ps(key[half + c], sn));
        rotated[half + c] = _mm512_fmadd_ps(key[half + c], cs, _mm512_mul_ps(key[c], sn));
      }
      for (int g = 0; g < group; ++g) partial[g][r] = dot_chunks(rotated, turned[g], Chunks);
    }
    for (int g = 0; g < group; ++g) {
      for (int r = filled; r < 16; ++r) partial[g][r] = _mm512_setzero_ps();
      alignas(64) float sums[16];
      _mm512_store_ps(sums, sum_lanes16(partial[g]));
      std::copy(sums, sums + filled, scores + g * ld + done);
    }
    done += filled;
    filled = 0;
  };
  codes.for_each_row([&](std::size_t, CodeStore::Indices index, const std::uint8_t* coefficient, int entries,
                         float scale) {
    Row& row = block[static_cast<std::size_t>(filled)];
    row.entries = entries;
    for (int i = 0; i < row.entries; ++i) {
      row.atom[i] = reinterpret_cast<const std::uint16_t*>(atoms) + static_cast<std::ptrdiff_t>(index[i]) * d;
      row.coefficient[i] = fp8[coefficient[i]] * scale;
      for (int c = 0; c < Chunks; c += 2) _mm_prefetch(reinterpret_cast<const char*>(row.atom[i] + 16 * c), _MM_HINT_T0);
    }
    if (++filled == 16) score_block();
  });
  if (filled > 0) score_block();
}
#endif

}  // namespace detail

// Scores of keys coded before RoPE: row r of `codes` is the token at position first + r.
// One pass over the tokens, each key decoded once for the whole GQA group, rotated to its
// position with angles from a RopeRun and dotted with the group's queries, all in
// registers and L1: per token and KV head about (s + 2 + group) · d multiply-adds and no
// trigonometry. O(s·d) per token instead of code_scores' O(s), the price of the lower
// error of dictionaries trained on keys before RoPE.
inline void rotated_code_scores(const CodeStore& codes, const CodeBook& book, const Rope& rope, std::int64_t first,
                                const float* queries, int group, float* scores, Eigen::Index ld) {
  require(book.dim() == rope.head_dim() && group >= 1 && group <= max_gqa_group,
          "rotated_code_scores: dictionary dimension ", book.dim(), ", RoPE head_dim ", rope.head_dim(),
          " and GQA group ", group, " do not fit");
  const int d = book.dim();
#if defined(__AVX512F__)
  const bool interleaved = rope.style() == RopeStyle::interleaved;
  if (!interleaved && group <= 8 && d == 128)
    return detail::rotated_code_scores_avx512<8>(codes, book.atoms_fp16(), rope, first, queries, group, scores, ld);
  if (!interleaved && group <= 8 && d == 64)
    return detail::rotated_code_scores_avx512<4>(codes, book.atoms_fp16(), rope, first, queries, group, scores, ld);
#endif
  // Elsewhere: the same steps one token at a time, the rotation by Rope::rotate.
  thread_local std::vector<float> key, atom, cos, sin;
  key.resize(static_cast<std::size_t>(d));
  atom.resize(key.size());
  cos.resize(static_cast<std::size_t>(rope.pairs()));
  sin.resize(cos.size());
  const auto& fp8 = detail::fp8_e4m3_table();
  RopeRun run(rope, first);
  float* k = key.data();
  float dots[max_gqa_group];
  codes.for_each_row([&](std::size_t row, CodeStore::Indices index, const std::uint8_t* coefficient, int entries,
                         float scale) {
    std::fill_n(k, d, 0.0f);
    for (int i = 0; i < entries; ++i) {
      const float c = fp8[coefficient[i]] * scale;
      to_float(book.atoms_fp16() + static_cast<std::ptrdiff_t>(index[i]) * d, atom.data(), d);
      for (int e = 0; e < d; ++e) k[e] += c * atom[static_cast<std::size_t>(e)];
    }
    run.next(cos.data(), sin.data());
    rope.rotate(k, cos.data(), sin.data());
    detail::dot_group(k, queries, group, d, dots);
    for (int g = 0; g < group; ++g) scores[g * ld + static_cast<Eigen::Index>(row)] = dots[g];
  });
}

}  // namespace lexico
