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
#include "../base/parallel.hpp"
#include "../base/rope.hpp"
#include "../base/rows.hpp"
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

// u = Dᵀq for M queries at once: table (N x M, row-major) = atomsᵀ · queriesᵀ, queries
// M x d row-major. One matrix product streams the atoms once for every query (of every
// head and, batched, of every sequence), in blocks of atoms over `threads` threads.
inline void atom_table(const Dictionary& dictionary, ConstRowsRef queries, RowMatrix& table, int threads = 0) {
  const Eigen::MatrixXf& atoms = dictionary.atoms();
  table.resize(atoms.cols(), queries.rows());
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
inline void add_atom_combination(const Dictionary& dictionary, const RowMatrix& weights, RowsRef out,
                                 int threads = 0) {
  const Eigen::MatrixXf& atoms = dictionary.atoms();
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

// The vectors of the first `count` rows of a code store: out is count x d, row-major.
inline void decode_codes(const CodeStore& codes, const Dictionary& dictionary, std::size_t count, float* out) {
  require(count <= codes.rows(), "decode_codes: ", count, " rows asked of ", codes.rows());
  const std::size_t d = static_cast<std::size_t>(dictionary.dim());
  codes.for_each_row([&](std::size_t r, CodeStore::Indices index, const std::uint8_t* coefficient, int entries,
                         float scale) {
    if (r < count) detail::decode_row(dictionary, index, coefficient, entries, scale, out + r * d);
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

// Scores of keys coded before RoPE: row r of `codes` is the token at position first + r.
// Each key is decoded, rotated to its position and dotted with the group's queries, 64
// tokens at a time: O(s·d) per token instead of code_scores' O(s), the price of the lower
// error of dictionaries trained on keys before RoPE.
inline void rotated_code_scores(const CodeStore& codes, const Dictionary& dictionary, const Rope& rope,
                                std::int64_t first, const float* queries, int group, float* scores, Eigen::Index ld) {
  require(dictionary.dim() == rope.head_dim() && group >= 1 && group <= max_gqa_group,
          "rotated_code_scores: dictionary dimension ", dictionary.dim(), ", RoPE head_dim ", rope.head_dim(),
          " and GQA group ", group, " do not fit");
  constexpr Eigen::Index block = 64;
  thread_local RowMatrix keys;
  keys.resize(block, dictionary.dim());
  Eigen::Index filled = 0, done = 0;
  const auto score_block = [&] {
    rotated_scores(rope, first + done, keys.topRows(filled), queries, group, scores + done, ld);
    done += filled;
    filled = 0;
  };
  codes.for_each_row([&](std::size_t, CodeStore::Indices index, const std::uint8_t* coefficient, int entries,
                         float scale) {
    detail::decode_row(dictionary, index, coefficient, entries, scale, keys.row(filled).data());
    if (++filled == block) score_block();
  });
  if (filled > 0) score_block();
}

}  // namespace lexico
