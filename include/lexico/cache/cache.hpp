#pragma once
// The interface every KV cache implements: dense, Lexico, quantized and eviction
// caches are used the same way, so the model runner never branches on the type.
//
// An abstract class rather than a C++ concept: programs choose the cache at run
// time (lexico-eval --cache NAME), and one virtual call per layer and token is
// noise next to the attention work behind it.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "attention.hpp"
#include "../base/error.hpp"
#include "../base/rope.hpp"

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

// How keys reach a cache: after RoPE (as attention uses them) or before it, for caches
// that code keys before RoPE (key_rope() names the rotation), which then skip a rotate
// and un-rotate round trip.
enum class KeyForm { rotated, unrotated };

// Concurrency contract, for every cache type: one cache is one sequence and is used by
// one thread at a time; different caches may run at once on different threads, also
// when they share per-model state (a CodeSpace), which is immutable or internally
// synchronised. Within a call a cache may use up to threads() OpenMP threads.
class KVCache {
 public:
  explicit KVCache(CacheShape shape)
      : shape_(shape),
        seen_(static_cast<std::size_t>(shape.layers), 0),
        first_(seen_.size(), 0),
        key_norm_(seen_.size(), 0.0) {
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

  // Tokens `layer` holds (the context length the cache stands for).
  std::int64_t seen(int layer) const { return seen_[checked_layer(layer)]; }
  // Position of the layer's first token (set by the first append, 0 by default) and of
  // the next one: a layer's tokens sit at consecutive positions.
  std::int64_t first_position(int layer) const { return first_[checked_layer(layer)]; }
  std::int64_t next_position(int layer) const { return first_position(layer) + seen(layer); }

  // The RoPE this cache codes keys before, which lets callers hand over keys before RoPE
  // (KeyForm::unrotated); null for caches that store keys after RoPE.
  virtual const Rope* key_rope() const { return nullptr; }

  // Adds one token at the next position: key and value of every KV head, kv_heads x
  // head_dim floats each, keys after RoPE. The new token is visible to the next attend().
  void append(int layer, const float* key, const float* value) {
    const int l = checked_layer(layer);
    const Eigen::Map<const RowMatrix> keys(key, 1, shape_.kv_width()), values(value, 1, shape_.kv_width());
    hold_keys(l, check_block(l, next_position(l), keys, values, KeyForm::rotated));
    append_token(l, key, value);
    ++seen_[l];
  }

  // Adds T tokens (keys and values T x kv_width) at positions position .. position + T - 1;
  // `position` must be next_position(layer), or any position >= 0 on an empty layer.
  void append(int layer, std::int64_t position, ConstRowsRef keys, ConstRowsRef values,
              KeyForm form = KeyForm::rotated) {
    const int l = checked_layer(layer);
    hold_keys(l, check_block(l, position, keys, values, form));
    if (seen_[l] == 0) first_[l] = position;
    if (keys.rows() == 0) return;
    append_block(l, keys, values, form);
    seen_[l] += keys.rows();
  }

  // Decode attention at the current position: queries are q_heads x head_dim
  // (q_heads a multiple of kv_heads, query head h reads KV head h / group),
  // out receives q_heads x head_dim.
  void attend(int layer, ConstRowsRef queries, RowsRef out) {
    const int l = checked_layer(layer);
    check_queries(queries, out, "attend");
    require(seen_[l] > 0, "KVCache::attend: layer ", layer, " holds no tokens");
    check_scores(l, queries, key_norm_[l], "attend");
    attend_tokens(l, queries, out, nullptr);
  }

  // append() then attend(): one decode step of one layer.
  void decode(int layer, const float* key, const float* value, ConstRowsRef queries, RowsRef out) {
    append(layer, key, value);
    attend(layer, queries, out);
  }

  // A causal block of T tokens at the next position: keys and values T x kv_width,
  // queries and out T x (q_heads * head_dim).
  void prefill(int layer, ConstRowsRef keys, ConstRowsRef values, ConstRowsRef queries, RowsRef out) {
    prefill(layer, next_position(layer), keys, values, queries, out, KeyForm::rotated);
  }

  // The same at explicit positions (chunked prefill). Token t of the block attends to
  // every token the layer held before the block, as the cache holds it, and exactly to
  // block tokens 0..t; then the cache stores (compresses, selects) the block. Attention
  // runs in tiles of queries, so its memory is O(tile x (held + T)), never T x T. Caches
  // whose attention changes their state (H2O, TOVA, ...) take a block on a layer that
  // already holds tokens one token at a time instead.
  void prefill(int layer, std::int64_t position, ConstRowsRef keys, ConstRowsRef values, ConstRowsRef queries,
               RowsRef out, KeyForm form = KeyForm::rotated) {
    const int l = checked_layer(layer);
    const double block_key_norm = check_block(l, position, keys, values, form);
    const Eigen::Index tokens = keys.rows();
    require(queries.rows() == tokens && out.rows() == tokens && out.cols() == queries.cols() &&
                queries.cols() % shape_.head_dim == 0 &&
                (queries.cols() / shape_.head_dim) % shape_.kv_heads == 0 && queries.cols() > 0,
            name(), "::prefill: queries must be T x (q_heads*", shape_.head_dim, ") with q_heads a multiple of ",
            shape_.kv_heads, " and out the same shape");
    require(queries.allFinite(), name(), "::prefill: the queries hold a NaN or Inf");
    check_scores(l, queries, std::max(key_norm_[l], block_key_norm), "prefill");
    hold_keys(l, block_key_norm);
    if (seen_[l] == 0) first_[l] = position;
    if (tokens == 0) return;
    // Attention needs keys after RoPE.
    RowMatrix rotated;
    if (const Rope* rope = key_rope(); rope && form == KeyForm::unrotated) {  // check_block: rope is set then
      rotated = keys;
      rope->rotate_rows(position, rotated.data(), rotated.rows(), rotated.cols(), shape_.kv_heads);
    }
    const ConstRowsRef attention_keys = form == KeyForm::unrotated ? ConstRowsRef(rotated) : keys;
    if (seen_[l] == 0) {
      causal_attention(queries, attention_keys, values, shape_.head_dim, out, nullptr, 0, threads_);
      store_prefill(l, keys, values, queries, form);
      seen_[l] += tokens;
      return;
    }
    if (!pure_attention()) {
      require(form == KeyForm::rotated, name(), "::prefill: takes keys after RoPE");
      const int q_heads = static_cast<int>(queries.cols() / shape_.head_dim);
      for (Eigen::Index t = 0; t < tokens; ++t) {
        append(layer, keys.row(t).data(), values.row(t).data());
        const Eigen::Map<const RowMatrix> q(queries.row(t).data(), q_heads, shape_.head_dim);
        Eigen::Map<RowMatrix> o(out.row(t).data(), q_heads, shape_.head_dim);
        attend_tokens(l, q, o, nullptr);
      }
      return;
    }
    chunk_attention(l, queries, attention_keys, values, out);
    append_block(l, keys, values, form);
    seen_[l] += tokens;
  }

  // Back to the first `tokens` tokens of every layer, exactly as if the later ones had
  // never been appended (speculative decoding, a rejected branch). A cache can undo only
  // what it has not yet compressed, selected or merged: truncate_floor() says how far back
  // it can go, and anything below raises.
  void truncate(std::int64_t tokens) {
    for (int l = 0; l < shape_.layers; ++l) {
      require(tokens >= 0 && tokens <= seen_[l], name(), "::truncate: ", tokens, " tokens asked, layer ", l,
              " holds ", seen_[l]);
      // Back to nothing is always exact: the layer is cleared.
      const std::int64_t floor = tokens == seen_[l] || tokens == 0 ? tokens : truncate_floor(l);
      require(tokens >= floor, name(), "::truncate: layer ", l, " can go back to ", floor,
              " tokens at the earliest (it has compressed or evicted tokens since), not to ", tokens);
    }
    for (int l = 0; l < shape_.layers; ++l) {
      if (tokens == seen_[l]) continue;
      if (tokens == 0) {
        clear_layer(l);
      } else {
        truncate_layer(l, tokens);
      }
      seen_[l] = tokens;
    }
  }

  // The fewest tokens truncate() can bring `layer` back to (0 when nothing was compressed
  // or evicted yet; seen(layer) when nothing can be undone).
  std::int64_t truncate_floor(int layer) const {
    const int l = checked_layer(layer);
    return seen_[l] == 0 ? 0 : std::min(seen_[l], rollback_floor(l));
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

  // Memory beside the KV bytes. Overhead: what this sequence holds besides its K and V
  // (bookkeeping, unused capacity, workspaces it owns), an estimate from the containers'
  // capacities. Shared: the per-model state this cache refers to (dictionaries, Gram
  // matrices), counted once per shared_state() however many caches use it.
  virtual std::size_t overhead_bytes() const { return sizeof(*this) + 2 * sizeof(std::int64_t) * seen_.size(); }
  virtual std::size_t shared_bytes() const { return 0; }
  virtual const void* shared_state() const { return nullptr; }

  // OpenMP threads one call may use (0: the OpenMP default). Per cache, never global.
  void set_threads(int threads) {
    require(threads >= 0, name(), ": threads = ", threads, " is negative");
    threads_ = threads;
  }
  int threads() const { return threads_; }

  // Forgets every token of every layer (a new sequence).
  void clear() {
    for (int l = 0; l < shape_.layers; ++l) {
      clear_layer(l);
      seen_[static_cast<std::size_t>(l)] = 0;
      first_[static_cast<std::size_t>(l)] = 0;
      key_norm_[static_cast<std::size_t>(l)] = 0.0;
    }
  }

 protected:
  // One token with keys after RoPE at next_position(layer).
  virtual void append_token(int layer, const float* key, const float* value) = 0;
  // Decode attention; when `log_sum_exp` is not null it receives, per query head, the
  // log of the softmax denominator (log Σ_t exp(score_t / sqrt(d))), so that a block's
  // attention can be merged with it.
  virtual void attend_tokens(int layer, ConstRowsRef queries, RowsRef out, float* log_sum_exp) = 0;
  virtual CacheBytes layer_bytes(int layer) const = 0;
  virtual void clear_layer(int layer) = 0;

  // T tokens at next_position(layer) .. : by default one at a time (keys after RoPE).
  virtual void append_block(int layer, ConstRowsRef keys, ConstRowsRef values, KeyForm form) {
    require(form == KeyForm::rotated, name(), ": takes keys after RoPE only");
    for (Eigen::Index t = 0; t < keys.rows(); ++t) {
      append_token(layer, keys.row(t).data(), values.row(t).data());
      ++seen_[static_cast<std::size_t>(layer)];
    }
    seen_[static_cast<std::size_t>(layer)] -= keys.rows();  // the caller counts the block
  }

  // Stores a prefilled block whose attention was already computed exactly (on an empty
  // layer); the queries are there for caches that select tokens by attention (SnapKV, H2O).
  virtual void store_prefill(int layer, ConstRowsRef keys, ConstRowsRef values, ConstRowsRef /*queries*/,
                             KeyForm form) {
    append_block(layer, keys, values, form);
  }

  // Whether attend_tokens() leaves the cache as it was, so that a block can attend to the
  // held tokens before it is stored (chunked prefill).
  virtual bool pure_attention() const { return true; }

  // Undo support: the fewest tokens truncate_layer() can restore, and the truncation
  // itself (called with rollback_floor(layer) <= tokens < seen(layer), tokens > 0).
  virtual std::int64_t rollback_floor(int layer) const { return seen(layer); }
  virtual void truncate_layer(int layer, std::int64_t tokens) {
    throw error(detail::concat(name(), ": cannot truncate layer ", layer, " to ", tokens, " tokens"));
  }

  // Whether the cache stores K or V in fp16 where they enter: values outside its range
  // are refused, naming the token, rather than stored as infinities.
  virtual bool narrows_to_fp16() const { return false; }

  // Counts tokens a cache took in by a route of its own (LexicoCache::append_codes), whose
  // keys have norms of at most key_norm.
  void add_tokens(int layer, std::int64_t tokens, double key_norm) {
    const int l = checked_layer(layer);
    seen_[static_cast<std::size_t>(l)] += tokens;
    hold_keys(l, key_norm);
  }

  int checked_layer(int layer) const {
    require(layer >= 0 && layer < shape_.layers, name(), ": layer ", layer, " out of range [0, ", shape_.layers,
            ")");
    return layer;
  }

 private:
  // Scores above this could overflow fp32 on their way through the dot products and the
  // softmax (FLT_MAX is 3.4e38; the margin covers keys decoded from codes, whose norm may
  // exceed the original's).
  static constexpr double max_score = 1e37;

  // The largest norm of one KV head's key in `keys` (rotation by RoPE keeps it).
  double largest_key_norm(ConstRowsRef keys) const {
    double largest = 0.0;
    for (Eigen::Index t = 0; t < keys.rows(); ++t)
      for (int h = 0; h < shape_.kv_heads; ++h)
        largest = std::max(largest, keys.row(t).segment(h * shape_.head_dim, shape_.head_dim).cast<double>().norm());
    return largest;
  }

  void hold_keys(int l, double key_norm) { key_norm_[l] = std::max(key_norm_[l], key_norm); }

  // Every score |q·k| is at most |q|·|k| (Cauchy-Schwarz, also for each partial sum of the
  // dot product): queries whose norm times the keys' could overflow are refused, naming
  // both, instead of turning into Inf - Inf = NaN inside the softmax.
  void check_scores(int l, ConstRowsRef queries, double key_norm, const char* where) const {
    double query_norm = 0.0;
    for (Eigen::Index r = 0; r < queries.rows(); ++r)
      for (Eigen::Index c = 0; c + shape_.head_dim <= queries.cols(); c += shape_.head_dim)
        query_norm = std::max(query_norm, queries.row(r).segment(c, shape_.head_dim).cast<double>().norm());
    require(query_norm * key_norm <= max_score, name(), "::", where, ": layer ", l, ": queries of norm up to ",
            query_norm, " against keys of norm up to ", key_norm, " give attention scores beyond ", max_score,
            ", too close to fp32's limit");
  }

  // Shapes, positions, the key form, and NaN/Inf or (for fp16 stores) out-of-range values:
  // all raise before anything is stored, naming the token, head and value. Returns the
  // block's largest key norm.
  double check_block(int l, std::int64_t position, ConstRowsRef keys, ConstRowsRef values, KeyForm form) const {
    require(keys.cols() == shape_.kv_width() && values.cols() == shape_.kv_width() && values.rows() == keys.rows(),
            name(), ": keys and values must be T x ", shape_.kv_width(), " (got ", keys.rows(), "x", keys.cols(),
            " and ", values.rows(), "x", values.cols(), ")");
    require(position >= 0 && (seen_[l] == 0 || position == next_position(l)), name(), ": layer ", l,
            " takes its next token at position ", next_position(l), ", not ", position);
    require(form == KeyForm::rotated || key_rope() != nullptr, name(),
            ": stores keys after RoPE; pass KeyForm::rotated keys");
    const bool fp16 = narrows_to_fp16();
    for (const ConstRowsRef* part : {&keys, &values})
      for (Eigen::Index t = 0; t < part->rows(); ++t)
        for (Eigen::Index i = 0; i < part->cols(); ++i) {
          const float x = (*part)(t, i);
          if (std::isfinite(x) && (!fp16 || std::fabs(x) <= 65504.0f)) continue;
          throw error(detail::concat(name(), ": layer ", l, ", token at position ", position + t, ", KV head ",
                                     i / shape_.head_dim, ": ", part == &keys ? "key" : "value", " element ",
                                     i % shape_.head_dim, " is ", x,
                                     std::isfinite(x) ? " (outside fp16's range +-65504, where this cache stores it)"
                                                      : " (not finite)"));
        }
    return largest_key_norm(keys);
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

  // Block attention on a layer that holds tokens: per tile of block tokens, the held
  // tokens through attend_tokens() (the tile's queries as one larger GQA group, with the
  // softmax denominators), the block exactly and causally, merged by their denominators.
  void chunk_attention(int l, ConstRowsRef queries, ConstRowsRef keys, ConstRowsRef values, RowsRef out) {
    const int d = shape_.head_dim, q_heads = static_cast<int>(queries.cols() / d), kv_heads = shape_.kv_heads;
    const int group = q_heads / kv_heads;
    const Eigen::Index tokens = keys.rows(), tile = std::max(1, max_gqa_group / group);
    RowMatrix q, o;
    std::vector<float> held_lse;
    RowMatrix block_out;
    std::vector<float> block_lse;
    for (Eigen::Index first = 0; first < tokens; first += tile) {
      const Eigen::Index count = std::min(tile, tokens - first);
      // Rows ordered KV head, token, query of the group: group' = count * group.
      q.resize(count * q_heads, d);
      for (int kv = 0; kv < kv_heads; ++kv)
        for (Eigen::Index t = 0; t < count; ++t)
          for (int g = 0; g < group; ++g)
            q.row((kv * count + t) * group + g) = queries.row(first + t).segment((kv * group + g) * d, d);
      o.resize(q.rows(), d);
      held_lse.resize(static_cast<std::size_t>(q.rows()));
      attend_tokens(l, q, o, held_lse.data());
      block_out.resize(count, queries.cols());
      block_lse.resize(static_cast<std::size_t>(count * q_heads));
      causal_attention(queries.middleRows(first, count), keys.topRows(first + count), values.topRows(first + count),
                       d, block_out, block_lse.data(), first, threads_);
      for (int kv = 0; kv < kv_heads; ++kv)
        for (Eigen::Index t = 0; t < count; ++t)
          for (int g = 0; g < group; ++g) {
            const Eigen::Index row = (kv * count + t) * group + g;
            const int head = kv * group + g;
            const float a = held_lse[static_cast<std::size_t>(row)];
            const float b = block_lse[static_cast<std::size_t>(t * q_heads + head)];
            const float top = std::max(a, b), wa = std::exp(a - top), wb = std::exp(b - top);
            out.row(first + t).segment(head * d, d) =
                (wa * o.row(row) + wb * block_out.row(t).segment(head * d, d)) / (wa + wb);
          }
    }
  }

  CacheShape shape_;
  std::vector<std::int64_t> seen_, first_;
  std::vector<double> key_norm_;  // per layer, the largest key norm held (bounds the scores)
  int threads_ = 0;
};

}  // namespace lexico
