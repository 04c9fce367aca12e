#pragma once
// The interface every KV cache implements: dense, Lexico, quantized and eviction
// caches are used the same way, so the model runner never branches on the type.
//
// An abstract class rather than a C++ concept: programs choose the cache at run
// time (lexico-eval --cache NAME), and one virtual call per layer and token is
// noise next to the attention work behind it.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "../attention.hpp"
#include "../error.hpp"

namespace lexico {

struct CacheShape {
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;

  int kv_width() const { return kv_heads * head_dim; }
};

// Bytes a cache holds for K and V, split the way papers account them.
struct CacheBytes {
  std::size_t payload = 0;   // codes, quantized values, kept tokens
  std::size_t metadata = 0;  // scales, minima, row headers, positions
  std::size_t buffer = 0;    // uncompressed recent tokens and residual windows

  std::size_t total() const { return payload + metadata + buffer; }
  CacheBytes& operator+=(const CacheBytes& other) {
    payload += other.payload;
    metadata += other.metadata;
    buffer += other.buffer;
    return *this;
  }
};

class KVCache {
 public:
  explicit KVCache(CacheShape shape) : shape_(shape), seen_(static_cast<std::size_t>(shape.layers), 0) {
    require(shape.layers > 0 && shape.kv_heads > 0 && shape.head_dim > 0,
            "KVCache: shape needs positive layers, kv_heads and head_dim (got ", shape.layers, ", ",
            shape.kv_heads, ", ", shape.head_dim, ")");
  }
  virtual ~KVCache() = default;
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  const CacheShape& shape() const { return shape_; }
  virtual std::string name() const = 0;
  // The settings that distinguish this instance, e.g. "s=8 N=4096 buffer=128".
  virtual std::string parameters() const = 0;

  // Tokens ever added to `layer` (the context length the cache stands for).
  std::int64_t seen(int layer) const { return seen_[checked_layer(layer)]; }

  // Adds one token to `layer`: key and value of every KV head, kv_heads x head_dim
  // floats each, keys after RoPE. The new token is visible to the next attend().
  void append(int layer, const float* key, const float* value) {
    const int l = checked_layer(layer);
    require_finite(key, value, seen_[l], l);
    append_token(l, key, value);
    ++seen_[l];
  }

  // Decode attention at the current position: queries are q_heads x head_dim
  // (q_heads a multiple of kv_heads, query head h reads KV head h / group),
  // out receives q_heads x head_dim.
  void attend(int layer, ConstRowsRef queries, RowsRef out) {
    const int l = checked_layer(layer);
    check_queries(queries, out, "attend");
    require(seen_[l] > 0, "KVCache::attend: layer ", layer, " holds no tokens");
    attend_tokens(l, queries, out);
  }

  // append() then attend(): one decode step of one layer.
  void decode(int layer, const float* key, const float* value, ConstRowsRef queries, RowsRef out) {
    append(layer, key, value);
    attend(layer, queries, out);
  }

  // A causal block of T tokens: keys and values T x kv_width, queries and out
  // T x (q_heads * head_dim). On an empty layer attention is exact over the block and
  // the cache then stores (compresses, selects) it; on a layer that already holds
  // tokens every token goes through append() and attend() in turn.
  void prefill(int layer, ConstRowsRef keys, ConstRowsRef values, ConstRowsRef queries, RowsRef out) {
    const int l = checked_layer(layer);
    const Eigen::Index tokens = keys.rows();
    require(keys.cols() == shape_.kv_width() && values.cols() == shape_.kv_width() &&
                values.rows() == tokens,
            "KVCache::prefill: keys and values must be T x ", shape_.kv_width(), " (got ", keys.rows(),
            "x", keys.cols(), " and ", values.rows(), "x", values.cols(), ")");
    require(queries.rows() == tokens && out.rows() == tokens && out.cols() == queries.cols() &&
                queries.cols() % shape_.head_dim == 0 &&
                (queries.cols() / shape_.head_dim) % shape_.kv_heads == 0 && queries.cols() > 0,
            "KVCache::prefill: queries must be T x (q_heads*", shape_.head_dim, ") with q_heads a multiple of ",
            shape_.kv_heads, " and out the same shape");
    if (tokens == 0) return;
    if (seen_[l] == 0) {
      for (Eigen::Index t = 0; t < tokens; ++t) require_finite(keys.row(t).data(), values.row(t).data(), t, l);
      causal_attention(queries, keys, values, shape_.head_dim, out);
      store_prefill(l, keys, values, queries);
      seen_[l] += tokens;
      return;
    }
    const int q_heads = static_cast<int>(queries.cols() / shape_.head_dim);
    for (Eigen::Index t = 0; t < tokens; ++t) {
      append(layer, keys.row(t).data(), values.row(t).data());
      RowMatrix q = Eigen::Map<const RowMatrix>(queries.row(t).data(), q_heads, shape_.head_dim);
      RowMatrix o(q_heads, shape_.head_dim);
      attend_tokens(l, q, o);
      out.row(t) = Eigen::Map<const Eigen::RowVectorXf>(o.data(), o.size());
    }
  }

