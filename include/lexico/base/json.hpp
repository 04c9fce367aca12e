#pragma once
// A small strict JSON reader (RFC 8259) for safetensors headers, config.json,
// tokenizer.json and dictionary-set manifests. Objects keep their members in file order
// (tokenizer merges and vocabularies are read in order) and reject duplicate keys;
// integer literals are kept exactly as int64 so byte offsets never pass through a double.
// Errors name the source, the byte offset, and the line and column.
//
// Memory: a Value is 16 bytes (a type tag and an int64, a double or a pointer to an
// immutable, reference-counted string, array or object; empty ones allocate nothing), and
// arrays and objects are sized exactly once parsed, so a document costs a small multiple
// of its text. Every parse runs under Limits (bytes of text, number of values), so a file
// cannot make the reader allocate more than its kind of file needs.
//
// Concurrency: a parsed Value is immutable; copies share their payload and may be read
// and copied from several threads at once.

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <iterator>
#include <limits>
#include <locale>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "error.hpp"
#include "files.hpp"

namespace lexico {
namespace json {

// What one parse may consume: bytes of text and values (every null, boolean, number,
// string, array and object counts one). A value costs at most ~64 bytes once parsed, so
// max_values bounds the memory of a document whose text is dense in tiny values.
// Exceeding either limit is an error naming the source and the limit.
struct Limits {
  std::uint64_t max_bytes = 100ull << 20;
  std::uint64_t max_values = 8ull << 20;

  // config.json, tokenizer_config.json, safetensors indexes, dictionary-set manifests.
  static constexpr Limits config() { return {1ull << 20, 1ull << 20}; }
  // tokenizer.json: the largest vocabularies and merge lists are a few million values.
  static constexpr Limits tokenizer() { return {64ull << 20, 8ull << 20}; }
  // A safetensors header, which the format caps at 100 MB.
  static constexpr Limits safetensors_header() { return {100ull << 20, 8ull << 20}; }
};

class Value {
 public:
  enum class Type : std::uint8_t { null, boolean, integer, real, string, array, object };
  using Array = std::vector<Value>;
  using Object = std::vector<std::pair<std::string, Value>>;

  Value() noexcept { bits_.integer = 0; }
  Value(const Value& other) noexcept : type_(other.type_), bits_(other.bits_) {
    if (NodeBase* node = shared()) node->refs.fetch_add(1, std::memory_order_relaxed);
  }
  Value(Value&& other) noexcept : type_(other.type_), bits_(other.bits_) {
    other.type_ = Type::null;
    other.bits_.integer = 0;
  }
  // By value: copy and move assignment alike, safe on self-assignment.
  Value& operator=(Value other) noexcept {
    std::swap(type_, other.type_);
    std::swap(bits_, other.bits_);
    return *this;
  }
  ~Value() { release(); }

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::null; }
  bool is_bool() const { return type_ == Type::boolean; }
  bool is_integer() const { return type_ == Type::integer; }
  bool is_number() const { return type_ == Type::integer || type_ == Type::real; }
  bool is_string() const { return type_ == Type::string; }
  bool is_array() const { return type_ == Type::array; }
  bool is_object() const { return type_ == Type::object; }

  // Typed access; `what` names the value in the error ("config.json: rope_theta").
  bool as_bool(std::string_view what = "value") const {
    expect(Type::boolean, what);
    return bits_.integer != 0;
  }
  std::int64_t as_int(std::string_view what = "value") const {
    expect(Type::integer, what);
    return bits_.integer;
  }
  double as_double(std::string_view what = "value") const {
    require(is_number(), what, ": expected a number, found ", type_name(type_));
    return type_ == Type::integer ? static_cast<double>(bits_.integer) : bits_.real;
  }
  const std::string& as_string(std::string_view what = "value") const {
    expect(Type::string, what);
    return payload<std::string>();
  }
  const Array& as_array(std::string_view what = "value") const {
    expect(Type::array, what);
    return payload<Array>();
  }
  const Object& as_object(std::string_view what = "value") const {
    expect(Type::object, what);
    return payload<Object>();
  }

  // The member named `key` of an object, or nullptr when absent (or not an object).
  const Value* find(std::string_view key) const {
    if (type_ != Type::object) return nullptr;
    for (const auto& member : payload<Object>())
      if (member.first == key) return &member.second;
    return nullptr;
  }
  // The member named `key`; throws naming `what` and the key when absent.
  const Value& at(std::string_view key, std::string_view what = "object") const {
    expect(Type::object, what);
    const Value* member = find(key);
    require(member != nullptr, what, ": missing key \"", key, "\"");
    return *member;
  }

