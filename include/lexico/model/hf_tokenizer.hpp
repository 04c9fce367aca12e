#pragma once
// Hugging Face tokenizer.json with a BPE model: the subset that Llama-family
// checkpoints use, run the way the `tokenizers` library runs it.
//   added tokens      split out of the text first, matched literally
//   normalizer        Sequence, Prepend, Replace (string patterns)
//   pre_tokenizer     none (the whole text is one word) or ByteLevel (GPT-2 split)
//   model             BPE: vocab, ranked merges, unk, fuse_unk, byte_fallback, ignore_merges
//   decoder           Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip
//   post_processor    none, ByteLevel or TemplateProcessing (only to learn the BOS)
// Anything else is refused with an error naming the component, rather than encoded
// differently from the reference.

#include <algorithm>
#include <array>
#include <cstdint>
#include <fstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../base/error.hpp"
#include "../base/json.hpp"
#include "bpe.hpp"
#include "unicode.hpp"

namespace lexico {

namespace detail {

inline void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  for (std::size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
    s.replace(at, from.size(), to);
}

// Invalid UTF-8 bytes become U+FFFD, as Rust's from_utf8_lossy does.
inline std::string utf8_lossy(std::string_view s) {
  std::string out;
  for (std::size_t i = 0, n = 0; i < s.size(); i += n) {
    const std::uint32_t cp = next_code_point(s, i, n);
    if (cp == 0xFFFD && n == 1) out += "\xEF\xBF\xBD";
    else out.append(s.substr(i, n));
  }
  return out;
}

// GPT-2's byte-to-character table: printable bytes stand for themselves, the others
// for U+0100 onwards, so every byte string is a string of visible characters.
struct ByteLevelTable {
  std::array<std::uint32_t, 256> to_char{};
  std::array<int, 324> to_byte{};  // indexed by character, -1 when none
  ByteLevelTable() {
    to_byte.fill(-1);
    std::uint32_t extra = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_char[static_cast<std::size_t>(b)] = printable ? static_cast<std::uint32_t>(b) : extra++;
      to_byte[to_char[static_cast<std::size_t>(b)]] = b;
    }
  }
};

inline const ByteLevelTable& byte_level_table() {
  static const ByteLevelTable table;
  return table;
}

// The GPT-2 pre-tokenization pattern, by hand rather than through a regex engine:
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
inline std::vector<std::string_view> split_gpt2(std::string_view s) {
  std::vector<std::uint32_t> cps;
  std::vector<std::size_t> at;
  for (std::size_t i = 0, n = 0; i < s.size(); i += n) {
    at.push_back(i);
    cps.push_back(next_code_point(s, i, n));
  }
  at.push_back(s.size());
  const std::size_t n = cps.size();
  auto is_class = [&](std::size_t k, CharClass cls) {
    if (cls != CharClass::other) return char_class(cps[k]) == cls;
    return !is_space(cps[k]) && char_class(cps[k]) == CharClass::other;
  };
  std::vector<std::string_view> words;
  for (std::size_t i = 0; i < n;) {
    std::size_t j = i;
    if (cps[i] == '\'' && i + 1 < n) {
      const std::uint32_t c1 = cps[i + 1], c2 = i + 2 < n ? cps[i + 2] : 0;
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') j = i + 2;
      else if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) j = i + 3;
    }
    for (const CharClass cls : {CharClass::letter, CharClass::number, CharClass::other}) {
      if (j != i) break;
      std::size_t k = cps[i] == ' ' ? i + 1 : i;  // the optional leading space
      if (k < n && is_class(k, cls)) {
        while (k < n && is_class(k, cls)) ++k;
        j = k;
      }
    }
    if (j == i) {  // whitespace: a run keeps its last space for the next word
      std::size_t end = i;
      while (end < n && is_space(cps[end])) ++end;
      j = end == n || end - i < 2 ? end : end - 1;
    }
    words.push_back(s.substr(at[i], at[j] - at[i]));
    i = j;
  }
  return words;
}

}  // namespace detail

