#pragma once
// The Lexico cache (Kim et al., ICML 2025, arXiv 2412.08890): every key and value
// vector outside a recent-token buffer is stored as a sparse code over its layer's
// key or value dictionary, and attention runs on the codes without densifying them:
// u = Dᵀq once per query, score_t = Σ_i coef_ti · u[idx_ti]; values accumulate
// w = Σ_t p_t c_t in atom space and the output is D_v · w.
//
// Optionally, codes are kept at a higher sparsity while their tokens are recent (tiers)
// and re-coded at the next lower one as they age: attention in these models is mostly
// local, so precision spent on recent tokens buys more than precision spent on old ones.
//
// Optionally, keys are coded before RoPE (options.key_rope): the cache undoes each key's
// rotation before coding and redoes it when scoring. Unrotated keys are far easier to
// code (TRAINING.md: 2.4x lower error at s = 8 on proxy-lm-hd128), but a score then
// costs O(s·d) instead of O(s), since the rotation does not commute with u = Dᵀq.

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "../atom_budget.hpp"
#include "../codes.hpp"
#include "../dictionary.hpp"
#include "../omp.hpp"
#include "../rope.hpp"
#include "cache.hpp"
#include "token_store.hpp"

namespace lexico {

struct LexicoOptions {
  int key_sparsity = 8;
  int value_sparsity = 8;
  // Relative residual ||x - x̂|| / ||x|| at which OMP may stop before s atoms (0: never).
  float key_tolerance = 0.0f;
  float value_tolerance = 0.0f;
  // > 1: the vectors coded in one flush (flush tokens x KV heads) share s atoms per vector
  // on average, one vector taking up to atom_pool·s where that removes the most residual
  // energy (atom_budget.hpp); rows then carry their length. 0: exactly s atoms each.
  float atom_pool = 0.0f;
  // false: only the long-term codes pool their atoms, the recent tiers keep exactly their
  // sparsity (a pooled tier of many atoms runs OMP to pool·rs atoms per vector: slow).
  bool pool_recent_tiers = true;
  int buffer = 128;  // n_b: most recent tokens kept uncompressed (fp16)
  int flush = 32;    // n_a: tokens coded at once when the buffer overflows
  // The first tokens of a sequence, kept in fp16 for good: attention sinks draw a large
  // share of every query's attention, so their coding error reaches every step
  // (Xiao et al. 2023, StreamingLLM). 0 is the paper's cache.
  int sinks = 0;
  // Atom indices packed at ceil(log2 N) bits (12 for N = 4096) instead of 16.
  bool pack_indices = true;
  // Per-layer (key, value) sparsity that replaces the two above for that layer.
  std::map<int, std::pair<int, int>> layer_sparsity;
  // Recent tiers, newest first: a token leaving the buffer is coded at the first tier's
  // sparsity; past its `tokens` it is re-coded (from its reconstruction) at the next
  // tier's, and past the last tier at key_sparsity / value_sparsity for good.
  struct Tier {
    int tokens, key_sparsity, value_sparsity;
  };
  std::vector<Tier> tiers;
  // The model's RoPE, to code keys before it: needs key dictionaries trained on keys
  // before RoPE (lexico-train --keys-before-rope). Token i of a layer must sit at
  // position i, as it does for a sequence that starts at position 0.
  std::optional<Rope> key_rope;
};

// A layer's key and value dictionaries.
struct LayerDictionaries {
  std::shared_ptr<const Dictionary> keys, values;
};

class LexicoCache final : public KVCache {
 public:
  LexicoCache(CacheShape shape, std::vector<LayerDictionaries> dictionaries, LexicoOptions options = {})
      : KVCache(shape), options_(std::move(options)) {
    require(static_cast<int>(dictionaries.size()) == shape.layers, "LexicoCache: ", dictionaries.size(),
            " layer dictionaries for ", shape.layers, " layers");
    require(options_.buffer >= 0 && options_.flush >= 1 && options_.sinks >= 0,
            "LexicoCache: buffer and sinks must be >= 0 and flush >= 1 (got ", options_.buffer, ", ",
            options_.sinks, ", ", options_.flush, ")");
    require(shape.head_dim <= TokenStore<Eigen::half>::max_head_dim, "LexicoCache: head_dim ", shape.head_dim,
            " above ", TokenStore<Eigen::half>::max_head_dim);
    require(!options_.key_rope || options_.key_rope->head_dim() == shape.head_dim, "LexicoCache: RoPE head_dim ",
            options_.key_rope ? options_.key_rope->head_dim() : 0, " differs from head_dim ", shape.head_dim);
    require(options_.atom_pool == 0.0f || (options_.atom_pool >= 1.0f && options_.atom_pool <= 255.0f),
            "LexicoCache: atom_pool = ", options_.atom_pool, " must be 0 (off) or in [1, 255]");
    for (const LexicoOptions::Tier& tier : options_.tiers)
      require(tier.tokens >= 1, "LexicoCache: a recent tier must hold at least one token (got ", tier.tokens, ")");
    for (const auto& [layer, sparsity] : options_.layer_sparsity)
      require(layer >= 0 && layer < shape.layers, "LexicoCache: sparsity override for layer ", layer,
              " outside [0, ", shape.layers, ")");
    for (int l = 0; l < shape.layers; ++l) {
      const LayerDictionaries& dicts = dictionaries[static_cast<std::size_t>(l)];
      require(dicts.keys && dicts.values, "LexicoCache: layer ", l, " lacks a key or value dictionary");
      const auto [key_s, value_s] = sparsity(l);
      // Oldest first; the first, the layer's own sparsity, is unbounded (0 tokens).
      std::vector<LexicoOptions::Tier> tiers = {{0, key_s, value_s}};
      tiers.insert(tiers.end(), options_.tiers.rbegin(), options_.tiers.rend());
      layers_.push_back(std::make_unique<Layer>(shape, dicts, tiers, options_));
    }
  }

