#pragma once
// Size arithmetic on numbers that come from files: every product and sum is checked, so a
// header field can never wrap a count past the checks that follow it.

#include <cstdint>
#include <limits>
#include <string_view>

#include "error.hpp"

namespace lexico {

// a * b for non-negative sizes; throws naming `what` when either is negative or the
// product exceeds `limit` (by default what int64 holds).
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, std::string_view what,
                                std::int64_t limit = std::numeric_limits<std::int64_t>::max()) {
  require(a >= 0 && b >= 0, what, ": negative size (", a, " x ", b, ")");
  require(a == 0 || b <= limit / a, what, ": ", a, " x ", b, " exceeds ", limit);
  return a * b;
}

// a + b for non-negative sizes, with the same contract as checked_mul.
inline std::int64_t checked_add(std::int64_t a, std::int64_t b, std::string_view what,
                                std::int64_t limit = std::numeric_limits<std::int64_t>::max()) {
  require(a >= 0 && b >= 0, what, ": negative size (", a, " + ", b, ")");
  require(a <= limit - b, what, ": ", a, " + ", b, " exceeds ", limit);
  return a + b;
}

// A size from a file as int, checked against [lo, hi] before narrowing.
inline int checked_int(std::int64_t value, std::string_view what, std::int64_t lo = 0,
                       std::int64_t hi = std::numeric_limits<int>::max()) {
  require(value >= lo && value <= hi, what, " = ", value, " is outside [", lo, ", ", hi, "]");
  return static_cast<int>(value);
}

}  // namespace lexico
