#pragma once
// FP8 E4M3 KV caches, in two forms of scale (Fp8Scale):
//
// tensor  vLLM's kv_cache_dtype=fp8: one fp32 scale per layer for K and one for V, shared
//         by every KV head; x_fp8 = saturate(x / scale), x̂ = x_fp8 · scale (docs.vllm.ai,
//         quantized KV cache). The scale must be fixed before the first value is coded.
//         vLLM either loads calibrated scales or takes amax / constant from the first
//         forward pass (amax / 200 for keys, amax / 100 for values); here it comes from the
//         first block a layer stores (the whole prefill block, or the first appended token
//         when a layer starts with decode): scale = max|x| · headroom / 448, so a later
//         value up to `headroom` times the block's largest still fits and anything beyond
//         saturates to ±448 · scale. vLLM's constants are headroom 448 / 200 = 2.24 for
//         keys and 448 / 100 = 4.48 for values (the factory's defaults). An all-zero first
//         block gives scale 1. The scale is re-chosen after clear() (a new sequence).
//         Truncation: tokens stored after the calibrating block can be dropped exactly, but
//         the block itself fixed the scale, so truncate_floor() is that block's length.
// token   one fp16 scale per token row of a head, max|x| / 448 of that row (2 bytes per
//         row, 1.6 % of a d = 128 row): nothing to calibrate, nothing saturates, any stored
//         token can be dropped.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "../base/fp8.hpp"
#include "token_quant.hpp"

namespace lexico {

enum class Fp8Scale { tensor, token };

class Fp8Codec {
 public:
  explicit Fp8Codec(float headroom = 1.0f, Fp8Scale scale = Fp8Scale::tensor) : headroom_(headroom), form_(scale) {
    require(std::isfinite(headroom) && headroom >= 1.0f, "Fp8Codec: headroom must be a number >= 1 (got ",
            headroom, ")");
  }

  std::string name() const { return "fp8"; }
  std::string parameters() const {
    return form_ == Fp8Scale::token ? "scale=token" : detail::concat("scale=tensor headroom=", headroom_);
  }
  float headroom() const { return headroom_; }
  Fp8Scale form() const { return form_; }
  // The tensor scale: 0 until calibrated (and always with per-token scales).
  float scale() const { return scale_; }

  void check(int /*head_dim*/) const {}
  int payload_bytes(int head_dim) const { return head_dim; }
  int metadata_bytes(int /*head_dim*/) const { return form_ == Fp8Scale::token ? sizeof(Eigen::half) : 0; }
  std::size_t shared_bytes() const { return form_ == Fp8Scale::tensor ? sizeof(float) : 0; }  // the fp32 scale
  bool data_dependent() const { return form_ == Fp8Scale::tensor; }

  void calibrate(ConstRowsRef tokens) {
    if (form_ == Fp8Scale::token) return;
    float largest = 0.0f;
    for (Eigen::Index t = 0; t < tokens.rows(); ++t) largest = std::max(largest, tokens.row(t).cwiseAbs().maxCoeff());
    require(std::isfinite(largest), "Fp8Codec: the calibration block holds ", largest);
    scale_ = largest * headroom_ / fp8_e4m3_max;
    if (!(scale_ > 0.0f) || !std::isfinite(scale_)) scale_ = 1.0f;
  }

  void encode(const float* x, int head_dim, std::uint8_t* row) const {
    float scale = scale_;
    if (form_ == Fp8Scale::token) {
      float largest = 0.0f;
      for (int i = 0; i < head_dim; ++i) {
        require(std::isfinite(x[i]), "Fp8Codec: value ", i, " is ", x[i]);
        largest = std::max(largest, std::fabs(x[i]));
      }
      const Eigen::half stored(largest / fp8_e4m3_max);
      require(std::isfinite(static_cast<float>(stored)), "Fp8Codec: a row's values up to ", largest,
              " overflow its fp16 scale");
      std::memcpy(row + head_dim, &stored, sizeof stored);
      scale = static_cast<float>(stored);
      if (!(scale > 0.0f)) {  // an all-zero row, or one below fp16's smallest scale: codes 0
        std::memset(row, 0, static_cast<std::size_t>(head_dim));
        return;
      }
    }
    for (int i = 0; i < head_dim; ++i) {
      require(std::isfinite(x[i]), "Fp8Codec: value ", i, " is ", x[i]);
      row[i] = fp8_e4m3_encode(std::clamp(x[i] / scale, -fp8_e4m3_max, fp8_e4m3_max));
    }
  }

  void decode(const std::uint8_t* row, int head_dim, float* x) const {
    float scale = scale_;
    if (form_ == Fp8Scale::token) {
      Eigen::half stored;
      std::memcpy(&stored, row + head_dim, sizeof stored);
      scale = static_cast<float>(stored);
    }
    for (int i = 0; i < head_dim; ++i) x[i] = fp8_e4m3_decode(row[i]) * scale;
  }

 private:
  float headroom_;
  Fp8Scale form_;
  float scale_ = 0.0f;
};

using Fp8Cache = TokenQuantCache<Fp8Codec>;

}  // namespace lexico