class HfTokenizer final : public Tokenizer {
 public:
  // Reads tokenizer.json; BOS and EOS come from a tokenizer_config.json beside it when
  // there is one, else from the post-processor's template, else from the usual names.
  explicit HfTokenizer(const std::string& path) : path_(path) {
    const json::Value root = json::parse_file(path);
    require(root.is_object(), path, ": must hold a JSON object");
    read_model(root.at("model", path));
    if (const json::Value* added = root.find("added_tokens"); added && !added->is_null()) read_added(*added);
    for (std::size_t id = 0; id < pieces_.size(); ++id)
      require(assigned_[id], where("model.vocab and added_tokens"), ": no token has id ", id);
    if (const json::Value* n = root.find("normalizer"); n && !n->is_null()) read_normalizer(*n);
    if (const json::Value* p = root.find("pre_tokenizer"); p && !p->is_null()) read_pre_tokenizer(*p);
    if (const json::Value* d = root.find("decoder"); d && !d->is_null()) read_decoder(*d);
    for (auto& added : normalized_added_) added.first = normalize(added.first);
    read_special_ids(root);
  }

  std::vector<int> encode(std::string_view text, bool add_bos = true) const override {
    std::vector<int> ids;
    if (add_bos && bos_id_ >= 0) ids.push_back(bos_id_);
    // As in `tokenizers`: added tokens with normalized=false are matched in the raw
    // text, the others in the normalized text, against their normalized content.
    split_added(text, raw_added_, ids, [&](std::string_view raw) {
      const std::string normalized = normalize(raw);
      split_added(normalized, normalized_added_, ids, [&](std::string_view part) { pre_tokenize(part, ids); });
    });
    return ids;
  }

  std::string decode(const std::vector<int>& ids, bool skip_special = true) const override {
    std::vector<std::string> tokens;
    for (const int id : ids) {
      const std::string& p = piece(id);
      if (!(skip_special && special_[static_cast<std::size_t>(id)])) tokens.push_back(p);
    }
    for (const DecodeStep& step : decoders_) apply(step, tokens);
    std::string text;
    for (const auto& t : tokens) text += t;
    return text;
  }

  const std::string& piece(int id) const override {
    require(id >= 0 && id < vocab_size(), path_, ": token id ", id, " outside [0, ", vocab_size(), ")");
    return pieces_[static_cast<std::size_t>(id)];
  }
  int vocab_size() const override { return static_cast<int>(pieces_.size()); }

  // The id of a vocabulary entry, or -1.
  int id(const std::string& piece) const {
    const auto it = ids_.find(piece);
    return it == ids_.end() ? -1 : it->second;
  }

 private:
  struct NormalizeStep {
    bool prepend;  // else replace
    std::string pattern, content;
  };
  struct DecodeStep {
    enum Kind { byte_level, replace, byte_fallback, fuse, strip } kind;
    std::string pattern, content;
    std::int64_t start = 0, stop = 0;
  };

  std::string where(std::string_view component) const { return path_ + ": " + std::string(component); }

  void set_piece(int id, const std::string& piece, const std::string& what) {
    require(id >= 0 && id < (1 << 24), where(what), ": id ", id, " out of range");
    if (static_cast<std::size_t>(id) >= pieces_.size()) {
      pieces_.resize(static_cast<std::size_t>(id) + 1);
      assigned_.resize(pieces_.size(), false);
      special_.resize(pieces_.size(), false);
    }
    auto& slot = pieces_[static_cast<std::size_t>(id)];
    require(!assigned_[static_cast<std::size_t>(id)] || slot == piece, where(what), ": id ", id, " names both '", slot,
            "' and '", piece, "'");
    slot = piece;
    assigned_[static_cast<std::size_t>(id)] = true;
    ids_.emplace(piece, id);
  }

