#include <gtest/gtest.h>

#include "test_util.hpp"

#include <malloc.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <new>
#include <string>

#include <lexico/base/json.hpp>

// Live heap bytes of this test program, to bound what a parse holds at its peak: every
// operator new is counted by its usable size until its delete.
namespace {
std::atomic<std::size_t> live_bytes{0}, peak_bytes{0};
}  // namespace

void* operator new(std::size_t size) {
  void* p = std::malloc(size ? size : 1);
  if (!p) throw std::bad_alloc();
  const std::size_t now = live_bytes += malloc_usable_size(p);
  for (std::size_t peak = peak_bytes; now > peak && !peak_bytes.compare_exchange_weak(peak, now);) {
  }
  return p;
}
void operator delete(void* p) noexcept {
  if (!p) return;
  live_bytes -= malloc_usable_size(p);
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept { operator delete(p); }

namespace {

using lexico::json::Limits;
using lexico::json::parse;
using lexico::json::Value;

using lexico_test::error_of;

TEST(Json, ParsesEveryValueType) {
  const Value v = parse(R"( {"a": 1, "b": -2.5e1, "c": "x\"\\\/\n\u00e9\ud83d\ude00", "d": [true, false, null],
                            "e": {}, "f": [], "big": 9007199254740993, "huge": 1e300} )");
  ASSERT_TRUE(v.is_object());
  EXPECT_EQ(v.at("a").as_int(), 1);
  EXPECT_DOUBLE_EQ(v.at("b").as_double(), -25.0);
  EXPECT_EQ(v.at("c").as_string(), "x\"\\/\n\xc3\xa9\xf0\x9f\x98\x80");
  const auto& d = v.at("d").as_array();
  ASSERT_EQ(d.size(), 3u);
  EXPECT_TRUE(d[0].as_bool());
  EXPECT_FALSE(d[1].as_bool());
  EXPECT_TRUE(d[2].is_null());
  EXPECT_TRUE(v.at("e").as_object().empty());
  EXPECT_TRUE(v.at("f").as_array().empty());
  EXPECT_EQ(v.at("big").as_int(), 9007199254740993LL);  // exact, not through a double
  EXPECT_DOUBLE_EQ(v.at("huge").as_double(), 1e300);
  EXPECT_EQ(v.find("missing"), nullptr);
}

TEST(Json, KeepsMemberOrder) {
  const Value v = parse(R"({"z": 0, "a": 1, "m": 2})");
  const auto& members = v.as_object();
  ASSERT_EQ(members.size(), 3u);
  EXPECT_EQ(members[0].first, "z");
  EXPECT_EQ(members[1].first, "a");
  EXPECT_EQ(members[2].first, "m");
}

TEST(Json, IntegerLimits) {
  EXPECT_EQ(parse("-9223372036854775808").as_int(), INT64_MIN);
  EXPECT_EQ(parse("9223372036854775807").as_int(), INT64_MAX);
  EXPECT_FALSE(parse("9223372036854775808").is_integer());  // falls back to a double
}

TEST(Json, ErrorsNameSourceAndOffset) {
  const struct {
    const char* text;
    const char* expected;
  } cases[] = {
      {"{\"a\": 1,}", "offset 8"},
      {"{\"a\" 1}", "expected ':'"},
      {"[1 2]", "expected ',' or ']'"},
      {"\"abc", "unterminated string"},
      {"{\"a\": 1, \"a\": 2}", "duplicate key \"a\""},
      {"01", "leading zeros"},
      {"tru", "invalid literal"},
      {"\"\\x\"", "invalid escape"},
      {"\"\\ud800\"", "surrogate"},
      {"\"a\tb\"", "control character"},
      {"1e999", "out of range"},
      {"{} x", "after the JSON value"},
      {"", "unexpected end"},
      {"-", "invalid value"},
      {"1.", "digit after '.'"},
  };
  for (const auto& c : cases) {
    const std::string message = error_of([&] { parse(c.text, "case.json"); });
    EXPECT_NE(message.find("case.json"), std::string::npos) << c.text << " -> " << message;
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.text << " -> " << message;
  }
  EXPECT_NE(error_of([] { parse("{\n  \"a\": ?}", "f.json"); }).find("line 2, column 8"), std::string::npos);
}

TEST(Json, DeepNestingIsAnErrorNotACrash) {
  const std::string deep(100000, '[');
  EXPECT_NE(error_of([&] { parse(deep); }).find("nesting"), std::string::npos);
}

TEST(Json, TypedAccessErrorsNameTheValue) {
  const Value v = parse(R"({"n": "text"})");
  EXPECT_NE(error_of([&] { v.at("n").as_int("config.json: n"); }).find("config.json: n: expected an integer"),
            std::string::npos);
  EXPECT_NE(error_of([&] { v.at("x", "config.json"); }).find("config.json: missing key \"x\""), std::string::npos);
}

TEST(Json, QuoteRoundTrips) {
  const std::string text = "a\"b\\c\n\x01\xc3\xa9";
  EXPECT_EQ(parse(lexico::json::quote(text)).as_string(), text);
}

TEST(Json, ParseFileNamesAMissingFile) {
  EXPECT_NE(error_of([] { lexico::json::parse_file("/nonexistent/x.json"); }).find("/nonexistent/x.json"),
            std::string::npos);
}

TEST(Json, ValueBudgetNamesSourceAndLimit) {
  EXPECT_EQ(parse("[1, [2], {\"a\": null}]", "v.json", Limits{1000, 6}).as_array().size(), 3u);  // six values
  const std::string message = error_of([] { parse("[1, [2], {\"a\": null}]", "v.json", Limits{1000, 5}); });
  EXPECT_NE(message.find("v.json"), std::string::npos) << message;
  EXPECT_NE(message.find("more than 5 values"), std::string::npos) << message;
}

TEST(Json, ByteLimitNamesSourceAndLimit) {
  const std::string text = "[" + std::string(100, ' ') + "]";
  EXPECT_TRUE(parse(text, "b.json", Limits{102, 10}).is_array());
  const std::string message = error_of([&] { parse(text, "b.json", Limits{101, 10}); });
  EXPECT_NE(message.find("b.json: 102 bytes of JSON, above the limit of 101"), std::string::npos) << message;
}

TEST(Json, ParseFileRefusesAFileAboveItsLimitBeforeReadingIt) {
  const std::string path =
      (std::filesystem::temp_directory_path() / ("lexico_json_" + std::to_string(::getpid()) + ".json")).string();
  std::ofstream(path) << "{\"a\": [" << std::string(2000, ' ') << "]}";
  EXPECT_EQ(lexico::json::parse_file(path).at("a").as_array().size(), 0u);
  const std::string message = error_of([&] { lexico::json::parse_file(path, Limits{1000, 100}); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("above the limit of 1000"), std::string::npos) << message;
  std::filesystem::remove(path);
}

TEST(Json, DuplicateKeysOfLargeObjectsAreFoundAtTheRepeat) {
  std::string text = "{";
  for (int i = 0; i < 100; ++i) text += "\"k" + std::to_string(i) + "\": " + std::to_string(i) + ", ";
  const std::size_t repeat = text.size();
  text += "\"k42\": 0, \"k7\": 1}";
  const std::string message = error_of([&] { parse(text, "big.json"); });
  EXPECT_NE(message.find("duplicate key \"k42\""), std::string::npos) << message;
  EXPECT_NE(message.find("offset " + std::to_string(repeat) + " "), std::string::npos) << message;
  // Equal keys in different objects are no duplicates.
  EXPECT_EQ(parse(R"([{"a": 1}, {"a": 2}, {"o": {"a": 3}, "a": 4}])").as_array().size(), 3u);
}

TEST(Json, CopiesShareThePayloadAndOutliveTheDocument) {
  Value copy;
  {
    const Value document = parse(R"({"s": "a string longer than the small-string buffer", "a": [1, {"b": [2]}]})");
    copy = document.at("a");
    Value self = document;
    self = self;  // self-assignment keeps the payload
    EXPECT_EQ(&self.at("s").as_string(), &document.at("s").as_string());
  }
  EXPECT_EQ(copy.as_array()[1].at("b").as_array()[0].as_int(), 2);
  EXPECT_TRUE(parse("\"\"").as_string().empty());  // empty payloads allocate nothing
  EXPECT_TRUE(parse("{}").find("x") == nullptr);
}

// Peak live heap bytes while `text` is parsed and its value held, beyond those before.
std::size_t parse_peak(const std::string& text) {
  const std::size_t before = live_bytes;
  peak_bytes = before;
  const Value value = parse(text, "memory.json", Limits{1u << 30, 1u << 30});
  return peak_bytes - before;
}

// The reader once held 60-75x its input; a value now costs 16 bytes plus its node.
TEST(Json, MemoryStaysASmallMultipleOfTheText) {
  std::string objects = "[";
  for (int i = 0; i < 100000; ++i)
    objects += (i ? "," : "") + std::string("{\"id\":") + std::to_string(i) + ",\"piece\":\"p" + std::to_string(i % 1000) +
               "\",\"score\":-1.5}";
  objects += "]";
  std::string dense = "[";  // five values in 17 bytes
  for (int i = 0; i < 100000; ++i) dense += (i ? "," : "") + std::string("{\"a\":1,\"b\":[2,3]}");
  dense += "]";
  std::string ints = "[";  // one value per 2 bytes, the densest text
  for (int i = 0; i < 1000000; ++i) ints += (i ? ",": "") + std::to_string(i % 10);
  ints += "]";
  const double objects_ratio = static_cast<double>(parse_peak(objects)) / static_cast<double>(objects.size());
  const double dense_ratio = static_cast<double>(parse_peak(dense)) / static_cast<double>(dense.size());
  const double bytes_per_int = static_cast<double>(parse_peak(ints)) / 1e6;
  std::printf("peak heap while parsing: %.1fx small objects, %.1fx dense objects, %.1f bytes per int\n", objects_ratio,
              dense_ratio, bytes_per_int);
  EXPECT_LT(objects_ratio, 10.0);
  EXPECT_LT(dense_ratio, 20.0);
  EXPECT_LT(bytes_per_int, 40.0);  // the array (16 per value) and, while it closes, its scratch
}

}  // namespace
