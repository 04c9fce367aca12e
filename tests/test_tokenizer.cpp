#include <gtest/gtest.h>

#include "test_util.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include <lexico/model/tokenizer.hpp>

namespace {

namespace fs = std::filesystem;
using lexico::HfTokenizer;
using lexico::Llama2cTokenizer;

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot open " << path;
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

template <typename T>
std::vector<int> read_ids(const std::string& path) {
  const std::string bytes = read_text(path);
  std::vector<int> ids(bytes.size() / sizeof(T));
  for (std::size_t i = 0; i < ids.size(); ++i) {
    T value;
    std::memcpy(&value, bytes.data() + i * sizeof(T), sizeof(T));
    ids[i] = static_cast<int>(value);
  }
  return ids;
}

using lexico_test::error_of;

// Strings that exercise spaces, newlines, punctuation, digits, contractions and
// multi-byte UTF-8 (accents, CJK, emoji).
const std::vector<std::string> samples = {
    "Hello world",
    "  two leading spaces, trailing  ",
    "Tabs\tand\nnew\n\nlines\r\n",
    "It's they're we've I'm you'll he'd don't",
    "Numbers 12345 and 3.14159, x2y3",
    "caf\xc3\xa9 na\xc3\xafve \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x98\x80!",
    "\xe2\x80\x94" "em dash\xe2\x80\x94 and \xe2\x80\x9cquotes\xe2\x80\x9d",
    "a",
    " ",
    "",
};

// The golden prompt/tokens pair: the tokens are the prompt's first 512 ids.
void check_golden_prompt(const lexico::Tokenizer& tok, const std::string& golden) {
  const std::string prompt = read_text(golden + "/prompt.txt");
  const std::vector<int> expected = read_ids<std::int32_t>(golden + "/tokens.i32");
  std::vector<int> ids = tok.encode(prompt, true);
  ASSERT_GE(ids.size(), expected.size());
  ids.resize(expected.size());
  EXPECT_EQ(ids, expected);
  const std::string text = tok.decode(expected);
  EXPECT_EQ(prompt.substr(0, text.size()), text);
  EXPECT_GT(text.size(), 900u);
}

TEST(Llama2cTokenizer, Stories260KGoldenPrompt) {
  const Llama2cTokenizer tok(LEXICO_REPO_DATA "/stories260k/tok512.bin");
  EXPECT_EQ(tok.vocab_size(), 512);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.piece(3), "<0x00>");
  EXPECT_EQ(tok.piece(258), "<0xFF>");
  check_golden_prompt(tok, LEXICO_REPO_DATA "/stories260k/golden");
}

TEST(Llama2cTokenizer, KnownIdsAndByteFallback) {
  const Llama2cTokenizer tok(LEXICO_REPO_DATA "/stories260k/tok512.bin");
  EXPECT_EQ(tok.encode("", true), std::vector<int>{1});
  EXPECT_TRUE(tok.encode("", false).empty());
  // "\n" is not a piece: byte fallback to <0x0A> = 3 + 10.
  const std::vector<int> ids = tok.encode("\n", false);
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(tok.piece(ids[0]), " ");
  EXPECT_EQ(ids[1], 13);
  // An emoji is four byte pieces.
  const std::vector<int> emoji = tok.encode("\xf0\x9f\x98\x80", false);
  EXPECT_EQ(emoji, (std::vector<int>{ids[0], 3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x80}));
}

TEST(Llama2cTokenizer, RoundTrips) {
  const Llama2cTokenizer tok(LEXICO_REPO_DATA "/stories260k/tok512.bin");
  for (const std::string& s : samples) {
    EXPECT_EQ(tok.decode(tok.encode(s, true)), s);
    EXPECT_EQ(tok.decode(tok.encode(s, false)), s);
  }
  EXPECT_EQ(tok.decode({1, 2}, false), "\n<s>\n\n</s>\n");
}

TEST(Llama2cTokenizer, Errors) {
  const fs::path dir = fs::temp_directory_path() / "lexico_tokenizer_test";
  fs::create_directories(dir);
  const std::string bytes = read_text(LEXICO_REPO_DATA "/stories260k/tok512.bin");
  const std::string cut = (dir / "cut.bin").string();
  std::ofstream(cut, std::ios::binary) << bytes.substr(0, 1001);
  const std::string message = error_of([&] { Llama2cTokenizer t(cut); });
  EXPECT_NE(message.find(cut), std::string::npos) << message;
  EXPECT_NE(message.find("truncated"), std::string::npos) << message;
  std::string bad = bytes;
  bad[8] = 0x7f;  // token 0's length
  std::ofstream((dir / "bad.bin").string(), std::ios::binary) << bad;
  EXPECT_NE(error_of([&] { Llama2cTokenizer t((dir / "bad.bin").string()); }).find("token 0 at offset 8 has length"),
            std::string::npos);
  EXPECT_NE(error_of([] { Llama2cTokenizer t("/nonexistent.bin"); }).find("cannot open"), std::string::npos);
  const Llama2cTokenizer tok(LEXICO_REPO_DATA "/stories260k/tok512.bin");
  EXPECT_NE(error_of([&] { tok.decode({5, 512}); }).find("token id 512 outside [0, 512)"), std::string::npos);
  fs::remove_all(dir);
}

