// A Hugging Face Llama checkpoint (LlamaModel::load_hf), then a forward of three tokens.
// Input (".split2", the format of ../shared/fuzz-findings/llama_hf): a little-endian u16
// length N, N bytes of config.json, then the rest is model.safetensors.
#include <cstddef>
#include <string>

#include <lexico/base/error.hpp>
#include <lexico/base/files.hpp>
#include <lexico/model/llama.hpp>

#include "llama_forward.hpp"

LEXICO_FUZZ_TARGET(llama_hf) {
  lexico::require(bytes.size() >= 2, "<fuzz>.split2: no u16 length of config.json");
  const std::size_t config_size =
      static_cast<unsigned char>(bytes[0]) | static_cast<std::size_t>(static_cast<unsigned char>(bytes[1])) << 8;
  lexico::require(config_size <= bytes.size() - 2, "<fuzz>.split2: config.json of ", config_size,
                  " bytes runs past the input's end");
  lexico::MemoryFolder folder("<fuzz>");
  folder.add("config.json", std::string(bytes.substr(2, config_size)));
  folder.add("model.safetensors", std::string(bytes.substr(2 + config_size)));
  lexico::fuzz::run_a_few_tokens(lexico::LlamaModel::load_hf(folder));
}
