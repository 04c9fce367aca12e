#include <gtest/gtest.h>

#include "test_util.hpp"

#include <string>

#include <lexico/base/json.hpp>

namespace {

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

}  // namespace