TEST(HfTokenizer, TinyStories656KGoldenPrompt) {
  const HfTokenizer tok(LEXICO_REPO_DATA "/tinystories-656k/tokenizer.json");
  EXPECT_EQ(tok.vocab_size(), 2048);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  check_golden_prompt(tok, LEXICO_REPO_DATA "/tinystories-656k/golden");
}

TEST(HfTokenizer, TinyStories656KGreedyText) {
  const HfTokenizer tok(LEXICO_REPO_DATA "/tinystories-656k/tokenizer.json");
  std::istringstream in(read_text(LEXICO_REPO_DATA "/tinystories-656k/golden/greedy_from_bos.ids.txt"));
  const std::vector<int> ids{std::istream_iterator<int>(in), std::istream_iterator<int>()};
  ASSERT_FALSE(ids.empty());
  std::string expected = read_text(LEXICO_REPO_DATA "/tinystories-656k/golden/greedy_from_bos.txt");
  while (!expected.empty() && expected.back() == '\n') expected.pop_back();
  EXPECT_EQ(tok.decode(ids, false), expected);
  // The last id is the special <|end_story|>; the one before it was spelled in pieces.
  EXPECT_EQ(ids.back(), tok.eos_id());
  EXPECT_EQ(tok.decode(ids, true) + "<|end_story|>", expected);
}

TEST(HfTokenizer, TinyStories656KRoundTripsAndUnknowns) {
  const HfTokenizer tok(LEXICO_REPO_DATA "/tinystories-656k/tokenizer.json");
  // Its vocabulary covers printable ASCII and newlines, and has no byte pieces.
  for (const std::string& s : {samples[0], samples[1], samples[3], samples[4], samples[7], samples[8], samples[9],
                               std::string("new\n\nlines\n")})
    EXPECT_EQ(tok.decode(tok.encode(s, true)), s);
  // So characters outside it become <unk>, one for a run (fuse_unk).
  const std::vector<int> ids = tok.encode("\xe6\x97\xa5\xe6\x9c\xac", false);
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(tok.piece(ids[0]), "\xe2\x96\x81");  // "▁"
  EXPECT_EQ(ids[1], 0);
  // Strip removes the leading space of the whole text, which here starts with BOS (as in HF).
  EXPECT_EQ(tok.decode(tok.encode("caf\xc3\xa9!", true), false), "<|start_story|> caf<unk>!");
  // Its added tokens are "normalized": matched in the normalized text against their
  // normalized content "▁<|end_story|>", so only after a space (as in `tokenizers`;
  // the model itself learnt to spell the unmatched form in pieces).
  const std::vector<int> spaced = tok.encode("Hi <|end_story|>", false);
  EXPECT_EQ(spaced.back(), 2);
  EXPECT_EQ(tok.decode(spaced, false), "Hi<|end_story|>");
  const std::vector<int> unspaced = tok.encode("Hi<|end_story|>", false);
  EXPECT_EQ(std::count(unspaced.begin(), unspaced.end(), 2), 0);
  EXPECT_EQ(tok.decode(unspaced), "Hi<|end_story|>");
}

std::string bpe4k() { return std::string(LEXICO_SHARED_DATA) + "/bpe4k"; }

TEST(HfTokenizer, ByteLevelKnownIds) {
  if (!fs::exists(bpe4k())) GTEST_SKIP() << "shared data not found at " << bpe4k();
  const HfTokenizer tok(bpe4k() + "/tokenizer.json");
  EXPECT_EQ(tok.vocab_size(), 4096);
  EXPECT_EQ(tok.bos_id(), 0);
  EXPECT_EQ(tok.eos_id(), 1);
  const std::vector<int> ids = tok.encode(" the", false);
  ASSERT_EQ(ids.size(), 1u);
  EXPECT_EQ(tok.piece(ids[0]), "\xc4\xa0the");  // "Ġthe"
  EXPECT_EQ(tok.encode("<s>!</s>", false), (std::vector<int>{0, 2, 1}));
  for (const std::string& s : samples) EXPECT_EQ(tok.decode(tok.encode(s, true)), s);
}

