#pragma once
// KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
// ICML 2024, arXiv 2402.02750; reference code jy-yuan/KIVI, models/llama_kivi.py):
// min/max quantization with an fp16 scale and minimum per group (block_quant.hpp),
//   keys per channel: a group is `group` consecutive tokens of one channel of one KV head;
//   values per token: a group is `group` consecutive channels of one token of one KV head;
// plus full-precision (fp16) residual windows of `residual` = R recent tokens:
//   keys leave their window R at a time: the key residual holds 0..R-1 tokens between
//     steps; when an append brings it to R, the R keys are quantized after that step's
//     attention (so the current token always sees its own key in fp16);
//   values leave one at a time: the value residual is a sliding window of exactly R tokens
//     once more than R were seen; the oldest is quantized after the step's attention.
// Prefill of T tokens (same rules applied to the whole block): keys 0..floor(T/R)·R are
// quantized, values 0..T-R are quantized, the rest stays in fp16.
//
// Codes are packed (4 per byte at 2 bits, 2 at 4 bits) and attention dequantizes one
// group of keys (head_dim x group) or one value row at a time, never the whole cache.
// Inputs are rounded to fp16 (the residual) before they are quantized, as KIVI quantizes
// fp16 tensors; dequantization and attention run in fp32. Values beyond fp16's range are
// refused before anything is stored.
//
// Truncation: only tokens still in the residual windows can be dropped exactly, and only
// if nothing was quantized since they arrived, so truncate_floor() is the token count at
// the last quantization of a key block or a value. Values leave their window one per
// token once more than R were seen, so from then on truncate() can only undo the newest
// token, and only before its attention. A truncated layer is as after the attention of
// its last token (windows settled); the next append() settles the windows first anyway,
// so everything stored and attended afterwards is exactly what it would have been.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "block_quant.hpp"
#include "cache.hpp"
#include "coded_rows.hpp"
#include "token_store.hpp"

namespace lexico {

struct KiviOptions {
  int bits = 2;         // 2 or 4, for K and V
  int group = 32;       // values per (scale, minimum) pair
  int residual = 128;   // R, full-precision recent tokens (a multiple of group)
};

namespace detail {

// Keys quantized per channel: tokens arrive in whole groups; for each group of tokens,
// each channel's `group` codes are packed together and followed, in a separate array,
// by its fp16 scale and minimum.
class ChannelQuantizedRows {
 public:
  ChannelQuantizedRows(int heads, int head_dim, int bits, int group)
      : quantizer_(QuantScheme::min_max, bits),
        head_dim_(head_dim),
        group_(group),
        codes_(static_cast<std::size_t>(heads)),
        params_(static_cast<std::size_t>(heads)) {}

  Eigen::Index tokens() const { return tokens_; }
  std::size_t payload_bytes() const { return bytes_of(codes_); }
  std::size_t metadata_bytes() const { return bytes_of(params_); }
  // Vector capacity slack and headers.
  std::size_t overhead_bytes() const {
    std::size_t bytes = codes_.capacity() * sizeof(codes_[0]) + params_.capacity() * sizeof(params_[0]);
    for (const auto& codes : codes_) bytes += (codes.capacity() - codes.size()) * sizeof(std::uint8_t);
    for (const auto& params : params_) bytes += (params.capacity() - params.size()) * sizeof(Eigen::half);
    return bytes;
  }

