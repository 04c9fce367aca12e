#pragma once
// PyramidKV (Cai et al., arXiv 2406.02069; Zefan-Cai/PyramidKV): SnapKV's selection with
// layer budgets that fall linearly with depth (lower layers keep more) around the same
// average, so the total equals SnapKV's at the same budget; see pyramid_limits() in
// eviction.hpp for the formula and how it differs from the reference.

#include <cmath>

#include "snapkv.hpp"

namespace lexico {

struct PyramidKVOptions : SnapKVOptions {
  double beta = 20;  // the last layer keeps 1/beta of the average selectable budget
};

inline EvictionPolicy pyramidkv_policy(const PyramidKVOptions& options) {
  require(options.beta > 0 && std::isfinite(options.beta), "PyramidKV: beta must be > 0 (got ", options.beta, ")");
  EvictionPolicy policy = snapkv_policy(options);
  policy.pyramid_beta = options.beta;
  return policy;
}

class PyramidKVCache final : public EvictionCache {
 public:
  PyramidKVCache(CacheShape shape, const PyramidKVOptions& options)
      : EvictionCache(shape, "pyramidkv", pyramidkv_policy(options)) {}
};

}  // namespace lexico