  // Bytes held for K and V over all layers.
  CacheBytes bytes() const {
    CacheBytes sum;
    for (int l = 0; l < shape_.layers; ++l) sum += layer_bytes(l);
    return sum;
  }

  // Stored bytes over the fp16 bytes of the same tokens' K and V (KV heads only).
  double kv_size_fraction() const {
    double fp16 = 0;
    for (int l = 0; l < shape_.layers; ++l) fp16 += 2.0 * 2.0 * static_cast<double>(seen_[l]) * shape_.kv_width();
    return fp16 > 0 ? static_cast<double>(bytes().total()) / fp16 : 0.0;
  }

  // Forgets every token of every layer (a new sequence).
  void clear() {
    for (int l = 0; l < shape_.layers; ++l) {
      clear_layer(l);
      seen_[static_cast<std::size_t>(l)] = 0;
    }
  }

 protected:
  virtual void append_token(int layer, const float* key, const float* value) = 0;
  virtual void attend_tokens(int layer, ConstRowsRef queries, RowsRef out) = 0;
  virtual CacheBytes layer_bytes(int layer) const = 0;
  virtual void clear_layer(int layer) = 0;

  // Stores a prefilled block whose attention was already computed exactly; the
  // queries are there for caches that select tokens by attention (SnapKV, H2O).
  virtual void store_prefill(int layer, ConstRowsRef keys, ConstRowsRef values, ConstRowsRef /*queries*/) {
    for (Eigen::Index t = 0; t < keys.rows(); ++t) append_token(layer, keys.row(t).data(), values.row(t).data());
  }

  int checked_layer(int layer) const {
    require(layer >= 0 && layer < shape_.layers, name(), ": layer ", layer, " out of range [0, ", shape_.layers,
            ")");
    return layer;
  }

 private:
  // NaN or Inf in the cache would poison every later attention step silently.
  void require_finite(const float* key, const float* value, std::int64_t token, int layer) const {
    const int n = shape_.kv_width();
    const auto finite = [n](const float* x) { return Eigen::Map<const Eigen::ArrayXf>(x, n).isFinite().all(); };
    require(finite(key) && finite(value), name(), ": token ", token, " of layer ", layer,
            " has a NaN or Inf in its key or value");
  }

  void check_queries(ConstRowsRef queries, RowsRef out, const char* where) const {
    require(queries.cols() == shape_.head_dim && queries.rows() > 0 && queries.rows() % shape_.kv_heads == 0 &&
                queries.rows() / shape_.kv_heads <= max_gqa_group &&
                out.rows() == queries.rows() && out.cols() == queries.cols(),
            name(), "::", where, ": queries must be q_heads x ", shape_.head_dim, " with q_heads a multiple of ",
            shape_.kv_heads, " (at most ", max_gqa_group, " per KV head) and out the same shape (got ", queries.rows(), "x", queries.cols(), " and ",
            out.rows(), "x", out.cols(), ")");
    require(queries.allFinite(), name(), "::", where, ": the queries hold a NaN or Inf");
  }

  CacheShape shape_;
  std::vector<std::int64_t> seen_;
};

}  // namespace lexico
