#pragma once
// Helpers shared by the cache tests: random tensors and a naive double-precision attention
// over what a cache says it stores (its stored_keys / stored_values).

#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include <lexico/cache/cache.hpp>

namespace lexico_test {

using lexico::RowMatrix;

inline RowMatrix random_rows(Eigen::Index rows, Eigen::Index cols, std::mt19937& rng, float sigma = 1.0f) {
  std::normal_distribution<float> normal(0.0f, sigma);
  RowMatrix m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

// softmax(K q / sqrt(d)) V for one query.
inline Eigen::VectorXd naive_attention(const Eigen::VectorXd& q, const Eigen::MatrixXd& keys,
                                       const Eigen::MatrixXd& values) {
  Eigen::VectorXd scores = keys * q / std::sqrt(static_cast<double>(q.size()));
  scores = (scores.array() - scores.maxCoeff()).exp();
  scores /= scores.sum();
  return values.transpose() * scores;
}

// Snapshots the tokens the cache stores for every KV head of `layer`, runs attend() and
// compares each query head's output with naive attention over the snapshot.
template <typename Cache>
void expect_attention_over_stored(Cache& cache, int layer, const RowMatrix& queries, double tolerance) {
  const int kv_heads = cache.shape().kv_heads;
  const int group = static_cast<int>(queries.rows()) / kv_heads;
  std::vector<Eigen::MatrixXd> keys, values;
  for (int h = 0; h < kv_heads; ++h) {
    keys.push_back(cache.stored_keys(layer, h).template cast<double>());
    values.push_back(cache.stored_values(layer, h).template cast<double>());
  }
  RowMatrix out(queries.rows(), queries.cols());
  cache.attend(layer, queries, out);
  for (Eigen::Index qh = 0; qh < queries.rows(); ++qh) {
    const Eigen::VectorXd want = naive_attention(queries.row(qh).transpose().cast<double>(), keys[qh / group],
                                                 values[qh / group]);
    for (Eigen::Index i = 0; i < queries.cols(); ++i) ASSERT_NEAR(out(qh, i), want(i), tolerance) << "head " << qh;
  }
}

// Query head rows of token t from a T x (q_heads * d) block.
inline RowMatrix query_heads(const RowMatrix& queries, Eigen::Index t, int head_dim) {
  return Eigen::Map<const RowMatrix>(queries.row(t).data(), queries.cols() / head_dim, head_dim);
}

// Prefills the first `prompt` tokens into `layer`, then appends the others one at a time,
// checking every step's attention against naive attention over the stored tokens.
template <typename Cache>
void expect_decode_over_stored(Cache& cache, int layer, const RowMatrix& keys, const RowMatrix& values,
                               const RowMatrix& queries, Eigen::Index prompt, double tolerance) {
  RowMatrix out(prompt, queries.cols());
  cache.prefill(layer, keys.topRows(prompt), values.topRows(prompt), queries.topRows(prompt), out);
  for (Eigen::Index t = prompt; t < keys.rows(); ++t) {
    cache.append(layer, keys.row(t).data(), values.row(t).data());
    expect_attention_over_stored(cache, layer, query_heads(queries, t, cache.shape().head_dim), tolerance);
  }
}

}  // namespace lexico_test
