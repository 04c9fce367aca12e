#pragma once
// Per-token quantized caches: every key and value row of every KV head goes through a row
// codec as soon as it arrives (no full-precision window). With BlockCodec these are
// llama.cpp's KV cache types q8_0 (8.5 bits per element) and q4_0 (4.5 bits): blocks of 32
// consecutive channels of one token of one head, one fp16 scale each, keys and values alike
// (llama.cpp ggml/src/ggml-common.h, QK8_0 = QK4_0 = 32). With Fp8Codec (fp8_cache.hpp)
// this is the FP8 E4M3 cache with per-tensor scales.

#include <string>
#include <utility>
#include <vector>

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
  // One codec per layer for K and one for V, copies of `codec` (calibrated separately).
  TokenQuantCache(CacheShape shape, const Codec& codec) : KVCache(shape) {
    for (int l = 0; l < shape.layers; ++l) {
      keys_.emplace_back(shape.kv_heads, shape.head_dim, codec);
      values_.emplace_back(shape.kv_heads, shape.head_dim, codec);
    }
  }

  std::string name() const override { return keys_.front().codec().name(); }
  std::string parameters() const override { return keys_.front().codec().parameters(); }

  const CodedRows<Codec>& keys(int layer) const { return keys_[static_cast<std::size_t>(checked_layer(layer))]; }
  const CodedRows<Codec>& values(int layer) const { return values_[static_cast<std::size_t>(checked_layer(layer))]; }

  // What attention reads for one KV head: tokens x head_dim, dequantized.
  RowMatrix stored_keys(int layer, int head) const { return decoded(keys(layer), head); }
  RowMatrix stored_values(int layer, int head) const { return decoded(values(layer), head); }

 protected:
  void append_token(int layer, const float* key, const float* value) override {
    keys_[static_cast<std::size_t>(layer)].append(key);
    values_[static_cast<std::size_t>(layer)].append(value);
  }

  // The whole block calibrates the codecs (the FP8 scale) before any row is coded.
  void store_prefill(int layer, ConstRowsRef keys, ConstRowsRef values, ConstRowsRef /*queries*/) override {
    keys_[static_cast<std::size_t>(layer)].calibrate(keys);
    values_[static_cast<std::size_t>(layer)].calibrate(values);
    for (Eigen::Index t = 0; t < keys.rows(); ++t) append_token(layer, keys.row(t).data(), values.row(t).data());
  }

  void attend_tokens(int layer, ConstRowsRef queries, RowsRef out) override {
    const auto& keys = keys_[static_cast<std::size_t>(layer)];
    detail::attend_stores(keys, values_[static_cast<std::size_t>(layer)], keys.tokens(), queries, out);
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
  }

 private:
  static RowMatrix decoded(const CodedRows<Codec>& store, int head) {
    require(head >= 0 && head < store.heads(), "TokenQuantCache: head ", head, " out of range");
    RowMatrix rows(store.tokens(), store.head_dim());
    detail::copy_rows(store, head, store.tokens(), rows, 0);
    return rows;
  }

  std::vector<CodedRows<Codec>> keys_, values_;
};

}  // namespace lexico
