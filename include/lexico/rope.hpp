#pragma once
// Rotary position embedding (Su et al. 2021, RoFormer): pair j of a head vector is
// rotated by the angle position · θ^(-2j/d). The model applies it to queries and keys;
// the Lexico cache can undo it to code keys before RoPE and redo it when scoring.

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "error.hpp"

namespace lexico {

// How RoPE pairs the elements of a head: Hugging Face rotates i with i + head_dim/2,
// llama2.c (and Meta's original code) rotates 2j with 2j + 1.
enum class RopeStyle { rotate_half, interleaved };

inline std::string to_string(RopeStyle style) {
  return style == RopeStyle::interleaved ? "interleaved" : "rotate_half";
}

inline RopeStyle parse_rope_style(const std::string& name) {
  require(name == "rotate_half" || name == "interleaved", "RoPE style '", name,
          "' is neither rotate_half nor interleaved");
  return name == "interleaved" ? RopeStyle::interleaved : RopeStyle::rotate_half;
}

class Rope {
 public:
  Rope(int head_dim, float theta, RopeStyle style) : head_dim_(head_dim), theta_(theta), style_(style) {
    require(head_dim > 0 && head_dim % 2 == 0, "Rope: head_dim must be positive and even, got ", head_dim);
    require(std::isfinite(theta) && theta > 1, "Rope: theta must be finite and above 1, got ", theta);
    inv_freq_.resize(static_cast<std::size_t>(pairs()));
    // fp32 as in the reference implementations, so long positions round the same way.
    for (int j = 0; j < pairs(); ++j)
      inv_freq_[static_cast<std::size_t>(j)] =
          1.0f / std::pow(theta, static_cast<float>(2 * j) / static_cast<float>(head_dim));
  }

  int head_dim() const { return head_dim_; }
  int pairs() const { return head_dim_ / 2; }
  float theta() const { return theta_; }
  RopeStyle style() const { return style_; }

  // cos and sin of every pair's angle at `position`, as the model computes them (the
  // angle is an fp32 product).
  void angles(std::int64_t position, float* cos, float* sin) const {
    const float p = static_cast<float>(position);
    for (int j = 0; j < pairs(); ++j) {
      const double angle = static_cast<double>(p * inv_freq_[static_cast<std::size_t>(j)]);
      cos[j] = static_cast<float>(std::cos(angle));
      sin[j] = static_cast<float>(std::sin(angle));
    }
  }

  // cos and sin at the `count` positions first, first + 1, ..., row-major count x pairs,
  // from one sin/cos per pair and a rotation recurrence in double: the angle is exact
  // (not an fp32 product), so these are for rotations the caller both undoes and redoes.
  void consecutive_angles(std::int64_t first, std::int64_t count, float* cos, float* sin) const {
    for (int j = 0; j < pairs(); ++j) {
      const double step = static_cast<double>(inv_freq_[static_cast<std::size_t>(j)]);
      const double step_cos = std::cos(step), step_sin = std::sin(step);
      double c = std::cos(static_cast<double>(first) * step), s = std::sin(static_cast<double>(first) * step);
      for (std::int64_t t = 0; t < count; ++t) {
        cos[t * pairs() + j] = static_cast<float>(c);
        sin[t * pairs() + j] = static_cast<float>(s);
        const double next = c * step_cos - s * step_sin;
        s = s * step_cos + c * step_sin;
        c = next;
      }
    }
  }

  // Rotates one head vector by the angles whose cos and sin are given, or by their
  // negatives (`inverse`), which undoes the rotation.
  void rotate(float* v, const float* cos, const float* sin, bool inverse = false) const {
    const int half = pairs();
    const bool interleaved = style_ == RopeStyle::interleaved;
    for (int j = 0; j < half; ++j) {
      float& a = interleaved ? v[2 * j] : v[j];
      float& b = interleaved ? v[2 * j + 1] : v[j + half];
      const float a0 = a, b0 = b, s = inverse ? -sin[j] : sin[j];
      a = a0 * cos[j] - b0 * s;
      b = b0 * cos[j] + a0 * s;
    }
  }

 private:
  int head_dim_;
  float theta_;
  RopeStyle style_;
  std::vector<float> inv_freq_;
};

}  // namespace lexico
