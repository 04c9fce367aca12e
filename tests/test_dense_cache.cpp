// The dense cache and the attention kernels against a naive attention written here.
#include <lexico/cache/dense.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "cache_test_util.hpp"

namespace {

using lexico::RowMatrix;

using lexico_test::random_rows;

// Softmax attention of one query over tokens 0..last, in double, one head at a time.
Eigen::VectorXd naive_attention(const Eigen::VectorXd& q, const Eigen::MatrixXd& keys, const Eigen::MatrixXd& values,
                                Eigen::Index last) {
  Eigen::VectorXd scores = keys.topRows(last + 1) * q / std::sqrt(static_cast<double>(q.size()));
  scores = (scores.array() - scores.maxCoeff()).exp();
  scores /= scores.sum();
  return values.topRows(last + 1).transpose() * scores;
}

struct Block {
  int q_heads, kv_heads, head_dim;
  Eigen::Index tokens;
  RowMatrix queries, keys, values;
};

Block random_block(int q_heads, int kv_heads, int head_dim, Eigen::Index tokens, unsigned seed) {
  std::mt19937 rng(seed);
  return {q_heads, kv_heads, head_dim, tokens, random_rows(tokens, q_heads * head_dim, rng),
          random_rows(tokens, kv_heads * head_dim, rng), random_rows(tokens, kv_heads * head_dim, rng)};
}

// The naive reference for query head h at token t.
Eigen::VectorXd expected(const Block& b, int h, Eigen::Index t) {
  const int kv = h / (b.q_heads / b.kv_heads);
  const Eigen::VectorXd q = b.queries.row(t).segment(h * b.head_dim, b.head_dim).transpose().cast<double>();
  const Eigen::MatrixXd k = b.keys.middleCols(kv * b.head_dim, b.head_dim).cast<double>();
  const Eigen::MatrixXd v = b.values.middleCols(kv * b.head_dim, b.head_dim).cast<double>();
  return naive_attention(q, k, v, t);
}

TEST(Attention, CausalBlockMatchesNaiveWithGqa) {
  const Block b = random_block(6, 2, 16, 37, 1);
  RowMatrix out(b.tokens, b.q_heads * b.head_dim);
  lexico::causal_attention(b.queries, b.keys, b.values, b.head_dim, out);
  for (Eigen::Index t = 0; t < b.tokens; ++t)
    for (int h = 0; h < b.q_heads; ++h) {
      const Eigen::VectorXd want = expected(b, h, t);
      for (int i = 0; i < b.head_dim; ++i) EXPECT_NEAR(out(t, h * b.head_dim + i), want(i), 1e-5) << t << " " << h;
    }
}

TEST(Attention, SoftmaxIsStableForHugeScores) {
  float scores[3] = {1e30f, 1e30f, -1e30f};
  lexico::softmax_rows(scores, 1, 3, 3, 1.0f);
  EXPECT_FLOAT_EQ(scores[0], 0.5f);
  EXPECT_FLOAT_EQ(scores[1], 0.5f);
  EXPECT_LE(scores[2], 1e-37f);  // e^-87 is where the exponential flushes
}

template <typename Scalar>
void check_decode_matches_naive(double tolerance) {
  const Block b = random_block(8, 2, 32, 50, 2);
  lexico::DenseCache<Scalar> cache({3, b.kv_heads, b.head_dim});
  // The stored (rounded) values are the reference for 16-bit storage.
  Block rounded = b;
  for (Eigen::Index i = 0; i < rounded.keys.size(); ++i) {
    rounded.keys.data()[i] = static_cast<float>(Scalar(b.keys.data()[i]));
    rounded.values.data()[i] = static_cast<float>(Scalar(b.values.data()[i]));
  }
  RowMatrix out(b.q_heads, b.head_dim);
  for (Eigen::Index t = 0; t < b.tokens; ++t) {
    RowMatrix q = Eigen::Map<const RowMatrix>(b.queries.row(t).data(), b.q_heads, b.head_dim);
    cache.decode(1, b.keys.row(t).data(), b.values.row(t).data(), q, out);
    for (int h = 0; h < b.q_heads; ++h) {
      const Eigen::VectorXd want = expected(rounded, h, t);
      for (int i = 0; i < b.head_dim; ++i) ASSERT_NEAR(out(h, i), want(i), tolerance) << t << " " << h;
    }
  }
  EXPECT_EQ(cache.seen(1), b.tokens);
  EXPECT_EQ(cache.seen(0), 0);
  // Payload only: T tokens x kv_width x sizeof(Scalar) for K and for V.
  EXPECT_EQ(cache.bytes().total(), static_cast<std::size_t>(2 * b.tokens * b.kv_heads * b.head_dim) * sizeof(Scalar));
  EXPECT_NEAR(cache.kv_size_fraction(), sizeof(Scalar) / 2.0, 1e-12);
}

TEST(DenseCache, DecodeMatchesNaiveFp32) { check_decode_matches_naive<float>(1e-5); }
TEST(DenseCache, DecodeMatchesNaiveFp16) { check_decode_matches_naive<Eigen::half>(1e-4); }
TEST(DenseCache, DecodeMatchesNaiveBf16) { check_decode_matches_naive<Eigen::bfloat16>(1e-4); }

// Decode attention over a long context goes through streamed_decode_attention: blocks of
// 512 tokens with an online softmax, parts of 4,096 tokens merged by log-sum-exp. Keys
// whose norm grows along the context make the running maximum grow in most blocks (every
// rescale is exercised), and the spread of scores makes early weights underflow. Checked
// against a double-precision softmax, with the log-sum-exp, and for equal results on 1
// and 2 threads (parts do not depend on the thread count). A head's 9,000 x 128 fp16 rows
// (2.3 MB) take the large-page blocks of LargePageAllocator, and the kernels' prefetch runs
// past each head's last row.
TEST(DenseCache, LongContextDecodeMatchesNaiveAndIsThreadInvariant) {
  const int q_heads = 6, kv_heads = 2, d = 128, group = q_heads / kv_heads;
  const Eigen::Index tokens = 9000;  // three parts, the last one partial
  std::mt19937 rng(41);
  RowMatrix keys = random_rows(tokens, kv_heads * d, rng), values = random_rows(tokens, kv_heads * d, rng);
  for (Eigen::Index t = 0; t < tokens; ++t) keys.row(t) *= 1.0f + 15.0f * static_cast<float>(t) / tokens;
  const RowMatrix queries = random_rows(q_heads, d, rng);
  RowMatrix rounded_keys = keys, rounded_values = values;
  for (Eigen::Index i = 0; i < keys.size(); ++i) {
    rounded_keys.data()[i] = static_cast<float>(Eigen::half(keys.data()[i]));
    rounded_values.data()[i] = static_cast<float>(Eigen::half(values.data()[i]));
  }
  RowMatrix outputs[2];
  std::vector<float> lse[2];
  lexico::TokenStore<Eigen::half> key_store(kv_heads, d), value_store(kv_heads, d);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    key_store.append(keys.row(t).data());
    value_store.append(values.row(t).data());
  }
  for (int threads : {1, 2}) {
    outputs[threads - 1].resize(q_heads, d);
    lse[threads - 1].resize(q_heads);
    lexico::detail::attend_stores(key_store, value_store, tokens, queries, outputs[threads - 1],
                                  lse[threads - 1].data(), threads);
  }
  EXPECT_EQ((outputs[0] - outputs[1]).cwiseAbs().maxCoeff(), 0.0f);
  EXPECT_EQ(lse[0], lse[1]);
  // The cache's own decode step takes the same path.
  lexico::DenseCache<Eigen::half> cache({1, kv_heads, d});
  cache.append(0, 0, keys, values);
  RowMatrix out(q_heads, d);
  cache.attend(0, queries, out);
  EXPECT_EQ((out - outputs[0]).cwiseAbs().maxCoeff(), 0.0f);
  for (int h = 0; h < q_heads; ++h) {
    const int kv = h / group;
    const Eigen::VectorXd q = queries.row(h).transpose().cast<double>();
    Eigen::VectorXd scores = rounded_keys.middleCols(kv * d, d).cast<double>() * q / std::sqrt(static_cast<double>(d));
    const double top = scores.maxCoeff();
    const Eigen::VectorXd weights = (scores.array() - top).exp();
    EXPECT_GT(weights.minCoeff(), 0.0);
    EXPECT_LT(weights.head(128).maxCoeff(), 1e-10) << "the early tokens should underflow against the late ones";
    const Eigen::VectorXd want = rounded_values.middleCols(kv * d, d).cast<double>().transpose() * weights / weights.sum();
    for (int i = 0; i < d; ++i) ASSERT_NEAR(outputs[0](h, i), want(i), 5e-4) << h << " " << i;
    EXPECT_NEAR(lse[0][static_cast<std::size_t>(h)], top + std::log(weights.sum()), 1e-3) << h;
  }
}

