#pragma once
// The Lexico cache (Kim et al., ICML 2025, arXiv 2412.08890): every key and value
// vector outside a recent-token buffer is stored as a sparse code over its layer's
// key or value dictionary, and attention runs on the codes without densifying them:
// u = Dᵀq once per query, score_t = Σ_i coef_ti · u[idx_ti]; values accumulate
// w = Σ_t p_t c_t in atom space and the output is D_v · w.

#include <algorithm>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "../codes.hpp"
#include "../dictionary.hpp"
#include "../omp.hpp"
#include "cache.hpp"
#include "token_store.hpp"

namespace lexico {

struct LexicoOptions {
  int key_sparsity = 8;
  int value_sparsity = 8;
  // Relative residual ||x - x̂|| / ||x|| at which OMP may stop before s atoms (0: never).
  float key_tolerance = 0.0f;
  float value_tolerance = 0.0f;
  int buffer = 128;  // n_b: most recent tokens kept uncompressed (fp16)
  int flush = 32;    // n_a: tokens coded at once when the buffer overflows
  // Per-layer (key, value) sparsity that replaces the two above for that layer.
  std::map<int, std::pair<int, int>> layer_sparsity;
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
    require(options_.buffer >= 0 && options_.flush >= 1, "LexicoCache: buffer must be >= 0 and flush >= 1 (got ",
            options_.buffer, ", ", options_.flush, ")");
    require(shape.head_dim <= TokenStore<Eigen::half>::max_head_dim, "LexicoCache: head_dim ", shape.head_dim,
            " above ", TokenStore<Eigen::half>::max_head_dim);
    for (const auto& [layer, sparsity] : options_.layer_sparsity)
      require(layer >= 0 && layer < shape.layers, "LexicoCache: sparsity override for layer ", layer,
              " outside [0, ", shape.layers, ")");
    for (int l = 0; l < shape.layers; ++l) {
      const LayerDictionaries& dicts = dictionaries[static_cast<std::size_t>(l)];
      require(dicts.keys && dicts.values, "LexicoCache: layer ", l, " lacks a key or value dictionary");
      const auto [key_s, value_s] = sparsity(l);
      layers_.push_back(std::make_unique<Layer>(shape, dicts, key_s, value_s, options_));
    }
  }

  std::string name() const override { return "lexico"; }
  std::string parameters() const override {
    std::ostringstream out;
    out << "sk=" << options_.key_sparsity << " sv=" << options_.value_sparsity
        << " N=" << layers_.front()->keys.dictionary->size() << " buffer=" << options_.buffer
        << " flush=" << options_.flush;
    if (options_.key_tolerance > 0 || options_.value_tolerance > 0)
      out << " tol_k=" << options_.key_tolerance << " tol_v=" << options_.value_tolerance;
    return out.str();
  }

  // Tokens of `layer` held as codes and in the buffer.
  Eigen::Index coded_tokens(int layer) const { return layers_[static_cast<std::size_t>(checked_layer(layer))]->coded; }
  Eigen::Index buffered_tokens(int layer) const {
    return layers_[static_cast<std::size_t>(checked_layer(layer))]->keys.buffer.tokens();
  }
  // The coded keys or values of one KV head of a layer, in token order.
  const CodeStore& key_codes(int layer, int head) const { return part(layer, head, true); }
  const CodeStore& value_codes(int layer, int head) const { return part(layer, head, false); }
  const Dictionary& key_dictionary(int layer) const { return *layers_[static_cast<std::size_t>(checked_layer(layer))]->keys.dictionary; }
  const Dictionary& value_dictionary(int layer) const { return *layers_[static_cast<std::size_t>(checked_layer(layer))]->values.dictionary; }

 protected:
  void append_token(int layer, const float* key, const float* value) override {
    Layer& state = *layers_[static_cast<std::size_t>(layer)];
    state.keys.buffer.append(key);
    state.values.buffer.append(value);
    const Eigen::Index excess = state.keys.buffer.tokens() - options_.buffer;
    if (excess > 0) state.code_oldest(std::min<Eigen::Index>(state.keys.buffer.tokens(), std::max<Eigen::Index>(options_.flush, excess)));
  }

  // Prefill: everything but the last n_b tokens is coded in one batch.
  void store_prefill(int layer, ConstRowsRef keys, ConstRowsRef values, ConstRowsRef /*queries*/) override {
    Layer& state = *layers_[static_cast<std::size_t>(layer)];
    const Eigen::Index coded = std::max<Eigen::Index>(0, keys.rows() - options_.buffer);
    state.code_rows(keys.topRows(coded), values.topRows(coded));
    for (Eigen::Index t = coded; t < keys.rows(); ++t) {
      state.keys.buffer.append(keys.row(t).data());
      state.values.buffer.append(values.row(t).data());
    }
  }

