// lexico-eval's per-token output, checked against the same run's own aggregates: the
// sweep pairs runs token by token, so the array must hold exactly the scored tokens, in
// order, and agree with the reported ΔNLL and its standard error.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <lexico/base/json.hpp>

namespace {

struct Output {
  int status = -1;
  std::string text;
};

// Runs a command through the shell and collects its stdout and exit status.
Output run(const std::string& command) {
  Output out;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (!pipe) return out;
  char buffer[4096];
  std::size_t got;
  while ((got = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) out.text.append(buffer, got);
  const int status = pclose(pipe);
  out.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}

std::string eval_command(const std::string& flags) {
  const std::string data = LEXICO_REPO_DATA;
  return std::string(LEXICO_BINARY_DIR) + "/examples/lexico-eval --model " + data +
         "/stories260k/stories260K.bin --text " + data + "/text/tinystories_valid_head.txt --window 64 --windows 3 " +
         flags;
}

std::vector<lexico::json::Value> json_lines(const std::string& text) {
  std::vector<lexico::json::Value> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (!line.empty() && line.front() == '{') lines.push_back(lexico::json::parse(line, "lexico-eval output"));
  return lines;
}

std::vector<double> token_deltas(const lexico::json::Value& result) {
  std::vector<double> deltas;
  for (const auto& v : result.at("token_delta_nll").as_array()) deltas.push_back(v.as_double());
  return deltas;
}

TEST(EvalTool, PerTokenDeltasMatchTheAggregates) {
  const Output out = run(eval_command("--cache dense --cache kivi:bits=2,group=8 --per-token --json"));
  ASSERT_EQ(out.status, 0) << out.text;
  const auto results = json_lines(out.text);
  ASSERT_EQ(results.size(), 2u) << out.text;
  for (const auto& result : results) {
    const std::vector<double> deltas = token_deltas(result);
    const long scored = result.at("scored_tokens").as_int();
    ASSERT_EQ(static_cast<long>(deltas.size()), scored);
    EXPECT_EQ(scored, 3 * (64 - 32 - 1));  // per window: the decoded half, less the last token
    double sum = 0, squares = 0;
    for (double d : deltas) {
      sum += d;
      squares += d * d;
    }
    const double n = static_cast<double>(scored), mean = sum / n;
    EXPECT_NEAR(mean, result.at("delta_nll").as_double(), 2e-6);
    const double se = std::sqrt((squares / n - mean * mean) / (n - 1));
    EXPECT_NEAR(se, result.at("delta_nll_se").as_double(), 2e-6);
  }
  // The dense cache decodes what the reference prefilled: equal up to rounding. 2-bit
  // KIVI moves every prediction.
  for (double d : token_deltas(results[0])) EXPECT_LT(std::abs(d), 1e-4);
  int moved = 0;
  for (double d : token_deltas(results[1])) moved += std::abs(d) > 1e-4;
  EXPECT_GT(moved, 3 * 31 / 2);
}

TEST(EvalTool, PerTokenOnlyWithJson) {
  const Output out = run(eval_command("--cache dense --per-token"));
  EXPECT_EQ(out.status, 2);
  EXPECT_NE(out.text.find("--per-token needs --json"), std::string::npos) << out.text;
  const Output plain = run(eval_command("--cache dense --json"));
  ASSERT_EQ(plain.status, 0) << plain.text;
  const auto results = json_lines(plain.text);
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results[0].find("token_delta_nll"), nullptr);  // off unless asked for
}

// --batch decodes windows in step, each in its own cache: the same tokens in the same
// order with the same scores up to rounding (3 windows in batches of 2: a full batch and
// a lone window), the same KV sizes, and the size averaged over decode steps below the
// size at the end for a cache that grows (KIVI).
TEST(EvalTool, BatchedWindowsScoreAsOneAtATime) {
  const std::string flags = "--cache kivi:bits=2,group=8 --cache tova:budget=0.5 --per-token --json";
  const Output lone = run(eval_command(flags)), batched = run(eval_command(flags + " --batch 2"));
  ASSERT_EQ(lone.status, 0) << lone.text;
  ASSERT_EQ(batched.status, 0) << batched.text;
  const auto a = json_lines(lone.text), b = json_lines(batched.text);
  ASSERT_EQ(a.size(), 2u);
  ASSERT_EQ(b.size(), 2u);
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].at("batch").as_int(), 1);
    EXPECT_EQ(b[i].at("batch").as_int(), 2);
    const std::vector<double> x = token_deltas(a[i]), y = token_deltas(b[i]);
    ASSERT_EQ(x.size(), y.size());
    // GEMM and GEMV round differently, and 2-bit KIVI can turn such a difference into
    // another quantization level; tokens out of order would differ by tenths.
    for (std::size_t t = 0; t < x.size(); ++t) EXPECT_NEAR(x[t], y[t], 2e-3) << "token " << t;
    EXPECT_NEAR(a[i].at("delta_nll").as_double(), b[i].at("delta_nll").as_double(), 2e-4);
    EXPECT_NEAR(a[i].at("mean_kl").as_double(), b[i].at("mean_kl").as_double(), 1e-5);
    EXPECT_EQ(a[i].at("kv_size_fraction").as_double(), b[i].at("kv_size_fraction").as_double());
    EXPECT_EQ(a[i].at("kv_size_fraction_decode_mean").as_double(),
              b[i].at("kv_size_fraction_decode_mean").as_double());
  }
  EXPECT_LT(a[0].at("kv_size_fraction_decode_mean").as_double(), a[0].at("kv_size_fraction").as_double() + 1e-9);
  EXPECT_GT(a[0].at("kv_size_fraction_decode_mean").as_double(), 0.0);
}

