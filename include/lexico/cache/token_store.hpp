#pragma once
// Uncompressed token rows of every KV head, in a storage type of choice (fp32,
// fp16, bf16): the dense cache, Lexico's recent-token buffer, KIVI's residual
// window and the tokens an eviction cache keeps are all one of these.

#include <cstddef>
#include <vector>

#include <Eigen/Core>

#include "../attention.hpp"
#include "../half.hpp"
#include "../kernels.hpp"

namespace lexico {

template <typename Scalar>
class TokenStore {
 public:
  TokenStore(int heads, int head_dim)
      : head_dim_(head_dim), rows_(static_cast<std::size_t>(heads)) {}

  int heads() const { return static_cast<int>(rows_.size()); }
  int head_dim() const { return head_dim_; }
  Eigen::Index tokens() const { return tokens_; }
  std::size_t bytes() const {
    std::size_t elements = 0;
    for (const auto& rows : rows_) elements += rows.size();
    return elements * sizeof(Scalar);
  }

  // Adds one token: heads x head_dim floats.
  void append(const float* token) {
    for (std::size_t h = 0; h < rows_.size(); ++h) {
      auto& rows = rows_[h];
      const std::size_t end = rows.size();
      rows.resize(end + static_cast<std::size_t>(head_dim_));
      from_float(token + h * static_cast<std::size_t>(head_dim_), rows.data() + end, head_dim_);
    }
    ++tokens_;
  }

  // Drops the oldest `count` tokens.
  void erase_front(Eigen::Index count) {
    for (auto& rows : rows_) rows.erase(rows.begin(), rows.begin() + count * head_dim_);
    tokens_ -= count;
  }

  // Drops token t of one head only (eviction caches choose per KV head).
  void erase(int head, Eigen::Index t) {
    auto& rows = rows_[static_cast<std::size_t>(head)];
    rows.erase(rows.begin() + t * head_dim_, rows.begin() + (t + 1) * head_dim_);
  }

  void clear() {
    for (auto& rows : rows_) rows.clear();
    tokens_ = 0;
  }

  // Token t of a head as floats.
  void row(int head, Eigen::Index t, float* out) const {
    to_float(rows_[static_cast<std::size_t>(head)].data() + t * head_dim_, out, head_dim_);
  }

  // Tokens held by one head (differs from tokens() only after per-head erase()).
  Eigen::Index head_tokens(int head) const {
    return static_cast<Eigen::Index>(rows_[static_cast<std::size_t>(head)].size()) / head_dim_;
  }

  // scores[g * ld + t] = <query g, key t> for the group's queries (group x head_dim).
  void scores(int head, const float* queries, int group, float* scores, Eigen::Index ld) const {
    float key[max_head_dim], dots[max_gqa_group];
    const Eigen::Index count = head_tokens(head);
    for (Eigen::Index t = 0; t < count; ++t) {
      detail::dot_group(as_float(head, t, key), queries, group, head_dim_, dots);
      for (int g = 0; g < group; ++g) scores[g * ld + t] = dots[g];
    }
  }

  // out[g] += Σ_t probabilities[g * ld + t] · value t.
  void accumulate(int head, const float* probabilities, Eigen::Index ld, int group, float* out) const {
    float value[max_head_dim], weights[max_gqa_group];
    const Eigen::Index count = head_tokens(head);
    for (Eigen::Index t = 0; t < count; ++t) {
      for (int g = 0; g < group; ++g) weights[g] = probabilities[g * ld + t];
      detail::axpy_group(as_float(head, t, value), weights, group, head_dim_, out);
    }
  }

  static constexpr int max_head_dim = 256;

 private:
  // fp32 rows are read in place; 16-bit rows are widened into `scratch`.
  const float* as_float(int head, Eigen::Index t, float* scratch) const {
    const Scalar* source = rows_[static_cast<std::size_t>(head)].data() + t * head_dim_;
    if constexpr (std::is_same_v<Scalar, float>) {
      return source;
    } else {
      to_float(source, scratch, head_dim_);
      return scratch;
    }
  }

  int head_dim_;
  Eigen::Index tokens_ = 0;
  std::vector<std::vector<Scalar>> rows_;  // [head] -> tokens x head_dim
};

}  // namespace lexico
