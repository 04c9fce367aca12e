#pragma once
// Attention kernels shared by every cache: the exact causal block (prefill and the
// reference for tests) and the grouped decode step, in which the query heads of one
// GQA group share a single pass over their KV head's tokens.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "error.hpp"

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
    float sum = 0.0f;
    for (Eigen::Index t = 0; t < cols; ++t) {
      row[t] = std::exp((row[t] - top) * scale);
      sum += row[t];
    }
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
#pragma omp parallel for schedule(static) if (tokens * kv_heads > 8192)
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

// Row r of a code store against `Group` query tables at once: the table holds, for
// atom a, the Group values <atom a, query g> side by side, so one gathered cache
// line serves every query head of the GQA group.
template <int Group>
void code_scores_grouped(const CodeStore& codes, const float* table, int group, float* scores, Eigen::Index ld) {
  const auto& fp8 = fp8_e4m3_table();
  const int g_count = Group > 0 ? Group : group;
  codes.for_each_row([&](std::size_t r, const std::uint16_t* index, const std::uint8_t* coefficient, int count,
                         float scale) {
    float sum[Group > 0 ? Group : max_gqa_group] = {};
    for (int i = 0; i < count; ++i) {
      const float c = fp8[coefficient[i]];
      const float* u = table + static_cast<std::size_t>(index[i]) * static_cast<std::size_t>(g_count);
      for (int g = 0; g < g_count; ++g) sum[g] += c * u[g];
    }
    for (int g = 0; g < g_count; ++g) scores[g * ld + static_cast<Eigen::Index>(r)] = sum[g] * scale;
  });
}

template <int Group>
void code_accumulate_grouped(const CodeStore& codes, const float* probabilities, Eigen::Index ld, int group,
                             float* weights) {
  const auto& fp8 = fp8_e4m3_table();
  const int g_count = Group > 0 ? Group : group;
  codes.for_each_row([&](std::size_t r, const std::uint16_t* index, const std::uint8_t* coefficient, int count,
                         float scale) {
    float p[Group > 0 ? Group : max_gqa_group];
    for (int g = 0; g < g_count; ++g) p[g] = probabilities[g * ld + static_cast<Eigen::Index>(r)] * scale;
    for (int i = 0; i < count; ++i) {
      const float c = fp8[coefficient[i]];
      float* w = weights + static_cast<std::size_t>(index[i]) * static_cast<std::size_t>(g_count);
      for (int g = 0; g < g_count; ++g) w[g] += c * p[g];
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
  static void run(int group, const CodeStore& codes, const float* table, float* scores, Eigen::Index ld) {
    code_scores_grouped<Group>(codes, table, group, scores, ld);
  }
};

template <int Group>
struct CodeAccumulate {
  static void run(int group, const CodeStore& codes, const float* probabilities, Eigen::Index ld, float* weights) {
    code_accumulate_grouped<Group>(codes, probabilities, ld, group, weights);
  }
};

}  // namespace detail

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

}  // namespace lexico
