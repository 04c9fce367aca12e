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

// The dimension that RoPE turns together with dimension e of a d-dimensional head.
inline int rope_partner(int e, int head_dim, RopeStyle style) {
  if (style == RopeStyle::interleaved) return e ^ 1;
  const int half = head_dim / 2;
  return e < half ? e + half : e - half;
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
    step_cos_.resize(static_cast<std::size_t>(run_block * pairs()));
    step_sin_.resize(step_cos_.size());
    consecutive_angles(0, run_block, step_cos_.data(), step_sin_.data());
    for (int j = 0; j < pairs(); ++j) {
      jump_cos_.push_back(std::cos(run_block * frequency(j)));
      jump_sin_.push_back(std::sin(run_block * frequency(j)));
    }
  }

  // Positions per block of a RopeRun, and cos/sin of t steps for t < run_block (row t,
  // one value per pair): the run turns a block's first angle by these.
  static constexpr int run_block = 64;
  const float* step_cos(int t) const { return step_cos_.data() + static_cast<std::size_t>(t) * pairs(); }
  const float* step_sin(int t) const { return step_sin_.data() + static_cast<std::size_t>(t) * pairs(); }
  // cos and sin of a whole block's steps (run_block positions), per pair, in double.
  const double* jump_cos() const { return jump_cos_.data(); }
  const double* jump_sin() const { return jump_sin_.data(); }

  int head_dim() const { return head_dim_; }
  int pairs() const { return head_dim_ / 2; }
  float theta() const { return theta_; }
  RopeStyle style() const { return style_; }
  // The angle step of pair j per position (θ^(-2j/d)).
  double frequency(int j) const { return static_cast<double>(inv_freq_[static_cast<std::size_t>(j)]); }

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
    const int n = pairs();
    std::vector<double> c(static_cast<std::size_t>(n)), s(c.size()), step_cos(c.size()), step_sin(c.size());
    for (int j = 0; j < n; ++j) {
      const double step = static_cast<double>(inv_freq_[static_cast<std::size_t>(j)]);
      step_cos[j] = std::cos(step);
      step_sin[j] = std::sin(step);
      c[j] = std::cos(static_cast<double>(first) * step);
      s[j] = std::sin(static_cast<double>(first) * step);
    }
    for (std::int64_t t = 0; t < count; ++t)  // pairs innermost: independent, so they vectorise
      for (int j = 0; j < n; ++j) {
        cos[t * n + j] = static_cast<float>(c[j]);
        sin[t * n + j] = static_cast<float>(s[j]);
        const double next = c[j] * step_cos[j] - s[j] * step_sin[j];
        s[j] = s[j] * step_cos[j] + c[j] * step_sin[j];
        c[j] = next;
      }
  }

  // Rotates (or with `inverse` un-rotates) `count` rows at positions first, first + 1, ...
  // (consecutive_angles), row r at rows + r * stride holding `heads` head vectors.
  void rotate_rows(std::int64_t first, float* rows, std::int64_t count, std::int64_t stride, int heads,
                   bool inverse = false) const {
    const int n = pairs();
    const Angles& a = memoized_angles(first, count);
    for (std::int64_t r = 0; r < count; ++r)
      for (int h = 0; h < heads; ++h) rotate(rows + r * stride + h * head_dim_, a.cos.data() + r * n, a.sin.data() + r * n, inverse);
  }

  // Rotates one head vector by the angles whose cos and sin are given, or by their
  // negatives (`inverse`), which undoes the rotation.
  void rotate(float* v, const float* cos, const float* sin, bool inverse = false) const {
    const int half = pairs();
    const float sign = inverse ? -1.0f : 1.0f;
    // The pair of element j: j + half (rotate_half) or 2j + 1 (interleaved).
    const auto turn = [&](float* a, float* b, std::ptrdiff_t stride) {
      for (int j = 0; j < half; ++j) {
        const float a0 = a[j * stride], b0 = b[j * stride], s = sign * sin[j];
        a[j * stride] = a0 * cos[j] - b0 * s;
        b[j * stride] = b0 * cos[j] + a0 * s;
      }
    };
    if (style_ == RopeStyle::interleaved)
      turn(v, v + 1, 2);
    else
      turn(v, v + half, 1);
  }

 private:
  struct Angles {
    int head_dim = 0;
    float theta = 0;
    std::int64_t first = -1, count = 0;
    std::vector<float> cos, sin;
  };

  // consecutive_angles of the last few runs rotated on this thread: a decode step rotates
  // the same held positions (sinks, recent tier, buffer) in every layer and KV head, and
  // their sin/cos in double cost more than the rotations. Long runs (a prompt's keys) are
  // computed once into a scratch slot instead, so the memo stays small.
  const Angles& memoized_angles(std::int64_t first, std::int64_t count) const {
    constexpr int slots = 4;
    constexpr std::int64_t longest_memoized = 1024;
    thread_local Angles memo[slots], scratch;
    thread_local int next = 0;
    for (const Angles& a : memo)
      if (a.first == first && a.count == count && a.head_dim == head_dim_ && a.theta == theta_) return a;
    Angles& a = count > longest_memoized ? scratch : memo[next];
    if (count <= longest_memoized) next = (next + 1) % slots;
    a.head_dim = head_dim_;
    a.theta = theta_;
    a.first = first;
    a.count = count;
    a.cos.resize(static_cast<std::size_t>(count * pairs()));
    a.sin.resize(a.cos.size());
    consecutive_angles(first, count, a.cos.data(), a.sin.data());
    return a;
  }

  int head_dim_;
  float theta_;
  RopeStyle style_;
  std::vector<float> inv_freq_;
  std::vector<float> step_cos_, step_sin_;  // run_block x pairs
  std::vector<double> jump_cos_, jump_sin_;  // pairs
};

