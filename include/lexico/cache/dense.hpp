#pragma once
// The exact reference cache: every token of every layer kept as fp32, fp16 or bf16.

#include <string>
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

 protected:
  void append_token(int layer, const float* key, const float* value) override {
    keys_[static_cast<std::size_t>(layer)].append(key);
    values_[static_cast<std::size_t>(layer)].append(value);
  }

  void attend_tokens(int layer, ConstRowsRef queries, RowsRef out) override {
    const auto& keys = keys_[static_cast<std::size_t>(layer)];
    detail::attend_stores(keys, values_[static_cast<std::size_t>(layer)], keys.tokens(), queries, out);
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

 private:
  std::vector<TokenStore<Scalar>> keys_, values_;
};

}  // namespace lexico