  void read_model(const json::Value& model) {
    const std::string type = model.at("type", where("model")).as_string(where("model.type"));
    require(type == "BPE", where("model"), ": type '", type, "' is not supported (only BPE)");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      const json::Value* v = model.find(key);
      require(!v || v->is_null() || v->as_string().empty(), where("model"), ": ", key, " is not supported");
    }
    if (const json::Value* dropout = model.find("dropout"); dropout && !dropout->is_null())
      require(dropout->as_double(where("model.dropout")) == 0, where("model"), ": BPE dropout is not supported");
    auto flag = [&](const char* key) {
      const json::Value* v = model.find(key);
      return v && !v->is_null() && v->as_bool(where(std::string("model.") + key));
    };
    byte_fallback_ = flag("byte_fallback");
    fuse_unk_ = flag("fuse_unk");
    ignore_merges_ = flag("ignore_merges");

    for (const auto& [piece, id] : model.at("vocab", where("model")).as_object(where("model.vocab")))
      set_piece(static_cast<int>(id.as_int(where("model.vocab '" + piece + "'"))), piece, "model.vocab");
    if (const json::Value* unk = model.find("unk_token"); unk && !unk->is_null()) {
      unk_id_ = id(unk->as_string(where("model.unk_token")));
      require(unk_id_ >= 0, where("model.unk_token"), ": '", unk->as_string(), "' is not in the vocabulary");
    }
    byte_ids_.fill(-1);
    for (std::size_t id = 0; id < pieces_.size(); ++id) {
      const int byte = detail::byte_piece_value(pieces_[id]);
      if (byte >= 0) byte_ids_[static_cast<std::size_t>(byte)] = static_cast<int>(id);
    }