  std::string name() const override { return "lexico"; }
  std::string parameters() const override {
    std::ostringstream out;
    out << "sk=" << options_.key_sparsity << " sv=" << options_.value_sparsity
        << " N=" << layers_.front()->keys.dictionary->size() << " buffer=" << options_.buffer
        << " flush=" << options_.flush;
    for (const auto& [layer, sparsity] : options_.layer_sparsity)
      out << " L" << layer << "=" << sparsity.first << "/" << sparsity.second;
    if (options_.sinks > 0) out << " sinks=" << options_.sinks;
    if (!options_.pack_indices) out << " index_bits=16";
    if (options_.key_rope) out << " keys=before_rope";
    for (const LexicoOptions::Tier& tier : options_.tiers)
      out << " tier=" << tier.tokens << ":" << tier.key_sparsity << ":" << tier.value_sparsity;
    if (options_.key_tolerance > 0 || options_.value_tolerance > 0)
      out << " tol_k=" << options_.key_tolerance << " tol_v=" << options_.value_tolerance;
    if (options_.atom_pool > 0) out << " atom_pool=" << options_.atom_pool;
    if (options_.atom_pool > 0 && !options_.pool_recent_tiers && !options_.tiers.empty()) out << " pool_recent=0";
    return out.str();
  }