TEST(DenseCache, PrefillThenDecodeEqualsTokenByToken) {
  const Block b = random_block(4, 2, 16, 40, 3);
  lexico::DenseCache<float> block_cache({1, 2, 16}), step_cache({1, 2, 16});
  const Eigen::Index split = 25;
  RowMatrix block_out(split, b.q_heads * b.head_dim), step_out(split, b.q_heads * b.head_dim);
  block_cache.prefill(0, b.keys.topRows(split), b.values.topRows(split), b.queries.topRows(split), block_out);
  // A layer that already holds tokens takes the block as a chunk: attention to the held
  // tokens merged with the block's own causal attention.
  step_cache.prefill(0, b.keys.topRows(1), b.values.topRows(1), b.queries.topRows(1), step_out.topRows(1));
  step_cache.prefill(0, b.keys.middleRows(1, split - 1), b.values.middleRows(1, split - 1),
                     b.queries.middleRows(1, split - 1), step_out.bottomRows(split - 1));
  EXPECT_LT((block_out - step_out).cwiseAbs().maxCoeff(), 1e-5f);
  RowMatrix a(b.q_heads, b.head_dim), c(b.q_heads, b.head_dim);
  for (Eigen::Index t = split; t < b.tokens; ++t) {
    RowMatrix q = Eigen::Map<const RowMatrix>(b.queries.row(t).data(), b.q_heads, b.head_dim);
    block_cache.decode(0, b.keys.row(t).data(), b.values.row(t).data(), q, a);
    step_cache.decode(0, b.keys.row(t).data(), b.values.row(t).data(), q, c);
    EXPECT_LT((a - c).cwiseAbs().maxCoeff(), 1e-5f);
  }
}

