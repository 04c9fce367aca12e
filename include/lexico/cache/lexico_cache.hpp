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
// Optionally, keys are coded before RoPE (a CodeSpace with key_rope): the cache keeps
// keys before RoPE (taking them as they are, or undoing the rotation of rotated keys
// at their positions) and rotates them when scoring. Unrotated keys are far easier to
// code (TRAINING.md: 2.4x lower error at s = 8 on proxy-lm-hd128), but a score then
// costs O(s·d) instead of O(s), since the rotation does not commute with u = Dᵀq.
//
// Optionally, every code keeps its residual x − x̂ beside it, quantized at a few bits per
// channel, and attention sees x̂ + r̂: above ~20 % of fp16's bytes that removes more error
// than the same bytes of atoms (results/residual.md).
//
// Memory: the dictionaries, Gram forms and encoder workspaces live in a CodeSpace shared
// by every sequence; a cache holds its codes, its fp16 sinks and buffer, and counters.
// Scratch for coding and attention belongs to the calling thread (thread_local).
//
// Concurrency: as every KVCache (cache.hpp): one thread per cache at a time; caches that
// share a CodeSpace may run on different threads at once.

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "../coding/atom_budget.hpp"
#include "../coding/code_space.hpp"
#include "../coding/code_attention.hpp"
#include "../coding/codes.hpp"
#include "../coding/dictionary.hpp"
#include "../coding/omp.hpp"
#include "../coding/key_metric.hpp"
#include "../coding/unshrink.hpp"
#include "../base/rope.hpp"
#include "cache.hpp"
#include "coded_rows.hpp"
#include "token_quant.hpp"
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
  // Codes scaled along their own vector by (‖x‖² / ⟨x, x̂⟩)^p (coding/unshrink.hpp): least
  // squares shortens x̂, so the key a query matches scores lower and copying blurs. 0 is the
  // paper's code, 1 restores a matching query's score, 0.5 the norm.
  float key_unshrink = 0.0f;
  float value_unshrink = 0.0f;
  // Bits per channel of the residual x − x̂ kept beside every code (0: none; 1, 2 or 4):
  // symmetric blocks of 32 channels with one fp16 scale (block_quant.hpp), in the codes'
  // space, so that attention sees x̂ + r̂. A 2-bit residual costs 40 bytes at d = 128, the
  // price of 16 atoms, and removes more error than they do at s >= 4 (issue 18, lever 4).
  int key_residual_bits = 0;
  int value_residual_bits = 0;
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
  // How a recent tier holds its tokens. `codes`: at the tier's sparsities, re-coded from
  // the reconstruction as they age. `q8_0` / `q4_0`: quantized per token (llama.cpp's
  // blocks of 32 channels with one fp16 scale: 8.5 or 4.5 bits per element) and coded
  // once, at the layer's sparsity, as they leave the tier; appending then costs what the
  // tierless cache's appending does, since no token runs OMP at many atoms or twice.
  // A quantized tier is a single one (tiers[0]; its sparsities are not used).
  enum class RecentFormat { codes, q8_0, q4_0 };
  RecentFormat recent_format = RecentFormat::codes;
  bool quantized_recent() const { return recent_format != RecentFormat::codes && !tiers.empty(); }
  // The values' format of a quantized tier where it differs from the keys' (attention is
  // more sensitive to key error: q8_0 keys with q4_0 values, say).
  std::optional<RecentFormat> recent_value_format;
};

inline std::string to_string(LexicoOptions::RecentFormat format) {
  switch (format) {
    case LexicoOptions::RecentFormat::q8_0: return "q8_0";
    case LexicoOptions::RecentFormat::q4_0: return "q4_0";
    default: return "codes";
  }
}

inline LexicoOptions::RecentFormat parse_recent_format(const std::string& name) {
  for (auto format : {LexicoOptions::RecentFormat::codes, LexicoOptions::RecentFormat::q8_0,
                      LexicoOptions::RecentFormat::q4_0})
    if (name == to_string(format)) return format;
  throw error("recent tier format '" + name + "' is none of codes, q8_0, q4_0");
}

// One decode-attention request of a batch (attend_batch): a cache and its queries.
struct AttendRequest {
  KVCache* cache;
  ConstRowsRef queries;  // q_heads x head_dim
  RowsRef out;           // q_heads x head_dim
};

