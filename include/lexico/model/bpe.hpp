#pragma once
// What a tokenizer offers (the Tokenizer interface) and the byte-pair merge loop that
// both supported formats share: Hugging Face BPE merges pairs by rank, llama2.c /
// SentencePiece by the score of the merged piece; both take the best pair first and
// the leftmost among equals.

#include <cstddef>
#include <cstdint>
#include <queue>
#include <string>
#include <string_view>
#include <vector>

namespace lexico {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids of `text` (UTF-8), BOS first when add_bos and the tokenizer has one.
  virtual std::vector<int> encode(std::string_view text, bool add_bos = true) const = 0;
  // The text of `ids`; special tokens (BOS, EOS, unk, ...) are left out when skip_special.
  virtual std::string decode(const std::vector<int>& ids, bool skip_special = true) const = 0;
  // The vocabulary entry of `id` as stored (e.g. "Ġthe", "▁the", "<0x0A>").
  virtual const std::string& piece(int id) const = 0;
  virtual int vocab_size() const = 0;

  int bos_id() const { return bos_id_; }  // -1 when the tokenizer has none
  int eos_id() const { return eos_id_; }

 protected:
  int bos_id_ = -1, eos_id_ = -1;
};

namespace detail {

// Merges adjacent symbols of `ids` in place until no pair merges. For a pair (a, b),
// rule(a, b, priority, merged) returns whether it merges, into which id, and its
// priority (lower merges first). A heap of candidate pairs with lazy invalidation:
// O(n log n) where rescanning after every merge would be O(n^2) on long inputs.
template <typename Rule>
void bpe_merge(std::vector<int>& ids, Rule&& rule) {
  const std::size_t n = ids.size();
  if (n < 2) return;
  constexpr std::size_t none = static_cast<std::size_t>(-1);
  std::vector<std::size_t> prev(n), next(n);
  for (std::size_t i = 0; i < n; ++i) {
    prev[i] = i == 0 ? none : i - 1;
    next[i] = i + 1 == n ? none : i + 1;
  }
  struct Candidate {
    double priority;
    std::size_t left;
    int a, b, merged;
    bool operator<(const Candidate& other) const {  // std::priority_queue pops the largest
      return priority != other.priority ? priority > other.priority : left > other.left;
    }
  };
  std::priority_queue<Candidate> heap;
  auto consider = [&](std::size_t left) {
    if (left == none || next[left] == none) return;
    double priority;
    int merged;
    const int a = ids[left], b = ids[next[left]];
    if (rule(a, b, priority, merged)) heap.push({priority, left, a, b, merged});
  };
  for (std::size_t i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    const std::size_t right = next[c.left];
    // Stale: the left symbol merged since, or its neighbour did (ids only ever change
    // into longer pieces, so matching ids mean the same pair).
    if (ids[c.left] != c.a || right == none || ids[right] != c.b) continue;
    ids[c.left] = c.merged;
    ids[right] = -1;
    next[c.left] = next[right];
    if (next[right] != none) prev[next[right]] = c.left;
    consider(prev[c.left]);
    consider(c.left);
  }
  std::size_t out = 0;
  for (std::size_t i = 0; i < n; ++i)
    if (ids[i] >= 0) ids[out++] = ids[i];
  ids.resize(out);
}

// Parses a "<0xAB>" byte piece; -1 for any other piece.
inline int byte_piece_value(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return -1;
  int value = 0;
  for (const char c : piece.substr(3, 2)) {
    value <<= 4;
    if (c >= '0' && c <= '9') value |= c - '0';
    else if (c >= 'A' && c <= 'F') value |= c - 'A' + 10;
    else if (c >= 'a' && c <= 'f') value |= c - 'a' + 10;
    else return -1;
  }
  return value;
}

}  // namespace detail
}  // namespace lexico