  // Quantizes the oldest `count` tokens of `source` (count a multiple of the group).
  void append_from(const TokenStore<Eigen::half>& source, Eigen::Index count) {
    std::vector<float> tile(static_cast<std::size_t>(group_ * head_dim_));  // group x head_dim
    const int group_bytes = quantizer_.code_bytes(group_);
    for (Eigen::Index first = 0; first < count; first += group_) {
      for (std::size_t h = 0; h < codes_.size(); ++h) {
        for (int i = 0; i < group_; ++i) source.row(static_cast<int>(h), first + i, tile.data() + i * head_dim_);
        auto& codes = codes_[h];
        auto& params = params_[h];
        codes.resize(codes.size() + static_cast<std::size_t>(head_dim_ * group_bytes));
        params.resize(params.size() + static_cast<std::size_t>(head_dim_ * 2));
        std::uint8_t* block_codes = codes.data() + codes.size() - head_dim_ * group_bytes;
        Eigen::half* block_params = params.data() + params.size() - head_dim_ * 2;
        for (int c = 0; c < head_dim_; ++c)
          quantizer_.quantize(tile.data() + c, group_, head_dim_, block_codes + c * group_bytes, block_params + 2 * c);
      }
    }
    tokens_ += count;
  }

  void clear() {
    for (auto& codes : codes_) codes.clear();
    for (auto& params : params_) params.clear();
    tokens_ = 0;
  }

  // scores[g * ld + t] = <query g, key t>, one dequantized group (head_dim x group) at a time.
  void scores(int head, const float* queries, int group, float* scores, Eigen::Index ld) const {
    const Eigen::Map<const RowMatrix> q(queries, group, head_dim_);
    Eigen::Map<RowMatrix, 0, Eigen::OuterStride<>> s(scores, group, tokens_, Eigen::OuterStride<>(ld));
    thread_local std::vector<float> tile;
    tile.resize(static_cast<std::size_t>(head_dim_ * group_));
    for (Eigen::Index first = 0; first < tokens_; first += group_) {
      dequantize_group(head, first / group_, tile.data());
      s.middleCols(first, group_).noalias() = q * Eigen::Map<const RowMatrix>(tile.data(), head_dim_, group_);
    }
  }

  // Token t of a head, dequantized (for inspection; attention uses scores()).
  void row(int head, Eigen::Index t, float* out) const {
    std::vector<float> tile(static_cast<std::size_t>(head_dim_ * group_));
    dequantize_group(head, t / group_, tile.data());
    for (int c = 0; c < head_dim_; ++c) out[c] = tile[static_cast<std::size_t>(c * group_ + t % group_)];
  }

 private:
  template <typename T>
  static std::size_t bytes_of(const std::vector<std::vector<T>>& heads) {
    std::size_t bytes = 0;
    for (const auto& v : heads) bytes += v.size() * sizeof(T);
    return bytes;
  }

  // Group `index` of a head into tile, head_dim x group, channel-major.
  void dequantize_group(int head, Eigen::Index index, float* tile) const {
    const int group_bytes = quantizer_.code_bytes(group_);
    const std::uint8_t* codes = codes_[static_cast<std::size_t>(head)].data() + index * head_dim_ * group_bytes;
    const Eigen::half* params = params_[static_cast<std::size_t>(head)].data() + index * head_dim_ * 2;
    for (int c = 0; c < head_dim_; ++c)
      quantizer_.dequantize(codes + c * group_bytes, params + 2 * c, group_, tile + c * group_);
  }

  BlockQuantizer quantizer_;
  int head_dim_, group_;
  Eigen::Index tokens_ = 0;
  std::vector<std::vector<std::uint8_t>> codes_;  // [head] -> groups x head_dim x packed codes
  std::vector<std::vector<Eigen::half>> params_;  // [head] -> groups x head_dim x (scale, minimum)
};

}  // namespace detail

class KiviCache final : public KVCache {
 public:
  explicit KiviCache(CacheShape shape, KiviOptions options = {}) : KVCache(shape), options_(options) {
    require(options.bits == 2 || options.bits == 4, "KiviCache: bits must be 2 or 4 (got ", options.bits, ")");
    // group <= head_dim first: the product below must not overflow for a group from an option string.
    require(options.group > 0 && options.group <= shape.head_dim && shape.head_dim % options.group == 0 &&
                options.group * options.bits % 8 == 0,
            "KiviCache: group ", options.group, " must divide head_dim ", shape.head_dim, " and fill whole bytes at ",
            options.bits, " bits");
    require(options.residual >= options.group && options.residual % options.group == 0, "KiviCache: residual ",
            options.residual, " must be a positive multiple of the group ", options.group);
    require(shape.head_dim <= TokenStore<float>::max_head_dim, "KiviCache: head_dim ", shape.head_dim, " above ",
            TokenStore<float>::max_head_dim);
    const BlockCodec value_codec(BlockQuantizer(QuantScheme::min_max, options.bits), options.group);
    for (int l = 0; l < shape.layers; ++l)
      layers_.push_back({detail::ChannelQuantizedRows(shape.kv_heads, shape.head_dim, options.bits, options.group),
                         TokenStore<Eigen::half>(shape.kv_heads, shape.head_dim),
                         CodedRows<BlockCodec>(shape.kv_heads, shape.head_dim, value_codec),
                         TokenStore<Eigen::half>(shape.kv_heads, shape.head_dim)});
  }

