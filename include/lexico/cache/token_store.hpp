#pragma once
// Uncompressed token rows of every KV head, in a storage type of choice (fp32,
// fp16, bf16): the dense cache, Lexico's recent-token buffer, KIVI's residual
// window and the tokens an eviction cache keeps are all one of these.
//
// Each head's rows sit in one vector behind a common offset: erase_front() only moves
// the offset (the dead rows are compacted away once they pass half the storage), so a
// sliding window costs O(1) amortised per token instead of a shift of the whole window.

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "attention.hpp"
#include "../base/error.hpp"
#include "../base/half.hpp"
#include "../base/kernels.hpp"
#include "../base/large_page_allocator.hpp"

namespace lexico {

template <typename Scalar>
class TokenStore {
 public:
  TokenStore(int heads, int head_dim)
      : head_dim_(head_dim), rows_(static_cast<std::size_t>(heads)) {}

  int heads() const { return static_cast<int>(rows_.size()); }
  int head_dim() const { return head_dim_; }
  Eigen::Index tokens() const { return tokens_; }
  // Bytes of the tokens held (not of the storage's capacity: see overhead_bytes()).
  std::size_t bytes() const {
    std::size_t elements = 0;
    for (const auto& rows : rows_) elements += rows.size() - front();
    return elements * sizeof(Scalar);
  }
  // Storage beyond bytes(): erased rows not yet compacted, vector capacity slack and headers.
  std::size_t overhead_bytes() const {
    std::size_t capacity = rows_.capacity() * sizeof(Rows);
    for (const auto& rows : rows_) capacity += rows.capacity() * sizeof(Scalar);
    return capacity - bytes();
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

  // Drops the oldest `count` tokens of every head, O(count · head_dim) amortised.
  void erase_front(Eigen::Index count) {
    for (int h = 0; h < heads(); ++h)
      require(count >= 0 && count <= head_tokens(h), "TokenStore::erase_front: ", count, " tokens asked, head ", h,
              " holds ", head_tokens(h));
    offset_ += count;
    tokens_ -= count;
    std::size_t stored = 0;
    for (const auto& rows : rows_) stored = std::max(stored, rows.size());
    if (2 * front() > stored) compact();
  }

  // Drops the newest `count` tokens of every head.
  void erase_back(Eigen::Index count) {
    for (int h = 0; h < heads(); ++h)
      require(count >= 0 && count <= head_tokens(h), "TokenStore::erase_back: ", count, " tokens asked, head ", h,
              " holds ", head_tokens(h));
    for (auto& rows : rows_) rows.resize(rows.size() - static_cast<std::size_t>(count * head_dim_));
    tokens_ -= count;
  }

  // Keeps the oldest `count` tokens (every head holding tokens() of them).
  void truncate(Eigen::Index count) {
    require(count >= 0 && count <= tokens_, "TokenStore::truncate: ", count, " tokens asked, ", tokens_, " held");
    erase_back(tokens_ - count);
  }

  // Drops token t of one head only (eviction caches choose per KV head).
  void erase(int head, Eigen::Index t) {
    auto& rows = rows_[static_cast<std::size_t>(head)];
    const auto first = rows.begin() + static_cast<std::ptrdiff_t>(front() + static_cast<std::size_t>(t * head_dim_));
    rows.erase(first, first + head_dim_);
  }

  void clear() {
    for (auto& rows : rows_) rows.clear();
    tokens_ = 0;
    offset_ = 0;
  }

  // Token t of a head as floats.
  void row(int head, Eigen::Index t, float* out) const { to_float(data(head, t), out, head_dim_); }

  // Tokens held by one head (differs from tokens() only after per-head erase()).
  Eigen::Index head_tokens(int head) const {
    return static_cast<Eigen::Index>(rows_[static_cast<std::size_t>(head)].size() - front()) / head_dim_;
  }

  // scores[g * ld + t] = <query g, key first + t> for the group's queries (group x
  // head_dim) and tokens [first, first + count) of a head.
  void scores(int head, const float* queries, int group, Eigen::Index first, Eigen::Index count, float* scores,
              Eigen::Index ld) const {
    float key[max_head_dim], dots[max_gqa_group];
    if constexpr (std::is_same_v<Scalar, Eigen::half>)
      if (count > 0 && detail::fp16_scores(reinterpret_cast<const std::uint16_t*>(data(head, first)), count, head_dim_,
                                           queries, group, scores, ld))
        return;
    for (Eigen::Index t = 0; t < count; ++t) {
      detail::dot_group(as_float(head, first + t, key), queries, group, head_dim_, dots);
      for (int g = 0; g < group; ++g) scores[g * ld + t] = dots[g];
    }
  }
  void scores(int head, const float* queries, int group, float* scores, Eigen::Index ld) const {
    this->scores(head, queries, group, 0, head_tokens(head), scores, ld);
  }

  // out[g] += Σ_t weights[g * ld + t] · value first + t, tokens [first, first + count).
  void accumulate(int head, const float* weights, Eigen::Index ld, int group, Eigen::Index first, Eigen::Index count,
                  float* out) const {
    float value[max_head_dim], column[max_gqa_group];
    if constexpr (std::is_same_v<Scalar, Eigen::half>)
      if (count > 0 && detail::fp16_accumulate(reinterpret_cast<const std::uint16_t*>(data(head, first)), count,
                                               head_dim_, weights, ld, group, out))
        return;
    for (Eigen::Index t = 0; t < count; ++t) {
      for (int g = 0; g < group; ++g) column[g] = weights[g * ld + t];
      detail::axpy_group(as_float(head, first + t, value), column, group, head_dim_, out);
    }
  }
  void accumulate(int head, const float* probabilities, Eigen::Index ld, int group, float* out) const {
    accumulate(head, probabilities, ld, group, 0, head_tokens(head), out);
  }

  static constexpr int max_head_dim = 256;

 private:
  // Elements before the first held token of every head.
  std::size_t front() const { return static_cast<std::size_t>(offset_ * head_dim_); }

  const Scalar* data(int head, Eigen::Index t) const {
    return rows_[static_cast<std::size_t>(head)].data() + front() + static_cast<std::size_t>(t * head_dim_);
  }

  // Moves the held rows to the start of their storage (capacity is kept for reuse).
  void compact() {
    for (auto& rows : rows_) rows.erase(rows.begin(), rows.begin() + static_cast<std::ptrdiff_t>(front()));
    offset_ = 0;
  }

  // fp32 rows are read in place; 16-bit rows are widened into `scratch`.
  const float* as_float(int head, Eigen::Index t, float* scratch) const {
    const Scalar* source = data(head, t);
    if constexpr (std::is_same_v<Scalar, float>) {
      return source;
    } else {
      to_float(source, scratch, head_dim_);
      return scratch;
    }
  }

  int head_dim_;
  Eigen::Index tokens_ = 0;
  Eigen::Index offset_ = 0;                // tokens erased from the front, not yet compacted
  // Each head's rows in their own block: decode attention streams them (large pages).
  using Rows = std::vector<Scalar, LargePageAllocator<Scalar>>;
  std::vector<Rows> rows_;  // [head] -> (offset_ + tokens) x head_dim
};

}  // namespace lexico