  static const char* type_name(Type type) {
    switch (type) {
      case Type::null: return "null";
      case Type::boolean: return "a boolean";
      case Type::integer: return "an integer";
      case Type::real: return "a number";
      case Type::string: return "a string";
      case Type::array: return "an array";
      case Type::object: return "an object";
    }
    return "?";
  }

 private:
  friend class Parser;

  // Strings, arrays and objects live in one heap node each, shared by every copy.
  struct NodeBase {
    std::atomic<std::size_t> refs{1};
  };
  template <typename T>
  struct Node : NodeBase {
    explicit Node(T&& payload) : data(std::move(payload)) {}
    T data;
  };

  static Value scalar(Type type, std::int64_t integer) {
    Value value;
    value.type_ = type;
    value.bits_.integer = integer;
    return value;
  }
  static Value real(double number) {
    Value value;
    value.type_ = Type::real;
    value.bits_.real = number;
    return value;
  }
  // An empty payload needs no node: the accessors return a shared empty one.
  template <typename T>
  static Value shared(Type type, T&& payload) {
    Value value;
    value.type_ = type;
    value.bits_.node = payload.empty() ? nullptr : new Node<T>(std::move(payload));
    return value;
  }

  NodeBase* shared() const {
    return type_ == Type::string || type_ == Type::array || type_ == Type::object ? bits_.node : nullptr;
  }
  template <typename T>
  const T& payload() const {
    static const T empty;
    return bits_.node ? static_cast<const Node<T>*>(bits_.node)->data : empty;
  }
  template <typename T>
  void destroy() noexcept {
    delete static_cast<Node<T>*>(bits_.node);
  }
  void release() noexcept {
    NodeBase* node = shared();
    if (!node || node->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    if (type_ == Type::string) destroy<std::string>();
    else if (type_ == Type::array) destroy<Array>();
    else destroy<Object>();
  }

  void expect(Type type, std::string_view what) const {
    require(type_ == type, what, ": expected ", type_name(type), ", found ", type_name(type_));
  }

  Type type_ = Type::null;
  union Bits {
    std::int64_t integer;  // also the boolean
    double real;
    NodeBase* node;  // string, array or object; nullptr when empty
  } bits_;
};

static_assert(sizeof(Value) == 16, "json::Value is a tag and a 64-bit payload");

class Parser {
 public:
  Parser(std::string_view text, std::string source, Limits limits = {})
      : text_(text), source_(std::move(source)), limits_(limits) {}

  Value parse_document() {
    require(text_.size() <= limits_.max_bytes, source_, ": ", text_.size(), " bytes of JSON, above the limit of ",
            limits_.max_bytes, " for this kind of file");
    skip_space();
    Value value = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail("unexpected characters after the JSON value");
    return value;
  }

 private:
  // Deeper nesting than any real header or tokenizer file; bounds the recursion.
  static constexpr int max_depth = 256;
  // Objects up to this size check their keys pairwise; larger ones sort them.
  static constexpr std::size_t pairwise_keys = 16;

  struct Member {
    std::string key;
    Value value;
    std::size_t at;  // offset of the key, for the duplicate-key error
  };

  [[noreturn]] void fail(std::string_view what) const { fail_at(pos_, what); }
  [[noreturn]] void fail_at(std::size_t at, std::string_view what) const {
    std::size_t line = 1, column = 1;
    for (std::size_t i = 0; i < at && i < text_.size(); ++i) {
      if (text_[i] == '\n') {
        ++line;
        column = 1;
      } else {
        ++column;
      }
    }
    throw error(detail::concat(source_, ": JSON error at offset ", at, " (line ", line, ", column ", column,
                               "): ", what));
  }

  void skip_space() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r'))
      ++pos_;
  }

  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }

  void expect_char(char c) {
    if (pos_ >= text_.size() || text_[pos_] != c) fail(detail::concat("expected '", c, "'"));
    ++pos_;
  }