// A sliding window through erase_front() against a plain copy of the window: same rows
// at every step, and storage bounded by a small multiple of the window (the erased rows
// are compacted away once they outnumber the held ones).
TEST(TokenStore, EraseFrontSlidesAWindowInBoundedStorage) {
  constexpr int heads = 2, d = 32, window = 5;
  lexico::TokenStore<Eigen::half> store(heads, d);
  std::mt19937 rng(4);
  const RowMatrix tokens = random_rows(400, heads * d, rng);
  std::size_t largest = 0;
  for (Eigen::Index t = 0; t < tokens.rows(); ++t) {
    store.append(tokens.row(t).data());
    if (store.tokens() > window) store.erase_front(t % 3 == 0 ? 2 : 1);
    const Eigen::Index held = store.tokens(), first = t + 1 - held;
    ASSERT_LE(held, window);
    ASSERT_EQ(store.bytes(), static_cast<std::size_t>(held * heads * d) * sizeof(Eigen::half));
    for (int h = 0; h < heads; ++h) {
      ASSERT_EQ(store.head_tokens(h), held);
      for (Eigen::Index i = 0; i < held; ++i) {
        float row[d];
        store.row(h, i, row);
        for (int c = 0; c < d; ++c)
          ASSERT_EQ(row[c], static_cast<float>(Eigen::half(tokens(first + i, h * d + c)))) << t << " " << h << " " << i;
      }
    }
    largest = std::max(largest, store.overhead_bytes());
  }
  // Held plus erased rows stay below 2 windows + 2, capacity below twice that.
  EXPECT_LE(largest, 4 * static_cast<std::size_t>((window + 2) * heads * d) * sizeof(Eigen::half) +
                        2 * sizeof(std::vector<Eigen::half>));
  EXPECT_THROW(store.erase_front(window + 1), lexico::error);
}

