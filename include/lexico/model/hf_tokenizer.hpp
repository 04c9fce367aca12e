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
//
// The files are outside input: tokenizer.json is read up to 64 MiB and
// tokenizer_config.json up to 4 MiB; ids are range-checked before they are narrowed or
// size anything; every loop over text advances; a normalizer or decoder chain longer than
// 64 steps, or that could grow a text more than 16x (+ 256 bytes), is refused, and each
// step runs in linear time.

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../base/error.hpp"
#include "../base/files.hpp"
#include "../base/json.hpp"
#include "bpe.hpp"
#include "unicode.hpp"

namespace lexico {

namespace detail {

// A non-empty literal pattern (a Replace's, an added token's) found in time linear in
// the text, by Knuth-Morris-Pratt: std::string_view::find takes text x pattern steps on
// inputs such as "aaa...ab", and both the pattern and the text come from outside.
class Literal {
 public:
  explicit Literal(std::string text) : text_(std::move(text)), border_(text_.size(), 0) {
    require(!text_.empty(), "an empty literal pattern");  // callers refuse it with a better message first
    for (std::size_t i = 1, k = 0; i < text_.size(); ++i) {
      while (k > 0 && text_[i] != text_[k]) k = border_[k - 1];
      if (text_[i] == text_[k]) ++k;
      border_[i] = k;  // the longest proper prefix of text_[0..i] that is also its suffix
    }
  }
  const std::string& text() const { return text_; }
  std::size_t size() const { return text_.size(); }

  // Where the pattern first occurs in `s` at or after `from`, or npos.
  std::size_t find(std::string_view s, std::size_t from) const {
    if (text_.size() == 1) return s.find(text_[0], from);
    for (std::size_t i = from, k = 0; i < s.size(); ++i) {
      while (k > 0 && s[i] != text_[k]) k = border_[k - 1];
      if (s[i] == text_[k] && ++k == text_.size()) return i + 1 - k;
    }
    return std::string_view::npos;
  }

