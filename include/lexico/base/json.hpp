#pragma once
// A small strict JSON reader (RFC 8259) for safetensors headers, config.json and
// tokenizer.json. Objects keep their members in file order (tokenizer merges and
// vocabularies are read in order) and reject duplicate keys; integer literals are
// kept exactly as int64 so byte offsets never pass through a double. Errors name
// the source, the byte offset, and the line and column.

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include "error.hpp"

namespace lexico {
namespace json {

class Value {
 public:
  enum class Type { null, boolean, integer, real, string, array, object };
  using Array = std::vector<Value>;
  using Object = std::vector<std::pair<std::string, Value>>;

  Value() = default;

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
    return integer_ != 0;
  }
  std::int64_t as_int(std::string_view what = "value") const {
    expect(Type::integer, what);
    return integer_;
  }
  double as_double(std::string_view what = "value") const {
    require(is_number(), what, ": expected a number, found ", type_name(type_));
    return type_ == Type::integer ? static_cast<double>(integer_) : real_;
  }
  const std::string& as_string(std::string_view what = "value") const {
    expect(Type::string, what);
    return string_;
  }
  const Array& as_array(std::string_view what = "value") const {
    expect(Type::array, what);
    return *array_;
  }
  const Object& as_object(std::string_view what = "value") const {
    expect(Type::object, what);
    return *object_;
  }

  // The member named `key` of an object, or nullptr when absent (or not an object).
  const Value* find(std::string_view key) const {
    if (type_ != Type::object) return nullptr;
    for (const auto& member : *object_)
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

  void expect(Type type, std::string_view what) const {
    require(type_ == type, what, ": expected ", type_name(type), ", found ", type_name(type_));
  }

  Type type_ = Type::null;
  std::int64_t integer_ = 0;  // also the boolean
  double real_ = 0;
  std::string string_;
  // Shared, immutable once parsed: copies of a document are cheap.
  std::shared_ptr<Array> array_;
  std::shared_ptr<Object> object_;
};

class Parser {
 public:
  Parser(std::string_view text, std::string source) : text_(text), source_(std::move(source)) {}

  Value parse_document() {
    skip_space();
    Value value = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail("unexpected characters after the JSON value");
    return value;
  }

 private:
  // Deeper nesting than any real header or tokenizer file; bounds the recursion.
  static constexpr int max_depth = 256;

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
    Value value;
    switch (text_[pos_]) {
      case '{': parse_object(value, depth); break;
      case '[': parse_array(value, depth); break;
      case '"':
        value.type_ = Value::Type::string;
        value.string_ = parse_string();
        break;
      case 't':
        expect_word("true");
        value.type_ = Value::Type::boolean;
        value.integer_ = 1;
        break;
      case 'f':
        expect_word("false");
        value.type_ = Value::Type::boolean;
        break;
      case 'n': expect_word("null"); break;
      default: parse_number(value);
    }
    return value;
  }

  void parse_object(Value& value, int depth) {
    value.type_ = Value::Type::object;
    value.object_ = std::make_shared<Value::Object>();
    std::unordered_set<std::string> keys;
    ++pos_;
    skip_space();
    if (peek() == '}') {
      ++pos_;
      return;
    }
    for (;;) {
      skip_space();
      const std::size_t key_at = pos_;
      if (peek() != '"') fail("expected a string key");
      std::string key = parse_string();
      if (!keys.insert(key).second) fail_at(key_at, detail::concat("duplicate key \"", key, "\""));
      skip_space();
      expect_char(':');
      skip_space();
      Value member = parse_value(depth + 1);
      value.object_->emplace_back(std::move(key), std::move(member));
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        return;
      }
      fail("expected ',' or '}' in an object");
    }
  }

  void parse_array(Value& value, int depth) {
    value.type_ = Value::Type::array;
    value.array_ = std::make_shared<Value::Array>();
    ++pos_;
    skip_space();
    if (peek() == ']') {
      ++pos_;
      return;
    }
    for (;;) {
      skip_space();
      value.array_->push_back(parse_value(depth + 1));
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        return;
      }
      fail("expected ',' or ']' in an array");
    }
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

  std::string parse_string() {
    const std::size_t start = pos_;
    ++pos_;  // the opening quote
    std::string out;
    for (;;) {
      if (pos_ >= text_.size()) fail_at(start, "unterminated string");
      const char c = text_[pos_++];
      if (c == '"') return out;
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
  }

  static bool is_digit(char c) { return c >= '0' && c <= '9'; }

  void parse_number(Value& value) {
    const std::size_t start = pos_;
    if (peek() == '-') ++pos_;
    if (!is_digit(peek())) fail_at(start, "invalid value");
    if (peek() == '0') {
      ++pos_;
      if (is_digit(peek())) fail_at(start, "leading zeros are not allowed");
    } else {
      while (is_digit(peek())) ++pos_;
    }
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
    const std::string literal(text_.substr(start, pos_ - start));
    if (integral) {
      // Exact int64 when it fits; larger integers fall back to a double.
      const bool negative = literal[0] == '-';
      std::uint64_t magnitude = 0;
      bool fits = true;
      for (std::size_t i = negative ? 1 : 0; i < literal.size() && fits; ++i) {
        const unsigned digit = static_cast<unsigned>(literal[i] - '0');
        if (magnitude > (std::numeric_limits<std::uint64_t>::max() - digit) / 10) fits = false;
        else magnitude = magnitude * 10 + digit;
      }
      const std::uint64_t limit =
          static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) + (negative ? 1u : 0u);
      if (fits && magnitude <= limit) {
        value.type_ = Value::Type::integer;
        value.integer_ = negative ? static_cast<std::int64_t>(0 - magnitude) : static_cast<std::int64_t>(magnitude);
        return;
      }
    }
    std::istringstream in(literal);
    in.imbue(std::locale::classic());
    double number = 0;
    in >> number;
    if (in.fail()) fail_at(start, "number out of range");
    value.type_ = Value::Type::real;
    value.real_ = number;
  }

  std::string_view text_;
  std::string source_;
  std::size_t pos_ = 0;
};

// Parses `text`; `source` (a file name) starts every error message.
inline Value parse(std::string_view text, const std::string& source = "<json>") {
  return Parser(text, source).parse_document();
}

inline Value parse_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  require(static_cast<bool>(in), path, ": cannot open file");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  require(!in.bad(), path, ": read error");
  return parse(text, path);
}

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
