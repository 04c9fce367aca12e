#include <gtest/gtest.h>

#include "test_util.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
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

// The in-memory entry points tokenize exactly as the file readers they stand behind.
TEST(Tokenizer, InMemoryMatchesFiles) {
  const std::string dir = LEXICO_REPO_DATA "/tinystories-656k";
  const HfTokenizer from_file(dir + "/tokenizer.json");
  const HfTokenizer from_text(read_text(dir + "/tokenizer.json"), read_text(dir + "/tokenizer_config.json"),
                              dir + "/tokenizer.json");
  const std::string bin = LEXICO_REPO_DATA "/stories260k/tok512.bin";
  const std::string bin_bytes = read_text(bin);
  const Llama2cTokenizer l2c_file(bin);
  const Llama2cTokenizer l2c_memory(lexico::MemoryBytes(bin_bytes, "tok512 in memory"));
  const std::string prompt = read_text(dir + "/golden/prompt.txt");
  for (const std::string& s : {samples[0], samples[3], samples[5], prompt}) {
    EXPECT_EQ(from_text.encode(s), from_file.encode(s));
    EXPECT_EQ(l2c_memory.encode(s), l2c_file.encode(s));
  }
  EXPECT_EQ(from_text.bos_id(), from_file.bos_id());
  EXPECT_EQ(from_text.eos_id(), from_file.eos_id());
  const std::vector<int> ids = from_file.encode(prompt);
  EXPECT_EQ(from_text.decode(ids), from_file.decode(ids));
  // Without its tokenizer_config.json, BOS comes from the post-processor's template.
  EXPECT_EQ(HfTokenizer(read_text(dir + "/tokenizer.json"), std::nullopt).bos_id(), from_file.bos_id());
  EXPECT_NE(error_of([&] { l2c_memory.piece(512); }).find("tok512 in memory: token id 512"), std::string::npos);
}

// A tokenizer.json in memory, named "mem/tokenizer.json" in its errors.
HfTokenizer hf(const std::string& json) { return HfTokenizer(json, std::nullopt, "mem/tokenizer.json"); }
std::string hf_error(const std::string& json) {
  return error_of([&] { hf(json); });
}
const std::string tiny_model = R"("model": {"type": "BPE", "vocab": {"<unk>": 0, "a": 1, "x": 2, " ": 3}, "merges": [], "unk_token": "<unk>"})";
std::string replace(const std::string& pattern, const std::string& content) {
  return R"({"type": "Replace", "pattern": {"String": ")" + pattern + R"("}, "content": ")" + content + R"("})";
}

TEST(HfTokenizer, AddedTokenNormalizedToNothingIsRefused) {
  // It would match at every position without consuming text: encode never ended.
  const std::string message = hf_error("{" + tiny_model + R"(, "normalizer": )" + replace("x", "") +
                                       R"(, "added_tokens": [{"id": 4, "content": "x", "normalized": true}]})");
  EXPECT_NE(message.find("mem/tokenizer.json: added_tokens: token 4 'x' normalizes to the empty string"),
            std::string::npos)
      << message;
  // Matched in the raw text, it is a token like any other.
  const HfTokenizer raw = hf("{" + tiny_model + R"(, "normalizer": )" + replace("x", "") +
                             R"(, "added_tokens": [{"id": 4, "content": "x", "normalized": false}]})");
  EXPECT_EQ(raw.encode("axa", false), (std::vector<int>{1, 4, 1}));
}

TEST(HfTokenizer, StripDecoderIsBoundedByTheText) {
  const std::string strip = R"({"type": "Strip", "content": " ", "start": 9223372036854775807, "stop": 1})";
  const HfTokenizer tok = hf("{" + tiny_model + R"(, "decoder": )" + strip + "}");
  // Every leading space of each token goes, however large `start` is; one trailing space.
  EXPECT_EQ(tok.decode({3, 3, 1, 3}), "a");
  const std::string fused = R"({"type": "Sequence", "decoders": [{"type": "Fuse"}, )" + strip + "]}";
  EXPECT_EQ(hf("{" + tiny_model + R"(, "decoder": )" + fused + "}").decode({3, 3, 1, 3, 3}), "a ");
  EXPECT_NE(hf_error("{" + tiny_model + R"(, "decoder": {"type": "Strip", "content": "", "start": 9223372036854775807, "stop": 0}})")
                .find("mem/tokenizer.json: decoder.content: '' is not one character"),
            std::string::npos);
  EXPECT_NE(hf_error("{" + tiny_model + R"(, "decoder": {"type": "Strip", "content": " ", "start": -1, "stop": 0}})")
                .find("mem/tokenizer.json: decoder: negative start (-1)"),
            std::string::npos);
}

