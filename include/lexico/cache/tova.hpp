#pragma once
// TOVA, Token Omission Via Attention (Oren et al., "Transformers are Multi-State RNNs",
// arXiv 2401.06104; schwartz-lab-NLP/TOVA src/tova_cache.py): once over budget, each step
// drops the token that the current query attends to least; a prefill keeps the tokens its
// last query attends to most. Nothing is protected, not even the newest token.
// The reference averages the attention over all heads of a layer and keeps the same tokens
// in every KV head: layerwise = true, the default here too; with layerwise = false each KV
// head decides from the attention averaged over its own GQA group.

#include "eviction.hpp"

namespace lexico {

struct TovaOptions {
  Budget budget;
  bool layerwise = true;
};

inline EvictionPolicy tova_policy(const TovaOptions& o) {
  // budget, sinks, window, observed (the last query), kernel, pool, decode rule, beta, layerwise, its default
  return {o.budget, 0, 0, 1, 1, Pool::max, DecodeRule::current, 0, o.layerwise, true};
}

class TovaCache final : public EvictionCache {
 public:
  TovaCache(CacheShape shape, const TovaOptions& options) : EvictionCache(shape, "tova", tova_policy(options)) {}
};

}  // namespace lexico