 private:
  std::string text_;
  std::vector<std::size_t> border_;
};

// `s` with every occurrence of `from` replaced by `to`, left to right and without
// overlaps, built in one pass (replacing in place moves the tail at every match:
// quadratic on long text).
inline std::string replace_all(std::string_view s, const Literal& from, std::string_view to) {
  std::string out;
  std::size_t done = 0;
  for (std::size_t at = from.find(s, 0); at != std::string_view::npos; at = from.find(s, done)) {
    out.append(s.substr(done, at - done)).append(to);
    done = at + from.size();
  }
  return out.append(s.substr(done));
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

// How long a chain of normalizers (or decoders) can make a text: at most factor x its
// length + constant bytes. Checked step by step as the chain is read, so that a file
// cannot make a short text huge (Replace "a" -> "aa" chained 24 times grows it 2^24 x).
// Each step is a pass over the text, so their number is capped too (real files have a few).
struct GrowthBound {
  static constexpr double max_factor = 16, max_constant = 256;
  static constexpr int max_steps = 64;
  double factor = 1, constant = 0;
  int steps = 0;

  // A step whose output is at most step_factor x its input + step_constant bytes.
  void add(double step_factor, double step_constant, const std::string& where) {
    require(++steps <= max_steps, where, ": more than ", max_steps, " steps in the chain");
    step_factor = std::max(1.0, step_factor);
    factor *= step_factor;
    constant = constant * step_factor + step_constant;
    require(factor <= max_factor && constant <= max_constant, where, ": the chain up to here can make a text ",
            factor, " x its length + ", constant, " bytes, above the limit of ", max_factor, " x + ", max_constant);
  }
};

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
  // Size caps: published tokenizer.json files are a few MB (the largest ~20 MB), and
  // tokenizer_config.json a few KB to a few hundred (chat templates).
  static constexpr std::uint64_t max_json_bytes = json::Limits::tokenizer().max_bytes;
  static constexpr std::uint64_t max_config_bytes = json::Limits::config().max_bytes;

  // Reads tokenizer.json; BOS and EOS come from a tokenizer_config.json beside it when
  // there is one, else from the post-processor's template, else from the usual names.
  explicit HfTokenizer(const std::string& path) {
    const std::string config_path = config_path_beside(path);
    std::error_code ec;
    std::optional<std::string> config;
    if (std::filesystem::exists(config_path, ec)) config = read_file(config_path, max_config_bytes);
    load(read_file(path, max_json_bytes), config, path);
  }

  // The same from the texts of tokenizer.json and of the tokenizer_config.json beside it
  // (nullopt: none). `source` names tokenizer.json in errors, and its folder the config.
  HfTokenizer(std::string_view tokenizer_json, std::optional<std::string_view> config_json,
              std::string source = "<memory>/tokenizer.json") {
    load(tokenizer_json, config_json, std::move(source));
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
  using GrowthBound = detail::GrowthBound;
  struct NormalizeStep {
    bool prepend;  // else replace
    std::optional<detail::Literal> pattern;
    std::string content;
  };
  struct DecodeStep {
    enum Kind { byte_level, replace, byte_fallback, fuse, strip } kind;
    std::optional<detail::Literal> pattern;
    std::string content;
    std::int64_t start = 0, stop = 0;
  };
  struct AddedToken {
    detail::Literal content;
    int id;
  };

  static std::string config_path_beside(const std::string& path) {
    return path.substr(0, path.find_last_of('/') + 1) + "tokenizer_config.json";
  }

  std::string where(std::string_view component) const { return path_ + ": " + std::string(component); }

  void load(std::string_view text, std::optional<std::string_view> config, std::string source) {
    path_ = std::move(source);
    require(text.size() <= max_json_bytes, path_, ": ", text.size(), " bytes, above the limit of ", max_json_bytes,
            " for tokenizer.json");
    const json::Value root = json::parse(text, path_, json::Limits::tokenizer());
    require(root.is_object(), path_, ": must hold a JSON object");
    const json::Value& model = root.at("model", path_);
    read_model_options(model);
    static const json::Value::Array no_added_tokens;
    const json::Value* added = root.find("added_tokens");
    read_pieces(model.at("vocab", where("model")).as_object(where("model.vocab")),
                added && !added->is_null() ? added->as_array(where("added_tokens")) : no_added_tokens);
    read_merges(model);
    GrowthBound growth;
    if (const json::Value* n = root.find("normalizer"); n && !n->is_null()) read_normalizer(*n, "normalizer", growth);
    if (const json::Value* p = root.find("pre_tokenizer"); p && !p->is_null()) read_pre_tokenizer(*p);
    growth = {};
    if (const json::Value* d = root.find("decoder"); d && !d->is_null()) read_decoder(*d, "decoder", growth);
    normalize_added();
    read_special_ids(root, config);
  }

  void read_model_options(const json::Value& model) {
    const std::string type = model.at("type", where("model")).as_string(where("model.type"));
    require(type == "BPE", where("model"), ": type '", type, "' is not supported (only BPE)");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      const json::Value* v = model.find(key);
      require(!v || v->is_null() || v->as_string(where(std::string("model.") + key)).empty(), where("model"), ": ", key,
              " is not supported");
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
  }

  // An id from the file, range-checked as the int64 it was read as, before narrowing.
  int read_id(const json::Value& value, const std::string& what) const {
    const std::int64_t id = value.as_int(where(what));
    require(id >= 0 && id < std::numeric_limits<int>::max(), where(what), ": id ", id, " outside [0, ",
            std::numeric_limits<int>::max(), ")");
    return static_cast<int>(id);
  }

  // The pieces of model.vocab and added_tokens by id. Ids must run from 0 without a gap
  // (one piece per id), which is checked on the ids themselves before any table is sized
  // from them: a single id of 2^24 must not cost 2^24 pieces before it is refused.
  void read_pieces(const json::Value::Object& vocab, const json::Value::Array& added) {
    std::vector<std::pair<int, const std::string*>> entries;  // (id, piece)
    entries.reserve(vocab.size() + added.size());
    for (const auto& [piece, id] : vocab) entries.emplace_back(read_id(id, "model.vocab '" + piece + "'"), &piece);
    struct Added {
      int id;
      const std::string* content;
      bool special, normalized;
    };
    std::vector<Added> added_tokens;
    for (std::size_t i = 0; i < added.size(); ++i) {
      const std::string what = detail::concat("added_tokens[", i, "]");
      const json::Value& token = added[i];
      const int id = read_id(token.at("id", where(what)), what + ".id");
      const std::string& content = token.at("content", where(what)).as_string(where(what + ".content"));
      require(!content.empty(), where(what), ": token ", id, " has empty content");
      const json::Value* special = token.find("special");
      const bool is_special = special && special->as_bool(where(what + ".special"));
      const json::Value* normalized = token.find("normalized");  // absent: special tokens are not
      added_tokens.push_back(
          {id, &content, is_special, normalized ? normalized->as_bool(where(what + ".normalized")) : !is_special});
      entries.emplace_back(id, &content);
    }

    std::vector<int> ids;
    ids.reserve(entries.size());
    for (const auto& entry : entries) ids.push_back(entry.first);
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    for (std::size_t k = 0; k < ids.size(); ++k)
      require(ids[k] == static_cast<int>(k), where("model.vocab and added_tokens"), ": no token has id ", k,
              " (ids run from 0 without a gap; the largest is ", ids.back(), ")");

    pieces_.resize(ids.size());
    std::vector<bool> assigned(ids.size(), false);
    special_.assign(ids.size(), false);
    for (const auto& [id, piece] : entries) {
      auto& slot = pieces_[static_cast<std::size_t>(id)];
      require(!assigned[static_cast<std::size_t>(id)] || slot == *piece, where("model.vocab and added_tokens"),
              ": id ", id, " names both '", slot, "' and '", *piece, "'");
      slot = *piece;
      assigned[static_cast<std::size_t>(id)] = true;
      ids_.emplace(*piece, id);
    }
    for (const Added& token : added_tokens) {
      special_[static_cast<std::size_t>(token.id)] = token.special;
      (token.normalized ? normalized_added_ : raw_added_).push_back({detail::Literal(*token.content), token.id});
    }
  }

  void read_merges(const json::Value& model) {
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

  // A Replace's pattern: a non-empty string (an empty one would match between every two
  // characters in `tokenizers`, which this reader does not reproduce).
  detail::Literal string_pattern(const json::Value& v, const std::string& what) const {
    const json::Value& pattern = v.at("pattern", where(what));
    const json::Value* s = pattern.find("String");
    require(s != nullptr, where(what), ": only String patterns are supported (not Regex)");
    const std::string& text = s->as_string(where(what + ".pattern"));
    require(!text.empty(), where(what + ".pattern"), ": empty pattern");
    return detail::Literal(text);
  }

  void read_normalizer(const json::Value& n, const std::string& what, GrowthBound& growth) {
    const std::string& type = n.at("type", where(what)).as_string(where(what + ".type"));
    if (type == "Sequence") {
      const auto& steps = n.at("normalizers", where(what)).as_array(where(what + ".normalizers"));
      for (std::size_t i = 0; i < steps.size(); ++i)
        read_normalizer(steps[i], detail::concat(what, ".normalizers[", i, "]"), growth);
    } else if (type == "Prepend") {
      NormalizeStep step{true, std::nullopt, n.at("prepend", where(what)).as_string(where(what + ".prepend"))};
      growth.add(1, static_cast<double>(step.content.size()), where(what));
      normalizers_.push_back(std::move(step));
    } else if (type == "Replace") {
      NormalizeStep step{false, string_pattern(n, what), n.at("content", where(what)).as_string(where(what + ".content"))};
      growth.add(static_cast<double>(step.content.size()) / static_cast<double>(step.pattern->size()), 0, where(what));
      normalizers_.push_back(std::move(step));
    } else {
      throw error(where(what) + ": type '" + type + "' is not supported");
    }
  }

  void read_pre_tokenizer(const json::Value& p) {
    const std::string& type = p.at("type", where("pre_tokenizer")).as_string(where("pre_tokenizer.type"));
    require(type == "ByteLevel", where("pre_tokenizer"), ": type '", type, "' is not supported (only ByteLevel)");
    byte_level_ = true;
    if (const json::Value* v = p.find("add_prefix_space")) add_prefix_space_ = v->as_bool(where("add_prefix_space"));
    if (const json::Value* v = p.find("use_regex")) use_regex_ = v->as_bool(where("use_regex"));
  }

  void read_decoder(const json::Value& d, const std::string& what, GrowthBound& growth) {
    const std::string& type = d.at("type", where(what)).as_string(where(what + ".type"));
    if (type == "Sequence") {
      const auto& steps = d.at("decoders", where(what)).as_array(where(what + ".decoders"));
      for (std::size_t i = 0; i < steps.size(); ++i)
        read_decoder(steps[i], detail::concat(what, ".decoders[", i, "]"), growth);
    } else if (type == "ByteLevel") {
      growth.add(3, 0, where(what));  // bytes that are not UTF-8 become U+FFFD, 3 bytes each
      decoders_.push_back({DecodeStep::byte_level, std::nullopt, ""});
    } else if (type == "Replace") {
      DecodeStep step{DecodeStep::replace, string_pattern(d, what),
                      d.at("content", where(what)).as_string(where(what + ".content"))};
      growth.add(static_cast<double>(step.content.size()) / static_cast<double>(step.pattern->size()), 0, where(what));
      decoders_.push_back(std::move(step));
    } else if (type == "ByteFallback") {
      growth.add(1, 0, where(what));  // "<0xAB>" becomes 1 to 3 bytes
      decoders_.push_back({DecodeStep::byte_fallback, std::nullopt, ""});
    } else if (type == "Fuse") {
      growth.add(1, 0, where(what));
      decoders_.push_back({DecodeStep::fuse, std::nullopt, ""});
    } else if (type == "Strip") {
      // As in `tokenizers`: content is one character, start and stop are counts.
      DecodeStep step{DecodeStep::strip, std::nullopt, d.at("content", where(what)).as_string(where(what + ".content"))};
      std::size_t length = 0;
      if (!step.content.empty()) detail::next_code_point(step.content, 0, length);
      require(!step.content.empty() && length == step.content.size(), where(what + ".content"), ": '", step.content,
              "' is not one character");
      step.start = d.at("start", where(what)).as_int(where(what + ".start"));
      step.stop = d.at("stop", where(what)).as_int(where(what + ".stop"));
      require(step.start >= 0 && step.stop >= 0, where(what), ": negative start (", step.start, ") or stop (",
              step.stop, ")");
      growth.add(1, 0, where(what));
      decoders_.push_back(std::move(step));
    } else {
      throw error(where(what) + ": type '" + type + "' is not supported");
    }
  }

  // Added tokens matched in the normalized text are matched by their normalized content;
  // one that normalizes to "" would match everywhere without consuming any text.
  void normalize_added() {
    for (AddedToken& token : normalized_added_) {
      std::string normalized = normalize(token.content.text());
      require(!normalized.empty(), where("added_tokens"), ": token ", token.id, " '", token.content.text(),
              "' normalizes to the empty string (it would match everywhere)");
      token.content = detail::Literal(std::move(normalized));
    }
  }

  void read_special_ids(const json::Value& root, std::optional<std::string_view> config_text) {
    auto find = [&](const std::string& piece) { return piece.empty() ? -1 : id(piece); };
    if (config_text) {
      const std::string config_name = config_path_beside(path_);
      require(config_text->size() <= max_config_bytes, config_name, ": ", config_text->size(),
              " bytes, above the limit of ", max_config_bytes, " for tokenizer_config.json");
      const json::Value config = json::parse(*config_text, config_name, json::Limits::config());
      require(config.is_object(), config_name, ": must hold a JSON object");
      auto token = [&](const char* key) -> std::string {
        const json::Value* v = config.find(key);
        if (!v || v->is_null()) return "";
        const std::string what = config_name + ": " + key;
        return v->is_string() ? v->as_string() : v->at("content", what).as_string(what + ".content");
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
  // Every token is non-empty, so each match moves `pos` forward.
  template <typename Segment>
  static void split_added(std::string_view text, const std::vector<AddedToken>& added, std::vector<int>& ids,
                          Segment&& segment) {
    std::vector<std::size_t> next;  // where each added token next occurs, refreshed once passed
    for (const auto& token : added) next.push_back(token.content.find(text, 0));
    for (std::size_t pos = 0; pos < text.size();) {
      std::size_t best = std::string_view::npos, best_length = 0;
      int best_id = -1;
      for (std::size_t k = 0; k < added.size(); ++k) {
        if (next[k] < pos) next[k] = added[k].content.find(text, pos);
        if (next[k] < best || (next[k] == best && best != std::string_view::npos && added[k].content.size() > best_length)) {
          best = next[k];
          best_length = added[k].content.size();
          best_id = added[k].id;
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
      if (!step.prepend) text = detail::replace_all(text, *step.pattern, step.content);
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
        for (auto& t : tokens) t = detail::replace_all(t, *step.pattern, step.content);
        break;
      case DecodeStep::fuse: {
        std::string all;
        for (const auto& t : tokens) all += t;
        tokens.assign(1, all);
        break;
      }
      case DecodeStep::strip: {
        // Up to `start` copies of the character off the front, `stop` off the back; each
        // count is bounded by the token's length, whatever the file says.
        const std::string_view c = step.content;
        for (auto& t : tokens) {
          std::string_view s = t;
          for (std::int64_t k = 0; k < step.start && s.substr(0, c.size()) == c; ++k) s.remove_prefix(c.size());
          for (std::int64_t k = 0; k < step.stop && s.size() >= c.size() && s.substr(s.size() - c.size()) == c; ++k)
            s.remove_suffix(c.size());
          t = std::string(s);
        }
        break;
      }
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
  std::vector<bool> special_;
  std::unordered_map<std::string, int> ids_;
  std::unordered_map<std::uint64_t, std::pair<int, int>> merges_;  // (a, b) -> (rank, merged id)
  std::array<int, 256> byte_ids_{};
  std::vector<AddedToken> raw_added_, normalized_added_;
  int unk_id_ = -1;
  bool byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;
  std::vector<NormalizeStep> normalizers_;
  bool byte_level_ = false, add_prefix_space_ = false, use_regex_ = true;
  std::vector<DecodeStep> decoders_;
};

}  // namespace lexico