// The pre-tokenized corpora: every document decodes to text that encodes back to
// exactly its ids.
void check_corpus(const std::string& file, std::size_t max_tokens) {
  if (!fs::exists(bpe4k())) GTEST_SKIP() << "shared data not found at " << bpe4k();
  const HfTokenizer tok(bpe4k() + "/tokenizer.json");
  std::vector<int> ids = read_ids<std::uint16_t>(bpe4k() + "/" + file);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], 0);
  if (ids.size() > max_tokens) ids.resize(max_tokens);
  std::size_t documents = 0, mismatches = 0, tokens = 0;
  const auto start = std::chrono::steady_clock::now();
  for (std::size_t begin = 0; begin < ids.size();) {
    std::size_t end = begin + 1;
    while (end < ids.size() && ids[end] != 0) ++end;
    if (end == ids.size() && begin > 0) break;  // a document cut by max_tokens
    const std::vector<int> doc(ids.begin() + static_cast<std::ptrdiff_t>(begin), ids.begin() + static_cast<std::ptrdiff_t>(end));
    const std::string text = tok.decode(doc);
    const std::vector<int> again = tok.encode(text, true);
    if (again != doc && ++mismatches <= 3) {
      std::size_t i = 0;
      while (i < std::min(again.size(), doc.size()) && again[i] == doc[i]) ++i;
      ADD_FAILURE() << file << " document at token " << begin << " differs at " << i << ": '"
                    << tok.piece(doc[std::min(i, doc.size() - 1)]) << "' vs '"
                    << tok.piece(again[std::min(i, again.size() - 1)]) << "'";
    }
    ++documents;
    tokens += doc.size();
    begin = end;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("  %s: %zu documents, %zu tokens round-tripped in %.2f s, %zu mismatches\n", file.c_str(), documents,
              tokens, seconds, mismatches);
  EXPECT_GT(documents, 0u);
  EXPECT_EQ(mismatches, 0u);
}

TEST(HfTokenizer, ByteLevelDevCorpusRoundTrip) { check_corpus("tokens_dev.u16", 400000); }
TEST(HfTokenizer, ByteLevelTrainCorpusHead) { check_corpus("tokens_train.u16", 300000); }

TEST(HfTokenizer, Errors) {
  const fs::path dir = fs::temp_directory_path() / "lexico_hf_tokenizer_test";
  fs::create_directories(dir);
  const std::string path = (dir / "tokenizer.json").string();
  auto load_error = [&](const std::string& json) {
    std::ofstream(path, std::ios::trunc) << json;
    const std::string message = error_of([&] { HfTokenizer t(path); });
    EXPECT_NE(message.find(path), std::string::npos) << message;
    return message;
  };
  const std::string vocab = R"("vocab": {"a": 0, "b": 1, "ab": 2})";
  EXPECT_NE(load_error(R"({"model": {"type": "Unigram"}})").find("type 'Unigram' is not supported"), std::string::npos);
  EXPECT_NE(load_error(R"({"model": {"type": "BPE", )" + vocab + R"(, "merges": ["a c"]}})").find("merges[0]"),
            std::string::npos);
  EXPECT_NE(load_error(R"({"model": {"type": "BPE", )" + vocab + R"(, "merges": ["ab"]}})").find("one space"),
            std::string::npos);
  EXPECT_NE(load_error(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 2}, "merges": []}})").find("no token has id 1"),
            std::string::npos);
  EXPECT_NE(load_error(R"({"model": {"type": "BPE", )" + vocab + R"(, "merges": []}, "pre_tokenizer": {"type": "Whitespace"}})")
                .find("pre_tokenizer: type 'Whitespace'"),
            std::string::npos);
  EXPECT_NE(load_error(R"({"model": {"type": "BPE", )" + vocab + R"(, "merges": []}, "normalizer": {"type": "NFKC"}})")
                .find("normalizer: type 'NFKC'"),
            std::string::npos);
  EXPECT_NE(load_error(R"({"model": {"type": "BPE", )" + vocab + R"(, "merges": [)").find("JSON error at offset"),
            std::string::npos);
  // A tokenizer without unk or byte fallback cannot encode an unknown character.
  std::ofstream(path, std::ios::trunc) << R"({"model": {"type": "BPE", )" + vocab + R"(, "merges": [["a", "b"]]}})";
  const HfTokenizer tiny(path);
  EXPECT_EQ(tiny.encode("abba", false), (std::vector<int>{2, 1, 0}));
  EXPECT_NE(error_of([&] { tiny.encode("abc", false); }).find("cannot encode 'c'"), std::string::npos);
  EXPECT_NE(error_of([&] { tiny.decode({7}); }).find("token id 7 outside [0, 3)"), std::string::npos);
  fs::remove_all(dir);
  EXPECT_NE(error_of([] { lexico::load_tokenizer("/nonexistent/tokenizer.txt"); }).find("not a tokenizer"),
            std::string::npos);
}

TEST(Tokenizer, LoadPicksTheFormat) {
  EXPECT_EQ(lexico::load_tokenizer(LEXICO_REPO_DATA "/stories260k/tok512.bin")->vocab_size(), 512);
  EXPECT_EQ(lexico::load_tokenizer(LEXICO_REPO_DATA "/tinystories-656k")->vocab_size(), 2048);
}

}  // namespace
