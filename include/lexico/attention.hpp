#pragma once
// Attention kernels shared by every cache: the exact causal block (prefill and the
// reference for tests) and the grouped decode step, in which the query heads of one
// GQA group share a single pass over their KV head's tokens.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "error.hpp"
#include "kernels.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lexico {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Most query heads that may share one KV head (GQA group); sizes stack buffers.
inline constexpr int max_gqa_group = 64;
using ConstRowsRef = Eigen::Ref<const RowMatrix>;
using RowsRef = Eigen::Ref<RowMatrix>;

// Softmax of scale * scores along each row, in place, computed stably in fp32; with
// `log_sum_exp`, row r's log Σ_t exp(scale * score_t) goes to log_sum_exp[r].
inline void softmax_rows(float* scores, int rows, Eigen::Index cols, Eigen::Index ld, float scale,
                         float* log_sum_exp = nullptr) {
  for (int r = 0; r < rows; ++r) {
    float* row = scores + r * ld;
    float top = -std::numeric_limits<float>::infinity();
    for (Eigen::Index t = 0; t < cols; ++t) top = std::max(top, row[t]);
    for (Eigen::Index t = 0; t < cols; ++t) row[t] = (row[t] - top) * scale;
    detail::exp_nonpositive(row, cols);
    float partial[detail::lanes] = {};
    Eigen::Index t = 0;
    for (; t + detail::lanes <= cols; t += detail::lanes)
      for (int l = 0; l < detail::lanes; ++l) partial[l] += row[t + l];
    float sum = 0.0f;
    for (; t < cols; ++t) sum += row[t];
    for (int l = 0; l < detail::lanes; ++l) sum += partial[l];
    const float inverse = 1.0f / sum;
    for (Eigen::Index t = 0; t < cols; ++t) row[t] *= inverse;
    if (log_sum_exp) log_sum_exp[r] = top * scale + std::log(sum);
  }
}