  // Tokens of `layer` held as sinks, as codes and in the buffer.
  Eigen::Index sink_tokens(int layer) const {
    return layers_[static_cast<std::size_t>(checked_layer(layer))]->keys.sinks.tokens();
  }
  Eigen::Index coded_tokens(int layer) const { return layers_[static_cast<std::size_t>(checked_layer(layer))]->coded; }
  Eigen::Index buffered_tokens(int layer) const {
    return layers_[static_cast<std::size_t>(checked_layer(layer))]->keys.buffer.tokens();
  }
  // The coded keys or values of one KV head of a layer in token order, tier by tier:
  // tier 0 holds the oldest tokens at key_sparsity / value_sparsity, the last tier the
  // newest (tier i > 0 is options.tiers[tiers - 1 - i]).
  int code_tiers() const { return static_cast<int>(options_.tiers.size()) + 1; }
  const CodeStore& key_codes(int layer, int head, int tier = 0) const { return part(layer, head, tier, true); }
  const CodeStore& value_codes(int layer, int head, int tier = 0) const { return part(layer, head, tier, false); }
  const Dictionary& key_dictionary(int layer) const { return *layers_[static_cast<std::size_t>(checked_layer(layer))]->keys.dictionary; }
  const Dictionary& value_dictionary(int layer) const { return *layers_[static_cast<std::size_t>(checked_layer(layer))]->values.dictionary; }

 protected:
  void append_token(int layer, const float* key, const float* value) override {
    Layer& state = *layers_[static_cast<std::size_t>(layer)];
    if (state.keys.sinks.tokens() < options_.sinks) {
      state.keys.sinks.append(key);
      state.values.sinks.append(value);
      return;
    }
    state.keys.buffer.append(key);
    state.values.buffer.append(value);
    const Eigen::Index excess = state.keys.buffer.tokens() - options_.buffer;
    if (excess > 0) {
      state.code_oldest(std::min<Eigen::Index>(state.keys.buffer.tokens(), std::max<Eigen::Index>(options_.flush, excess)));
      state.age_tiers(options_.flush);
    }
  }

  // Prefill: the sinks aside, everything but the last n_b tokens is coded in one batch.
  void store_prefill(int layer, ConstRowsRef keys, ConstRowsRef values, ConstRowsRef /*queries*/) override {
    Layer& state = *layers_[static_cast<std::size_t>(layer)];
    const Eigen::Index sinks = std::min<Eigen::Index>(options_.sinks, keys.rows());
    for (Eigen::Index t = 0; t < sinks; ++t) {
      state.keys.sinks.append(keys.row(t).data());
      state.values.sinks.append(values.row(t).data());
    }
    const Eigen::Index coded = std::max<Eigen::Index>(0, keys.rows() - sinks - options_.buffer);
    state.code_rows(keys.middleRows(sinks, coded), values.middleRows(sinks, coded));
    state.age_tiers(options_.flush);
    for (Eigen::Index t = sinks + coded; t < keys.rows(); ++t) {
      state.keys.buffer.append(keys.row(t).data());
      state.values.buffer.append(values.row(t).data());
    }
  }

  void attend_tokens(int layer, ConstRowsRef queries, RowsRef out) override {
    Layer& state = *layers_[static_cast<std::size_t>(layer)];
    // Score columns: sinks, then coded tokens, then the buffer.
    const Eigen::Index sinks = state.keys.sinks.tokens(), coded = state.coded;
    const Dictionary& key_dict = *state.keys.dictionary;
    const Dictionary& value_dict = *state.values.dictionary;
    const Eigen::Index atoms_k = key_dict.size(), atoms_v = value_dict.size();
    grouped_decode_attention(
        queries, shape().kv_heads, sinks + coded + state.keys.buffer.tokens(), out,
        [&](int h, const float* q, int group, float* scores, Eigen::Index ld) {
          state.keys.sinks.scores(h, q, group, scores, ld);
          if (coded > 0) {
            thread_local std::vector<float> table;
            if (!options_.key_rope) {
              table.resize(static_cast<std::size_t>(atoms_k * group));
              atom_table(key_dict, q, group, table.data());
            }
            // A token's column is its position: sinks first, then the codes in order.
            Eigen::Index column = sinks;
            for (const Tier& tier : state.keys.tiers) {
              const CodeStore& codes = tier.heads[static_cast<std::size_t>(h)];
              if (options_.key_rope)
                rotated_code_scores(codes, key_dict, *options_.key_rope, column, q, group, scores + column, ld);
              else
                code_scores(codes, table.data(), group, scores + column, ld);
              column += static_cast<Eigen::Index>(codes.rows());
            }
          }
          state.keys.buffer.scores(h, q, group, scores + sinks + coded, ld);
        },
        [&](int h, const float* p, Eigen::Index ld, int group, float* o) {
          state.values.sinks.accumulate(h, p, ld, group, o);
          if (coded > 0) {
            thread_local std::vector<float> weights;
            weights.assign(static_cast<std::size_t>(atoms_v * group), 0.0f);
            Eigen::Index column = sinks;
            for (const Tier& tier : state.values.tiers) {
              const CodeStore& codes = tier.heads[static_cast<std::size_t>(h)];
              code_accumulate(codes, p + column, ld, group, weights.data());
              column += static_cast<Eigen::Index>(codes.rows());
            }
            add_atom_combination(value_dict, weights.data(), group, o);
          }
          state.values.buffer.accumulate(h, p + sinks + coded, ld, group, o);
        });
  }