class LexicoCache final : public KVCache {
 public:
  LexicoCache(CacheShape shape, std::shared_ptr<const CodeSpace> space, LexicoOptions options = {})
      : KVCache(shape), space_(std::move(space)), options_(std::move(options)) {
    require(space_ != nullptr, "LexicoCache: no CodeSpace");
    // A set trained for another model: refused naming both sides.
    require(space_->layers() == shape.layers && space_->dim() == shape.head_dim, "LexicoCache: the dictionary set of '",
            space_->manifest().model, "' has ", space_->layers(), " layers of head_dim ", space_->dim(),
            "; this cache's model has ", shape.layers, " layers of head_dim ", shape.head_dim);
    for (const float p : {options_.key_unshrink, options_.value_unshrink})
      require(p >= 0 && p <= 1, "LexicoCache: unshrink powers must be in [0, 1] (got ", options_.key_unshrink, "/",
              options_.value_unshrink, ")");
    require(options_.buffer >= 0 && options_.flush >= 1 && options_.sinks >= 0,
            "LexicoCache: buffer and sinks must be >= 0 and flush >= 1 (got ", options_.buffer, ", ",
            options_.sinks, ", ", options_.flush, ")");
    require(shape.head_dim <= TokenStore<Eigen::half>::max_head_dim, "LexicoCache: head_dim ", shape.head_dim,
            " above ", TokenStore<Eigen::half>::max_head_dim);
    require(options_.atom_pool == 0.0f || (options_.atom_pool >= 1.0f && options_.atom_pool <= 255.0f),
            "LexicoCache: atom_pool = ", options_.atom_pool, " must be 0 (off) or in [1, 255]");
    for (const LexicoOptions::Tier& tier : options_.tiers)
      require(tier.tokens >= 1, "LexicoCache: a recent tier must hold at least one token (got ", tier.tokens, ")");
    require(!options_.recent_value_format ||
                (*options_.recent_value_format != LexicoOptions::RecentFormat::codes &&
                 options_.recent_format != LexicoOptions::RecentFormat::codes),
            "LexicoCache: keys and values of a recent tier are both codes or both quantized");
    // A quantized format names how the tier holds its tokens; without a tier it would be ignored.
    require((options_.recent_format == LexicoOptions::RecentFormat::codes && !options_.recent_value_format) ||
                !options_.tiers.empty(),
            "LexicoCache: a ", to_string(options_.recent_format), " recent format needs a recent tier (none given)");
    require(!quantized_recent() || options_.tiers.size() == 1, "LexicoCache: a ", to_string(options_.recent_format),
            " recent tier is a single tier (", options_.tiers.size(), " given)");
    require(!quantized_recent() || shape.head_dim % llama_block == 0, "LexicoCache: a ",
            to_string(options_.recent_format), " recent tier needs head_dim a multiple of ", llama_block, " (got ",
            shape.head_dim, ")");
    for (const int bits : {options_.key_residual_bits, options_.value_residual_bits}) {
      require(bits == 0 || bits == 1 || bits == 2 || bits == 4, "LexicoCache: residual bits must be 0, 1, 2 or 4 (got ",
              options_.key_residual_bits, "/", options_.value_residual_bits, ")");
      require(bits == 0 || shape.head_dim % llama_block == 0, "LexicoCache: a residual needs head_dim a multiple of ",
              llama_block, " (got ", shape.head_dim, ")");
    }
    // The coded values' attention leaves through D_v·w and T⁻¹; a residual goes straight to the output.
    require(options_.value_residual_bits == 0 || space_->coding_map(0, false) == nullptr,
            "LexicoCache: a value residual with a value metric is not supported (dictionary set of '",
            space_->manifest().model, "')");
    for (const auto& [layer, sparsity] : options_.layer_sparsity)
      require(layer >= 0 && layer < shape.layers, "LexicoCache: sparsity override for layer ", layer,
              " outside [0, ", shape.layers, ")");
    for (int l = 0; l < shape.layers; ++l) {
      const auto [key_s, value_s] = sparsity(l);
      // Oldest first; the first, the layer's own sparsity, is unbounded (0 tokens).
      std::vector<LexicoOptions::Tier> tiers = {{0, key_s, value_s}};
      if (!quantized_recent()) tiers.insert(tiers.end(), options_.tiers.rbegin(), options_.tiers.rend());
      layers_.emplace_back(shape, *space_, l, tiers, options_);
    }
  }

  // A cache with a CodeSpace of its own (one sequence; engines share one CodeSpace).
  LexicoCache(CacheShape shape, const std::vector<LayerDictionaries>& dictionaries, LexicoOptions options = {},
              CodeSpaceOptions space = {})
      : LexicoCache(shape, make_space(shape, dictionaries, std::move(space)), std::move(options)) {}

  std::string name() const override { return "lexico"; }
  std::string parameters() const override {
    std::ostringstream out;
    out << "sk=" << options_.key_sparsity << " sv=" << options_.value_sparsity << " N=" << space_->keys(0).size()
        << " buffer=" << options_.buffer << " flush=" << options_.flush;
    for (const auto& [layer, sparsity] : options_.layer_sparsity)
      out << " L" << layer << "=" << sparsity.first << "/" << sparsity.second;
    if (options_.sinks > 0) out << " sinks=" << options_.sinks;
    if (!options_.pack_indices) out << " index_bits=16";
    if (space_->key_rope()) out << " keys=before_rope";
    for (const LexicoOptions::Tier& tier : options_.tiers)
      if (quantized_recent())
        out << " tier=" << tier.tokens << ":" << to_string(options_.recent_format)
            << (options_.recent_value_format ? "/" + to_string(*options_.recent_value_format) : std::string());
      else out << " tier=" << tier.tokens << ":" << tier.key_sparsity << ":" << tier.value_sparsity;
    if (options_.key_tolerance > 0 || options_.value_tolerance > 0)
      out << " tol_k=" << options_.key_tolerance << " tol_v=" << options_.value_tolerance;
    if (options_.atom_pool > 0) out << " atom_pool=" << options_.atom_pool;
    if (options_.atom_pool > 0 && !options_.pool_recent_tiers && !options_.tiers.empty()) out << " pool_recent=0";
    if (space_->options().gram != GramPolicy::fp16) out << " gram=" << to_string(space_->options().gram);
    if (options_.key_unshrink > 0 || options_.value_unshrink > 0)
      out << " unshrink=" << options_.key_unshrink << "/" << options_.value_unshrink;
    if (options_.key_residual_bits > 0 || options_.value_residual_bits > 0)
      out << " residual=" << options_.key_residual_bits << "/" << options_.value_residual_bits;
    return out.str();
  }

  const CodeSpace& space() const { return *space_; }
  const Rope* key_rope() const override { return space_->key_rope() ? &*space_->key_rope() : nullptr; }

