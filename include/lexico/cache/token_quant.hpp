#pragma once
// Per-token quantized caches: every key and value row of every KV head goes through a row
// codec as soon as it arrives (no full-precision window). With BlockCodec these are
// llama.cpp's KV cache types q8_0 (8.5 bits per element) and q4_0 (4.5 bits): blocks of 32
// consecutive channels of one token of one head, one fp16 scale each, keys and values alike
// (llama.cpp ggml/src/ggml-common.h, QK8_0 = QK4_0 = 32). With Fp8Codec (fp8_cache.hpp)
// this is the FP8 E4M3 cache with per-tensor scales.
//
// A block (prefill, or append() of T tokens) calibrates a codec with data-dependent
// parameters (the FP8 scale) as a whole when it is the layer's first; a single token does
// alone. Every row is coded on its own, so truncate() can drop any stored token exactly:
// truncate_floor() is 0 for q8_0 and q4_0, and the length of the calibrating block for
// FP8. A block that fails to code (a q8_0 scale beyond fp16) leaves the layer as it was.
//
// With `rotate`, every key and value row is turned by the Hadamard rotation M of
// hadamard.hpp before it is coded (head_dim a power of two); a decode step turns the
// queries by M and the output back by Mᵀ, and stored_keys / stored_values give rows in
// the model's own basis.

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../base/hadamard.hpp"
#include "block_quant.hpp"
#include "cache.hpp"
#include "coded_rows.hpp"

namespace lexico {

inline constexpr int llama_block = 32;  // QK8_0 and QK4_0

inline BlockCodec q8_0_codec() { return BlockCodec(BlockQuantizer(QuantScheme::q8_0), llama_block); }
inline BlockCodec q4_0_codec() { return BlockCodec(BlockQuantizer(QuantScheme::q4_0), llama_block); }

template <typename Codec>
class TokenQuantCache final : public KVCache {
 public:
  // Every layer's keys get a copy of `key_codec`, its values one of `value_codec`
  // (calibrated separately).
  TokenQuantCache(CacheShape shape, const Codec& key_codec, const Codec& value_codec, bool rotate = false)
      : KVCache(shape), rotate_(rotate), calibration_(static_cast<std::size_t>(shape.layers), 0) {
    require(!rotate || is_power_of_two(shape.head_dim), key_codec.name(), ": the Hadamard rotation needs a head_dim ",
            "that is a power of two (got ", shape.head_dim, ")");
    for (int l = 0; l < shape.layers; ++l) {
      keys_.emplace_back(shape.kv_heads, shape.head_dim, key_codec);
      values_.emplace_back(shape.kv_heads, shape.head_dim, value_codec);
    }
  }
  TokenQuantCache(CacheShape shape, const Codec& codec, bool rotate = false)
      : TokenQuantCache(shape, codec, codec, rotate) {}

  std::string name() const override { return keys_.front().codec().name(); }
  std::string parameters() const override {
    const std::string keys = keys_.front().codec().parameters(), values = values_.front().codec().parameters();
    std::string text = keys == values ? keys : detail::concat("keys: ", keys, "; values: ", values);
    return rotate_ ? text + (text.empty() ? "" : " ") + "rotate=hadamard" : text;
  }
  bool rotates() const { return rotate_; }

  const CodedRows<Codec>& keys(int layer) const { return keys_[static_cast<std::size_t>(checked_layer(layer))]; }
  const CodedRows<Codec>& values(int layer) const { return values_[static_cast<std::size_t>(checked_layer(layer))]; }

  // What attention reads for one KV head: tokens x head_dim, dequantized.
  RowMatrix stored_keys(int layer, int head) const { return decoded(keys(layer), head); }
  RowMatrix stored_values(int layer, int head) const { return decoded(values(layer), head); }

  // The cache object, its per-layer stores with their unused capacity, the calibration lengths.
  std::size_t overhead_bytes() const override {
    std::size_t bytes = KVCache::overhead_bytes() + sizeof(*this) - sizeof(KVCache) +
                        (keys_.capacity() + values_.capacity()) * sizeof(CodedRows<Codec>) +
                        calibration_.capacity() * sizeof(std::int64_t);
    for (std::size_t l = 0; l < keys_.size(); ++l) bytes += keys_[l].overhead_bytes() + values_[l].overhead_bytes();
    return bytes;
  }

 protected:
  void append_token(int layer, const float* key, const float* value) override {
    const Eigen::Index width = shape().kv_width();
    store(layer, Eigen::Map<const RowMatrix>(key, 1, width), Eigen::Map<const RowMatrix>(value, 1, width));
  }