// erase_back(), truncate() and per-head erase() after the front moved: the rows left are
// the ones a plain copy keeps, and scores/accumulate read them.
TEST(TokenStore, EraseBackTruncateAndPerHeadErase) {
  constexpr int heads = 2, d = 16;
  lexico::TokenStore<float> store(heads, d);
  RowMatrix tokens(10, heads * d);
  for (Eigen::Index t = 0; t < 10; ++t) tokens.row(t).setConstant(static_cast<float>(t));
  for (Eigen::Index t = 0; t < 10; ++t) store.append(tokens.row(t).data());
  store.erase_front(3);  // 3..9
  store.erase_back(2);   // 3..7
  EXPECT_EQ(store.tokens(), 5);
  store.truncate(4);     // 3..6
  EXPECT_EQ(store.tokens(), 4);
  EXPECT_THROW(store.truncate(5), lexico::error);
  EXPECT_THROW(store.erase_back(5), lexico::error);
  store.erase(1, 1);     // head 1: 3, 5, 6
  const auto first_column = [&](int h) {
    std::vector<float> values;
    float row[d];
    for (Eigen::Index t = 0; t < store.head_tokens(h); ++t) {
      store.row(h, t, row);
      values.push_back(row[0]);
    }
    return values;
  };
  EXPECT_EQ(first_column(0), (std::vector<float>{3, 4, 5, 6}));
  EXPECT_EQ(first_column(1), (std::vector<float>{3, 5, 6}));
  // Attention reads the same rows: one query of ones scores each token at 16 x its value.
  float query[d];
  std::fill_n(query, d, 1.0f);
  float scores[3];
  store.scores(1, query, 1, scores, 3);
  EXPECT_EQ(std::vector<float>(scores, scores + 3), (std::vector<float>{48, 80, 96}));
  const float weights[3] = {0.5f, 0.25f, 0.25f};
  float out[d] = {};
  store.accumulate(1, weights, 3, 1, out);
  EXPECT_EQ(out[0], 0.5f * 3 + 0.25f * 5 + 0.25f * 6);
  store.clear();
  EXPECT_EQ(store.tokens(), 0);
  EXPECT_EQ(store.bytes(), 0u);
  store.append(tokens.row(9).data());
  EXPECT_EQ(first_column(0), (std::vector<float>{9}));
}

// Truncation of a dense cache is exact at any length, including into a prefill.
TEST(DenseCache, TruncateIsExactAtAnyLength) {
  const Block b = random_block(4, 2, 16, 30, 5);
  for (Eigen::Index n = 0; n <= 20; n += 4) {
    lexico::DenseCache<Eigen::bfloat16> cache({1, 2, 16}), reference({1, 2, 16});
    RowMatrix out(20, b.q_heads * b.head_dim);
    cache.prefill(0, b.keys.topRows(20), b.values.topRows(20), b.queries.topRows(20), out);
    EXPECT_EQ(cache.truncate_floor(0), 0);
    cache.truncate(n);
    if (n > 0) reference.prefill(0, b.keys.topRows(n), b.values.topRows(n), b.queries.topRows(n), out.topRows(n));
    EXPECT_EQ(cache.bytes().total(), reference.bytes().total());
    RowMatrix a(b.q_heads, b.head_dim), c(b.q_heads, b.head_dim);
    for (Eigen::Index t = n; t < b.tokens; ++t) {
      RowMatrix q = Eigen::Map<const RowMatrix>(b.queries.row(t).data(), b.q_heads, b.head_dim);
      cache.decode(0, b.keys.row(t).data(), b.values.row(t).data(), q, a);
      reference.decode(0, b.keys.row(t).data(), b.values.row(t).data(), q, c);
      ASSERT_EQ(a, c) << "n = " << n << ", t = " << t;
    }
  }
}

