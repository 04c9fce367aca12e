// A whole llama2.c checkpoint (LlamaModel::load_llama2c), then a forward of three tokens.
// The header's sizes must be refused before any allocation the input cannot back.
#include <lexico/base/files.hpp>
#include <lexico/model/llama.hpp>

#include "llama_forward.hpp"

LEXICO_FUZZ_TARGET(llama2c_model) {
  const lexico::MemoryBytes file(bytes, "<fuzz>.bin");
  lexico::fuzz::run_a_few_tokens(lexico::LlamaModel::load_llama2c(file));
}