  // Tokens of `layer` held as sinks, as codes and in the buffer.
  Eigen::Index sink_tokens(int layer) const { return at(layer).keys.sinks.tokens(); }
  Eigen::Index coded_tokens(int layer) const { return at(layer).coded; }
  Eigen::Index buffered_tokens(int layer) const { return at(layer).keys.buffer.tokens(); }
  // The quantized recent tier of a layer (RecentFormat q8_0 / q4_0; null otherwise): rows
  // of every KV head, oldest first, right after the codes and before the buffer.
  const CodedRows<BlockCodec>* recent_keys(int layer) const { return at(layer).keys.recent.get(); }
  const CodedRows<BlockCodec>* recent_values(int layer) const { return at(layer).values.recent.get(); }
  // The coded keys or values of one KV head of a layer in token order, tier by tier:
  // tier 0 holds the oldest tokens at key_sparsity / value_sparsity, the last tier the
  // newest (tier i > 0 is options.tiers[tiers - 1 - i]).
  int code_tiers() const { return quantized_recent() ? 1 : static_cast<int>(options_.tiers.size()) + 1; }
  // Keys of a set with a key metric are coded whitened, √w ⊙ k (CodeSpace::key_scale).
  const CodeStore& key_codes(int layer, int head, int tier = 0) const { return part(layer, head, tier, true); }
  const CodeStore& value_codes(int layer, int head, int tier = 0) const { return part(layer, head, tier, false); }
  // The quantized residuals of a code tier (every KV head, rows as the codes'; null without
  // LexicoOptions::key_residual_bits / value_residual_bits), in the codes' space.
  const CodedRows<BlockCodec>* key_residual(int layer, int tier = 0) const { return residual(layer, tier, true); }
  const CodedRows<BlockCodec>* value_residual(int layer, int tier = 0) const { return residual(layer, tier, false); }
  const Dictionary& key_dictionary(int layer) const { return space_->keys(checked_layer(layer)).dictionary(); }
  const Dictionary& value_dictionary(int layer) const { return space_->values(checked_layer(layer)).dictionary(); }

  // Appends T tokens given as codes (T·kv_heads columns, token-major) to the long-term
  // codes of an empty or code-only layer: a cache restored from storage, or filled for
  // a benchmark without running OMP.
  void append_codes(int layer, const SparseCodes& keys, const SparseCodes& values) {
    Layer& state = at(layer);
    const int heads = shape().kv_heads;
    bool recent = false;
    for (std::size_t i = 1; i < state.keys.tiers.size(); ++i) recent = recent || state.keys.tiers[i].tokens() > 0;
    recent = recent || state.keys.recent_tokens() > 0;
    require(state.keys.buffer.tokens() == 0 && state.keys.sinks.tokens() == 0 && !recent,
            "LexicoCache::append_codes: layer ", layer, " holds buffered tokens, sinks or recent-tier codes");
    require(!state.keys.tiers.front().residual && !state.values.tiers.front().residual,
            "LexicoCache::append_codes: codes alone lack the residual this cache keeps beside them");
    require(keys.vectors() == values.vectors() && keys.vectors() % heads == 0, "LexicoCache::append_codes: ",
            keys.vectors(), " key and ", values.vectors(), " value codes for ", heads, " KV heads");
    const Eigen::Index tokens = keys.vectors() / heads;
    state.keys.append(keys, state.keys.tiers.front());
    state.values.append(values, state.values.tiers.front());
    state.coded += tokens;
    state.frozen = seen(layer) + tokens;
    // Atoms have unit norm: a key's norm is at most the sum of its |coefficients| (times
    // the largest 1/√w of a key metric, whose space the codes are in).
    double stretch = 1;
    if (const std::vector<float>* inverse = space_->key_inverse_scale(layer))
      stretch = *std::max_element(inverse->begin(), inverse->end());
    add_tokens(layer, tokens, stretch * keys.coefficients.cwiseAbs().colwise().sum().maxCoeff());
  }

  // Decode attention for many sequences' caches on one layer (any cache type). Lexico
  // caches on one CodeSpace share u = Dᵀq for all their queries (one matrix product of
  // N x d by d x (sequences · query heads)) and the D_v · w product; every other request
  // is served by its own attend().
  static void attend_batch(int layer, const std::vector<AttendRequest>& requests, int threads = 0) {
    std::map<const CodeSpace*, std::vector<std::size_t>> by_space;
    for (std::size_t i = 0; i < requests.size(); ++i) {
      auto* lexico = dynamic_cast<LexicoCache*>(requests[i].cache);
      if (lexico) by_space[lexico->space_.get()].push_back(i);
      else requests[i].cache->attend(layer, requests[i].queries, requests[i].out);
    }
    // Chunks of about 128 queries: the product is efficient from there on, and a chunk's
    // table and weights (2 MiB each at N = 4096) stay near the cores.
    constexpr Eigen::Index chunk_queries = 128;
    for (const auto& [space, members] : by_space) {
      std::vector<std::size_t> chunk;
      Eigen::Index queries = 0;
      for (std::size_t i : members) {
        chunk.push_back(i);
        queries += requests[i].queries.rows();
        if (queries < chunk_queries && i != members.back()) continue;
        attend_group(layer, requests, chunk, threads);
        chunk.clear();
        queries = 0;
      }
    }
  }

  // The objects that hold the codes and buffers, and their unused capacity.
  std::size_t overhead_bytes() const override {
    std::size_t total = KVCache::overhead_bytes() + sizeof(*this) - sizeof(KVCache) + sizeof(Layer) * layers_.size();
    for (const Layer& layer : layers_)
      for (const Part* part : {&layer.keys, &layer.values}) {
        total += part->tiers.size() * sizeof(Tier) + part->buffer.overhead_bytes() + part->sinks.overhead_bytes();
        if (part->recent) total += sizeof(*part->recent) + part->recent->overhead_bytes();
        for (const Tier& tier : part->tiers) {
          for (const CodeStore& codes : tier.heads) total += sizeof(CodeStore) + codes.spare_bytes();
          if (tier.residual) total += sizeof(*tier.residual) + tier.residual->overhead_bytes();
        }
      }
    return total;
  }
  std::size_t shared_bytes() const override { return space_->bytes(); }
  const void* shared_state() const override { return space_.get(); }

 protected:
  bool narrows_to_fp16() const override { return true; }

  void append_token(int layer, const float* key, const float* value) override {
    const Eigen::Map<const RowMatrix> keys(key, 1, shape().kv_width()), values(value, 1, shape().kv_width());
    append_block(layer, keys, values, KeyForm::rotated);
  }

