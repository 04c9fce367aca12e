#pragma once
// H2O, Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048; FMInference/H2O
// h2o_hf/utils_real_drop/modify_llama.py): keeps the most recent `window` tokens and the
// "heavy hitters", the tokens with the largest attention summed over every query so far.
// A prefill scores its block by the column sums of its causal attention; each decode step
// adds the new query's attention and, once over budget, drops the lowest-scored token
// outside the window. Scores are the unnormalised sums of the original (kvpress's
// ObservedAttention divides by the number of queries that saw a token; not done here).
// With GQA each KV head decides alone, from the attention averaged over its query heads.
// The default window is half the budget (the paper's 10 % heavy + 10 % recent split).
// The fp32 scores are state and count as metadata (4 bytes per kept token and KV head).

#include "eviction.hpp"

namespace lexico {

struct H2OOptions {
  Budget budget;          // kept tokens, window included
  int window = -1;        // recent tokens always kept; -1: half the budget
  bool layerwise = false; // one choice for all KV heads, from their mean score
};

inline EvictionPolicy h2o_policy(const H2OOptions& o) {
  // budget, sinks, window, observed (every query), kernel, pool, decode rule, beta, layerwise
  return {o.budget, 0, o.window, -1, 1, Pool::max, DecodeRule::accumulated, 0, o.layerwise};
}

class H2OCache final : public EvictionCache {
 public:
  H2OCache(CacheShape shape, const H2OOptions& options) : EvictionCache(shape, "h2o", h2o_policy(options)) {}
};

}  // namespace lexico
