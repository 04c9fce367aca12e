#pragma once
// Tokenizers for the models the runner loads: Hugging Face tokenizer.json (BPE) and
// llama2.c's tokenizer .bin. load_tokenizer picks the format from the path.

#include <filesystem>
#include <memory>
#include <string>
#include <system_error>

#include "../base/error.hpp"
#include "bpe.hpp"
#include "hf_tokenizer.hpp"
#include "llama2c_tokenizer.hpp"

namespace lexico {

// A tokenizer.json, a directory holding one, or a llama2.c tokenizer .bin.
inline std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) return std::make_unique<HfTokenizer>(path + "/tokenizer.json");
  const std::string extension = std::filesystem::path(path).extension().string();
  if (extension == ".json") return std::make_unique<HfTokenizer>(path);
  if (extension == ".bin") return std::make_unique<Llama2cTokenizer>(path);
  throw error(path + ": not a tokenizer (expected tokenizer.json, a directory holding one, or a llama2.c .bin)");
}

}  // namespace lexico