  std::string name() const override { return "kivi"; }
  std::string parameters() const override {
    return detail::concat("bits=", options_.bits, " group=", options_.group, " residual=", options_.residual);
  }
  const KiviOptions& options() const { return options_; }

  // The cache object, its stores' unused capacity (and not yet compacted window rows).
  std::size_t overhead_bytes() const override {
    std::size_t bytes =
        KVCache::overhead_bytes() + sizeof(*this) - sizeof(KVCache) + layers_.capacity() * sizeof(Layer);
    for (const Layer& l : layers_)
      bytes += l.keys.overhead_bytes() + l.key_residual.overhead_bytes() + l.values.overhead_bytes() +
               l.value_residual.overhead_bytes();
    return bytes;
  }

  // Token counts of a layer: quantized and fp16 residual, keys and values.
  Eigen::Index quantized_keys(int layer) const { return at(layer).keys.tokens(); }
  Eigen::Index residual_keys(int layer) const { return at(layer).key_residual.tokens(); }
  Eigen::Index quantized_values(int layer) const { return at(layer).values.tokens(); }
  Eigen::Index residual_values(int layer) const { return at(layer).value_residual.tokens(); }

  // What attention reads for one KV head, oldest first: dequantized tokens, then the residual.
  RowMatrix stored_keys(int layer, int head) const {
    const Layer& l = at(layer);
    return joined(l.keys, l.key_residual, head);
  }
  RowMatrix stored_values(int layer, int head) const {
    const Layer& l = at(layer);
    return joined(l.values, l.value_residual, head);
  }

 protected:
  void append_token(int layer, const float* key, const float* value) override {
    Layer& l = layers_[static_cast<std::size_t>(layer)];
    settle(l);  // in case the previous token was never attended
    l.key_residual.append(key);
    l.value_residual.append(value);
  }

  void store_prefill(int layer, ConstRowsRef keys, ConstRowsRef values, ConstRowsRef /*queries*/,
                     KeyForm /*form*/) override {
    Layer& l = layers_[static_cast<std::size_t>(layer)];
    for (Eigen::Index t = 0; t < keys.rows(); ++t) {
      l.key_residual.append(keys.row(t).data());
      l.value_residual.append(values.row(t).data());
    }
    settle(l);
  }

  // A decode step attends to the windows as they are (its own key still in fp16) and
  // settles them afterwards. A block's queries (chunked prefill, the only caller that asks
  // for log_sum_exp) come before the block is appended, so they see the windows settled,
  // as each block token would when it is appended: the flush the block's first append
  // would make anyway is made first, and every tile of the block sees the same tokens.
  void attend_tokens(int layer, ConstRowsRef queries, RowsRef out, float* log_sum_exp) override {
    Layer& l = layers_[static_cast<std::size_t>(layer)];
    if (log_sum_exp) settle(l);
    const Eigen::Index quantized_keys = l.keys.tokens(), quantized_values = l.values.tokens();
    grouped_decode_attention(
        queries, shape().kv_heads, quantized_keys + l.key_residual.tokens(), out,
        [&](int h, const float* q, int group, float* scores, Eigen::Index ld) {
          l.keys.scores(h, q, group, scores, ld);
          l.key_residual.scores(h, q, group, scores + quantized_keys, ld);
        },
        [&](int h, const float* p, Eigen::Index ld, int group, float* o) {
          l.values.accumulate(h, p, ld, group, o);
          l.value_residual.accumulate(h, p + quantized_values, ld, group, o);
        },
        log_sum_exp, threads());
    settle(l);
  }