  void append_block(int layer, ConstRowsRef keys, ConstRowsRef values, KeyForm form) override {
    require(form == KeyForm::rotated, name(), ": takes keys after RoPE only");
    store(layer, keys, values);
  }

  void store_prefill(int layer, ConstRowsRef keys, ConstRowsRef values, ConstRowsRef /*queries*/,
                     KeyForm form) override {
    append_block(layer, keys, values, form);
  }

  void attend_tokens(int layer, ConstRowsRef queries, RowsRef out, float* log_sum_exp) override {
    const auto& keys = keys_[static_cast<std::size_t>(layer)];
    const auto& values = values_[static_cast<std::size_t>(layer)];
    if (!rotate_) return detail::attend_stores(keys, values, keys.tokens(), queries, out, log_sum_exp, threads());
    const RowMatrix turned = rotated(queries, false);
    detail::attend_stores(keys, values, keys.tokens(), turned, out, log_sum_exp, threads());
    out = rotated(out, true);
  }

  CacheBytes layer_bytes(int layer) const override {
    const auto& keys = keys_[static_cast<std::size_t>(layer)];
    const auto& values = values_[static_cast<std::size_t>(layer)];
    CacheBytes bytes;
    bytes.payload = keys.payload_bytes() + values.payload_bytes();
    bytes.metadata = keys.metadata_bytes() + values.metadata_bytes();
    return bytes;
  }

  void clear_layer(int layer) override {
    keys_[static_cast<std::size_t>(layer)].clear();
    values_[static_cast<std::size_t>(layer)].clear();
    calibration_[static_cast<std::size_t>(layer)] = 0;
  }

  // Rows are coded one by one; only the block that fixed data-dependent parameters stays.
  std::int64_t rollback_floor(int layer) const override {
    const bool fixed = keys_.front().codec().data_dependent() || values_.front().codec().data_dependent();
    return fixed ? calibration_[static_cast<std::size_t>(layer)] : 0;
  }
  void truncate_layer(int layer, std::int64_t tokens) override {
    keys_[static_cast<std::size_t>(layer)].truncate(tokens);
    values_[static_cast<std::size_t>(layer)].truncate(tokens);
  }

 private:
  // Codes a block (T x kv_width), calibrating the codecs on it when they are not yet; a
  // failure leaves the layer as it was.
  void store(int layer, ConstRowsRef keys, ConstRowsRef values) {
    if (rotate_) return store_rows(layer, rotated(keys, false), rotated(values, false));
    store_rows(layer, keys, values);
  }
  void store_rows(int layer, ConstRowsRef keys, ConstRowsRef values) {
    auto& k = keys_[static_cast<std::size_t>(layer)];
    auto& v = values_[static_cast<std::size_t>(layer)];
    const Eigen::Index before = k.tokens();
    const bool calibrates = !k.calibrated();
    try {
      k.calibrate(keys);
      v.calibrate(values);
      for (Eigen::Index t = 0; t < keys.rows(); ++t) {
        k.append(keys.row(t).data());
        v.append(values.row(t).data());
      }
    } catch (...) {
      if (calibrates) {
        k.clear();
        v.clear();
      } else {
        k.truncate(before);
        v.truncate(before);
      }
      throw;
    }
    if (calibrates) calibration_[static_cast<std::size_t>(layer)] = keys.rows();
  }

  RowMatrix decoded(const CodedRows<Codec>& store, int head) const {
    require(head >= 0 && head < store.heads(), "TokenQuantCache: head ", head, " out of range");
    RowMatrix rows(store.tokens(), store.head_dim());
    detail::copy_rows(store, head, store.tokens(), rows, 0);
    return rotate_ ? rotated(rows, true) : rows;
  }

  // Every head_dim-wide segment of every row turned by M (or Mᵀ with `inverse`).
  RowMatrix rotated(ConstRowsRef rows, bool inverse) const {
    RowMatrix turned = rows;
    const int d = shape().head_dim;
    for (Eigen::Index r = 0; r < turned.rows(); ++r)
      for (Eigen::Index c = 0; c < turned.cols(); c += d) hadamard_rotate(turned.row(r).data() + c, d, inverse);
    return turned;
  }

  bool rotate_;
  std::vector<CodedRows<Codec>> keys_, values_;
  std::vector<std::int64_t> calibration_;  // per layer: tokens of the block that calibrated the codecs
};

}  // namespace lexico
