#pragma once
// Attention kernels shared by every cache: the exact causal block (prefill, chunked
// prefill and the reference for tests) and the grouped decode step, in which the query
// heads of one GQA group share a single pass over their KV head's tokens.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "../base/error.hpp"
#include "../base/kernels.hpp"
#include "../base/parallel.hpp"
#include "../base/rows.hpp"

namespace lexico {

// Softmax of scale * scores along each row, in place, computed stably in fp32; with
// `log_sum_exp`, row r's log Σ_t exp(scale * score_t) goes to log_sum_exp[r].
inline void softmax_rows(float* scores, int rows, Eigen::Index cols, Eigen::Index ld, float scale,
                         float* log_sum_exp = nullptr) {
  for (int r = 0; r < rows; ++r) {
    float* row = scores + r * ld;
    const float top = detail::max_value(row, cols, -std::numeric_limits<float>::infinity());
    for (Eigen::Index t = 0; t < cols; ++t) row[t] = (row[t] - top) * scale;
    detail::exp_nonpositive(row, cols);
    const float sum = detail::sum_values(row, cols);
    const float inverse = 1.0f / sum;
    for (Eigen::Index t = 0; t < cols; ++t) row[t] *= inverse;
    if (log_sum_exp) log_sum_exp[r] = top * scale + std::log(sum);
  }
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

namespace detail {

// The group of query heads that reads KV head h (rows h * group ..), copied into `rows`
// as group x head_dim contiguous floats, the layout score callbacks take.
inline const float* group_queries(ConstRowsRef queries, int h, int group, std::vector<float>& rows) {
  const int head_dim = static_cast<int>(queries.cols());
  rows.resize(static_cast<std::size_t>(group * head_dim));
  for (int g = 0; g < group; ++g)
    for (int i = 0; i < head_dim; ++i) rows[static_cast<std::size_t>(g * head_dim + i)] = queries(h * group + g, i);
  return rows.data();
}

}  // namespace detail

// One decode step: for every KV head, the group of query heads that reads it gets
// score(kv_head, queries, group, scores, ld) to fill group x tokens raw dot products,
// the softmax, then accumulate(kv_head, probabilities, ld, group, out) to add
// Σ_t p_t v_t into out (group x head_dim, zeroed before). Heads run in parallel for
// long contexts, on at most `threads` threads (0: the OpenMP default); the callbacks
// must only touch their own head's state. With `log_sum_exp`, query row r's softmax
// denominator (as softmax_rows gives it) goes to log_sum_exp[r]. Heads go parallel once
// tokens x kv_heads reaches `parallel_from` (caches whose tokens cost more lower it).
template <typename ScoreFn, typename AccumulateFn>
void grouped_decode_attention(ConstRowsRef queries, int kv_heads, Eigen::Index tokens, RowsRef out,
                              ScoreFn&& score, AccumulateFn&& accumulate, float* log_sum_exp = nullptr,
                              int threads = 0, Eigen::Index parallel_from = 4096) {
  const int q_heads = static_cast<int>(queries.rows());
  const int head_dim = static_cast<int>(queries.cols());
  const int group = q_heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  out.setZero();
#pragma omp parallel for schedule(static) num_threads(thread_budget(threads)) if (tokens * kv_heads >= parallel_from)
  for (int h = 0; h < kv_heads; ++h) {
    serial_eigen_products();
    thread_local std::vector<float> scores;
    thread_local std::vector<float> query_rows, out_rows;
    scores.resize(static_cast<std::size_t>(group * tokens));
    out_rows.assign(static_cast<std::size_t>(group * head_dim), 0.0f);
    score(h, detail::group_queries(queries, h, group, query_rows), group, scores.data(), tokens);
    softmax_rows(scores.data(), group, tokens, tokens, scale, log_sum_exp ? log_sum_exp + h * group : nullptr);
    accumulate(h, static_cast<const float*>(scores.data()), tokens, group, out_rows.data());
    for (int g = 0; g < group; ++g)
      for (int i = 0; i < head_dim; ++i) out(h * group + g, i) = out_rows[static_cast<std::size_t>(g * head_dim + i)];
  }
}

// Decode attention streamed over blocks of tokens with an online softmax: each query
// keeps a running maximum and sum, and its output is rescaled when the maximum grows,
// so a block's keys, scores and values are read while they are in cache and no pass
// ever runs over a whole context's scores. Each head's tokens are cut into parts of
// `part_tokens` (fixed, so results never depend on the thread count), the parts of all
// heads run in parallel once tokens x kv_heads reaches `parallel_from`, and each head's
// parts are merged by their log-sum-exp. score(h, queries, group, first, count, scores, ld)
// fills group x count raw dot products for tokens [first, first + count) of KV head h;
// accumulate(h, weights, ld, group, first, count, out) adds Σ_t weights[g * ld + t] ·
// value first + t into out (group x head_dim); the weights are the softmax's numerators,
// not yet divided by its sum, so callers that need probabilities use grouped_decode_attention.
template <typename ScoreFn, typename AccumulateFn>
void streamed_decode_attention(ConstRowsRef queries, int kv_heads, Eigen::Index tokens, RowsRef out,
                               ScoreFn&& score, AccumulateFn&& accumulate, float* log_sum_exp = nullptr,
                               int threads = 0, Eigen::Index parallel_from = 4096) {
  constexpr Eigen::Index block = 512, part_tokens = 4096;
  const int q_heads = static_cast<int>(queries.rows());
  const int head_dim = static_cast<int>(queries.cols());
  const int group = q_heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const Eigen::Index parts = std::max<Eigen::Index>(1, (tokens + part_tokens - 1) / part_tokens);
  // Per (head, part): group x head_dim output sums, then group maxima, then group sums.
  const Eigen::Index state_size = group * (head_dim + 2);
  std::vector<float> states(static_cast<std::size_t>(kv_heads * parts * state_size));
#pragma omp parallel for schedule(dynamic, 1) num_threads(thread_budget(threads)) if (tokens * kv_heads >= parallel_from)
  for (Eigen::Index item = 0; item < kv_heads * parts; ++item) {
    serial_eigen_products();
    const int h = static_cast<int>(item / parts);
    const Eigen::Index begin = item % parts * part_tokens, end = std::min(tokens, begin + part_tokens);
    float* sums = states.data() + item * state_size;
    float* top = sums + group * head_dim;
    float* total = top + group;
    std::fill(sums, sums + group * head_dim, 0.0f);
    std::fill(top, top + group, -std::numeric_limits<float>::infinity());
    std::fill(total, total + group, 0.0f);
    thread_local std::vector<float> query_rows, weights;
    weights.resize(static_cast<std::size_t>(group * block));
    const float* group_rows = detail::group_queries(queries, h, group, query_rows);
    for (Eigen::Index first = begin; first < end; first += block) {
      const Eigen::Index count = std::min(block, end - first);
      score(h, group_rows, group, first, count, weights.data(), block);
      for (int g = 0; g < group; ++g) {
        float* row = weights.data() + g * block;
        const float previous = top[g], now = detail::max_value(row, count, previous);
        if (now > previous) {  // rescale what the earlier blocks summed (exp(-inf) = 0 the first time)
          const float factor = std::exp((previous - now) * scale);
          total[g] *= factor;
          for (int i = 0; i < head_dim; ++i) sums[g * head_dim + i] *= factor;
          top[g] = now;
        }
        for (Eigen::Index t = 0; t < count; ++t) row[t] = (row[t] - now) * scale;
        detail::exp_nonpositive(row, count);
        total[g] += detail::sum_values(row, count);
      }
      accumulate(h, static_cast<const float*>(weights.data()), block, group, first, count, sums);
    }
  }
  // Merge each query's parts: rescaled to their common maximum, summed, divided.
  const auto part_state = [&](int h, Eigen::Index p) { return states.data() + (h * parts + p) * state_size; };
  for (int h = 0; h < kv_heads; ++h)
    for (int g = 0; g < group; ++g) {
      float common = -std::numeric_limits<float>::infinity();
      for (Eigen::Index p = 0; p < parts; ++p) common = std::max(common, part_state(h, p)[group * head_dim + g]);
      float denominator = 0.0f;
      auto row = out.row(h * group + g);
      row.setZero();
      for (Eigen::Index p = 0; p < parts; ++p) {
        const float* state = part_state(h, p);
        const float part_top = state[group * head_dim + g];
        if (part_top == -std::numeric_limits<float>::infinity()) continue;  // a part with no tokens
        const float factor = std::exp((part_top - common) * scale);
        denominator += factor * state[group * head_dim + group + g];
        row += factor * Eigen::Map<const Eigen::RowVectorXf>(state + g * head_dim, head_dim);
      }
      if (denominator > 0.0f) row /= denominator;
      if (log_sum_exp) log_sum_exp[h * group + g] = common * scale + std::log(denominator);
    }
}

}  // namespace lexico

namespace lexico::detail {

// Decode attention over a key store and a value store with TokenStore's interface
// (scores and accumulate over a range of tokens), `tokens` tokens in every head.
template <typename KeyStore, typename ValueStore>
void attend_stores(const KeyStore& keys, const ValueStore& values, Eigen::Index tokens, ConstRowsRef queries,
                   RowsRef out, float* log_sum_exp, int threads) {
  streamed_decode_attention(
      queries, keys.heads(), tokens, out,
      [&](int h, const float* q, int group, Eigen::Index first, Eigen::Index count, float* scores, Eigen::Index ld) {
        keys.scores(h, q, group, first, count, scores, ld);
      },
      [&](int h, const float* p, Eigen::Index ld, int group, Eigen::Index first, Eigen::Index count, float* o) {
        values.accumulate(h, p, ld, group, first, count, o);
      },
      log_sum_exp, threads);
}

}  // namespace lexico::detail
