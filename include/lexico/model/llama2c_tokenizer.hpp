#pragma once
// The llama2.c tokenizer file (tokenizer.bin, tok512.bin): SentencePiece BPE exported
// as int32 max_token_length, then per id: f32 score, int32 length, the piece's bytes.
// Pieces carry plain spaces (SentencePiece's "▁" already replaced); ids 0, 1, 2 are
// unk, BOS, EOS; "<0xAB>" pieces are the byte fallback.
//
// Encoding follows SentencePiece BPE as llama2.c runs it: a dummy-prefix space, one
// symbol per code point (bytes of unknown code points fall back to byte pieces), then
// the adjacent pair whose concatenation is the highest-scoring piece merges first.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "../base/error.hpp"
#include "../base/files.hpp"
#include "bpe.hpp"
#include "unicode.hpp"

namespace lexico {

class Llama2cTokenizer final : public Tokenizer {
 public:
  // Size cap: a 32k vocabulary takes ~0.4 MB, a 256k one ~4 MB.
  static constexpr std::uint64_t max_file_bytes = std::uint64_t{16} << 20;

  explicit Llama2cTokenizer(const std::string& path) : Llama2cTokenizer(FileBytes(path)) {}

  // The same from any bytes (a file, or memory: MemoryBytes); errors start with source.name().
  explicit Llama2cTokenizer(const ByteSource& source) : name_(source.name()) {
    const std::string data = source.read_all(max_file_bytes);
    std::size_t at = 0;
    auto read_i32 = [&](const char* what, int id) {
      require(data.size() - at >= 4, name_, ": truncated at offset ", at, " reading the ", what,
              id >= 0 ? detail::concat(" of token ", id) : std::string());
      std::int32_t value;
      std::memcpy(&value, data.data() + at, 4);
      at += 4;
      return value;
    };
    const std::int32_t max_length = read_i32("max_token_length", -1);
    require(max_length > 0 && max_length < (1 << 16), name_, ": max_token_length ", max_length, " out of range");
    // Every token takes at least 8 bytes of the capped file, so ids stay far below INT_MAX.
    while (at < data.size()) {
      const int id = static_cast<int>(pieces_.size());
      const std::int32_t score_bits = read_i32("score", id);
      float score;
      std::memcpy(&score, &score_bits, 4);
      const std::int32_t length = read_i32("length", id);
      require(length >= 0 && length <= max_length, name_, ": token ", id, " at offset ", at - 4, " has length ", length,
              " outside [0, ", max_length, "]");
      require(data.size() - at >= static_cast<std::size_t>(length), name_, ": truncated in the bytes of token ", id,
              " at offset ", at);
      require(std::isfinite(score), name_, ": token ", id, " has a non-finite score");
      pieces_.emplace_back(data, at, static_cast<std::size_t>(length));
      scores_.push_back(score);
      longest_ = std::max(longest_, static_cast<std::size_t>(length));
      at += static_cast<std::size_t>(length);
    }
    require(pieces_.size() >= 3, name_, ": ", pieces_.size(), " tokens, fewer than unk, BOS and EOS");
    bos_id_ = 1;
    eos_id_ = 2;
    byte_ids_.fill(-1);
    for (int id = static_cast<int>(pieces_.size()) - 1; id >= 0; --id) {  // first occurrence wins
      ids_[pieces_[static_cast<std::size_t>(id)]] = id;
      const int byte = detail::byte_piece_value(pieces_[static_cast<std::size_t>(id)]);
      if (byte >= 0) byte_ids_[static_cast<std::size_t>(byte)] = id;
    }
  }

  std::vector<int> encode(std::string_view text, bool add_bos = true) const override {
    std::vector<int> ids;
    if (!text.empty()) {
      ids.push_back(symbol(" "));  // SentencePiece's dummy prefix
      for (std::size_t i = 0, n = 0; i < text.size(); i += n) {
        detail::next_code_point(text, i, n);
        const auto it = ids_.find(std::string(text.substr(i, n)));
        if (it != ids_.end()) {
          ids.push_back(it->second);
          continue;
        }
        for (std::size_t k = 0; k < n; ++k) ids.push_back(byte_symbol(static_cast<unsigned char>(text[i + k])));
      }
      std::string joined;
      detail::bpe_merge(ids, [&](int a, int b, double& priority, int& merged) {
        // A pair longer than every piece cannot be one (and is not built: pieces may be 64 KB).
        if (pieces_[static_cast<std::size_t>(a)].size() + pieces_[static_cast<std::size_t>(b)].size() > longest_)
          return false;
        joined = pieces_[static_cast<std::size_t>(a)];
        joined += pieces_[static_cast<std::size_t>(b)];
        const auto it = ids_.find(joined);
        if (it == ids_.end()) return false;
        merged = it->second;
        priority = -static_cast<double>(scores_[static_cast<std::size_t>(merged)]);
        return true;
      });
    }
    if (add_bos) ids.insert(ids.begin(), bos_id_);
    return ids;
  }

  std::string decode(const std::vector<int>& ids, bool skip_special = true) const override {
    std::string text;
    bool first = true;
    for (const int id : ids) {
      const std::string& p = piece(id);
      if (id <= 2 && skip_special) continue;  // unk, BOS, EOS
      const int byte = detail::byte_piece_value(p);
      if (byte >= 0) text += static_cast<char>(byte);
      else text += first && !p.empty() && p[0] == ' ' ? p.substr(1) : p;  // the dummy prefix
      first = false;
    }
    return text;
  }

  const std::string& piece(int id) const override {
    require(id >= 0 && id < vocab_size(), name_, ": token id ", id, " outside [0, ", vocab_size(), ")");
    return pieces_[static_cast<std::size_t>(id)];
  }
  int vocab_size() const override { return static_cast<int>(pieces_.size()); }

 private:
  int symbol(const std::string& s) const {
    const auto it = ids_.find(s);
    if (it != ids_.end()) return it->second;
    return byte_symbol(static_cast<unsigned char>(s[0]));
  }

  int byte_symbol(unsigned char byte) const {
    const int id = byte_ids_[byte];
    return id >= 0 ? id : 0;  // no byte fallback for this byte: unk
  }

  std::string name_;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::size_t longest_ = 0;
  std::unordered_map<std::string, int> ids_;
  std::array<int, 256> byte_ids_{};
};

}  // namespace lexico