  void expect_word(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) fail(detail::concat("invalid literal, expected ", word));
    pos_ += word.size();
  }

  Value parse_value(int depth) {
    if (depth > max_depth) fail("nesting deeper than 256 levels");
    if (pos_ >= text_.size()) fail("unexpected end of input");
    if (++values_ > limits_.max_values)
      fail(detail::concat("more than ", limits_.max_values, " values, the limit for this kind of file"));
    switch (text_[pos_]) {
      case '{': return parse_object(depth);
      case '[': return parse_array(depth);
      case '"': return Value::shared(Value::Type::string, parse_string());
      case 't': expect_word("true"); return Value::scalar(Value::Type::boolean, 1);
      case 'f': expect_word("false"); return Value::scalar(Value::Type::boolean, 0);
      case 'n': expect_word("null"); return Value();
      default: return parse_number();
    }
  }

  // Members and elements gather on the parser's stacks and move, last first, into a
  // container of the exact size when their object or array closes: the deques grow
  // without reallocation copies and give their blocks back as they empty, so a large
  // container is held about once, not twice.
  Value parse_object(int depth) {
    const std::size_t base = members_.size();
    ++pos_;
    skip_space();
    if (peek() == '}') {
      ++pos_;
      return Value::shared(Value::Type::object, Value::Object());
    }
    for (;;) {
      skip_space();
      const std::size_t key_at = pos_;
      if (peek() != '"') fail("expected a string key");
      std::string key = parse_string();
      skip_space();
      expect_char(':');
      skip_space();
      Value value = parse_value(depth + 1);
      members_.push_back({std::move(key), std::move(value), key_at});
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        break;
      }
      fail("expected ',' or '}' in an object");
    }
    check_unique_keys(base);
    Value::Object object(members_.size() - base);
    for (auto member = object.rbegin(); member != object.rend(); ++member, members_.pop_back())
      *member = {std::move(members_.back().key), std::move(members_.back().value)};
    return Value::shared(Value::Type::object, std::move(object));
  }

  // Throws at the first key (in file order) that repeats an earlier one of the object
  // whose members are members_[base..]; needs no copy of the keys.
  void check_unique_keys(std::size_t base) const {
    const std::size_t end = members_.size();
    std::size_t repeat = end;
    if (end - base <= pairwise_keys) {
      for (std::size_t j = base + 1; j < end && repeat == end; ++j)
        for (std::size_t i = base; i < j; ++i)
          if (members_[i].key == members_[j].key) {
            repeat = j;
            break;
          }
    } else {
      std::vector<std::size_t> order(end - base);
      for (std::size_t i = 0; i < order.size(); ++i) order[i] = base + i;
      std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
        const int c = members_[a].key.compare(members_[b].key);
        return c < 0 || (c == 0 && a < b);
      });
      for (std::size_t k = 1; k < order.size(); ++k)
        if (members_[order[k]].key == members_[order[k - 1]].key) repeat = std::min(repeat, order[k]);
    }
    if (repeat != end)
      fail_at(members_[repeat].at, detail::concat("duplicate key \"", members_[repeat].key, "\""));
  }

  Value parse_array(int depth) {
    const std::size_t base = items_.size();
    ++pos_;
    skip_space();
    if (peek() == ']') {
      ++pos_;
      return Value::shared(Value::Type::array, Value::Array());
    }
    for (;;) {
      skip_space();
      Value item = parse_value(depth + 1);
      items_.push_back(std::move(item));
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        break;
      }
      fail("expected ',' or ']' in an array");
    }
    Value::Array array(items_.size() - base);
    for (auto item = array.rbegin(); item != array.rend(); ++item, items_.pop_back()) *item = std::move(items_.back());
    return Value::shared(Value::Type::array, std::move(array));
  }

  unsigned parse_hex4() {
    if (text_.size() - pos_ < 4) fail("truncated \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = text_[pos_++];
      code <<= 4;
      if (c >= '0' && c <= '9') code |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') code |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') code |= static_cast<unsigned>(c - 'A' + 10);
      else fail("invalid hex digit in \\u escape");
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  static bool plain_char(char c) { return c != '"' && c != '\\' && static_cast<unsigned char>(c) >= 0x20; }

  std::string parse_string() {
    const std::size_t start = pos_;
    ++pos_;  // the opening quote
    // Most strings hold no escape: copied in one piece, exactly sized.
    std::size_t end = pos_;
    while (end < text_.size() && plain_char(text_[end])) ++end;
    std::string out(text_.substr(pos_, end - pos_));
    pos_ = end;
    for (;;) {
      if (pos_ >= text_.size()) fail_at(start, "unterminated string");
      const char c = text_[pos_++];
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) fail_at(pos_ - 1, "control character inside a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= text_.size()) fail_at(start, "unterminated string");
      const char escape = text_[pos_++];
      switch (escape) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = parse_hex4();
          if (code >= 0xD800 && code < 0xDC00) {  // a high surrogate needs its low half
            if (text_.substr(pos_, 2) != "\\u") fail("unpaired UTF-16 surrogate in \\u escape");
            pos_ += 2;
            const unsigned low = parse_hex4();
            if (low < 0xDC00 || low >= 0xE000) fail("invalid low surrogate in \\u escape");
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          } else if (code >= 0xDC00 && code < 0xE000) {
            fail("unpaired UTF-16 surrogate in \\u escape");
          }
          append_utf8(out, code);
          break;
        }
        default: fail_at(pos_ - 1, "invalid escape character");
      }
    }
    // An escaped string grew by doubling; the parsed document keeps it exactly sized.
    if (out.capacity() - out.size() > 64) out.shrink_to_fit();
    return out;
  }

  static bool is_digit(char c) { return c >= '0' && c <= '9'; }

  Value parse_number() {
    const std::size_t start = pos_;
    const bool negative = peek() == '-';
    if (negative) ++pos_;
    if (!is_digit(peek())) fail_at(start, "invalid value");
    if (peek() == '0') {
      ++pos_;
      if (is_digit(peek())) fail_at(start, "leading zeros are not allowed");
    } else {
      while (is_digit(peek())) ++pos_;
    }
    const std::size_t digits_end = pos_;
    bool integral = true;
    if (peek() == '.') {
      integral = false;
      ++pos_;
      if (!is_digit(peek())) fail("expected a digit after '.'");
      while (is_digit(peek())) ++pos_;
    }
    if (peek() == 'e' || peek() == 'E') {
      integral = false;
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!is_digit(peek())) fail("expected a digit in the exponent");
      while (is_digit(peek())) ++pos_;
    }
    if (integral) {
      // Exact int64 when it fits; larger integers fall back to a double.
      std::uint64_t magnitude = 0;
      bool fits = true;
      for (std::size_t i = start + (negative ? 1 : 0); i < digits_end && fits; ++i) {
        const unsigned digit = static_cast<unsigned>(text_[i] - '0');
        if (magnitude > (std::numeric_limits<std::uint64_t>::max() - digit) / 10) fits = false;
        else magnitude = magnitude * 10 + digit;
      }
      const std::uint64_t limit =
          static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) + (negative ? 1u : 0u);
      if (fits && magnitude <= limit)
        return Value::scalar(Value::Type::integer,
                             negative ? static_cast<std::int64_t>(0 - magnitude) : static_cast<std::int64_t>(magnitude));
    }
    std::istringstream in(std::string(text_.substr(start, pos_ - start)));
    in.imbue(std::locale::classic());
    double number = 0;
    in >> number;
    if (in.fail()) fail_at(start, "number out of range");
    return Value::real(number);
  }

  std::string_view text_;
  std::string source_;
  Limits limits_;
  std::size_t pos_ = 0;
  std::uint64_t values_ = 0;
  std::deque<Value> items_;
  std::deque<Member> members_;
};

// Parses `text` under `limits`; `source` (a file name) starts every error message.
inline Value parse(std::string_view text, const std::string& source, const Limits& limits) {
  return Parser(text, source, limits).parse_document();
}
inline Value parse(std::string_view text, const std::string& source = "<json>") { return parse(text, source, Limits{}); }

// A file or bytes in memory; refused before it is read when above limits.max_bytes.
inline Value parse(const ByteSource& source, const Limits& limits = {}) {
  const std::string text = source.read_all(limits.max_bytes);
  return parse(text, source.name(), limits);
}

inline Value parse_file(const std::string& path, const Limits& limits = {}) { return parse(FileBytes(path), limits); }

// `text` as a JSON string literal, quotes included (for writers).
inline std::string quote(std::string_view text) {
  static const char hex[] = "0123456789abcdef";
  std::string out = "\"";
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (byte < 0x20) {
      out += "\\u00";
      out += hex[byte >> 4];
      out += hex[byte & 15];
    } else {
      out += c;
    }
  }
  return out + '"';
}

}  // namespace json
}  // namespace lexico