  CacheBytes layer_bytes(int layer) const override {
    const Layer& state = *layers_[static_cast<std::size_t>(layer)];
    CacheBytes bytes;
    for (const Part* part : {&state.keys, &state.values}) {
      for (const Tier& tier : part->tiers)
        for (const CodeStore& codes : tier.heads) {
          bytes.payload += codes.payload_bytes();
          bytes.metadata += codes.metadata_bytes();
        }
      bytes.buffer += part->buffer.bytes() + part->sinks.bytes();
    }
    return bytes;
  }

  void clear_layer(int layer) override {
    Layer& state = *layers_[static_cast<std::size_t>(layer)];
    for (Part* part : {&state.keys, &state.values}) {
      for (Tier& tier : part->tiers)
        for (CodeStore& codes : tier.heads) codes.clear();
      part->buffer.clear();
      part->sinks.clear();
    }
    state.coded = 0;
  }

 private:
  // Codes at one sparsity, one store per KV head, and the encoder that makes them.
  struct Tier {
    Tier(const Dictionary& dictionary, int kv_heads, int sparsity, float tolerance, float pool, int index_bits,
         Eigen::Index capacity)
        : sparsity(sparsity),
          longest(pool > 0 ? longest_code(dictionary, sparsity, pool) : sparsity),
          encoder(dictionary, OmpOptions{longest, tolerance}),
          heads(static_cast<std::size_t>(kv_heads), CodeStore(longest, tolerance > 0 || pool > 0, index_bits)),
          capacity(capacity) {}
    Eigen::Index tokens() const { return static_cast<Eigen::Index>(heads.front().rows()); }
    bool pooled() const { return longest > sparsity; }

    static int longest_code(const Dictionary& dictionary, int sparsity, float pool) {
      const int cap = std::min({dictionary.dim(), dictionary.size(), 255});
      return std::clamp(static_cast<int>(pool * static_cast<float>(sparsity)), std::min(sparsity, cap), cap);
    }

    int sparsity;  // atoms per vector, on average when pooled
    int longest;   // atoms one vector may take
    OmpEncoder encoder;
    std::vector<CodeStore> heads;
    Eigen::Index capacity;  // 0: unbounded
  };

  // Keys or values of one layer: dictionary, code tiers (oldest first), fp16 buffer and sinks.
  struct Part {
    Part(const CacheShape& shape, std::shared_ptr<const Dictionary> dict, const std::vector<LexicoOptions::Tier>& specs,
         bool keys, const LexicoOptions& options, const Rope* rope)
        : dictionary(std::move(dict)), rope(rope), pool_columns(Eigen::Index(options.flush) * shape.kv_heads),
          buffer(shape.kv_heads, shape.head_dim), sinks(shape.kv_heads, shape.head_dim) {
      require(dictionary->dim() == shape.head_dim, "LexicoCache: dictionary dimension ", dictionary->dim(),
              " differs from head_dim ", shape.head_dim);
      const int index_bits =
          options.pack_indices ? CodeStore::bits_for(static_cast<std::size_t>(dictionary->size())) : 16;
      const float tolerance = keys ? options.key_tolerance : options.value_tolerance;
      for (const LexicoOptions::Tier& spec : specs)
        tiers.emplace_back(*dictionary, shape.kv_heads, keys ? spec.key_sparsity : spec.value_sparsity, tolerance,
                           (tiers.empty() || options.pool_recent_tiers) ? options.atom_pool : 0.0f, index_bits,
                           spec.tokens);
    }

