#pragma once
// FP8 E4M3 KV cache with per-tensor scales, as vLLM's kv_cache_dtype=fp8: one fp32 scale
// per layer for K and one for V, shared by every KV head; x_fp8 = saturate(x / scale),
// x̂ = x_fp8 · scale (docs.vllm.ai, quantized KV cache).
//
// A per-tensor scale must be fixed before the first value is coded. vLLM either loads
// calibrated scales or takes amax/constant from the first forward pass; here it comes from
// the first block a layer stores: the whole prefill block, or the first appended token when
// a layer starts with decode. scale = max|x| · headroom / 448, so with headroom 1 that block
// uses the full E4M3 range and a later value up to `headroom` times larger still fits;
// anything beyond saturates to ±448 · scale. An all-zero first block gives scale 1.
// The scale is re-chosen after clear() (a new sequence).
//
// Truncation: tokens stored after the calibrating block can be dropped exactly, but the
// block itself fixed the scale, so truncate_floor() is that block's length.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "../base/fp8.hpp"
#include "token_quant.hpp"

namespace lexico {

class Fp8Codec {
 public:
  explicit Fp8Codec(float headroom = 1.0f) : headroom_(headroom) {
    require(std::isfinite(headroom) && headroom >= 1.0f, "Fp8Codec: headroom must be a number >= 1 (got ",
            headroom, ")");
  }

  std::string name() const { return "fp8"; }
  std::string parameters() const { return detail::concat("headroom=", headroom_); }
  float headroom() const { return headroom_; }
  // 0 until calibrated.
  float scale() const { return scale_; }

  void check(int /*head_dim*/) const {}
  int payload_bytes(int head_dim) const { return head_dim; }
  int metadata_bytes(int /*head_dim*/) const { return 0; }
  std::size_t shared_bytes() const { return sizeof(float); }  // the fp32 scale of this tensor
  static constexpr bool data_dependent = true;

  void calibrate(ConstRowsRef tokens) {
    float largest = 0.0f;
    for (Eigen::Index t = 0; t < tokens.rows(); ++t) largest = std::max(largest, tokens.row(t).cwiseAbs().maxCoeff());
    require(std::isfinite(largest), "Fp8Codec: the calibration block holds ", largest);
    scale_ = largest * headroom_ / fp8_e4m3_max;
    if (!(scale_ > 0.0f) || !std::isfinite(scale_)) scale_ = 1.0f;
  }

  void encode(const float* x, int head_dim, std::uint8_t* row) const {
    for (int i = 0; i < head_dim; ++i) {
      require(std::isfinite(x[i]), "Fp8Codec: value ", i, " is ", x[i]);
      row[i] = fp8_e4m3_encode(std::clamp(x[i] / scale_, -fp8_e4m3_max, fp8_e4m3_max));
    }
  }

  void decode(const std::uint8_t* row, int head_dim, float* x) const {
    for (int i = 0; i < head_dim; ++i) x[i] = fp8_e4m3_decode(row[i]) * scale_;
  }

 private:
  float headroom_;
  float scale_ = 0.0f;
};

using Fp8Cache = TokenQuantCache<Fp8Codec>;

}  // namespace lexico
