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

namespace lexico {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Most query heads that may share one KV head (GQA group); sizes stack buffers.
inline constexpr int max_gqa_group = 64;
using ConstRowsRef = Eigen::Ref<const RowMatrix>;
using RowsRef = Eigen::Ref<RowMatrix>;

// Softmax of scale * scores along each row, in place, computed stably in fp32.
inline void softmax_rows(float* scores, int rows, Eigen::Index cols, Eigen::Index ld, float scale) {
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
  }
}

// Exact causal attention of a block of T tokens: queries T x (q_heads * d), keys and
// values T x (kv_heads * d), out T x (q_heads * d). Query head h reads KV head
// h / (q_heads / kv_heads); token t sees tokens 0..t.
inline void causal_attention(ConstRowsRef queries, ConstRowsRef keys, ConstRowsRef values, int head_dim,
                             RowsRef out) {
  const Eigen::Index tokens = queries.rows();
  const int q_heads = static_cast<int>(queries.cols() / head_dim);
  const int kv_heads = static_cast<int>(keys.cols() / head_dim);
  require(head_dim > 0 && kv_heads > 0 && q_heads % kv_heads == 0 && keys.rows() == tokens &&
              values.rows() == tokens && values.cols() == keys.cols() && out.rows() == tokens &&
              out.cols() == queries.cols(),
          "causal_attention: inconsistent shapes");
  const int group = q_heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
#pragma omp parallel for schedule(static) if (tokens > 32)
  for (int h = 0; h < q_heads; ++h) {
    const int kv = h / group;
    RowMatrix scores = queries.middleCols(h * head_dim, head_dim) *
                       keys.middleCols(kv * head_dim, head_dim).transpose();
    for (Eigen::Index t = 0; t < tokens; ++t) {
      softmax_rows(scores.row(t).data(), 1, t + 1, tokens, scale);
      scores.row(t).tail(tokens - t - 1).setZero();  // the future is masked out
    }
    out.middleCols(h * head_dim, head_dim).noalias() = scores * values.middleCols(kv * head_dim, head_dim);
  }
}