// cos and sin of consecutive positions first, first + 1, ... for kernels that rotate
// one token at a time: the angle at each block's first position comes from a rotation
// recurrence in double (one exact sin/cos per pair at `first`), and a token's from one
// fp32 complex product with the step powers of its block, so no error builds up along
// a long run and the angles agree with consecutive_angles to a few fp32 ulps.
class RopeRun {
 public:
  RopeRun(const Rope& rope, std::int64_t first)
      : rope_(rope), pairs_(rope.pairs()), base_cos_(static_cast<std::size_t>(pairs_)), base_sin_(base_cos_.size()),
        block_cos_(base_cos_.size()), block_sin_(base_cos_.size()) {
    // Exact angle at `first`, per pair, in double.
    for (int j = 0; j < pairs_; ++j) {
      const double angle = static_cast<double>(first) * rope.frequency(j);
      base_cos_[j] = std::cos(angle);
      base_sin_[j] = std::sin(angle);
    }
  }

  // cos and sin (pairs values each) of position first + t, for t = 0, 1, 2, ... in order.
  void next(float* cos, float* sin) {
    if (offset_ == Rope::run_block) {
      next_block(block_cos_.data(), block_sin_.data());
      offset_ = 0;
    }
    const float* pc = rope_.step_cos(offset_);
    const float* ps = rope_.step_sin(offset_);
    for (int j = 0; j < pairs_; ++j) {
      cos[j] = block_cos_[j] * pc[j] - block_sin_[j] * ps[j];
      sin[j] = block_sin_[j] * pc[j] + block_cos_[j] * ps[j];
    }
    ++offset_;
  }

  // Whole blocks instead (a run uses one form or the other): cos and sin of position
  // first + k·run_block for k = 0, 1, 2, ... in order. Position first + k·run_block + t is
  // that angle turned by rope.step_cos(t) / step_sin(t).
  void next_block(float* cos, float* sin) {
    if (blocks_++ > 0) {
      const double* jump_cos = rope_.jump_cos();
      const double* jump_sin = rope_.jump_sin();
      for (int j = 0; j < pairs_; ++j) {
        const double c = base_cos_[j] * jump_cos[j] - base_sin_[j] * jump_sin[j];
        base_sin_[j] = base_sin_[j] * jump_cos[j] + base_cos_[j] * jump_sin[j];
        base_cos_[j] = c;
      }
    }
    for (int j = 0; j < pairs_; ++j) {
      cos[j] = static_cast<float>(base_cos_[j]);
      sin[j] = static_cast<float>(base_sin_[j]);
    }
  }

 private:
  const Rope& rope_;
  int pairs_, offset_ = Rope::run_block, blocks_ = 0;
  std::vector<double> base_cos_, base_sin_;
  std::vector<float> block_cos_, block_sin_;
};

}  // namespace lexico