// OpenMP threads for a call: the caller's budget, or the OpenMP default when it is 0.
inline int thread_budget(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

// Eigen runs a large product on omp_get_max_threads() threads of its own whenever it is
// not inside a team of several threads, with a blocking (and so rounding) that depends on
// that count. Kernels that parallelise themselves call this first in their parallel
// region: it sets the nthreads ICV of the calling implicit task only (never the caller's),
// so Eigen stays serial there and results do not depend on the threads a call was given.
inline void serial_eigen_products() {
#ifdef _OPENMP
  omp_set_num_threads(1);
#endif
}

// Exact causal attention: queries T x (q_heads * d), keys and values S x (kv_heads * d)
// with S >= offset + T, out T x (q_heads * d). Query row t sits at key row offset + t and
// sees key rows 0..offset + t; query head h reads KV head h / (q_heads / kv_heads). Runs
// in tiles of 64 queries, so it holds 64 x S scores per thread, never T x S. With
// `log_sum_exp` (T x q_heads, row-major) it also gives the softmax denominators.
inline void causal_attention(ConstRowsRef queries, ConstRowsRef keys, ConstRowsRef values, int head_dim,
                             RowsRef out, float* log_sum_exp = nullptr, Eigen::Index offset = 0, int threads = 0) {
  const Eigen::Index tokens = queries.rows();
  require(head_dim > 0 && queries.cols() % head_dim == 0 && keys.cols() % head_dim == 0, "causal_attention: ",
          "widths ", queries.cols(), " and ", keys.cols(), " are not multiples of head_dim ", head_dim);
  const int q_heads = static_cast<int>(queries.cols() / head_dim);
  const int kv_heads = static_cast<int>(keys.cols() / head_dim);
  require(kv_heads > 0 && q_heads % kv_heads == 0 && offset >= 0 && keys.rows() >= offset + tokens &&
              values.rows() == keys.rows() && values.cols() == keys.cols() && out.rows() == tokens &&
              out.cols() == queries.cols(),
          "causal_attention: inconsistent shapes");
  const int group = q_heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  constexpr Eigen::Index tile = 64;
  const Eigen::Index tiles = (tokens + tile - 1) / tile;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(thread_budget(threads)) if (tokens > 32)
  for (int h = 0; h < q_heads; ++h)
    for (Eigen::Index first = 0; first < tiles * tile; first += tile) {
      serial_eigen_products();
      const int kv = h / group;
      const Eigen::Index count = std::min(tile, tokens - first), visible = offset + first + count;
      RowMatrix scores = queries.block(first, h * head_dim, count, head_dim) *
                         keys.block(0, kv * head_dim, visible, head_dim).transpose();
      for (Eigen::Index t = 0; t < count; ++t) {
        const Eigen::Index seen = offset + first + t + 1;
        float lse = 0.0f;
        softmax_rows(scores.row(t).data(), 1, seen, visible, scale, &lse);
        scores.row(t).tail(visible - seen).setZero();  // the future is masked out
        if (log_sum_exp) log_sum_exp[(first + t) * q_heads + h] = lse;
      }
      out.block(first, h * head_dim, count, head_dim).noalias() =
          scores * values.block(0, kv * head_dim, visible, head_dim);
    }
}

// One decode step: for every KV head, the group of query heads that reads it gets
// score(kv_head, queries, group, scores, ld) to fill group x tokens raw dot products,
// the softmax, then accumulate(kv_head, probabilities, ld, group, out) to add
// Σ_t p_t v_t into out (group x head_dim, zeroed before). Heads run in parallel for
// long contexts, on at most `threads` threads (0: the OpenMP default); the callbacks
// must only touch their own head's state. With `log_sum_exp`, query row r's softmax
// denominator (as softmax_rows gives it) goes to log_sum_exp[r].
template <typename ScoreFn, typename AccumulateFn>
void grouped_decode_attention(ConstRowsRef queries, int kv_heads, Eigen::Index tokens, RowsRef out,
                              ScoreFn&& score, AccumulateFn&& accumulate, float* log_sum_exp = nullptr,
                              int threads = 0) {
  const int q_heads = static_cast<int>(queries.rows());
  const int head_dim = static_cast<int>(queries.cols());
  const int group = q_heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  out.setZero();
#pragma omp parallel for schedule(static) num_threads(thread_budget(threads)) if (tokens * kv_heads >= 4096)
  for (int h = 0; h < kv_heads; ++h) {
    serial_eigen_products();
    thread_local std::vector<float> scores;
    thread_local std::vector<float> query_rows, out_rows;
    scores.resize(static_cast<std::size_t>(group * tokens));
    query_rows.resize(static_cast<std::size_t>(group * head_dim));
    out_rows.assign(static_cast<std::size_t>(group * head_dim), 0.0f);
    for (int g = 0; g < group; ++g)
      for (int i = 0; i < head_dim; ++i) query_rows[static_cast<std::size_t>(g * head_dim + i)] = queries(h * group + g, i);
    score(h, query_rows.data(), group, scores.data(), tokens);
    softmax_rows(scores.data(), group, tokens, tokens, scale, log_sum_exp ? log_sum_exp + h * group : nullptr);
    accumulate(h, static_cast<const float*>(scores.data()), tokens, group, out_rows.data());
    for (int g = 0; g < group; ++g)
      for (int i = 0; i < head_dim; ++i) out(h * group + g, i) = out_rows[static_cast<std::size_t>(g * head_dim + i)];
  }
}

}  // namespace lexico

#include "codes.hpp"
#include "dictionary.hpp"
#include "rope.hpp"

namespace lexico::detail {

// Decode attention over a key store and a value store with TokenStore's interface
// (scores, accumulate), `tokens` tokens in every head.
template <typename KeyStore, typename ValueStore>
void attend_stores(const KeyStore& keys, const ValueStore& values, Eigen::Index tokens, ConstRowsRef queries,
                   RowsRef out, float* log_sum_exp, int threads) {
  grouped_decode_attention(
      queries, keys.heads(), tokens, out,
      [&](int h, const float* q, int group, float* scores, Eigen::Index ld) { keys.scores(h, q, group, scores, ld); },
      [&](int h, const float* p, Eigen::Index ld, int group, float* o) { values.accumulate(h, p, ld, group, o); },
      log_sum_exp, threads);
}

}  // namespace lexico::detail

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
  const int pairs = rope.pairs();
  thread_local std::vector<float> cos, sin;
  cos.resize(static_cast<std::size_t>(keys.rows() * pairs));
  sin.resize(cos.size());
  rope.consecutive_angles(first, keys.rows(), cos.data(), sin.data());
  for (Eigen::Index t = 0; t < keys.rows(); ++t)
    rope.rotate(keys.row(t).data(), cos.data() + t * pairs, sin.data() + t * pairs);
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