  // Tokens go to the sinks while there is room, then to the buffer; every time the
  // buffer would exceed n_b, its oldest n_a tokens are coded (and the tiers aged), just
  // as if the block had come one token at a time.
  void append_block(int layer, ConstRowsRef keys, ConstRowsRef values, KeyForm form) override {
    Layer& state = layers_[static_cast<std::size_t>(layer)];
    const ConstRowsRef stored_keys = unrotated(keys, form, next_position(layer));
    for (Eigen::Index t = 0; t < keys.rows(); ++t) {
      if (state.keys.sinks.tokens() < options_.sinks) {
        state.keys.sinks.append(stored_keys.row(t).data());
        state.values.sinks.append(values.row(t).data());
        continue;
      }
      state.keys.buffer.append(stored_keys.row(t).data());
      state.values.buffer.append(values.row(t).data());
      const Eigen::Index excess = state.keys.buffer.tokens() - options_.buffer;
      if (excess > 0) {
        state.code_oldest(std::min<Eigen::Index>(state.keys.buffer.tokens(), std::max<Eigen::Index>(options_.flush, excess)));
        state.age_tiers(options_.flush);
        state.frozen = seen(layer) + t + 1;
      }
    }
  }

  // Prefill: the sinks aside, everything but the last n_b tokens is coded in one batch.
  void store_prefill(int layer, ConstRowsRef keys, ConstRowsRef values, ConstRowsRef /*queries*/,
                     KeyForm form) override {
    Layer& state = layers_[static_cast<std::size_t>(layer)];
    const ConstRowsRef stored_keys = unrotated(keys, form, next_position(layer));
    const Eigen::Index sinks = std::min<Eigen::Index>(options_.sinks, keys.rows());
    for (Eigen::Index t = 0; t < sinks; ++t) {
      state.keys.sinks.append(stored_keys.row(t).data());
      state.values.sinks.append(values.row(t).data());
    }
    const Eigen::Index coded = std::max<Eigen::Index>(0, keys.rows() - sinks - options_.buffer);
    if (coded > 0) {
      state.keys.store_aged(stored_keys.middleRows(sinks, coded));
      state.values.store_aged(values.middleRows(sinks, coded));
      state.coded += coded;
      state.frozen = seen(layer) + keys.rows();
    }
    for (Eigen::Index t = sinks + coded; t < keys.rows(); ++t) {
      state.keys.buffer.append(stored_keys.row(t).data());
      state.values.buffer.append(values.row(t).data());
    }
  }

  void attend_tokens(int layer, ConstRowsRef queries, RowsRef out, float* log_sum_exp) override {
    attend_group(layer, {AttendRequest{this, queries, out}}, {0}, threads(), log_sum_exp);
  }

  CacheBytes layer_bytes(int layer) const override {
    const Layer& state = layers_[static_cast<std::size_t>(layer)];
    CacheBytes bytes;
    for (const Part* part : {&state.keys, &state.values}) {
      for (const Tier& tier : part->tiers) {
        for (const CodeStore& codes : tier.heads) {
          bytes.payload += codes.payload_bytes();
          bytes.metadata += codes.metadata_bytes();
        }
        if (tier.residual) {
          bytes.payload += tier.residual->payload_bytes();
          bytes.metadata += tier.residual->metadata_bytes();
        }
      }
      if (part->recent) {
        bytes.payload += part->recent->payload_bytes();
        bytes.metadata += part->recent->metadata_bytes();
      }
      bytes.buffer += part->buffer.bytes() + part->sinks.bytes();
    }
    return bytes;
  }

  void clear_layer(int layer) override {
    Layer& state = layers_[static_cast<std::size_t>(layer)];
    for (Part* part : {&state.keys, &state.values}) {
      for (Tier& tier : part->tiers) {
        for (CodeStore& codes : tier.heads) codes.clear();
        if (tier.residual) tier.residual->clear();
      }
      if (part->recent) part->recent->clear();
      part->buffer.clear();
      part->sinks.clear();
    }
    state.coded = 0;
    state.frozen = 0;
  }

  // Coding cannot be undone: a layer goes back at most to its last flush.
  std::int64_t rollback_floor(int layer) const override { return layers_[static_cast<std::size_t>(layer)].frozen; }

  void truncate_layer(int layer, std::int64_t tokens) override {
    Layer& state = layers_[static_cast<std::size_t>(layer)];
    Eigen::Index drop = seen(layer) - tokens;
    const Eigen::Index from_buffer = std::min(drop, state.keys.buffer.tokens());
    state.keys.buffer.truncate(state.keys.buffer.tokens() - from_buffer);
    state.values.buffer.truncate(state.values.buffer.tokens() - from_buffer);
    drop -= from_buffer;
    state.keys.sinks.truncate(state.keys.sinks.tokens() - drop);  // nothing coded yet (frozen == 0)
    state.values.sinks.truncate(state.values.sinks.tokens() - drop);
  }

 private:
  // Codes at one sparsity, one store per KV head, the encoder that makes them and the
  // quantized residuals, if kept.
  struct Tier {
    Tier(const CodeSpace& space, int layer, bool keys, int kv_heads, int sparsity, float tolerance, float pool,
         int index_bits, int residual_bits, Eigen::Index capacity)
        : sparsity(sparsity),
          longest(pool > 0 ? longest_code((keys ? space.keys(layer) : space.values(layer)).dictionary(), sparsity, pool)
                           : sparsity),
          encoder(space.encoder(layer, keys, longest, tolerance)),
          heads(static_cast<std::size_t>(kv_heads), CodeStore(longest, tolerance > 0 || pool > 0, index_bits)),
          residual(residual_bits > 0 ? std::make_unique<CodedRows<BlockCodec>>(
                                           kv_heads, space.dim(),
                                           BlockCodec(BlockQuantizer(QuantScheme::symmetric, residual_bits), llama_block))
                                     : nullptr),
          capacity(capacity) {}
    Eigen::Index tokens() const { return static_cast<Eigen::Index>(heads.front().rows()); }
    bool pooled() const { return longest > sparsity; }

