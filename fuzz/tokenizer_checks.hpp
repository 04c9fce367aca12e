#pragma once
// What the tokenizer targets do with a tokenizer that loaded: encode and decode a few
// fixed texts (ASCII, spaces, multi-byte and invalid UTF-8, special-token names) and
// decode the first ids. Every id that encode returns must be a valid id.
#include <algorithm>
#include <string>
#include <vector>

#include <lexico/model/bpe.hpp>

#include "fuzz_target.hpp"

namespace lexico {
namespace fuzz {

inline void exercise(const Tokenizer& tokenizer) {
  static const std::string texts[] = {
      "Hello world", "  a  b\n\nc ", "aaaaaaaa", "x", "", "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80",
      "\xff\xfe\xc3", "<s>hi</s><unk>", "It's 12345!"};
  for (const std::string& text : texts) {
    for (const bool bos : {true, false}) {
      const std::vector<int> ids = tokenizer.encode(text, bos);
      for (const int id : ids)
        require_sane(id >= 0 && id < tokenizer.vocab_size(), "encode returned an id outside the vocabulary");
      tokenizer.decode(ids, bos);
    }
  }
  std::vector<int> first(static_cast<std::size_t>(std::min(tokenizer.vocab_size(), 64)));
  for (std::size_t id = 0; id < first.size(); ++id) first[id] = static_cast<int>(id);
  tokenizer.decode(first, false);
  tokenizer.decode(first, true);
}

}  // namespace fuzz
}  // namespace lexico