TEST(DenseCache, BadShapesRaise) {
  lexico::DenseCache<float> cache({2, 2, 8});
  RowMatrix q(3, 8), out(3, 8);  // 3 query heads cannot share 2 KV heads
  const float token[16] = {};
  cache.append(0, token, token);
  EXPECT_THROW(cache.attend(0, q, out), lexico::error);
  RowMatrix q4(4, 8), out4(4, 8);
  EXPECT_THROW(cache.attend(1, q4, out4), lexico::error);  // empty layer
  EXPECT_THROW(cache.append(2, token, token), lexico::error);
  EXPECT_THROW(lexico::DenseCache<float>({0, 2, 8}), lexico::error);
}

}  // namespace

// The fp16 decode kernels against a naive double loop: every row count around the
// 16-row blocks, every GQA group up to 8, head sizes 16 to 256.
// Blocks of 2 MiB or more are 2 MiB aligned; a vector that grows from small blocks into
// large ones (and shrinks back) keeps its contents.
TEST(LargePageAllocator, AlignsLargeBlocksAndKeepsContentsAcrossGrowth) {
  lexico::LargePageAllocator<float> allocator;
  float* large = allocator.allocate(3 << 18);  // 3 MiB
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(large) % lexico::LargePageAllocator<float>::page, 0u);
  std::fill(large, large + (3 << 18), 2.0f);
  EXPECT_EQ(large[(3 << 18) - 1], 2.0f);
  allocator.deallocate(large, 3 << 18);
  std::vector<std::uint16_t, lexico::LargePageAllocator<std::uint16_t>> rows;
  for (std::uint32_t i = 0; i < (3u << 20); ++i) rows.push_back(static_cast<std::uint16_t>(i * 2654435761u >> 16));
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(rows.data()) % lexico::LargePageAllocator<float>::page, 0u);
  for (std::uint32_t i = 0; i < (3u << 20); i += 4099)
    ASSERT_EQ(rows[i], static_cast<std::uint16_t>(i * 2654435761u >> 16));
  rows.resize(1000);
  rows.shrink_to_fit();
  for (std::uint32_t i = 0; i < 1000; ++i) ASSERT_EQ(rows[i], static_cast<std::uint16_t>(i * 2654435761u >> 16));
  EXPECT_THROW(allocator.allocate(static_cast<std::size_t>(-1) / 2), std::bad_array_new_length);
}

TEST(Kernels, NonzeroRowsListsEveryRowWithAWeight) {
  // The value combination's list of atoms in use, against the plain definition: the
  // vector path (m = 1, 2, 4, 8, 16), its tail and the portable path (m = 3, 5), rows that
  // are nonzero in one column only, -0.0 (counts as zero) and NaN (counts as a weight).
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (int m : {1, 2, 3, 4, 5, 8, 16})
    for (long n : {0L, 1L, 3L, 17L, 4096L})
      for (float density : {0.0f, 0.05f, 0.5f, 1.0f}) {
        std::vector<float> weights(static_cast<std::size_t>(n * m), 0.0f);
        for (long r = 0; r < n; ++r)
          if (uniform(rng) < density) weights[static_cast<std::size_t>(r * m + static_cast<long>(uniform(rng) * m) % m)] = uniform(rng) + 0.1f;
        if (n > 2) weights[static_cast<std::size_t>(m)] = -0.0f, weights[static_cast<std::size_t>(2 * m)] = std::nanf("");
        std::vector<int> want, got = {-1};
        for (long r = 0; r < n; ++r) {
          bool any = false;
          for (int g = 0; g < m; ++g) any = any || weights[static_cast<std::size_t>(r * m + g)] != 0.0f;
          if (any) want.push_back(static_cast<int>(r));
        }
        want.insert(want.begin(), -1);  // appends after what the list held
        lexico::detail::nonzero_rows(weights.data(), n, m, got);
        ASSERT_EQ(got, want) << "m " << m << " n " << n << " density " << density;
      }
}