    static int longest_code(const Dictionary& dictionary, int sparsity, float pool) {
      const int cap = std::min({dictionary.dim(), dictionary.size(), 255});
      return std::clamp(static_cast<int>(pool * static_cast<float>(sparsity)), std::min(sparsity, cap), cap);
    }

    int sparsity;  // atoms per vector, on average when pooled
    int longest;   // atoms one vector may take
    OmpEncoder encoder;  // a view of the CodeSpace's book and workspace pool
    std::vector<CodeStore> heads;
    std::unique_ptr<CodedRows<BlockCodec>> residual;  // x − x̂ of every head's rows, or null
    Eigen::Index capacity;  // 0: unbounded
  };

  // What a thread needs to code a flush: shared by every cache the thread runs.
  struct CodingScratch {
    Eigen::MatrixXf vectors;  // d x (tokens · heads), token-major
    SparseCodes result;
    std::vector<int> keep;
  };
  static CodingScratch& scratch() {
    thread_local CodingScratch instance;
    return instance;
  }

  // Keys or values of one layer: code tiers (oldest first), fp16 buffer and sinks. Keys
  // are held before RoPE when the space codes them so.
  struct Part {
    Part(const CacheShape& shape, const CodeSpace& space, int layer, const std::vector<LexicoOptions::Tier>& specs,
         bool keys, const LexicoOptions& options)
        : dictionary(&(keys ? space.keys(layer) : space.values(layer)).dictionary()),
          pool_columns(Eigen::Index(options.flush) * shape.kv_heads),
          unshrink(keys ? options.key_unshrink : options.value_unshrink),
          map(space.coding_map(layer, keys)),
          buffer(shape.kv_heads, shape.head_dim), sinks(shape.kv_heads, shape.head_dim) {
      if (options.quantized_recent()) {
        const auto format = keys ? options.recent_format : options.recent_value_format.value_or(options.recent_format);
        const BlockCodec codec = format == LexicoOptions::RecentFormat::q8_0 ? q8_0_codec() : q4_0_codec();
        recent = std::make_unique<CodedRows<BlockCodec>>(shape.kv_heads, shape.head_dim, codec);
        recent_capacity = options.tiers.front().tokens;
      }
      const int index_bits =
          options.pack_indices ? CodeStore::bits_for(static_cast<std::size_t>(dictionary->size())) : 16;
      const float tolerance = keys ? options.key_tolerance : options.value_tolerance;
      for (const LexicoOptions::Tier& spec : specs)
        tiers.emplace_back(space, layer, keys, shape.kv_heads, keys ? spec.key_sparsity : spec.value_sparsity,
                           tolerance, (tiers.empty() || options.pool_recent_tiers) ? options.atom_pool : 0.0f,
                           index_bits, keys ? options.key_residual_bits : options.value_residual_bits, spec.tokens);
    }

    Eigen::Index recent_tokens() const { return recent ? recent->tokens() : 0; }

    // A prompt's tokens that leave the buffer at once (T rows of kv_heads x head_dim, as
    // fp16 holds them): each goes straight to the tier its age puts it in, the newest to
    // the recent tier(s), the rest coded once at the layer's sparsity (one batch per tier).
    void store_aged(ConstRowsRef rows) {
      const int heads = buffer.heads(), dim = buffer.head_dim();
      thread_local RowMatrix held;
      held = rows.unaryExpr([](float x) { return static_cast<float>(Eigen::half(x)); });
      Eigen::Index end = held.rows();
      if (recent) {
        const Eigen::Index take = std::min(recent_capacity, end);
        for (Eigen::Index t = end - take; t < end; ++t) recent->append(held.row(t).data());
        end -= take;
      }
      for (std::size_t i = tiers.size(); i-- > 0;) {
        const Eigen::Index take = i == 0 ? end : std::min(tiers[i].capacity, end);
        if (take == 0) continue;
        // Whole token rows are already the token-major d x (tokens · heads) layout.
        scratch().vectors = Eigen::Map<const Eigen::MatrixXf>(held.row(end - take).data(), dim, take * heads);
        encode_raw(tiers[i]);
        end -= take;
      }
    }

    // Moves the oldest `count` buffered tokens into the recent tier: quantized, or coded
    // at the newest tier's sparsity.
    void code_buffered(Eigen::Index count) {
      const Eigen::MatrixXf& vectors = gather(buffer, count);
      buffer.erase_front(count);
      if (!recent) return encode_raw(tiers.back());
      for (Eigen::Index t = 0; t < count; ++t) recent->append(vectors.col(t * buffer.heads()).data());
    }

    // Codes the oldest `count` tokens of the quantized recent tier at the layer's sparsity.
    void code_recent(Eigen::Index count) {
      gather(*recent, count);
      recent->erase_front(count);
      encode_raw(tiers.front());
    }

    // The oldest `count` tokens of every head of a store (TokenStore, CodedRows) into
    // scratch().vectors, token-major: a token's heads are one contiguous row.
    template <typename Store>
    static const Eigen::MatrixXf& gather(const Store& store, Eigen::Index count) {
      const int heads = store.heads();
      Eigen::MatrixXf& vectors = scratch().vectors;
      vectors.resize(store.head_dim(), count * heads);
      for (Eigen::Index t = 0; t < count; ++t)
        for (int h = 0; h < heads; ++h) store.row(h, t, vectors.col(t * heads + h).data());
      return vectors;
    }

    // Moves the oldest `count` tokens of tier i into tier i - 1, re-coding their
    // reconstructions (with their residuals, if kept) at that tier's sparsity.
    void age(std::size_t i, Eigen::Index count) {
      Tier &from = tiers[i], &to = tiers[i - 1];
      const int heads = static_cast<int>(from.heads.size()), dim = dictionary->dim();
      thread_local RowMatrix decoded;
      thread_local std::vector<float> residual;
      decoded.resize(count, dim);
      residual.resize(static_cast<std::size_t>(dim));
      Eigen::MatrixXf& vectors = scratch().vectors;
      vectors.resize(dim, count * heads);
      for (int h = 0; h < heads; ++h) {
        CodeStore& codes = from.heads[static_cast<std::size_t>(h)];
        decode_codes(codes, *dictionary, 0, static_cast<std::size_t>(count), decoded.data());
        for (Eigen::Index r = 0; r < count; ++r) {
          vectors.col(r * heads + h) = decoded.row(r).transpose();
          if (!from.residual) continue;
          from.residual->row(h, r, residual.data());
          vectors.col(r * heads + h) += Eigen::Map<const Eigen::VectorXf>(residual.data(), dim);
        }
        codes.erase_front(static_cast<std::size_t>(count));
      }
      if (from.residual) from.residual->erase_front(count);
      encode_into(to);
    }