    // Merges are "a b" strings (older files) or [a, b] pairs; the rank is the index.
    const auto& merges = model.at("merges", where("model")).as_array(where("model.merges"));
    for (std::size_t rank = 0; rank < merges.size(); ++rank) {
      const std::string what = detail::concat("model.merges[", rank, "]");
      std::string a, b;
      if (merges[rank].is_string()) {
        const std::string& s = merges[rank].as_string();
        const std::size_t space = s.find(' ');
        require(space != std::string::npos && s.find(' ', space + 1) == std::string::npos, where(what), ": '", s,
                "' is not two pieces separated by one space");
        a = s.substr(0, space);
        b = s.substr(space + 1);
      } else {
        const auto& pair = merges[rank].as_array(where(what));
        require(pair.size() == 2, where(what), ": expected a pair of pieces");
        a = pair[0].as_string(where(what));
        b = pair[1].as_string(where(what));
      }
      const int ia = id(a), ib = id(b), merged = id(a + b);
      require(ia >= 0 && ib >= 0 && merged >= 0, where(what), ": '", a, "' + '", b,
              "' has a piece missing from the vocabulary");
      merges_.emplace(pair_key(ia, ib), std::make_pair(static_cast<int>(rank), merged));
    }
  }

  void read_added(const json::Value& added) {
    for (const json::Value& token : added.as_array(where("added_tokens"))) {
      const int id = static_cast<int>(token.at("id", where("added_tokens")).as_int(where("added_tokens.id")));
      const std::string& content = token.at("content", where("added_tokens")).as_string(where("added_tokens.content"));
      require(!content.empty(), where("added_tokens"), ": token ", id, " has empty content");
      set_piece(id, content, "added_tokens");
      const json::Value* special = token.find("special");
      special_[static_cast<std::size_t>(id)] = special && special->as_bool(where("added_tokens.special"));
      const json::Value* normalized = token.find("normalized");  // absent: special tokens are not
      const bool is_normalized =
          normalized ? normalized->as_bool(where("added_tokens.normalized")) : !special_[static_cast<std::size_t>(id)];
      (is_normalized ? normalized_added_ : raw_added_).emplace_back(content, id);
    }
  }

  void read_normalizer(const json::Value& n) {
    const std::string& type = n.at("type", where("normalizer")).as_string(where("normalizer.type"));
    if (type == "Sequence") {
      for (const json::Value& step : n.at("normalizers", where("normalizer")).as_array(where("normalizer.normalizers")))
        read_normalizer(step);
    } else if (type == "Prepend") {
      normalizers_.push_back({true, "", n.at("prepend", where("normalizer")).as_string(where("normalizer.prepend"))});
    } else if (type == "Replace") {
      normalizers_.push_back({false, string_pattern(n, "normalizer"),
                              n.at("content", where("normalizer")).as_string(where("normalizer.content"))});
    } else {
      throw error(where("normalizer") + ": type '" + type + "' is not supported");
    }
  }

  void read_pre_tokenizer(const json::Value& p) {
    const std::string& type = p.at("type", where("pre_tokenizer")).as_string(where("pre_tokenizer.type"));
    require(type == "ByteLevel", where("pre_tokenizer"), ": type '", type, "' is not supported (only ByteLevel)");
    byte_level_ = true;
    if (const json::Value* v = p.find("add_prefix_space")) add_prefix_space_ = v->as_bool(where("add_prefix_space"));
    if (const json::Value* v = p.find("use_regex")) use_regex_ = v->as_bool(where("use_regex"));
  }

  void read_decoder(const json::Value& d) {
    const std::string& type = d.at("type", where("decoder")).as_string(where("decoder.type"));
    if (type == "Sequence") {
      for (const json::Value& step : d.at("decoders", where("decoder")).as_array(where("decoder.decoders")))
        read_decoder(step);
    } else if (type == "ByteLevel") {
      decoders_.push_back({DecodeStep::byte_level, "", ""});
    } else if (type == "Replace") {
      decoders_.push_back(
          {DecodeStep::replace, string_pattern(d, "decoder"), d.at("content", where("decoder")).as_string(where("decoder.content"))});
    } else if (type == "ByteFallback") {
      decoders_.push_back({DecodeStep::byte_fallback, "", ""});
    } else if (type == "Fuse") {
      decoders_.push_back({DecodeStep::fuse, "", ""});
    } else if (type == "Strip") {
      DecodeStep step{DecodeStep::strip, "", d.at("content", where("decoder")).as_string(where("decoder.content"))};
      step.start = d.at("start", where("decoder")).as_int(where("decoder.start"));
      step.stop = d.at("stop", where("decoder")).as_int(where("decoder.stop"));
      decoders_.push_back(step);
    } else {
      throw error(where("decoder") + ": type '" + type + "' is not supported");
    }
  }

  std::string string_pattern(const json::Value& v, const std::string& component) const {
    const json::Value& pattern = v.at("pattern", where(component));
    const json::Value* s = pattern.find("String");
    require(s != nullptr, where(component), ": only String patterns are supported (not Regex)");
    return s->as_string(where(component + ".pattern"));
  }

  void read_special_ids(const json::Value& root) {
    auto find = [&](const std::string& piece) { return piece.empty() ? -1 : id(piece); };
    const std::string folder = path_.substr(0, path_.find_last_of('/') + 1);
    if (std::ifstream(folder + "tokenizer_config.json")) {
      const json::Value config = json::parse_file(folder + "tokenizer_config.json");
      auto token = [&](const char* key) -> std::string {
        const json::Value* v = config.find(key);
        if (!v || v->is_null()) return "";
        return v->is_string() ? v->as_string() : v->at("content", folder + "tokenizer_config.json").as_string();
      };
      bos_id_ = find(token("bos_token"));
      eos_id_ = find(token("eos_token"));
    }
    const json::Value* post = root.find("post_processor");
    if (post && !post->is_null()) {
      const std::string& type = post->at("type", where("post_processor")).as_string(where("post_processor.type"));
      require(type == "ByteLevel" || type == "TemplateProcessing", where("post_processor"), ": type '", type,
              "' is not supported");
      const json::Value* single = post->find("single");
      if (bos_id_ < 0 && single && !single->as_array(where("post_processor.single")).empty()) {
        const json::Value* first = single->as_array().front().find("SpecialToken");
        if (first) bos_id_ = find(first->at("id", where("post_processor")).as_string(where("post_processor.single")));
      }
    }
    for (const char* name : {"<s>", "<|begin_of_text|>", "<|startoftext|>"})
      if (bos_id_ < 0) bos_id_ = find(name);
    for (const char* name : {"</s>", "<|end_of_text|>", "<|endoftext|>"})
      if (eos_id_ < 0) eos_id_ = find(name);
  }

  static std::uint64_t pair_key(int a, int b) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
  }

  // Cuts `text` at the added tokens of `added` (the earliest match first, the longest
  // of those starting together): their ids go to `ids`, the text between to `segment`.
  template <typename Segment>
  static void split_added(std::string_view text, const std::vector<std::pair<std::string, int>>& added,
                          std::vector<int>& ids, Segment&& segment) {
    std::vector<std::size_t> next;  // where each added token next occurs, refreshed once passed
    for (const auto& token : added) next.push_back(text.find(token.first));
    for (std::size_t pos = 0; pos < text.size();) {
      std::size_t best = std::string_view::npos, best_length = 0;
      int best_id = -1;
      for (std::size_t k = 0; k < added.size(); ++k) {
        if (next[k] < pos) next[k] = text.find(added[k].first, pos);
        if (next[k] < best || (next[k] == best && best != std::string_view::npos && added[k].first.size() > best_length)) {
          best = next[k];
          best_length = added[k].first.size();
          best_id = added[k].second;
        }
      }
      if (best != pos) segment(text.substr(pos, best == std::string_view::npos ? std::string_view::npos : best - pos));
      if (best == std::string_view::npos) break;
      ids.push_back(best_id);
      pos = best + best_length;
    }
  }

  std::string normalize(std::string_view raw) const {
    std::string text(raw);
    for (const NormalizeStep& step : normalizers_) {
      if (!step.prepend) detail::replace_all(text, step.pattern, step.content);
      else if (!text.empty()) text.insert(0, step.content);
    }
    return text;
  }

  void pre_tokenize(std::string_view segment, std::vector<int>& ids) const {
    if (segment.empty()) return;
    if (!byte_level_) {
      encode_word(std::string(segment), ids);
      return;
    }
    std::string text(segment);
    if (add_prefix_space_ && text[0] != ' ') text.insert(0, " ");
    const auto& table = detail::byte_level_table();
    std::string mapped;
    for (const std::string_view word : use_regex_ ? detail::split_gpt2(text) : std::vector<std::string_view>{text}) {
      mapped.clear();
      for (const char c : word) detail::append_utf8(mapped, table.to_char[static_cast<unsigned char>(c)]);
      encode_word(mapped, ids);
    }
  }

  void encode_word(const std::string& word, std::vector<int>& ids) const {
    if (ignore_merges_) {
      if (const int whole = id(word); whole >= 0) {
        ids.push_back(whole);
        return;
      }
    }
    std::vector<int> symbols;
    bool previous_unk = false;
    for (std::size_t i = 0, n = 0; i < word.size(); i += n) {
      detail::next_code_point(word, i, n);
      if (const int known = id(word.substr(i, n)); known >= 0) {
        symbols.push_back(known);
        previous_unk = false;
        continue;
      }
      bool bytes_known = byte_fallback_;
      for (std::size_t k = 0; k < n && bytes_known; ++k) bytes_known = byte_ids_[static_cast<unsigned char>(word[i + k])] >= 0;
      if (bytes_known) {
        for (std::size_t k = 0; k < n; ++k) symbols.push_back(byte_ids_[static_cast<unsigned char>(word[i + k])]);
        previous_unk = false;
        continue;
      }
      require(unk_id_ >= 0, path_, ": cannot encode '", word.substr(i, n),
              "': not in the vocabulary, and the model has neither byte fallback nor an unk token");
      if (!(fuse_unk_ && previous_unk)) symbols.push_back(unk_id_);
      previous_unk = true;
    }
    detail::bpe_merge(symbols, [&](int a, int b, double& priority, int& merged) {
      const auto it = merges_.find(pair_key(a, b));
      if (it == merges_.end()) return false;
      priority = it->second.first;
      merged = it->second.second;
      return true;
    });
    ids.insert(ids.end(), symbols.begin(), symbols.end());
  }

  static void apply(const DecodeStep& step, std::vector<std::string>& tokens) {
    switch (step.kind) {
      case DecodeStep::replace:
        for (auto& t : tokens) detail::replace_all(t, step.pattern, step.content);
        break;
      case DecodeStep::fuse: {
        std::string all;
        for (const auto& t : tokens) all += t;
        tokens.assign(1, all);
        break;
      }
      case DecodeStep::strip:
        for (auto& t : tokens) {
          for (std::int64_t k = 0; k < step.start && t.compare(0, step.content.size(), step.content) == 0; ++k)
            t.erase(0, step.content.size());
          for (std::int64_t k = 0; k < step.stop && t.size() >= step.content.size() &&
                                   t.compare(t.size() - step.content.size(), step.content.size(), step.content) == 0;
               ++k)
            t.erase(t.size() - step.content.size());
        }
        break;
      case DecodeStep::byte_fallback: {
        // Runs of byte pieces become their UTF-8 text, or one U+FFFD per byte when invalid.
        std::vector<std::string> out;
        std::string bytes;
        std::size_t run = 0;
        auto flush = [&] {
          if (run == 0) return;
          if (detail::valid_utf8(bytes)) out.push_back(bytes);
          else
            for (std::size_t k = 0; k < run; ++k) out.emplace_back("\xEF\xBF\xBD");
          bytes.clear();
          run = 0;
        };
        for (auto& t : tokens) {
          const int byte = detail::byte_piece_value(t);
          if (byte >= 0) {
            bytes += static_cast<char>(byte);
            ++run;
            continue;
          }
          flush();
          out.push_back(std::move(t));
        }
        flush();
        tokens = std::move(out);
        break;
      }
      case DecodeStep::byte_level: {
        // Each token's characters back to bytes (a token with a character outside the
        // table stays as it is), then the whole as lossy UTF-8.
        const auto& table = detail::byte_level_table();
        std::string bytes;
        for (const auto& t : tokens) {
          std::string mapped;
          bool all = true;
          for (std::size_t i = 0, n = 0; i < t.size() && all; i += n) {
            const std::uint32_t cp = detail::next_code_point(t, i, n);
            all = cp < table.to_byte.size() && table.to_byte[cp] >= 0;
            if (all) mapped += static_cast<char>(table.to_byte[cp]);
          }
          bytes += all ? mapped : t;
        }
        tokens.assign(1, detail::utf8_lossy(bytes));
        break;
      }
    }
  }

  std::string path_;
  std::vector<std::string> pieces_;
  std::vector<bool> assigned_, special_;
  std::unordered_map<std::string, int> ids_;
  std::unordered_map<std::uint64_t, std::pair<int, int>> merges_;  // (a, b) -> (rank, merged id)
  std::array<int, 256> byte_ids_{};
  std::vector<std::pair<std::string, int>> raw_added_, normalized_added_;  // content, id
  int unk_id_ = -1;
  bool byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;
  std::vector<NormalizeStep> normalizers_;
  bool byte_level_ = false, add_prefix_space_ = false, use_regex_ = true;
  std::vector<DecodeStep> decoders_;
};

}  // namespace lexico