TEST(Kernels, Fp16CombinationMatchesNaive) {
  // The value combination over the atoms in use: passes of 64 columns (m <= 4) and of 32,
  // column ranges that start inside a row, every output count up to 8.
  std::mt19937 rng(17);
  std::normal_distribution<float> normal;
  const int d = 128, n = 300;
  std::vector<Eigen::half> rows(static_cast<std::size_t>(n * d));
  for (auto& x : rows) x = Eigen::half(normal(rng));
  std::vector<int> atoms;
  for (int a = 0; a < n; a += 1 + a % 3) atoms.push_back(a);
  for (int m = 1; m <= 8; ++m)
    for (int width : {32, 64, 128})
      for (int first_column : {0, 64}) {
        if (first_column + width > d) continue;
        std::vector<float> weights(static_cast<std::size_t>(n * m)), out(static_cast<std::size_t>(m * d), -7.0f);
        for (auto& w : weights) w = normal(rng);
        const auto* raw = reinterpret_cast<const std::uint16_t*>(rows.data()) + first_column;
        if (!lexico::detail::fp16_combination(raw, d, width, atoms.data(), static_cast<long>(atoms.size()), weights.data(),
                                              m, out.data() + first_column))
          GTEST_SKIP() << "no AVX-512";
        for (int g = 0; g < m; ++g)
          for (int c = 0; c < d; ++c) {
            const float got = out[static_cast<std::size_t>(g * d + c)];
            if (c < first_column || c >= first_column + width) {
              ASSERT_EQ(got, -7.0f) << "column " << c << " outside the range was written";
              continue;
            }
            double want = 0;
            for (int a : atoms) want += static_cast<double>(weights[static_cast<std::size_t>(a * m + g)]) *
                                        static_cast<double>(rows[static_cast<std::size_t>(a * d + c)]);
            ASSERT_NEAR(got, want, 1e-4 * (1 + std::fabs(want))) << "m " << m << " width " << width << " column " << c;
          }
      }
}

TEST(TokenStore, Fp16KernelsMatchNaive) {
  std::mt19937 rng(31);
  std::normal_distribution<float> normal;
  for (int d : {16, 64, 128, 256})
    for (int group : {1, 2, 3, 4, 6, 8})
      for (long count : {1L, 15L, 16L, 17L, 40L}) {
        std::vector<Eigen::half> rows(static_cast<std::size_t>(count * d));
        for (auto& x : rows) x = Eigen::half(normal(rng));
        std::vector<float> queries(static_cast<std::size_t>(group * d)), p(static_cast<std::size_t>(group * (count + 3)));
        for (auto& x : queries) x = normal(rng);
        for (auto& x : p) x = std::fabs(normal(rng));
        const long ld = count + 3;
        std::vector<float> scores(static_cast<std::size_t>(group * ld), -1.0f), out(static_cast<std::size_t>(group * d));
        for (auto& x : out) x = normal(rng);
        const std::vector<float> out_before = out;
        const auto* raw = reinterpret_cast<const std::uint16_t*>(rows.data());
        if (!lexico::detail::fp16_scores(raw, count, d, queries.data(), group, scores.data(), ld)) GTEST_SKIP() << "no AVX-512";
        ASSERT_TRUE(lexico::detail::fp16_accumulate(raw, count, d, p.data(), ld, group, out.data()));
        for (int g = 0; g < group; ++g) {
          for (long t = 0; t < count; ++t) {
            double want = 0;
            for (int i = 0; i < d; ++i) want += static_cast<double>(rows[t * d + i]) * queries[g * d + i];
            ASSERT_NEAR(scores[g * ld + t], want, 1e-4 * (1 + std::fabs(want))) << d << " " << group << " " << count;
          }
          for (int i = 0; i < d; ++i) {
            double want = out_before[g * d + i];
            for (long t = 0; t < count; ++t) want += static_cast<double>(p[g * ld + t]) * static_cast<double>(rows[t * d + i]);
            ASSERT_NEAR(out[g * d + i], want, 1e-4 * (1 + std::fabs(want))) << d << " " << group << " " << count;
          }
        }
      }
}