    // Encodes the columns of scratch().vectors as the stores hold them: mapped first into
    // the space of the set's key or value metric (key_metric.hpp, value_metric.hpp), if any.
    void encode_raw(Tier& tier) {
      if (map) scratch().vectors = *map * scratch().vectors;
      encode_into(tier);
    }

    // Encodes the columns of scratch().vectors (token-major, heads within a token) into a
    // tier; a pooled tier shares its atoms within each flush's worth of columns, from the
    // first, so a token codes the same whether it came from a prefill or one by one.
    void encode_into(Tier& tier) {
      CodingScratch& work = scratch();
      tier.encoder.encode(work.vectors, work.result);
      if (tier.pooled())
        for (Eigen::Index first = 0; first < work.vectors.cols(); first += pool_columns) {
          const Eigen::Index count = std::min(pool_columns, work.vectors.cols() - first);
          share_atoms(work.result, first, count, count * tier.sparsity, work.keep);
          shorten_codes(*dictionary, work.vectors, first, work.keep, work.result);
        }
      unshrink_codes(*dictionary, work.vectors, unshrink, work.result);
      append(work.result, tier);
      if (tier.residual) append_residuals(tier);
    }

    // Quantizes x − x̂ of the columns of scratch().vectors, just appended to a tier, with x̂
    // decoded from the stored rows: the residual also carries the FP8 coefficients' rounding.
    void append_residuals(Tier& tier) {
      const Eigen::MatrixXf& vectors = scratch().vectors;
      const int heads = static_cast<int>(tier.heads.size()), dim = dictionary->dim();
      const Eigen::Index count = vectors.cols() / heads;
      thread_local RowMatrix decoded;
      thread_local Eigen::MatrixXf residuals;
      decoded.resize(count, dim);
      residuals.resize(dim, vectors.cols());
      for (int h = 0; h < heads; ++h) {
        const CodeStore& codes = tier.heads[static_cast<std::size_t>(h)];
        decode_codes(codes, *dictionary, codes.rows() - static_cast<std::size_t>(count), static_cast<std::size_t>(count),
                     decoded.data());
        for (Eigen::Index t = 0; t < count; ++t)
          residuals.col(t * heads + h) = vectors.col(t * heads + h) - decoded.row(t).transpose();
      }
      for (Eigen::Index t = 0; t < count; ++t) tier.residual->append(residuals.col(t * heads).data());
    }

    void append(const SparseCodes& codes, Tier& tier) {
      const int heads = static_cast<int>(tier.heads.size());
      for (Eigen::Index v = 0; v < codes.vectors(); ++v)
        tier.heads[static_cast<std::size_t>(v % heads)].append(codes.indices.col(v).data(),
                                                               codes.coefficients.col(v).data(), codes.counts(v));
    }

    const Dictionary* dictionary;  // the CodeSpace's
    Eigen::Index pool_columns;     // columns that share an atom budget: one flush
    float unshrink;                // LexicoOptions::key_unshrink / value_unshrink
    const Eigen::MatrixXf* map;    // into the space of the set's key or value metric, else null
    std::vector<Tier> tiers;       // oldest first; tiers[0] is unbounded
    std::unique_ptr<CodedRows<BlockCodec>> recent;  // the quantized recent tier, if any
    Eigen::Index recent_capacity = 0;
    TokenStore<Eigen::half> buffer, sinks;
  };

  struct Layer {
    Layer(const CacheShape& shape, const CodeSpace& space, int layer, const std::vector<LexicoOptions::Tier>& tiers,
          const LexicoOptions& options)
        : keys(shape, space, layer, tiers, true, options), values(shape, space, layer, tiers, false, options) {}

    // Re-codes, newest tier first, whatever overflows a tier: at least `flush` tokens at
    // once, so a token is re-coded once per tier however it arrived.
    void age_tiers(int flush) {
      if (const Eigen::Index excess = keys.recent_tokens() - keys.recent_capacity; keys.recent && excess > 0) {
        const Eigen::Index count = std::min(keys.recent_tokens(), std::max<Eigen::Index>(flush, excess));
        keys.code_recent(count);
        values.code_recent(count);
      }
      for (std::size_t i = keys.tiers.size() - 1; i > 0; --i) {
        const Eigen::Index excess = keys.tiers[i].tokens() - keys.tiers[i].capacity;
        if (excess <= 0) continue;
        const Eigen::Index count = std::min(keys.tiers[i].tokens(), std::max<Eigen::Index>(flush, excess));
        keys.age(i, count);
        values.age(i, count);
      }
    }

    // Moves the oldest `count` buffered tokens into the codes.
    void code_oldest(Eigen::Index count) {
      keys.code_buffered(count);
      values.code_buffered(count);
      coded += count;
    }

    Part keys, values;
    Eigen::Index coded = 0;
    std::int64_t frozen = 0;  // tokens held right after the last coding: the rollback floor
  };

  static std::shared_ptr<const CodeSpace> make_space(const CacheShape& shape,
                                                     const std::vector<LayerDictionaries>& dictionaries,
                                                     CodeSpaceOptions options) {
    require(static_cast<int>(dictionaries.size()) == shape.layers, "LexicoCache: ", dictionaries.size(),
            " layer dictionaries for ", shape.layers, " layers");
    return std::make_shared<const CodeSpace>(dictionaries, std::move(options));
  }

