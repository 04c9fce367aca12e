#pragma once
// Caches by name, for programs that choose one at run time (lexico-eval --cache NAME with
// options "key=value,key=value"). A cache type is one CacheType entry: its name, a line of
// help, the option keys it reads with their defaults, and a constructor. make_cache()
// rejects keys the entry does not declare, so a typo never falls back to a default, and
// fills in the declared defaults before the constructor reads the options.
//
// Adding a cache type is one entry: a line in detail::builtin_cache_types() below (where
// the Lexico cache goes), or register_cache() at run time.

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../coding/dictionary_set.hpp"
#include "../coding/layer_sparsity.hpp"
#include "cache.hpp"
#include "dense.hpp"
#include "fp8_cache.hpp"
#include "h2o.hpp"
#include "kivi.hpp"
#include "lexico_cache.hpp"
#include "options.hpp"
#include "pyramidkv.hpp"
#include "snapkv.hpp"
#include "streaming.hpp"
#include "token_quant.hpp"
#include "tova.hpp"

namespace lexico {

struct CacheOptionInfo {
  std::string key;
  std::string fallback;  // the default; empty: required, or as `help` says
  std::string help;
};

struct CacheType {
  std::string name;
  std::string summary;
  std::vector<CacheOptionInfo> options;
  // Gets the caller's options with every non-empty fallback filled in.
  std::function<std::unique_ptr<KVCache>(CacheShape, const CacheOptions&)> make;
};

namespace detail {

inline Budget budget_option(const CacheOptions& options) {
  Budget budget = Budget::parse(options.get("budget"));
  if (options.has("context")) {
    require(budget.is_fraction(), "make_cache: context applies to a fractional budget (budget=",
            options.get("budget"), ")");
    budget.context = options.get_integer("context", 1);
  }
  return budget;
}

inline bool rotate_option(const CacheOptions& options) {
  return options.get_choice("rotate", {"none", "hadamard"}) == "hadamard";
}

// scope=layer|head; the default comes from the method's option table.
inline bool layerwise_option(const CacheOptions& options) {
  return options.get_choice("scope", {"head", "layer"}) == "layer";
}

inline void read_snapkv_options(const CacheOptions& options, SnapKVOptions& snap) {
  snap.budget = budget_option(options);
  snap.window = options.get_int("window", 0);
  snap.kernel = options.get_int("kernel", 1);
  snap.pool = options.get_choice("pool", {"max", "avg"}) == "max" ? Pool::max : Pool::avg;
  snap.layerwise = layerwise_option(options);
}

// Code spaces by dictionary directory and settings: every cache made for one set while
// another is alive shares its CodeSpace, so the per-model state is held once.
struct CodeSpaceRegistry {
  std::mutex mutex;
  std::map<std::string, std::weak_ptr<const CodeSpace>> spaces;
  std::size_t built = 0;
};

inline CodeSpaceRegistry& code_space_registry() {
  static CodeSpaceRegistry registry;
  return registry;
}

}  // namespace detail

// The CodeSpace of the dictionary set in `dir` with these options: the one already in
// use when there is one, else loaded (thread-safe).
inline std::shared_ptr<const CodeSpace> shared_code_space(const std::string& dir, const CodeSpaceOptions& options) {
  require(!options.key_rope, "shared_code_space: the RoPE comes from the set's manifest");
  std::error_code ignored;
  const std::filesystem::path canonical = std::filesystem::weakly_canonical(dir, ignored);
  const std::string key = detail::concat(canonical.string(), "|", to_string(options.gram), "|", options.hot_columns,
                                         "|", options.threads);
  detail::CodeSpaceRegistry& registry = detail::code_space_registry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  if (auto space = registry.spaces[key].lock()) return space;
  auto space = load_code_space(dir, options);
  registry.spaces[key] = space;
  ++registry.built;
  return space;
}

// CodeSpaces shared_code_space() has loaded so far in this process.
inline std::size_t code_spaces_built() {
  detail::CodeSpaceRegistry& registry = detail::code_space_registry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  return registry.built;
}

namespace detail {

inline std::vector<CacheType> builtin_cache_types() {
  using Made = std::unique_ptr<KVCache>;
  const CacheOptionInfo budget{"budget", "", "kept tokens per KV head: a count (256) or a fraction (0.2); required"};
  const CacheOptionInfo context{"context", "", "a fractional budget is of this length (default: of the tokens seen)"};
  const CacheOptionInfo rotate{"rotate", "none",
                               "hadamard: turn keys and values by a fixed Hadamard rotation before coding (QuaRot)"};
  const CacheOptionInfo scope{"scope", "head", "head: per KV head, by its GQA group's mean; layer: same tokens in all"};
  const std::vector<CacheOptionInfo> snapkv{budget,
                                            {"window", "32", "observation window, always kept"},
                                            {"kernel", "7", "pooling width over neighbouring tokens (odd)"},
                                            {"pool", "max", "max | avg pooling"},
                                            scope};
  std::vector<CacheOptionInfo> pyramidkv = snapkv;
  pyramidkv.push_back({"beta", "20", "the last layer keeps 1/beta of the mean selectable budget"});
  return {
      {"dense", "exact reference: every token kept", {{"dtype", "fp32", "fp32 | fp16 | bf16 storage"}},
       [](CacheShape shape, const CacheOptions& o) -> Made {
         const std::string dtype = o.get_choice("dtype", {"fp32", "fp16", "bf16"});
         if (dtype == "fp16") return std::make_unique<DenseCache<Eigen::half>>(shape);
         if (dtype == "bf16") return std::make_unique<DenseCache<Eigen::bfloat16>>(shape);
         return std::make_unique<DenseCache<float>>(shape);
       }},
      {"kivi", "KIVI: keys per channel, values per token, min/max groups, fp16 residual",
       {{"bits", "2", "2 | 4 bits per code"},
        {"group", "32", "values per fp16 (scale, minimum) pair"},
        {"residual", "128", "full-precision recent tokens (a multiple of group)"}},
       [](CacheShape shape, const CacheOptions& o) -> Made {
         return std::make_unique<KiviCache>(shape, KiviOptions{o.get_int("bits"), o.get_int("group"),
                                                                o.get_int("residual")});
       }},
      {"q8_0", "llama.cpp q8_0: per token, blocks of 32 channels, int8 + fp16 scale (8.5 bits)", {rotate},
       [](CacheShape shape, const CacheOptions& o) -> Made {
         return std::make_unique<TokenQuantCache<BlockCodec>>(shape, q8_0_codec(), rotate_option(o));
       }},
      {"q4_0", "llama.cpp q4_0: per token, blocks of 32 channels, 4 bits + fp16 scale (4.5 bits)", {rotate},
       [](CacheShape shape, const CacheOptions& o) -> Made {
         return std::make_unique<TokenQuantCache<BlockCodec>>(shape, q4_0_codec(), rotate_option(o));
       }},
      {"fp8", "FP8 E4M3: one fp32 scale per layer for K and for V from the first stored block, or one per token",
       {{"scale", "tensor", "tensor: per layer, max|x| * headroom / 448 of the first stored block; token: per row"},
        {"k_headroom", "2.24", "keys' tensor scale headroom (>= 1; vLLM's amax / 200 is 448 / 200)"},
        {"v_headroom", "4.48", "values' tensor scale headroom (>= 1; vLLM's amax / 100 is 448 / 100)"},
        rotate},
       [](CacheShape shape, const CacheOptions& o) -> Made {
         const bool per_token = o.get_choice("scale", {"tensor", "token"}) == "token";
         const Fp8Scale form = per_token ? Fp8Scale::token : Fp8Scale::tensor;
         return std::make_unique<Fp8Cache>(shape, Fp8Codec(static_cast<float>(o.get_number("k_headroom")), form),
                                           Fp8Codec(static_cast<float>(o.get_number("v_headroom")), form),
                                           rotate_option(o));
       }},
      {"streaming", "StreamingLLM: attention sinks + the most recent tokens",
       {budget, {"sinks", "4", "first tokens always kept (within the budget)"}, context},
       [](CacheShape shape, const CacheOptions& o) -> Made {
         return std::make_unique<StreamingCache>(shape, StreamingOptions{budget_option(o), o.get_int("sinks", 0)});
       }},
      {"h2o", "H2O: heavy hitters by accumulated attention + a recent window, evicting every step",
       {budget, {"window", "", "recent tokens always kept (default: half the budget)"}, context, scope},
       [](CacheShape shape, const CacheOptions& o) -> Made {
         const int window = o.has("window") ? o.get_int("window", 0) : -1;
         return std::make_unique<H2OCache>(shape, H2OOptions{budget_option(o), window, layerwise_option(o)});
       }},
      {"snapkv", "SnapKV: after the prefill, keep the window and the pooled best by window attention", snapkv,
       [](CacheShape shape, const CacheOptions& o) -> Made {
         SnapKVOptions options;
         read_snapkv_options(o, options);
         return std::make_unique<SnapKVCache>(shape, options);
       }},
      {"pyramidkv", "PyramidKV: SnapKV with layer budgets falling linearly with depth, same total", pyramidkv,
       [](CacheShape shape, const CacheOptions& o) -> Made {
         PyramidKVOptions options;
         read_snapkv_options(o, options);
         options.beta = o.get_number("beta");
         return std::make_unique<PyramidKVCache>(shape, options);
       }},
      {"tova", "TOVA: drop the token the current query attends to least, every step",
       {budget, context,
        {"scope", "layer", "layer: same tokens in all KV heads, by the layer's mean (the reference's); head"}},
       [](CacheShape shape, const CacheOptions& o) -> Made {
         return std::make_unique<TovaCache>(shape, TovaOptions{budget_option(o), layerwise_option(o)});
       }},
      {"lexico", "Lexico: sparse codes over per-layer dictionaries (lexico-train), fp16 recent buffer",
       {{"dict", "", "directory written by lexico-train; required (from --keys-before-rope: keys coded before RoPE)"},
        {"s", "8", "atoms per key and per value vector"},
        {"sk", "", "atoms per key vector (default: s)"},
        {"sv", "", "atoms per value vector (default: s)"},
        {"layer_s", "", "atoms per key and value vector of each layer, s0:s1:... (one per layer; replaces s, sk, sv), "
                        "or auto: s on average, shared out by the manifest's dev errors (layer_sparsity.hpp)"},
        {"layer_sk", "", "atoms per key vector of each layer, s0:s1:... (after s, sk or layer_s; before kv_shift)"},
        {"layer_sv", "", "atoms per value vector of each layer, s0:s1:... (after s, sv or layer_s; before kv_shift)"},
        {"kv_shift", "0", "atoms moved from each layer's value codes to its key codes (keys s + k, values s - k: the "
                          "same bytes, up to the indices' rounding); negative moves them to the values"},
        {"buffer", "128", "recent tokens kept in fp16 (n_b)"},
        {"flush", "32", "tokens coded at once when the buffer overflows (n_a)"},
        {"sinks", "0", "first tokens kept in fp16 for good (attention sinks)"},
        {"pack", "1", "1: atom indices packed at ceil(log2 N) bits; 0: 16 bits as in the paper"},
        {"recent", "0", "tokens kept at sparsity rs after leaving the buffer, then re-coded at s (0: no tier)"},
        {"rs", "", "atoms per key and value vector of recent tokens (default: 2s)"},
        {"recent_format", "codes", "how the recent tier holds tokens: codes (at rs atoms, re-coded at s as they age) | "
                                   "q8_0 | q4_0 (quantized per token, coded once at s as they leave the tier); "
                                   "KEYS/VALUES (q8_0/q4_0) for formats that differ"},
        {"tol", "0", "relative residual at which OMP may stop early (0: always s atoms)"},
        {"pool", "0", "> 1: the vectors of a flush share s atoms each on average, one taking up to pool*s (0: s each)"},
        {"pool_recent", "1", "1: the recent tier pools its atoms too; 0: only the codes at s do"},
        {"gram", "fp16", "Gram matrix form: fp16 (N^2 fp16 per dictionary) | on_demand (columns computed, 3d hot)"},
        {"threads", "0", "OpenMP threads that code a flush (0: the OpenMP default)"},
        {"unshrink", "0", "p in [0, 1]: codes scaled by (|x|^2 / <x, Dc>)^p, undoing least squares' shrinkage "
                          "(1: a matching query's score, 0.5: the norm)"},
        {"unshrink_k", "", "p for keys (default: unshrink)"},
        {"unshrink_v", "", "p for values (default: unshrink)"},
        {"residual", "0", "bits per channel of each code's residual x - Dc kept beside it (0: none; 1, 2 or 4; "
                          "blocks of 32 channels with an fp16 scale)"},
        {"residual_k", "", "residual bits of keys (default: residual)"},
        {"residual_v", "", "residual bits of values (default: residual)"}},
       [](CacheShape shape, const CacheOptions& o) -> Made {
         require(o.has("dict"), "make_cache: cache 'lexico' needs dict=DIR (dictionaries from lexico-train)");
         CodeSpaceOptions space_options;
         space_options.gram = parse_gram_policy(o.get("gram"));
         space_options.threads = o.get_int("threads", 0);
         const auto space = shared_code_space(o.get("dict"), space_options);
         LexicoOptions options;
         const int s = o.get_int("s", 1, 255);
         options.key_sparsity = o.has("sk") ? o.get_int("sk", 1, 255) : s;
         options.value_sparsity = o.has("sv") ? o.get_int("sv", 1, 255) : s;
         // One count per layer, from an option's list (or layer_s=auto's allocation).
         const auto per_layer_option = [&](const char* name) {
           const std::vector<int> per_layer = std::string(name) == "layer_s" && o.get(name) == "auto"
                                                  ? allocate_layer_sparsity(space->manifest(), s)
                                                  : o.get_int_list(name, 1, 255);
           require(static_cast<int>(per_layer.size()) == shape.layers, "make_cache: lexico ", name, " lists ",
                   per_layer.size(), " sparsities for a model of ", shape.layers, " layers");
           return per_layer;
         };
         if (o.has("layer_s")) {
           const std::vector<int> per_layer = per_layer_option("layer_s");
           for (int l = 0; l < shape.layers; ++l)
             options.layer_sparsity[l] = {per_layer[static_cast<std::size_t>(l)], per_layer[static_cast<std::size_t>(l)]};
         }
         // Keys and values of each layer apart (measured sensitivities give them different budgets).
         for (const bool keys : {true, false}) {
           const char* name = keys ? "layer_sk" : "layer_sv";
           if (!o.has(name)) continue;
           const std::vector<int> per_layer = per_layer_option(name);
           for (int l = 0; l < shape.layers; ++l) {
             auto& kv = options.layer_sparsity.try_emplace(l, options.key_sparsity, options.value_sparsity).first->second;
             (keys ? kv.first : kv.second) = per_layer[static_cast<std::size_t>(l)];
           }
         }
         if (const int shift = o.get_int("kv_shift", -254, 254); shift != 0) {
           const auto moved = [&](std::pair<int, int>& kv, const std::string& where) {
             require(kv.first + shift >= 1 && kv.first + shift <= 255 && kv.second - shift >= 1 &&
                         kv.second - shift <= 255,
                     "make_cache: lexico kv_shift=", shift, " leaves ", where, " with ", kv.first + shift,
                     " key and ", kv.second - shift, " value atoms (each must be in [1, 255])");
             kv = {kv.first + shift, kv.second - shift};
           };
           std::pair<int, int> plain{options.key_sparsity, options.value_sparsity};
           moved(plain, "every layer");
           std::tie(options.key_sparsity, options.value_sparsity) = plain;
           for (auto& [layer, kv] : options.layer_sparsity) moved(kv, "layer " + std::to_string(layer));
         }
         options.buffer = o.get_int("buffer", 0);
         options.flush = o.get_int("flush", 1);
         options.sinks = o.get_int("sinks", 0);
         options.pack_indices = o.get_int("pack", 0, 1) == 1;
         if (const int recent = o.get_int("recent", 0); recent > 0) {
           const int rs = o.has("rs") ? o.get_int("rs", 1, 255) : std::min(2 * s, 255);
           options.tiers.push_back({recent, rs, rs});
         }
         const std::string format = o.get("recent_format");
         const std::size_t slash = format.find('/');
         options.recent_format = parse_recent_format(format.substr(0, slash));
         if (slash != std::string::npos) options.recent_value_format = parse_recent_format(format.substr(slash + 1));
         options.key_tolerance = options.value_tolerance = static_cast<float>(o.get_number("tol"));
         require(options.key_tolerance >= 0 && options.key_tolerance < 1, "make_cache: lexico tol must be in [0, 1)");
         options.atom_pool = static_cast<float>(o.get_number("pool"));  // LexicoCache checks its range
         options.pool_recent_tiers = o.get_int("pool_recent", 0, 1) == 1;
         const double unshrink = o.get_number("unshrink", 0, 1);
         options.key_unshrink = static_cast<float>(o.has("unshrink_k") ? o.get_number("unshrink_k", 0, 1) : unshrink);
         options.value_unshrink = static_cast<float>(o.has("unshrink_v") ? o.get_number("unshrink_v", 0, 1) : unshrink);
         const int residual = o.get_int("residual", 0, 4);  // LexicoCache refuses 3
         options.key_residual_bits = o.has("residual_k") ? o.get_int("residual_k", 0, 4) : residual;
         options.value_residual_bits = o.has("residual_v") ? o.get_int("residual_v", 0, 4) : residual;
         return std::make_unique<LexicoCache>(shape, space, options);
       }},
  };
}

inline std::map<std::string, CacheType>& cache_registry() {
  static std::map<std::string, CacheType> registry = [] {
    std::map<std::string, CacheType> types;
    for (auto& type : builtin_cache_types()) types.emplace(type.name, std::move(type));
    return types;
  }();
  return registry;
}

}  // namespace detail

// Adds a cache type (not thread-safe: register before caches are made concurrently).
inline void register_cache(CacheType type) {
  require(!type.name.empty() && type.make, "register_cache: a cache type needs a name and a constructor");
  auto& registry = detail::cache_registry();
  require(!registry.count(type.name), "register_cache: '", type.name, "' is already registered");
  const std::string name = type.name;
  registry.emplace(name, std::move(type));
}

inline std::vector<std::string> cache_names() {
  std::vector<std::string> names;
  for (const auto& entry : detail::cache_registry()) names.push_back(entry.first);
  return names;
}

inline const CacheType& cache_type(const std::string& name) {
  const auto& registry = detail::cache_registry();
  const auto found = registry.find(name);
  if (found == registry.end()) {
    std::string known;
    for (const auto& entry : registry) known += (known.empty() ? "" : ", ") + entry.first;
    throw error(detail::concat("make_cache: no cache named '", name, "' (known: ", known, ")"));
  }
  return found->second;
}

// The cache `name` for `shape`, configured by `options` (keys as cache_help() lists them).
inline std::unique_ptr<KVCache> make_cache(const std::string& name, CacheShape shape,
                                           const CacheOptions& options = {}) {
  const CacheType& type = cache_type(name);
  CacheOptions filled;
  std::string keys;
  for (const auto& info : type.options) {
    if (!info.fallback.empty()) filled.set(info.key, info.fallback);
    keys += (keys.empty() ? "" : ", ") + info.key;
  }
  for (const auto& [key, value] : options.values()) {
    bool known = false;
    for (const auto& info : type.options) known = known || info.key == key;
    require(known, "make_cache: cache '", name, "' has no option '", key, "' (options: ",
            keys.empty() ? "none" : keys, ")");
    filled.set(key, value);
  }
  return type.make(shape, filled);
}

// Every cache type with its options and defaults, for --help.
inline std::string cache_help() {
  std::string text = "Caches (name, then options as key=value,key=value):\n";
  for (const auto& [name, type] : detail::cache_registry()) {
    text += "  " + name + std::string(name.size() < 11 ? 11 - name.size() : 1, ' ') + type.summary + "\n";
    for (const auto& info : type.options) {
      const std::string key = info.key + (info.fallback.empty() ? "" : "=" + info.fallback);
      text += "      " + key + std::string(key.size() < 16 ? 16 - key.size() : 1, ' ') + info.help + "\n";
    }
  }
  return text;
}

}  // namespace lexico
