#pragma once
// StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
// ICLR 2024, arXiv 2309.17453; mit-han-lab/streaming-llm kv_cache.py): the first `sinks`
// tokens (attention sinks, 4 by default) and the most recent budget - sinks tokens. The
// oldest non-sink token makes room for each new one; a prefill keeps the sinks and the
// block's last tokens.
//
// Keys are stored after RoPE with their original positions (as kvpress and
// KVCache-Factory do); the paper's re-assignment of positions 0..budget-1 needs pre-RoPE
// keys and is the model runner's business.

#include "eviction.hpp"

namespace lexico {

struct StreamingOptions {
  Budget budget;  // kept tokens, sinks included
  int sinks = 4;
};

inline EvictionPolicy streaming_policy(const StreamingOptions& o) {
  // budget, sinks, window, observed (none), kernel, pool, decode rule
  return {o.budget, o.sinks, 0, 0, 1, Pool::max, DecodeRule::oldest};
}

class StreamingCache final : public EvictionCache {
 public:
  StreamingCache(CacheShape shape, const StreamingOptions& options)
      : EvictionCache(shape, "streaming", streaming_policy(options)) {}
};

}  // namespace lexico