  // Keys as the cache holds them: as given, or un-rotated at positions first, first + 1, ...
  // when the space codes keys before RoPE and they came rotated.
  ConstRowsRef unrotated(ConstRowsRef keys, KeyForm form, std::int64_t first) const {
    const Rope* rope = key_rope();
    if (!rope || form == KeyForm::unrotated) return keys;
    thread_local RowMatrix rows;
    rows = keys;
    rope->rotate_rows(first, rows.data(), rows.rows(), rows.cols(), shape().kv_heads, true);
    return rows;
  }

  // Attention of one cache with the key table u = Dᵀq and the value weights w given
  // (their rows table_ld and weights_ld apart, this cache's queries in their first
  // columns); the caller adds D_v · w to out.
  void attend_codes(int layer, ConstRowsRef queries, RowsRef out, float* log_sum_exp, const float* table,
                    Eigen::Index table_ld, float* weights, Eigen::Index weights_ld) const {
    const Layer& state = layers_[static_cast<std::size_t>(layer)];
    const Eigen::Index sinks = state.keys.sinks.tokens(), coded = state.coded;
    const Rope* rope = key_rope();
    const CodeBook& key_book = space_->keys(layer);
    const int group = static_cast<int>(queries.rows()) / shape().kv_heads;
    const std::int64_t first = first_position(layer);
    const std::vector<float>* inverse = space_->key_inverse_scale(layer);
    grouped_decode_attention(
        queries, shape().kv_heads, sinks + coded + state.keys.buffer.tokens(), out,
        [&](int h, const float* q, int g, float* scores, Eigen::Index ld) {
          held_scores(state.keys.sinks, rope, first, h, q, g, scores, ld);
          // Codes of whitened keys and their residuals meet the queries turned back (q ⊘ √w);
          // codes of keys after RoPE get them through the table u = Dᵀ(q ⊘ √w) of attend_group.
          thread_local std::vector<float> turned_back;
          const float* coded_q = q;
          if (inverse) {
            const int d = key_book.dim();
            turned_back.resize(static_cast<std::size_t>(g * d));
            for (int i = 0; i < g * d; ++i) turned_back[static_cast<std::size_t>(i)] = q[i] * (*inverse)[static_cast<std::size_t>(i % d)];
            coded_q = turned_back.data();
          }
          // A token's column is its position: sinks first, then the codes in order.
          Eigen::Index column = sinks;
          for (const Tier& tier : state.keys.tiers) {
            const CodeStore& codes = tier.heads[static_cast<std::size_t>(h)];
            if (codes.rows() == 0) continue;
            if (rope)
              rotated_code_scores(codes, key_book, *rope, first + column, coded_q, g, scores + column, ld);
            else
              code_scores(codes, table + h * group, table_ld, g, scores + column, ld);
            if (tier.residual) add_held_scores(*tier.residual, rope, first + column, h, coded_q, g, scores + column, ld);
            column += static_cast<Eigen::Index>(codes.rows());
          }
          if (state.keys.recent) held_scores(*state.keys.recent, rope, first + column, h, q, g, scores + column, ld);
          held_scores(state.keys.buffer, rope, first + sinks + coded, h, q, g, scores + sinks + coded, ld);
        },
        [&](int h, const float* p, Eigen::Index ld, int g, float* o) {
          state.values.sinks.accumulate(h, p, ld, g, o);
          Eigen::Index column = sinks;
          for (const Tier& tier : state.values.tiers) {
            const CodeStore& codes = tier.heads[static_cast<std::size_t>(h)];
            if (codes.rows() == 0) continue;
            code_accumulate(codes, p + column, ld, g, weights + h * group, weights_ld);
            if (tier.residual) tier.residual->accumulate(h, p + column, ld, g, o);
            column += static_cast<Eigen::Index>(codes.rows());
          }
          if (state.values.recent) state.values.recent->accumulate(h, p + column, ld, g, o);
          state.values.buffer.accumulate(h, p + sinks + coded, ld, g, o);
        },
        // A key decoded and rotated costs several times a dense one: heads go parallel sooner.
        log_sum_exp, threads(), rope ? 1024 : 4096);
  }

  // Scores of uncoded tokens (sinks, buffer, quantized recent tier) at positions first,
  // first + 1, ...: rotated here when they are held before RoPE.
  template <typename Store>
  static void held_scores(const Store& store, const Rope* rope, std::int64_t first, int h, const float* q, int group,
                          float* scores, Eigen::Index ld) {
    if (!rope) return store.scores(h, q, group, scores, ld);
    thread_local RowMatrix keys;
    keys.resize(store.tokens(), store.head_dim());
    for (Eigen::Index t = 0; t < store.tokens(); ++t) store.row(h, t, keys.row(t).data());
    rotated_scores(*rope, first, keys, q, group, scores, ld);
  }

  // held_scores added to the scores (a code tier's residual).
  template <typename Store>
  static void add_held_scores(const Store& store, const Rope* rope, std::int64_t first, int h, const float* q,
                              int group, float* scores, Eigen::Index ld) {
    thread_local std::vector<float> extra;
    const Eigen::Index tokens = store.tokens();
    extra.resize(static_cast<std::size_t>(group * tokens));
    held_scores(store, rope, first, h, q, group, extra.data(), tokens);
    for (int g = 0; g < group; ++g)
      for (Eigen::Index t = 0; t < tokens; ++t) scores[g * ld + t] += extra[static_cast<std::size_t>(g * tokens + t)];
  }

