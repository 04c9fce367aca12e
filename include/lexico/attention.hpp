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
