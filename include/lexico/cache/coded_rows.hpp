#pragma once
// Token rows of every KV head, each stored as a fixed number of bytes by a row codec:
// the per-token quantized caches (q8_0, q4_0, FP8) and KIVI's quantized values. Same
// interface as TokenStore, so attention code reads either.
//
// A row codec provides
//   void check(int head_dim) const;                    // raises if it cannot code such rows
//   int payload_bytes(int head_dim) const;             // codes of one row
//   int metadata_bytes(int head_dim) const;            // per-row scales, minima
//   std::size_t shared_bytes() const;                  // per-store parameters (FP8 scale)
//   bool data_dependent() const;                       // whether calibrate() fixes anything
//   void calibrate(ConstRowsRef tokens);               // fixes data-dependent parameters
//   void encode(const float* x, int head_dim, std::uint8_t* row) const;   // payload, metadata
//   void decode(const std::uint8_t* row, int head_dim, float* x) const;
//   std::string name() const;  std::string parameters() const;

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "attention.hpp"
#include "token_store.hpp"

namespace lexico {

template <typename Codec>
class CodedRows {
 public:
  static constexpr int max_head_dim = TokenStore<float>::max_head_dim;

  CodedRows(int heads, int head_dim, Codec codec)
      : codec_(std::move(codec)), head_dim_(head_dim), rows_(static_cast<std::size_t>(heads)) {
    require(head_dim > 0 && head_dim <= max_head_dim, "CodedRows: head_dim ", head_dim, " outside [1, ", max_head_dim,
            "]");
    codec_.check(head_dim);
    row_bytes_ = static_cast<std::size_t>(codec_.payload_bytes(head_dim) + codec_.metadata_bytes(head_dim));
  }

  const Codec& codec() const { return codec_; }
  int heads() const { return static_cast<int>(rows_.size()); }
  int head_dim() const { return head_dim_; }
  Eigen::Index tokens() const { return tokens_; }
  // Whether the codec's data-dependent parameters are fixed (by calibrate() or the first append()).
  bool calibrated() const { return calibrated_; }

  std::size_t payload_bytes() const { return count() * static_cast<std::size_t>(codec_.payload_bytes(head_dim_)); }
  std::size_t metadata_bytes() const {
    return count() * static_cast<std::size_t>(codec_.metadata_bytes(head_dim_)) +
           (calibrated_ ? codec_.shared_bytes() : 0);
  }

  // Lets the codec fix its data-dependent parameters from a block of tokens (T x heads*head_dim)
  // before the first row is coded; later calls change nothing until clear(). append() calibrates
  // on its own token when nothing did before.
  void calibrate(ConstRowsRef tokens) {
    if (calibrated_) return;
    codec_.calibrate(tokens);
    calibrated_ = true;
  }

  // Adds one token: heads x head_dim floats. A row the codec refuses (NaN) leaves the store as it was.
  void append(const float* token) {
    if (!calibrated_) calibrate(Eigen::Map<const RowMatrix>(token, 1, static_cast<Eigen::Index>(heads()) * head_dim_));
    const std::size_t end = static_cast<std::size_t>(tokens_) * row_bytes_;
    try {
      for (std::size_t h = 0; h < rows_.size(); ++h) {
        rows_[h].resize(end + row_bytes_);
        codec_.encode(token + h * static_cast<std::size_t>(head_dim_), head_dim_, rows_[h].data() + end);
      }
    } catch (...) {
      for (auto& rows : rows_) rows.resize(end);
      throw;
    }
    ++tokens_;
  }

  // Drops the oldest `count` tokens.
  void erase_front(Eigen::Index count) {
    require(count >= 0 && count <= tokens_, "CodedRows::erase_front: ", count, " tokens asked, ", tokens_, " held");
    for (auto& rows : rows_) rows.erase(rows.begin(), rows.begin() + static_cast<std::ptrdiff_t>(count * row_bytes_));
    tokens_ -= count;
  }

  // Keeps the oldest `count` tokens (the codec's calibration stays).
  void truncate(Eigen::Index count) {
    require(count >= 0 && count <= tokens_, "CodedRows::truncate: ", count, " tokens asked, ", tokens_, " held");
    for (auto& rows : rows_) rows.resize(static_cast<std::size_t>(count) * row_bytes_);
    tokens_ = count;
  }

  // Storage beyond the held rows: vector capacity slack and headers.
  std::size_t overhead_bytes() const {
    std::size_t bytes = rows_.capacity() * sizeof(std::vector<std::uint8_t>);
    for (const auto& rows : rows_) bytes += rows.capacity() - rows.size();
    return bytes;
  }

  void clear() {
    for (auto& rows : rows_) rows.clear();
    tokens_ = 0;
    calibrated_ = false;
  }

  // Token t of a head, decoded.
  void row(int head, Eigen::Index t, float* out) const {
    codec_.decode(rows_[static_cast<std::size_t>(head)].data() + static_cast<std::size_t>(t) * row_bytes_, head_dim_,
                  out);
  }

  // scores[g * ld + t] = <query g, key first + t> for the group's queries (group x
  // head_dim) and tokens [first, first + count); each row is decoded once for the group.
  void scores(int head, const float* queries, int group, Eigen::Index first, Eigen::Index count, float* scores,
              Eigen::Index ld) const {
    require(group >= 1 && group <= max_gqa_group, "CodedRows::scores: GQA group of ", group, " query heads");
    float key[max_head_dim], dots[max_gqa_group];
    for (Eigen::Index t = 0; t < count; ++t) {
      row(head, first + t, key);
      detail::dot_group(key, queries, group, head_dim_, dots);
      for (int g = 0; g < group; ++g) scores[g * ld + t] = dots[g];
    }
  }
  void scores(int head, const float* queries, int group, float* scores, Eigen::Index ld) const {
    this->scores(head, queries, group, 0, tokens_, scores, ld);
  }

  // out[g] += Σ_t weights[g * ld + t] · value first + t, tokens [first, first + count).
  void accumulate(int head, const float* weights, Eigen::Index ld, int group, Eigen::Index first, Eigen::Index count,
                  float* out) const {
    require(group >= 1 && group <= max_gqa_group, "CodedRows::accumulate: GQA group of ", group, " query heads");
    float value[max_head_dim], p[max_gqa_group];
    for (Eigen::Index t = 0; t < count; ++t) {
      row(head, first + t, value);
      for (int g = 0; g < group; ++g) p[g] = weights[g * ld + t];
      detail::axpy_group(value, p, group, head_dim_, out);
    }
  }
  void accumulate(int head, const float* probabilities, Eigen::Index ld, int group, float* out) const {
    accumulate(head, probabilities, ld, group, 0, tokens_, out);
  }

 private:
  std::size_t count() const { return static_cast<std::size_t>(tokens_) * rows_.size(); }

  Codec codec_;
  int head_dim_;
  std::size_t row_bytes_ = 0;
  Eigen::Index tokens_ = 0;
  bool calibrated_ = false;
  std::vector<std::vector<std::uint8_t>> rows_;  // [head] -> tokens x row_bytes_
};

namespace detail {

// Rows [0, count) of one head of a store (TokenStore, CodedRows, ...) into out rows [at, at + count).
template <typename Store>
void copy_rows(const Store& store, int head, Eigen::Index count, RowMatrix& out, Eigen::Index at) {
  for (Eigen::Index t = 0; t < count; ++t) store.row(head, t, out.row(at + t).data());
}

}  // namespace detail

}  // namespace lexico
