// llama2.c tokenizer.bin (max_token_length, then score, length and bytes per token).
#include <lexico/model/llama2c_tokenizer.hpp>

#include "fuzz_target.hpp"
#include "tokenizer_checks.hpp"

LEXICO_FUZZ_TARGET(llama2c_tokenizer) {
  const lexico::Llama2cTokenizer tokenizer(lexico::MemoryBytes(bytes, "<fuzz>/tokenizer.bin"));
  lexico::fuzz::exercise(tokenizer);
}