// --documents: each window is the first W tokens of one document (a document starts at
// every occurrence of the mark), short documents are passed over, and nothing else is
// windowed; without it the same text gives consecutive windows.
TEST(EvalTool, DocumentWindowsOpenOneDocumentEach) {
  const std::string path = ::testing::TempDir() + "/lexico_documents.txt";
  {
    std::ofstream out(path);
    std::string long_story;
    for (int i = 0; i < 60; ++i) long_story += "the cat sat on a mat and the dog ran. ";
    out << "Prologue that precedes every mark. " << long_story << "\n";
    for (int d = 0; d < 3; ++d) out << "Once upon a time " << long_story << "\nOnce upon a time the end.\n";
  }
  const std::string data = LEXICO_REPO_DATA;
  const std::string base = std::string(LEXICO_BINARY_DIR) + "/examples/lexico-eval --model " + data +
                           "/stories260k/stories260K.bin --text " + path + " --window 64 --windows 20 --json --cache dense";
  const Output documents = run(base + " --documents 'Once upon a time'"), plain = run(base);
  ASSERT_EQ(documents.status, 0) << documents.text;
  ASSERT_EQ(plain.status, 0) << plain.text;
  // The prologue and three long stories open a window each; "the end." is too short.
  EXPECT_EQ(json_lines(documents.text).at(0).at("windows").as_int(), 4);
  EXPECT_EQ(json_lines(plain.text).at(0).at("windows").as_int(), 20);
  const Output empty = run(base + " --documents ''");
  EXPECT_EQ(empty.status, 2);
  EXPECT_NE(empty.text.find("--documents needs a non-empty mark"), std::string::npos) << empty.text;
  const Output none = run(base + " --window 4000 --documents 'Once upon a time'");
  EXPECT_EQ(none.status, 2);
  EXPECT_NE(none.text.find("windows open documents"), std::string::npos) << none.text;
}

// --token-detail names each scored token: the ids are the window's next tokens (a .u16
// corpus written here, so the windows are known: BOS, then the file's tokens in order),
// the same for every cache, and the dense NLLs average to the run's dense mean NLL.
TEST(EvalTool, TokenDetailNamesTheScoredTokens) {
  const std::string path = ::testing::TempDir() + "/lexico_detail.u16";
  std::vector<std::uint16_t> file;
  for (int i = 0; i < 200; ++i) file.push_back(static_cast<std::uint16_t>(3 + (i * 37 + i / 5) % 400));
  {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(file.data()), static_cast<std::streamsize>(file.size() * 2));
  }
  const std::string data = LEXICO_REPO_DATA;
  const std::string base = std::string(LEXICO_BINARY_DIR) + "/examples/lexico-eval --model " + data +
                           "/stories260k/stories260K.bin --tokens " + path +
                           " --window 64 --windows 2 --prefill 40 --cache dense --cache kivi:bits=2,group=8";
  const Output out = run(base + " --json --per-token --token-detail");
  ASSERT_EQ(out.status, 0) << out.text;
  const auto results = json_lines(out.text);
  ASSERT_EQ(results.size(), 2u);
  for (const auto& result : results) {
    const auto& ids = result.at("token_ids").as_array();
    const auto& dense = result.at("token_dense_nll").as_array();
    ASSERT_EQ(ids.size(), 2u * (64 - 40 - 1));
    ASSERT_EQ(dense.size(), ids.size());
    for (std::size_t w = 0; w < 2; ++w)
      for (std::size_t p = 40; p + 1 < 64; ++p)  // position p predicts window token p + 1 = file token w*63 + p
        EXPECT_EQ(ids[w * 23 + p - 40].as_int(), file[w * 63 + p]) << "window " << w << " position " << p;
    double sum = 0;
    for (const auto& v : dense) sum += v.as_double();
    EXPECT_NEAR(sum / static_cast<double>(dense.size()), result.at("dense_mean_nll").as_double(), 1e-5);
  }
  for (std::size_t t = 0; t < results[0].at("token_dense_nll").as_array().size(); ++t)
    EXPECT_EQ(results[0].at("token_dense_nll").as_array()[t].as_double(),
              results[1].at("token_dense_nll").as_array()[t].as_double());
  const Output bare = run(base + " --json --token-detail");
  EXPECT_EQ(bare.status, 2);
  EXPECT_NE(bare.text.find("--token-detail needs --per-token"), std::string::npos) << bare.text;
}

}  // namespace
