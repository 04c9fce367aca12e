#pragma once
// The exact reference cache: every token of every layer kept as fp32, fp16 or bf16.
// Nothing is ever compressed, so truncate() goes back to any length (truncate_floor 0).

#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "cache.hpp"
#include "token_store.hpp"

namespace lexico {

template <typename Scalar = float>
class DenseCache final : public KVCache {
 public:
  explicit DenseCache(CacheShape shape) : KVCache(shape) {
    require(shape.head_dim <= TokenStore<Scalar>::max_head_dim, "DenseCache: head_dim ", shape.head_dim,
            " above ", TokenStore<Scalar>::max_head_dim);
    for (int l = 0; l < shape.layers; ++l) {
      keys_.emplace_back(shape.kv_heads, shape.head_dim);
      values_.emplace_back(shape.kv_heads, shape.head_dim);
    }
  }

  std::string name() const override { return "dense"; }
  std::string parameters() const override { return std::string("dtype=") + scalar_name<Scalar>(); }

  // The cache object, its per-layer stores and their unused capacity.
  std::size_t overhead_bytes() const override {
    std::size_t bytes = KVCache::overhead_bytes() + sizeof(*this) - sizeof(KVCache) +
                        (keys_.capacity() + values_.capacity()) * sizeof(TokenStore<Scalar>);
    for (std::size_t l = 0; l < keys_.size(); ++l) bytes += keys_[l].overhead_bytes() + values_[l].overhead_bytes();
    return bytes;
  }

 protected:
  void append_token(int layer, const float* key, const float* value) override {
    keys_[static_cast<std::size_t>(layer)].append(key);
    values_[static_cast<std::size_t>(layer)].append(value);
  }

  void attend_tokens(int layer, ConstRowsRef queries, RowsRef out, float* log_sum_exp) override {
    const auto& keys = keys_[static_cast<std::size_t>(layer)];
    detail::attend_stores(keys, values_[static_cast<std::size_t>(layer)], keys.tokens(), queries, out, log_sum_exp,
                          threads());
  }

  CacheBytes layer_bytes(int layer) const override {
    CacheBytes bytes;
    bytes.payload = keys_[static_cast<std::size_t>(layer)].bytes() + values_[static_cast<std::size_t>(layer)].bytes();
    return bytes;
  }

  void clear_layer(int layer) override {
    keys_[static_cast<std::size_t>(layer)].clear();
    values_[static_cast<std::size_t>(layer)].clear();
  }

  std::int64_t rollback_floor(int /*layer*/) const override { return 0; }
  void truncate_layer(int layer, std::int64_t tokens) override {
    keys_[static_cast<std::size_t>(layer)].truncate(tokens);
    values_[static_cast<std::size_t>(layer)].truncate(tokens);
  }

  // fp16 storage turns values beyond +-65504 into infinities; bf16 has fp32's range.
  bool narrows_to_fp16() const override { return std::is_same_v<Scalar, Eigen::half>; }

 private:
  std::vector<TokenStore<Scalar>> keys_, values_;
};

}  // namespace lexico