  CacheBytes layer_bytes(int layer) const override {
    const Layer& l = layers_[static_cast<std::size_t>(layer)];
    CacheBytes bytes;
    bytes.payload = l.keys.payload_bytes() + l.values.payload_bytes();
    bytes.metadata = l.keys.metadata_bytes() + l.values.metadata_bytes();
    bytes.buffer = l.key_residual.bytes() + l.value_residual.bytes();
    return bytes;
  }

  void clear_layer(int layer) override {
    Layer& l = layers_[static_cast<std::size_t>(layer)];
    l.keys.clear();
    l.key_residual.clear();
    l.values.clear();
    l.value_residual.clear();
    l.floor = 0;
  }

  std::int64_t rollback_floor(int layer) const override { return layers_[static_cast<std::size_t>(layer)].floor; }
  // Drops the newest tokens from both residual windows: rollback_floor() guarantees that
  // they hold them (every quantized key and value is older than the floor).
  void truncate_layer(int layer, std::int64_t tokens) override {
    Layer& l = layers_[static_cast<std::size_t>(layer)];
    const Eigen::Index drop = held(l) - tokens;
    l.key_residual.erase_back(drop);
    l.value_residual.erase_back(drop);
  }

  bool narrows_to_fp16() const override { return true; }  // the residual windows are fp16

 private:
  struct Layer {
    detail::ChannelQuantizedRows keys;
    TokenStore<Eigen::half> key_residual;
    CodedRows<BlockCodec> values;
    TokenStore<Eigen::half> value_residual;
    std::int64_t floor = 0;  // tokens held at the last quantization (the truncation floor)
  };

  static Eigen::Index held(const Layer& l) { return l.keys.tokens() + l.key_residual.tokens(); }

  const Layer& at(int layer) const { return layers_[static_cast<std::size_t>(checked_layer(layer))]; }

  // Moves what has left the residual windows into the quantized stores: whole blocks of R
  // keys, and every value beyond the last R.
  void settle(Layer& l) const {
    const Eigen::Index r = options_.residual;
    const Eigen::Index keys = l.key_residual.tokens() / r * r;
    const Eigen::Index values = l.value_residual.tokens() - r;
    if (keys > 0 || values > 0) l.floor = held(l);
    if (keys > 0) {
      l.keys.append_from(l.key_residual, keys);
      l.key_residual.erase_front(keys);
    }
    if (values > 0) {
      std::vector<float> token(static_cast<std::size_t>(shape().kv_width()));
      for (Eigen::Index t = 0; t < values; ++t) {
        for (int h = 0; h < shape().kv_heads; ++h) l.value_residual.row(h, t, token.data() + h * shape().head_dim);
        l.values.append(token.data());
      }
      l.value_residual.erase_front(values);
    }
  }

  template <typename Quantized>
  RowMatrix joined(const Quantized& quantized, const TokenStore<Eigen::half>& residual, int head) const {
    require(head >= 0 && head < shape().kv_heads, "KiviCache: head ", head, " out of range");
    RowMatrix rows(quantized.tokens() + residual.tokens(), shape().head_dim);
    detail::copy_rows(quantized, head, quantized.tokens(), rows, 0);
    detail::copy_rows(residual, head, residual.tokens(), rows, quantized.tokens());
    return rows;
  }

  KiviOptions options_;
  std::vector<Layer> layers_;
};

}  // namespace lexico