  void attend_tokens(int layer, ConstRowsRef queries, RowsRef out) override {
    Layer& state = *layers_[static_cast<std::size_t>(layer)];
    const Eigen::Index coded = state.coded;
    const Dictionary& key_dict = *state.keys.dictionary;
    const Dictionary& value_dict = *state.values.dictionary;
    const Eigen::Index atoms_k = key_dict.size(), atoms_v = value_dict.size();
    grouped_decode_attention(
        queries, shape().kv_heads, coded + state.keys.buffer.tokens(), out,
        [&](int h, const float* q, int group, float* scores, Eigen::Index ld) {
          if (coded > 0) {
            thread_local std::vector<float> table;
            table.resize(static_cast<std::size_t>(atoms_k * group));
            atom_table(key_dict, q, group, table.data());
            code_scores(state.keys.codes[static_cast<std::size_t>(h)], table.data(), group, scores, ld);
          }
          state.keys.buffer.scores(h, q, group, scores + coded, ld);
        },
        [&](int h, const float* p, Eigen::Index ld, int group, float* o) {
          if (coded > 0) {
            thread_local std::vector<float> weights;
            weights.assign(static_cast<std::size_t>(atoms_v * group), 0.0f);
            code_accumulate(state.values.codes[static_cast<std::size_t>(h)], p, ld, group, weights.data());
            add_atom_combination(value_dict, weights.data(), group, o);
          }
          state.values.buffer.accumulate(h, p + coded, ld, group, o);
        });
  }

  CacheBytes layer_bytes(int layer) const override {
    const Layer& state = *layers_[static_cast<std::size_t>(layer)];
    CacheBytes bytes;
    for (const Part* part : {&state.keys, &state.values}) {
      for (const CodeStore& codes : part->codes) {
        bytes.payload += codes.payload_bytes();
        bytes.metadata += codes.metadata_bytes();
      }
      bytes.buffer += part->buffer.bytes();
    }
    return bytes;
  }

  void clear_layer(int layer) override {
    Layer& state = *layers_[static_cast<std::size_t>(layer)];
    for (Part* part : {&state.keys, &state.values}) {
      for (CodeStore& codes : part->codes) codes.clear();
      part->buffer.clear();
    }
    state.coded = 0;
  }

 private:
  // Keys or values of one layer: dictionary, encoder, per-head codes, fp16 buffer.
  struct Part {
    Part(const CacheShape& shape, std::shared_ptr<const Dictionary> dict, int sparsity, float tolerance)
        : dictionary(std::move(dict)),
          encoder(*dictionary, OmpOptions{sparsity, tolerance}),
          codes(static_cast<std::size_t>(shape.kv_heads), CodeStore(sparsity, tolerance > 0)),
          buffer(shape.kv_heads, shape.head_dim) {
      require(dictionary->dim() == shape.head_dim, "LexicoCache: dictionary dimension ", dictionary->dim(),
              " differs from head_dim ", shape.head_dim);
    }

    // Codes T tokens (rows of kv_heads x head_dim) and appends them head by head.
    void code(ConstRowsRef rows) {
      const int heads = static_cast<int>(codes.size());
      const int dim = dictionary->dim();
      const Eigen::Index vectors = rows.rows() * heads;
      scratch.resize(dim, vectors);
      for (Eigen::Index t = 0; t < rows.rows(); ++t)
        scratch.middleCols(t * heads, heads) = Eigen::Map<const Eigen::MatrixXf>(rows.row(t).data(), dim, heads);
      // Code what an fp16 cache holds, so a token codes the same whether it came
      // straight from a prefill or through the fp16 buffer.
      for (Eigen::Index i = 0; i < scratch.size(); ++i) scratch.data()[i] = static_cast<float>(Eigen::half(scratch.data()[i]));
      encoder.encode(scratch, result);
      for (Eigen::Index v = 0; v < vectors; ++v)
        codes[static_cast<std::size_t>(v % heads)].append(result.indices.col(v).data(),
                                                          result.coefficients.col(v).data(), result.counts(v));
    }

    std::shared_ptr<const Dictionary> dictionary;
    OmpEncoder encoder;
    std::vector<CodeStore> codes;  // one per KV head
    TokenStore<Eigen::half> buffer;
    Eigen::MatrixXf scratch;
    SparseCodes result;
  };

  struct Layer {
    Layer(const CacheShape& shape, const LayerDictionaries& dicts, int key_sparsity, int value_sparsity,
          const LexicoOptions& options)
        : keys(shape, dicts.keys, key_sparsity, options.key_tolerance),
          values(shape, dicts.values, value_sparsity, options.value_tolerance) {}

    void code_rows(ConstRowsRef key_rows, ConstRowsRef value_rows) {
      if (key_rows.rows() == 0) return;
      keys.code(key_rows);
      values.code(value_rows);
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

  const CodeStore& part(int layer, int head, bool keys) const {
    const Layer& state = *layers_[static_cast<std::size_t>(checked_layer(layer))];
    require(head >= 0 && head < shape().kv_heads, "LexicoCache: KV head ", head, " out of range");
    return (keys ? state.keys : state.values).codes[static_cast<std::size_t>(head)];
  }

  LexicoOptions options_;
  std::vector<std::unique_ptr<Layer>> layers_;
};

}  // namespace lexico