  // Lexico caches on one CodeSpace (one cache for attend(), a chunk of a batch for
  // attend_batch()): one product u = Dᵀq for all their queries and one D_v · w, each cache's
  // token loop in between. `log_sum_exp` is for a single cache (chunked prefill).
  static void attend_group(int layer, const std::vector<AttendRequest>& requests,
                           const std::vector<std::size_t>& members, int threads, float* log_sum_exp = nullptr) {
    const CodeSpace& space = *static_cast<LexicoCache*>(requests[members.front()].cache)->space_;
    const int d = space.dim();
    const bool single = members.size() == 1;
    Eigen::Index rows = 0;
    bool coded = false;
    std::vector<Eigen::Index> offsets;
    for (std::size_t i : members) {
      auto* cache = static_cast<LexicoCache*>(requests[i].cache);
      const int l = cache->checked_layer(layer);
      require(cache->seen(l) > 0, "LexicoCache::attend_batch: a cache holds no tokens in layer ", layer);
      require(requests[i].queries.cols() == d && requests[i].out.rows() == requests[i].queries.rows() &&
                  requests[i].out.cols() == d && requests[i].queries.rows() % cache->shape().kv_heads == 0,
              "LexicoCache::attend_batch: queries and out must be q_heads x ", d);
      coded = coded || cache->layers_[static_cast<std::size_t>(l)].coded > 0;
      offsets.push_back(rows);
      rows += requests[i].queries.rows();
    }
    // One product for every query. In a batch each sequence then works in its own
    // contiguous copy of its table columns and its own weights (N x its query heads, 512 KiB
    // at 32 heads), which stay in L2 while its tokens gather and scatter: in the shared
    // N x (all queries) matrices an atom's row would be 4 KiB wide at 32 sequences of 32
    // heads, and the gathers, which dominate, would miss L2.
    thread_local RowMatrix stacked, table, weights, combined;
    thread_local std::vector<float> block_table, block_weights;
    if (!single) {
      stacked.resize(rows, d);
      for (std::size_t m = 0; m < members.size(); ++m)
        stacked.middleRows(offsets[m], requests[members[m]].queries.rows()) = requests[members[m]].queries;
      require(stacked.allFinite(), "LexicoCache::attend_batch: the queries hold a NaN or Inf");
    }
    const ConstRowsRef queries = single ? requests[members.front()].queries : ConstRowsRef(stacked);
    const Eigen::Index n_keys = space.keys(layer).size(), n_values = space.values(layer).size();
    if (coded && !space.key_rope()) {
      thread_local RowMatrix turned_back;  // q ⊘ √w for codes of whitened keys
      const std::vector<float>* inverse = space.key_inverse_scale(layer);
      if (inverse) {
        turned_back = queries;
        for (int e = 0; e < d; ++e) turned_back.col(e) *= (*inverse)[static_cast<std::size_t>(e)];
      }
      atom_table(space.keys(layer), inverse ? ConstRowsRef(turned_back) : queries, table, threads);
    }
    if (coded) weights.setZero(n_values, rows);
    for (std::size_t m = 0; m < members.size(); ++m) {
      const AttendRequest& request = requests[members[m]];
      const Eigen::Index heads = request.queries.rows();
      const float* member_table = nullptr;
      float* member_weights = nullptr;
      if (coded && single) {
        member_table = table.data();
        member_weights = weights.data();
      } else if (coded) {
        if (!space.key_rope()) {
          block_table.resize(static_cast<std::size_t>(n_keys * heads));
          Eigen::Map<RowMatrix>(block_table.data(), n_keys, heads) = table.middleCols(offsets[m], heads);
          member_table = block_table.data();
        }
        block_weights.assign(static_cast<std::size_t>(n_values * heads), 0.0f);
        member_weights = block_weights.data();
      }
      static_cast<LexicoCache*>(request.cache)
          ->attend_codes(layer, request.queries, request.out, log_sum_exp, member_table, heads, member_weights, heads);
      if (coded && !single)
        weights.middleCols(offsets[m], heads) = Eigen::Map<const RowMatrix>(block_weights.data(), n_values, heads);
    }
    if (!coded) return;
    const Eigen::MatrixXf* value_inverse = space.value_inverse(layer);
    if (single && !value_inverse)
      return add_atom_combination(space.values(layer), weights, requests[members.front()].out, threads);
    combined.setZero(rows, d);
    add_atom_combination(space.values(layer), weights, combined, threads);
    if (value_inverse) combined *= value_inverse->transpose();  // rows of T·v back to v: (T⁻¹ Σ p T v)ᵀ
    for (std::size_t m = 0; m < members.size(); ++m) {
      RowsRef out = requests[members[m]].out;
      out += combined.middleRows(offsets[m], out.rows());
    }
  }

  std::pair<int, int> sparsity(int layer) const {
    const auto found = options_.layer_sparsity.find(layer);
    return found != options_.layer_sparsity.end() ? found->second
                                                  : std::make_pair(options_.key_sparsity, options_.value_sparsity);
  }

  bool quantized_recent() const { return options_.quantized_recent(); }

  const Layer& at(int layer) const { return layers_[static_cast<std::size_t>(checked_layer(layer))]; }
  Layer& at(int layer) { return layers_[static_cast<std::size_t>(checked_layer(layer))]; }

  const CodeStore& part(int layer, int head, int tier, bool keys) const {
    const Layer& state = at(layer);
    require(head >= 0 && head < shape().kv_heads, "LexicoCache: KV head ", head, " out of range");
    require(tier >= 0 && tier < code_tiers(), "LexicoCache: code tier ", tier, " out of range");
    return (keys ? state.keys : state.values).tiers[static_cast<std::size_t>(tier)].heads[static_cast<std::size_t>(head)];
  }

  const CodedRows<BlockCodec>* residual(int layer, int tier, bool keys) const {
    const Layer& state = at(layer);
    require(tier >= 0 && tier < code_tiers(), "LexicoCache: code tier ", tier, " out of range");
    return (keys ? state.keys : state.values).tiers[static_cast<std::size_t>(tier)].residual.get();
  }

  std::shared_ptr<const CodeSpace> space_;
  LexicoOptions options_;
  std::vector<Layer> layers_;
};

// Decode attention of many sequences on one layer: batched where the caches allow it
// (LexicoCache::attend_batch), one attend() per request otherwise.
inline void attend_batch(int layer, const std::vector<AttendRequest>& requests, int threads = 0) {
  LexicoCache::attend_batch(layer, requests, threads);
}

}  // namespace lexico
