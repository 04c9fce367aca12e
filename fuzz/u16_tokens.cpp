// Token corpora (.u16 files): little-endian ids, cut into training windows.
#include <lexico/training/kv_collect.hpp>

#include "fuzz_target.hpp"

LEXICO_FUZZ_TARGET(u16_tokens) {
  const std::vector<int> tokens = lexico::parse_u16_tokens(bytes, "<fuzz>.u16");
  for (const auto& window : lexico::sample_windows(tokens, 16, 1, 8, 0))
    lexico::fuzz::require_sane(!window.empty() && window.size() <= 16 && window.front() == 1, "window shape");
}