// One decode step: for every KV head, the group of query heads that reads it gets
// score(kv_head, queries, group, scores, ld) to fill group x tokens raw dot products,
// the softmax, then accumulate(kv_head, probabilities, ld, group, out) to add
// Σ_t p_t v_t into out (group x head_dim, zeroed before). Heads run in parallel for
// long contexts; the callbacks must only touch their own head's state.
template <typename ScoreFn, typename AccumulateFn>
void grouped_decode_attention(ConstRowsRef queries, int kv_heads, Eigen::Index tokens, RowsRef out,
                              ScoreFn&& score, AccumulateFn&& accumulate) {
  const int q_heads = static_cast<int>(queries.rows());
  const int head_dim = static_cast<int>(queries.cols());
  const int group = q_heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  out.setZero();
#pragma omp parallel for schedule(static) if (tokens * kv_heads >= 4096)
  for (int h = 0; h < kv_heads; ++h) {
    thread_local std::vector<float> scores;
    thread_local std::vector<float> query_rows, out_rows;
    scores.resize(static_cast<std::size_t>(group * tokens));
    query_rows.resize(static_cast<std::size_t>(group * head_dim));
    out_rows.assign(static_cast<std::size_t>(group * head_dim), 0.0f);
    for (int g = 0; g < group; ++g)
      for (int i = 0; i < head_dim; ++i) query_rows[static_cast<std::size_t>(g * head_dim + i)] = queries(h * group + g, i);
    score(h, query_rows.data(), group, scores.data(), tokens);
    softmax_rows(scores.data(), group, tokens, tokens, scale);
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
                   RowsRef out) {
  grouped_decode_attention(
      queries, keys.heads(), tokens, out,
      [&](int h, const float* q, int group, float* scores, Eigen::Index ld) { keys.scores(h, q, group, scores, ld); },
      [&](int h, const float* p, Eigen::Index ld, int group, float* o) { values.accumulate(h, p, ld, group, o); });
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
void code_scores_grouped(const CodeStore& codes, const float* table, int /*group*/, float* scores, Eigen::Index ld) {
  using Vector = typename GroupVector<Group>::type;
  const auto& fp8 = fp8_e4m3_table();
  codes.for_each_row([&](std::size_t r, CodeStore::Indices index, const std::uint8_t* coefficient, int count,
                         float scale) {
    Vector sum{};
    for (int i = 0; i < count; ++i) {
      Vector u;
      std::memcpy(&u, table + static_cast<std::size_t>(index[i]) * Group, sizeof u);
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
                             float* weights) {
  using Vector = typename GroupVector<Group>::type;
  const auto& fp8 = fp8_e4m3_table();
  codes.for_each_row([&](std::size_t r, CodeStore::Indices index, const std::uint8_t* coefficient, int count,
                         float scale) {
    float lanes[Group];
    for (int g = 0; g < Group; ++g) lanes[g] = probabilities[g * ld + static_cast<Eigen::Index>(r)] * scale;
    Vector p;
    std::memcpy(&p, lanes, sizeof p);
    for (int i = 0; i < count; ++i) {
      float* w = weights + static_cast<std::size_t>(index[i]) * Group;
      Vector sum;
      std::memcpy(&sum, w, sizeof sum);
      sum += p * fp8[coefficient[i]];
      std::memcpy(w, &sum, sizeof sum);
    }
  });
}

// Any group size, one query at a time.
inline void code_scores_any(const CodeStore& codes, const float* table, int group, float* scores, Eigen::Index ld) {
  const auto& fp8 = fp8_e4m3_table();
  codes.for_each_row([&](std::size_t r, CodeStore::Indices index, const std::uint8_t* coefficient, int count,
                         float scale) {
    for (int g = 0; g < group; ++g) {
      float sum = 0.0f;
      for (int i = 0; i < count; ++i) sum += fp8[coefficient[i]] * table[static_cast<std::size_t>(index[i]) * group + g];
      scores[g * ld + static_cast<Eigen::Index>(r)] = sum * scale;
    }
  });
}

inline void code_accumulate_any(const CodeStore& codes, const float* probabilities, Eigen::Index ld, int group,
                                float* weights) {
  const auto& fp8 = fp8_e4m3_table();
  codes.for_each_row([&](std::size_t r, CodeStore::Indices index, const std::uint8_t* coefficient, int count,
                         float scale) {
    for (int g = 0; g < group; ++g) {
      const float p = probabilities[g * ld + static_cast<Eigen::Index>(r)] * scale;
      for (int i = 0; i < count; ++i) weights[static_cast<std::size_t>(index[i]) * group + g] += p * fp8[coefficient[i]];
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
struct AtomDots {
  static void run(int group, const float* atoms, int count, int d, const float* queries, float* table) {
    if constexpr (Group > 0) {
      atom_dots<Group>(atoms, count, d, queries, table);
    } else {
      for (int a = 0; a < count; ++a)
        for (int g = 0; g < group; ++g)
          table[a * group + g] = Eigen::Map<const Eigen::VectorXf>(atoms + static_cast<long>(a) * d, d)
                                     .dot(Eigen::Map<const Eigen::VectorXf>(queries + g * d, d));
    }
  }
};

template <int Group>
struct AtomCombination {
  static void run(int group, const float* atoms, int count, int d, const float* weights, float* out) {
    if constexpr (Group > 0) {
      atom_combination<Group>(atoms, count, d, weights, out);
    } else {
      for (int a = 0; a < count; ++a)
        for (int g = 0; g < group; ++g)
          for (int i = 0; i < d; ++i) out[g * d + i] += weights[a * group + g] * atoms[static_cast<long>(a) * d + i];
    }
  }
};

template <int Group>
struct CodeScores {
  static void run(int group, const CodeStore& codes, const float* table, float* scores, Eigen::Index ld) {
    if constexpr (Group > 0) code_scores_grouped<Group>(codes, table, group, scores, ld);
    else code_scores_any(codes, table, group, scores, ld);
  }
};

template <int Group>
struct CodeAccumulate {
  static void run(int group, const CodeStore& codes, const float* probabilities, Eigen::Index ld, float* weights) {
    if constexpr (Group > 0) code_accumulate_grouped<Group>(codes, probabilities, ld, group, weights);
    else code_accumulate_any(codes, probabilities, ld, group, weights);
  }
};

}  // namespace detail

// table[a * group + g] = <atom a, query g>: u = Dᵀq for the queries of a GQA group
// (queries: group x d, row-major).
inline void atom_table(const Dictionary& dictionary, const float* queries, int group, float* table) {
  detail::dispatch_group<detail::AtomDots>(group, dictionary.atoms().data(), dictionary.size(), dictionary.dim(),
                                           queries, table);
}

// out (group x d) += D · weights for weights laid out like atom_table's result.
inline void add_atom_combination(const Dictionary& dictionary, const float* weights, int group, float* out) {
  detail::dispatch_group<detail::AtomCombination>(group, dictionary.atoms().data(), dictionary.size(),
                                                  dictionary.dim(), weights, out);
}

// Scores of coded keys: scores[g * ld + t] = Σ_i coef_ti · table[idx_ti * group + g],
// where table (N x group, row-major) holds u = Dᵀq for each query of the group.
inline void code_scores(const CodeStore& codes, const float* table, int group, float* scores, Eigen::Index ld) {
  require(group >= 1 && group <= max_gqa_group, "code_scores: GQA group of ", group, " query heads above ",
          max_gqa_group);
  detail::dispatch_group<detail::CodeScores>(group, codes, table, scores, ld);
}

// Values in code space: weights[idx_ti * group + g] += p[g * ld + t] · coef_ti, so the
// output is D_v · weights, one dense product after the pass over the tokens.
inline void code_accumulate(const CodeStore& codes, const float* probabilities, Eigen::Index ld, int group,
                            float* weights) {
  require(group >= 1 && group <= max_gqa_group, "code_accumulate: GQA group of ", group, " query heads above ",
          max_gqa_group);
  detail::dispatch_group<detail::CodeAccumulate>(group, codes, probabilities, ld, weights);
}

// Scores of keys coded before RoPE: row r of `codes` is the token at position first + r.
// Each key is rebuilt from its atoms, rotated to its position and dotted with the
// group's queries, 64 tokens at a time: O(s·d) per token instead of code_scores' O(s),
// the price of the lower error of dictionaries trained on keys before RoPE.
inline void rotated_code_scores(const CodeStore& codes, const Dictionary& dictionary, const Rope& rope,
                                std::int64_t first, const float* queries, int group, float* scores, Eigen::Index ld) {
  require(dictionary.dim() == rope.head_dim() && group >= 1 && group <= max_gqa_group,
          "rotated_code_scores: dictionary dimension ", dictionary.dim(), ", RoPE head_dim ", rope.head_dim(),
          " and GQA group ", group, " do not fit");
  constexpr Eigen::Index block = 64;
  const int d = dictionary.dim(), pairs = rope.pairs();
  thread_local RowMatrix keys;
  thread_local std::vector<float> cos, sin;
  keys.resize(block, d);
  cos.resize(static_cast<std::size_t>(block * pairs));
  sin.resize(cos.size());
  const Eigen::Map<const RowMatrix> q(queries, group, d);
  const auto& fp8 = detail::fp8_e4m3_table();
  Eigen::Index filled = 0, done = 0;
  const auto score_block = [&] {
    rope.consecutive_angles(first + done, filled, cos.data(), sin.data());
    for (Eigen::Index t = 0; t < filled; ++t) rope.rotate(keys.row(t).data(), cos.data() + t * pairs, sin.data() + t * pairs);
    Eigen::Map<RowMatrix, 0, Eigen::OuterStride<>> out(scores + done, group, filled, Eigen::OuterStride<>(ld));
    out.noalias() = q * keys.topRows(filled).transpose();
    done += filled;
    filled = 0;
  };
  codes.for_each_row([&](std::size_t, CodeStore::Indices index, const std::uint8_t* coefficient, int count,
                         float scale) {
    auto key = keys.row(filled);
    key.setZero();
    for (int i = 0; i < count; ++i) key += (fp8[coefficient[i]] * scale) * dictionary.atoms().col(index[i]).transpose();
    if (++filled == block) score_block();
  });
  if (filled > 0) score_block();
}

}  // namespace lexico