TEST(HfTokenizer, GrowingChainsAreRefused) {
  // Replace "a" -> "aa" doubles a text; chained, it grew a short text 2^24 x.
  std::string chain;
  for (int i = 0; i < 24; ++i) chain += (i ? ", " : "") + replace("a", "aa");
  const std::string message = hf_error("{" + tiny_model + R"(, "normalizer": {"type": "Sequence", "normalizers": [)" +
                                       chain + "]}}");
  EXPECT_NE(message.find("mem/tokenizer.json: normalizer.normalizers[4]: the chain up to here can make a text 32 x"),
            std::string::npos)
      << message;
  // Decoders too (every id's piece would grow), and a long Prepend.
  EXPECT_NE(hf_error("{" + tiny_model + R"(, "decoder": {"type": "Sequence", "decoders": [)" + replace("a", "aaaaa") +
                     ", " + replace("a", "aaaaa") + "]}}")
                .find("decoder.decoders[1]: the chain up to here can make a text 25 x"),
            std::string::npos);
  EXPECT_NE(hf_error("{" + tiny_model + R"(, "normalizer": {"type": "Prepend", "prepend": ")" + std::string(300, 'a') +
                     R"("}})")
                .find("normalizer: the chain up to here can make a text 1 x its length + 300 bytes"),
            std::string::npos);
  EXPECT_NE(hf_error("{" + tiny_model + R"(, "normalizer": )" + replace("", "a") + "}").find("normalizer.pattern: empty pattern"),
            std::string::npos);
  std::string fuses = R"({"type": "Fuse"})";
  for (int i = 0; i < 64; ++i) fuses += R"(, {"type": "Fuse"})";
  EXPECT_NE(hf_error("{" + tiny_model + R"(, "decoder": {"type": "Sequence", "decoders": [)" + fuses + "]}}")
                .find("decoder.decoders[64]: more than 64 steps in the chain"),
            std::string::npos);
  // Four doublings stay within the limit and replace left to right, without overlaps.
  const HfTokenizer four = hf("{" + tiny_model + R"(, "normalizer": {"type": "Sequence", "normalizers": [)" +
                              replace("a", "aa") + ", " + replace("a", "aa") + ", " + replace("aaa", "x") + "]}}");
  EXPECT_EQ(four.encode("aa", false), (std::vector<int>{2, 2, 1, 1}));  // aaaaaaaa -> xx aa
}

TEST(HfTokenizer, IdsAreCheckedBeforeNarrowing) {
  // 4294967297 = 2^32 + 1 used to load as id 1.
  EXPECT_NE(hf_error(R"({"model": {"type": "BPE", "vocab": {"<unk>": 0, "a": 4294967297, "x": 2}, "merges": []}})")
                .find("mem/tokenizer.json: model.vocab 'a': id 4294967297 outside [0, 2147483647)"),
            std::string::npos);
  EXPECT_NE(hf_error("{" + tiny_model + R"(, "added_tokens": [{"id": -4294967295, "content": "b"}]})")
                .find("mem/tokenizer.json: added_tokens[0].id: id -4294967295 outside"),
            std::string::npos);
}

TEST(HfTokenizer, IdsAreCheckedBeforeTheyAllocate) {
  // One id of 2^24 - 1 cost 519 MB of empty pieces before the gap below it was found.
  const auto start = std::chrono::steady_clock::now();
  EXPECT_NE(hf_error(R"({"model": {"type": "BPE", "vocab": {"<unk>": 16777215}, "merges": []}})")
                .find("mem/tokenizer.json: model.vocab and added_tokens: no token has id 0 (ids run from 0 without a "
                      "gap; the largest is 16777215)"),
            std::string::npos);
  EXPECT_NE(hf_error("{" + tiny_model + R"(, "added_tokens": [{"id": 5, "content": "b"}]})").find("no token has id 4"),
            std::string::npos);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 0.5);
  // An added token may repeat a vocabulary entry under its id, not under another.
  EXPECT_EQ(hf("{" + tiny_model + R"(, "added_tokens": [{"id": 1, "content": "a"}]})").vocab_size(), 4);
  EXPECT_NE(hf_error("{" + tiny_model + R"(, "added_tokens": [{"id": 1, "content": "b"}]})").find("id 1 names both 'a' and 'b'"),
            std::string::npos);
}

