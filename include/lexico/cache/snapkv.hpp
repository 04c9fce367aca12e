#pragma once
// SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469; FasterDecoding/SnapKV
// snapkv_utils.py): once, after the prefill, the last `window` tokens (the observation
// window) are kept, and the other tokens are ranked by the attention the window's queries
// pay them, summed over the window, averaged over the KV head's query heads (not repeated
// per query head as in the original), then max- (or avg-) pooled over `kernel` neighbours
// so that clusters survive together; the best budget - window are kept. Decode tokens are
// appended without further eviction. Defaults follow the paper's LongBench setting: window
// 32, kernel 7, max pooling. The observation window sees the prompt's end: if the question
// is there, selection is query-aware.

#include "eviction.hpp"

namespace lexico {

struct SnapKVOptions {
  Budget budget;           // kept tokens after the prefill, window included
  int window = 32;         // observation window, always kept
  int kernel = 7;          // pooling width (odd)
  Pool pool = Pool::max;
  bool layerwise = false;  // one choice for all KV heads, from their mean score
};

inline EvictionPolicy snapkv_policy(const SnapKVOptions& o) {
  // budget, sinks, window, observed (the window's queries), kernel, pool, decode rule, beta, layerwise
  return {o.budget, 0, o.window, o.window, o.kernel, o.pool, DecodeRule::keep, 0, o.layerwise};
}

class SnapKVCache final : public EvictionCache {
 public:
  SnapKVCache(CacheShape shape, const SnapKVOptions& options)
      : EvictionCache(shape, "snapkv", snapkv_policy(options)) {}
};

}  // namespace lexico
