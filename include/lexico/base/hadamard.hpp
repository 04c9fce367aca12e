#pragma once
// A fixed orthogonal rotation M = H · S / √n of vectors of n = 2^k floats: S flips the
// signs of a fixed pseudo-random set of channels (about half), H is the Sylvester-Hadamard matrix
// (H_ij = (-1)^popcount(i & j)), applied by the fast Walsh-Hadamard transform in
// n log2 n additions. Rotating keys and values before a per-block quantizer spreads an
// outlier channel over all channels, so one large value no longer sets a block's scale
// (QuaRot, Ashkboos et al., arXiv 2404.00456, rotates KV caches this way before
// quantizing them). Since M is orthogonal, qᵀk = (Mq)ᵀ(Mk) and Σ p_t v_t = Mᵀ Σ p_t (M v_t):
// a cache rotates the queries once and the output back once per step.

#include <cmath>
#include <cstdint>

#include "error.hpp"

namespace lexico {

inline bool is_power_of_two(int n) { return n > 0 && (n & (n - 1)) == 0; }

// The sign S applies to channel i: a fixed hash, the same on every machine.
inline float hadamard_sign(int i) {
  std::uint32_t h = static_cast<std::uint32_t>(i) * 0x9E3779B9u;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  return (h & 1u) ? -1.0f : 1.0f;
}

// x <- M x (forward) or x <- Mᵀ x (inverse), in place.
inline void hadamard_rotate(float* x, int n, bool inverse = false) {
  require(is_power_of_two(n), "hadamard_rotate: length ", n, " is not a power of two");
  if (!inverse)
    for (int i = 0; i < n; ++i) x[i] *= hadamard_sign(i);
  for (int half = 1; half < n; half *= 2)
    for (int start = 0; start < n; start += 2 * half)
      for (int i = start; i < start + half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a + b;
        x[i + half] = a - b;
      }
  const float norm = 1.0f / std::sqrt(static_cast<float>(n));
  for (int i = 0; i < n; ++i) x[i] *= inverse ? norm * hadamard_sign(i) : norm;
}

}  // namespace lexico