TEST(HfTokenizer, FilesAboveTheirCapsAreRefusedUnread) {
  const fs::path dir = fs::temp_directory_path() / "lexico_hf_tokenizer_caps";
  fs::create_directories(dir);
  const std::string json = (dir / "tokenizer.json").string(), config = (dir / "tokenizer_config.json").string();
  std::ofstream(json) << "{" << tiny_model << "}";
  std::ofstream(config) << "{}";
  EXPECT_EQ(HfTokenizer(json).vocab_size(), 4);
  fs::resize_file(config, HfTokenizer::max_config_bytes + 1);  // sparse: nothing is written
  EXPECT_NE(error_of([&] { HfTokenizer t(json); })
                .find(config + ": " + std::to_string(HfTokenizer::max_config_bytes + 1) + " bytes, above the limit of " +
                      std::to_string(HfTokenizer::max_config_bytes)),
            std::string::npos);
  fs::remove(config);
  fs::resize_file(json, HfTokenizer::max_json_bytes + 1);
  EXPECT_NE(error_of([&] { HfTokenizer t(json); }).find(json + ": 67108865 bytes, above the limit of 67108864"),
            std::string::npos);
  fs::remove_all(dir);
}

// Replace runs in one pass: 1 MiB of text, every byte a match that grows, encodes in
// well under a second (in place, each match moved the rest of the text: hours).
TEST(HfTokenizer, ReplaceIsLinear) {
  const HfTokenizer tok = hf("{" + tiny_model + R"(, "normalizer": )" + replace(" ", "xx") + "}");
  const std::string text(1 << 20, ' ');
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int> ids = tok.encode(text, false);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(ids, std::vector<int>(2 * text.size(), 2));
  EXPECT_LT(seconds, 5.0);
  std::printf("  1 MiB encoded in %.3f s\n", seconds);
}

// Knuth-Morris-Pratt against the obvious search, on texts where naive matching backtracks.
TEST(HfTokenizer, ReplaceMatchesLeftToRightWithoutOverlaps) {
  std::uint32_t seed = 12345;
  auto next = [&] { return seed = seed * 1664525u + 1013904223u; };
  for (int trial = 0; trial < 2000; ++trial) {
    std::string text(next() % 40, 'a'), pattern(1 + next() % 5, 'a');
    for (char& c : text) c = "aab"[next() % 3];
    for (char& c : pattern) c = "aab"[next() % 3];
    std::string expected;
    for (std::size_t i = 0; i < text.size();) {
      if (text.compare(i, pattern.size(), pattern) == 0) {
        expected += "<>";
        i += pattern.size();
      } else {
        expected += text[i++];
      }
    }
    ASSERT_EQ(lexico::detail::replace_all(text, lexico::detail::Literal(pattern), "<>"), expected)
        << text << " / " << pattern;
  }
}

TEST(Llama2cTokenizer, FileAboveItsCapIsRefusedUnread) {
  const fs::path dir = fs::temp_directory_path() / "lexico_llama2c_caps";
  fs::create_directories(dir);
  const std::string path = (dir / "tokenizer.bin").string();
  std::ofstream(path, std::ios::binary) << read_text(LEXICO_REPO_DATA "/stories260k/tok512.bin");
  fs::resize_file(path, Llama2cTokenizer::max_file_bytes + 1);
  EXPECT_NE(error_of([&] { Llama2cTokenizer t(path); }).find(path + ": 16777217 bytes, above the limit of 16777216"),
            std::string::npos);
  fs::remove_all(dir);
}

TEST(Tokenizer, LoadPicksTheFormat) {
  EXPECT_EQ(lexico::load_tokenizer(LEXICO_REPO_DATA "/stories260k/tok512.bin")->vocab_size(), 512);
  EXPECT_EQ(lexico::load_tokenizer(LEXICO_REPO_DATA "/tinystories-656k")->vocab_size(), 2048);
}

}  // namespace