    // Codes T tokens (rows of kv_heads x head_dim) at positions first, first + 1, ...
    // into the newest tier, head by head.
    void code(ConstRowsRef rows, std::int64_t first) {
      Tier& tier = tiers.back();
      const int heads = static_cast<int>(tier.heads.size());
      const int dim = dictionary->dim();
      const Eigen::Index vectors = rows.rows() * heads;
      scratch.resize(dim, vectors);
      for (Eigen::Index t = 0; t < rows.rows(); ++t)
        scratch.middleCols(t * heads, heads) = Eigen::Map<const Eigen::MatrixXf>(rows.row(t).data(), dim, heads);
      // Code what an fp16 cache holds, so a token codes the same whether it came
      // straight from a prefill or through the fp16 buffer.
      for (Eigen::Index i = 0; i < scratch.size(); ++i) scratch.data()[i] = static_cast<float>(Eigen::half(scratch.data()[i]));
      if (rope) unrotate(first, rows.rows(), heads);
      encode_into(tier);
    }

    // Undoes RoPE on the columns of `scratch`, with the angles scoring will redo it with.
    void unrotate(std::int64_t first, Eigen::Index tokens, int heads) {
      const int pairs = rope->pairs();
      cos.resize(static_cast<std::size_t>(tokens * pairs));
      sin.resize(cos.size());
      rope->consecutive_angles(first, tokens, cos.data(), sin.data());
      for (Eigen::Index v = 0; v < scratch.cols(); ++v)
        rope->rotate(scratch.col(v).data(), cos.data() + v / heads * pairs, sin.data() + v / heads * pairs, true);
    }

    // Moves the oldest `count` tokens of tier i into tier i - 1, re-coding their
    // reconstructions at that tier's sparsity.
    void age(std::size_t i, Eigen::Index count) {
      Tier &from = tiers[i], &to = tiers[i - 1];
      const int heads = static_cast<int>(from.heads.size());
      const int dim = dictionary->dim();
      scratch.setZero(dim, count * heads);
      for (int h = 0; h < heads; ++h) {
        CodeStore& codes = from.heads[static_cast<std::size_t>(h)];
        codes.for_each_row([&](std::size_t r, CodeStore::Indices index, const std::uint8_t* coefficient, int entries,
                               float scale) {
          if (static_cast<Eigen::Index>(r) >= count) return;
          for (int e = 0; e < entries; ++e)
            scratch.col(static_cast<Eigen::Index>(r) * heads + h) +=
                (fp8_e4m3_decode(coefficient[e]) * scale) * dictionary->atoms().col(index[e]);
        });
        codes.erase_front(static_cast<std::size_t>(count));
      }
      encode_into(to);
    }

    // Encodes the columns of `scratch` (token-major, heads within a token) into a tier;
    // a pooled tier shares its atoms within each flush's worth of columns, from the
    // first, so a token codes the same whether it came from a prefill or one by one.
    void encode_into(Tier& tier) {
      const int heads = static_cast<int>(tier.heads.size());
      tier.encoder.encode(scratch, result);
      if (tier.pooled())
        for (Eigen::Index first = 0; first < scratch.cols(); first += pool_columns) {
          const Eigen::Index count = std::min(pool_columns, scratch.cols() - first);
          share_atoms(result, first, count, count * tier.sparsity, keep);
          shorten_codes(*dictionary, scratch, first, keep, result);
        }
      for (Eigen::Index v = 0; v < scratch.cols(); ++v)
        tier.heads[static_cast<std::size_t>(v % heads)].append(result.indices.col(v).data(),
                                                               result.coefficients.col(v).data(), result.counts(v));
    }

