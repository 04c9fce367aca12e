// Hugging Face tokenizer.json. Where the input holds a line "#CONFIG#", the text after
// it is the tokenizer_config.json beside it (the format of ../shared/fuzz-findings).
#include <algorithm>
#include <optional>
#include <string_view>

#include <lexico/model/hf_tokenizer.hpp>

#include "fuzz_target.hpp"
#include "tokenizer_checks.hpp"

LEXICO_FUZZ_TARGET(hf_tokenizer) {
  constexpr std::string_view mark = "#CONFIG#";
  std::string_view json = bytes;
  std::optional<std::string_view> config;
  for (std::size_t at = bytes.find(mark); at != std::string_view::npos; at = bytes.find(mark, at + 1)) {
    const std::size_t end = at + mark.size();
    if ((at == 0 || bytes[at - 1] == '\n') && (end == bytes.size() || bytes[end] == '\n')) {
      json = bytes.substr(0, at);
      config = bytes.substr(std::min(end + 1, bytes.size()));
      break;
    }
  }
  const lexico::HfTokenizer tokenizer(json, config, "<fuzz>/tokenizer.json");
  lexico::fuzz::exercise(tokenizer);
}