    std::shared_ptr<const Dictionary> dictionary;
    const Rope* rope;  // keys coded before RoPE: the rotation to undo; else null
    Eigen::Index pool_columns;  // columns that share an atom budget: one flush
    std::vector<Tier> tiers;  // oldest first; tiers[0] is unbounded
    TokenStore<Eigen::half> buffer, sinks;
    Eigen::MatrixXf scratch;
    std::vector<float> cos, sin;
    SparseCodes result;
    std::vector<int> keep;
  };

  struct Layer {
    Layer(const CacheShape& shape, const LayerDictionaries& dicts, const std::vector<LexicoOptions::Tier>& tiers,
          const LexicoOptions& options)
        : keys(shape, dicts.keys, tiers, true, options, options.key_rope ? &*options.key_rope : nullptr),
          values(shape, dicts.values, tiers, false, options, nullptr) {}

    // Re-codes, newest tier first, whatever overflows a tier: at least `flush` tokens at
    // once, so a token is re-coded once per tier however it arrived.
    void age_tiers(int flush) {
      for (std::size_t i = keys.tiers.size() - 1; i > 0; --i) {
        const Eigen::Index excess = keys.tiers[i].tokens() - keys.tiers[i].capacity;
        if (excess <= 0) continue;
        const Eigen::Index count = std::min(keys.tiers[i].tokens(), std::max<Eigen::Index>(flush, excess));
        keys.age(i, count);
        values.age(i, count);
      }
    }

    void code_rows(ConstRowsRef key_rows, ConstRowsRef value_rows) {
      if (key_rows.rows() == 0) return;
      const std::int64_t first = keys.sinks.tokens() + coded;  // the position of the first row
      keys.code(key_rows, first);
      values.code(value_rows, first);
      coded += key_rows.rows();
    }

    // Moves the oldest `count` buffered tokens into the codes.
    void code_oldest(Eigen::Index count) {
      const int width = static_cast<int>(keys.buffer.heads()) * keys.buffer.head_dim();
      key_rows.resize(count, width);  // no reallocation once the flush size has been seen
      value_rows.resize(count, width);
      for (Eigen::Index t = 0; t < count; ++t)
        for (int h = 0; h < keys.buffer.heads(); ++h) {
          keys.buffer.row(h, t, key_rows.row(t).data() + h * keys.buffer.head_dim());
          values.buffer.row(h, t, value_rows.row(t).data() + h * values.buffer.head_dim());
        }
      keys.buffer.erase_front(count);
      values.buffer.erase_front(count);
      code_rows(key_rows, value_rows);
    }

    Part keys, values;
    Eigen::Index coded = 0;
    RowMatrix key_rows, value_rows;  // tokens leaving the buffer, reused by every flush
  };

  std::pair<int, int> sparsity(int layer) const {
    const auto found = options_.layer_sparsity.find(layer);
    return found != options_.layer_sparsity.end() ? found->second
                                                  : std::make_pair(options_.key_sparsity, options_.value_sparsity);
  }

  const CodeStore& part(int layer, int head, int tier, bool keys) const {
    const Layer& state = *layers_[static_cast<std::size_t>(checked_layer(layer))];
    require(head >= 0 && head < shape().kv_heads, "LexicoCache: KV head ", head, " out of range");
    require(tier >= 0 && tier < code_tiers(), "LexicoCache: code tier ", tier, " out of range");
    return (keys ? state.keys : state.values).tiers[static_cast<std::size_t>(tier)].heads[static_cast<std::size_t>(head)];
  }

  LexicoOptions options_;
  std::vector<std::unique_ptr<Layer>> layers_;
};

}  // namespace lexico
