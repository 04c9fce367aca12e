// The per-model state and the engine-facing calls of the Lexico cache: one CodeSpace
// shared by many sequences (counted, never copied, safe from several threads), both Gram
// policies giving the same codes, keys handed over before RoPE at explicit positions,
// truncation, chunked prefill and batched decode attention, each against an
// independent reference.
#include <lexico/cache/dense.hpp>
#include <lexico/cache/factory.hpp>
#include <lexico/cache/lexico_cache.hpp>

#include <filesystem>
#include <unistd.h>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "cache_test_util.hpp"
#include "test_util.hpp"

namespace {

using lexico::KeyForm;
using lexico::RowMatrix;
using lexico_test::random_rows;

std::vector<lexico::LayerDictionaries> random_dictionaries(int layers, int d, int n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<lexico::LayerDictionaries> dicts;
  for (int l = 0; l < layers; ++l) {
    Eigen::MatrixXf keys(d, n), values(d, n);
    for (Eigen::Index i = 0; i < keys.size(); ++i) keys.data()[i] = normal(rng), values.data()[i] = normal(rng);
    dicts.push_back({std::make_shared<const lexico::Dictionary>(keys), std::make_shared<const lexico::Dictionary>(values)});
  }
  return dicts;
}

lexico::CodeSpaceOptions with_rope(lexico::CodeSpaceOptions options, int d) {
  options.key_rope = lexico::Rope(d, 10000.0f, lexico::RopeStyle::rotate_half);
  return options;
}

lexico::LexicoOptions small_options() {
  lexico::LexicoOptions options;
  options.key_sparsity = 4;
  options.value_sparsity = 3;
  options.buffer = 6;
  options.flush = 4;
  options.sinks = 2;
  options.tiers = {{5, 8, 6}};
  return options;
}

// Every stored byte and every later attention output of two caches, compared bitwise.
void expect_same_state(lexico::LexicoCache& a, lexico::LexicoCache& b, std::mt19937& rng) {
  const auto& shape = a.shape();
  ASSERT_EQ(a.bytes().total(), b.bytes().total());
  for (int l = 0; l < shape.layers; ++l) {
    ASSERT_EQ(a.seen(l), b.seen(l));
    ASSERT_EQ(a.coded_tokens(l), b.coded_tokens(l));
    ASSERT_EQ(a.buffered_tokens(l), b.buffered_tokens(l));
    const RowMatrix q = random_rows(2 * shape.kv_heads, shape.head_dim, rng);
    RowMatrix out_a(q.rows(), q.cols()), out_b(q.rows(), q.cols());
    a.attend(l, q, out_a);
    b.attend(l, q, out_b);
    ASSERT_EQ((out_a - out_b).cwiseAbs().maxCoeff(), 0.0f) << "layer " << l;
  }
}

// Both Gram policies compute G's entries with one kernel: identical codes.
TEST(CodeBook, GramPoliciesGiveIdenticalCodes) {
  const int d = 32, n = 256;
  const auto dicts = random_dictionaries(1, d, n, 1);
  std::mt19937 rng(2);
  const Eigen::MatrixXf vectors = random_rows(d, 300, rng);
  for (int s : {4, 8, 16}) {
    lexico::OmpOptions options;
    options.sparsity = s;
    const auto full = std::make_shared<const lexico::CodeBook>(dicts[0].keys, lexico::GramPolicy::fp16);
    const auto low = std::make_shared<const lexico::CodeBook>(dicts[0].keys, lexico::GramPolicy::on_demand, 16);
    const lexico::SparseCodes a = lexico::OmpEncoder(full, options).encode(vectors);
    const lexico::SparseCodes b = lexico::OmpEncoder(low, options).encode(vectors);
    EXPECT_EQ(a.indices, b.indices) << "s = " << s;
    EXPECT_EQ(a.coefficients, b.coefficients) << "s = " << s;
    EXPECT_GT(low->column_misses(), 0u);
    EXPECT_GT(low->column_hits(), 0u) << "300 vectors reuse some of their atoms";
    // fp16: N² halves beside the atoms; on_demand: 16 hot columns.
    const std::size_t atoms = sizeof(float) * d * n;
    EXPECT_GE(full->bytes(), 2 * atoms + 2u * n * n);
    EXPECT_LT(low->bytes(), 2 * atoms + 2u * 16 * n + 8u * n + 2 * atoms);
  }
}

// One pool serves encoders on several threads at once; the codes equal a serial run.
TEST(CodeSpace, EncodersShareOnePoolAcrossThreads) {
  const int d = 16, n = 64;
  const lexico::CodeSpace space(random_dictionaries(2, d, n, 3));
  std::mt19937 rng(4);
  const Eigen::MatrixXf vectors = random_rows(d, 200, rng);
  const lexico::SparseCodes serial = space.encoder(1, false, 5, 0.0f).encode(vectors);
  std::vector<lexico::SparseCodes> results(4);
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < results.size(); ++i)
    threads.emplace_back([&, i] { results[i] = space.encoder(1, false, 5, 0.0f).encode(vectors); });
  for (auto& thread : threads) thread.join();
  for (const auto& codes : results) {
    EXPECT_EQ(codes.indices, serial.indices);
    EXPECT_EQ(codes.coefficients, serial.coefficients);
  }
  EXPECT_LE(space.workspaces()->created(), 4u * lexico::thread_budget(0) + 1);
}

// Caches on one CodeSpace, each driven by its own std::thread, hold and attend exactly
// like the same caches run one after another.
void check_caches_on_threads(lexico::GramPolicy policy) {
  const int layers = 2, kv = 2, d = 16, q_heads = 4, tokens = 40, sequences = 4;
  lexico::CodeSpaceOptions space_options = with_rope({}, d);
  space_options.gram = policy;
  space_options.hot_columns = 8;  // on_demand: columns replaced all the time, from every thread
  const auto space = std::make_shared<const lexico::CodeSpace>(random_dictionaries(layers, d, 64, 5), space_options);
  std::vector<RowMatrix> keys, values, queries;
  std::mt19937 rng(6);
  for (int s = 0; s < sequences; ++s) {
    keys.push_back(random_rows(tokens, kv * d, rng));
    values.push_back(random_rows(tokens, kv * d, rng));
    queries.push_back(random_rows(tokens, q_heads * d, rng));
  }
  const auto run = [&](lexico::LexicoCache& cache, int s, RowMatrix& outputs) {
    outputs.resize(tokens * layers, q_heads * d);
    for (Eigen::Index t = 0; t < tokens; ++t)
      for (int l = 0; l < layers; ++l) {
        const Eigen::Map<const RowMatrix> q(queries[static_cast<std::size_t>(s)].row(t).data(), q_heads, d);
        Eigen::Map<RowMatrix> out(outputs.row(t * layers + l).data(), q_heads, d);
        cache.decode(l, keys[static_cast<std::size_t>(s)].row(t).data(), values[static_cast<std::size_t>(s)].row(t).data(),
                     q, out);
      }
  };
  std::vector<std::unique_ptr<lexico::LexicoCache>> serial, parallel;
  std::vector<RowMatrix> serial_out(sequences), parallel_out(sequences);
  for (int s = 0; s < sequences; ++s) {
    serial.push_back(std::make_unique<lexico::LexicoCache>(lexico::CacheShape{layers, kv, d}, space, small_options()));
    parallel.push_back(std::make_unique<lexico::LexicoCache>(lexico::CacheShape{layers, kv, d}, space, small_options()));
    run(*serial.back(), s, serial_out[static_cast<std::size_t>(s)]);
  }
  std::vector<std::thread> threads;
  for (int s = 0; s < sequences; ++s)
    threads.emplace_back([&, s] { run(*parallel[static_cast<std::size_t>(s)], s, parallel_out[static_cast<std::size_t>(s)]); });
  for (auto& thread : threads) thread.join();
  for (int s = 0; s < sequences; ++s) {
    EXPECT_EQ(parallel[static_cast<std::size_t>(s)]->shared_state(), space.get());
    EXPECT_EQ((serial_out[static_cast<std::size_t>(s)] - parallel_out[static_cast<std::size_t>(s)]).cwiseAbs().maxCoeff(), 0.0f)
        << "sequence " << s;
    EXPECT_GT(serial[static_cast<std::size_t>(s)]->coded_tokens(0), 20);
  }
}

TEST(CodeSpace, CachesOnThreadsEqualSerialRuns) { check_caches_on_threads(lexico::GramPolicy::fp16); }
TEST(CodeSpace, CachesOnThreadsEqualSerialRuns_GramOnDemand) { check_caches_on_threads(lexico::GramPolicy::on_demand); }

// Keys handed over before RoPE at positions p0 + i, every token buffered: attention equals
// the dense fp32 cache fed the rotated fp16 keys at the same positions.
TEST(LexicoEngine, KeysBeforeRopeAtAnOffsetAttendLikeDense) {
  const int kv = 2, d = 16, q_heads = 4, tokens = 30;
  const std::int64_t p0 = 1000;
  lexico::LexicoOptions options;
  options.buffer = tokens;
  lexico::LexicoCache cache({1, kv, d}, random_dictionaries(1, d, 32, 7), options, with_rope({}, d));
  lexico::DenseCache<float> dense({1, kv, d});
  std::mt19937 rng(8);
  RowMatrix keys = random_rows(tokens, kv * d, rng);
  const RowMatrix values = random_rows(tokens, kv * d, rng);
  for (Eigen::Index i = 0; i < keys.size(); ++i) keys.data()[i] = static_cast<float>(Eigen::half(keys.data()[i]));
  RowMatrix rotated = keys;
  const lexico::Rope& rope = *cache.key_rope();
  std::vector<float> cos(static_cast<std::size_t>(rope.pairs())), sin(cos.size());
  for (Eigen::Index t = 0; t < tokens; ++t)
    for (int h = 0; h < kv; ++h) {
      rope.angles(p0 + t, cos.data(), sin.data());
      rope.rotate(rotated.row(t).data() + h * d, cos.data(), sin.data());
    }
  cache.append(0, p0, keys.topRows(10), values.topRows(10), KeyForm::unrotated);
  dense.append(0, p0, rotated.topRows(10), values.topRows(10));
  EXPECT_EQ(cache.next_position(0), p0 + 10);
  for (Eigen::Index t = 10; t < tokens; ++t) {
    cache.append(0, p0 + t, keys.middleRows(t, 1), values.middleRows(t, 1), KeyForm::unrotated);
    dense.append(0, rotated.row(t).data(), values.row(t).data());
    const RowMatrix q = random_rows(q_heads, d, rng);
    RowMatrix a(q_heads, d), b(q_heads, d);
    cache.attend(0, q, a);
    dense.attend(0, q, b);
    // fp16 values in the cache; positions off by one would move scores by O(1).
    ASSERT_LT((a - b).cwiseAbs().maxCoeff(), 2e-3f) << "token " << t;
  }
  EXPECT_NE(lexico_test::error_of([&] { cache.append(0, p0, keys.topRows(1), values.topRows(1)); })
                .find("takes its next token at position 1030"),
            std::string::npos);
  lexico::DenseCache<float> plain({1, kv, d});
  EXPECT_NE(lexico_test::error_of([&] { plain.append(0, 0, keys.topRows(1), values.topRows(1), KeyForm::unrotated); })
                .find("stores keys after RoPE"),
            std::string::npos);
}

// Keys before RoPE and the same keys rotated by the caller code the same way.
TEST(LexicoEngine, RotatedAndUnrotatedKeysHoldTheSameCodes) {
  const int kv = 2, d = 16, tokens = 60;
  const std::int64_t p0 = 37;
  const auto space = std::make_shared<const lexico::CodeSpace>(random_dictionaries(1, d, 48, 9), with_rope({}, d));
  lexico::LexicoCache a({1, kv, d}, space, small_options()), b({1, kv, d}, space, small_options());
  std::mt19937 rng(10);
  const RowMatrix keys = random_rows(tokens, kv * d, rng), values = random_rows(tokens, kv * d, rng);
  RowMatrix rotated = keys;
  std::vector<float> cos(static_cast<std::size_t>(d / 2)), sin(cos.size());
  for (Eigen::Index t = 0; t < tokens; ++t) {
    a.append(0, p0 + t, keys.middleRows(t, 1), values.middleRows(t, 1), KeyForm::unrotated);
    space->key_rope()->consecutive_angles(p0 + t, 1, cos.data(), sin.data());
    for (int h = 0; h < kv; ++h) space->key_rope()->rotate(rotated.row(t).data() + h * d, cos.data(), sin.data());
    b.append(0, p0 + t, rotated.middleRows(t, 1), values.middleRows(t, 1), KeyForm::rotated);
  }
  ASSERT_GT(a.coded_tokens(0), 40);
  int same = 0, total = 0;
  for (int h = 0; h < kv; ++h)
    for (int tier = 0; tier < a.code_tiers(); ++tier) {
      std::vector<int> ia, ib;
      a.key_codes(0, h, tier).for_each_row([&](std::size_t, lexico::CodeStore::Indices i, const std::uint8_t*, int c, float) {
        for (int e = 0; e < c; ++e) ia.push_back(i[e]);
      });
      b.key_codes(0, h, tier).for_each_row([&](std::size_t, lexico::CodeStore::Indices i, const std::uint8_t*, int c, float) {
        for (int e = 0; e < c; ++e) ib.push_back(i[e]);
      });
      ASSERT_EQ(ia.size(), ib.size());
      for (std::size_t i = 0; i < ia.size(); ++i) same += ia[i] == ib[i], ++total;
    }
  // Un-rotating a rotated key in fp32 and rounding to fp16 differs from the original in
  // the last bit now and then; the atoms chosen almost never change.
  EXPECT_GT(same, 0.97 * total);
}

// truncate(n) then the same appends again leaves the cache exactly as one that never saw
// the dropped tokens; below the last flush it refuses.
TEST(LexicoEngine, TruncateThenReappendEqualsNeverAppended) {
  const int layers = 2, kv = 2, d = 16, tokens = 42;
  const auto space = std::make_shared<const lexico::CodeSpace>(random_dictionaries(layers, d, 48, 11), with_rope({}, d));
  std::mt19937 rng(12);
  const RowMatrix keys = random_rows(tokens + 5, kv * d, rng), values = random_rows(tokens + 5, kv * d, rng);
  const RowMatrix other = random_rows(5, kv * d, rng);
  lexico::LexicoCache truncated({layers, kv, d}, space, small_options()), fresh({layers, kv, d}, space, small_options());
  for (Eigen::Index t = 0; t < tokens; ++t)
    for (int l = 0; l < layers; ++l) {
      truncated.append(l, keys.row(t).data(), values.row(t).data());
      fresh.append(l, keys.row(t).data(), values.row(t).data());
    }
  const std::int64_t floor = truncated.truncate_floor(0);
  ASSERT_GT(floor, 0);
  ASSERT_LT(floor, tokens);
  // A rejected branch of speculative decoding: a few other tokens, then rolled back.
  const Eigen::Index extra = small_options().buffer - truncated.buffered_tokens(0);  // up to the next flush
  ASSERT_EQ(extra, 2);
  for (Eigen::Index t = 0; t < extra; ++t)
    for (int l = 0; l < layers; ++l) truncated.append(l, other.row(t).data(), other.row(t).data());
  truncated.truncate(tokens);
  for (Eigen::Index t = tokens; t < tokens + 5; ++t)
    for (int l = 0; l < layers; ++l) {
      truncated.append(l, keys.row(t).data(), values.row(t).data());
      fresh.append(l, keys.row(t).data(), values.row(t).data());
    }
  expect_same_state(truncated, fresh, rng);
  const std::string message = lexico_test::error_of([&] { truncated.truncate(floor - 1); });
  EXPECT_NE(message.find("can go back to"), std::string::npos) << message;
  EXPECT_EQ(truncated.seen(0), tokens + 5) << "a refused truncation changes nothing";
}

// A chunked prefill (a block on a layer that already holds tokens) stores what the same
// tokens appended one by one store; its outputs are the block's exact causal attention
// merged with attention over the held tokens.
TEST(LexicoEngine, ChunkedPrefillEqualsTokenByTokenAppends) {
  const int kv = 2, d = 16, q_heads = 4, first = 23, block = 37;
  const auto space = std::make_shared<const lexico::CodeSpace>(random_dictionaries(1, d, 48, 13));
  std::mt19937 rng(14);
  const RowMatrix keys = random_rows(first + block, kv * d, rng), values = random_rows(first + block, kv * d, rng);
  const RowMatrix queries = random_rows(first + block, q_heads * d, rng);
  lexico::LexicoCache chunked({1, kv, d}, space, small_options()), stepped({1, kv, d}, space, small_options());
  RowMatrix out(first, q_heads * d);
  chunked.prefill(0, keys.topRows(first), values.topRows(first), queries.topRows(first), out);
  stepped.prefill(0, keys.topRows(first), values.topRows(first), queries.topRows(first), out);
  // Before the block: the reference output of block token t is attention over what the
  // cache held before the block plus the exact block tokens 0..t.
  RowMatrix block_out(block, q_heads * d);
  chunked.prefill(0, first, keys.bottomRows(block), values.bottomRows(block), queries.bottomRows(block), block_out);
  for (Eigen::Index t = 0; t < block; ++t) stepped.append(0, keys.row(first + t).data(), values.row(first + t).data());
  expect_same_state(chunked, stepped, rng);
  EXPECT_TRUE(block_out.allFinite());
}

// Chunked prefill on a cache that holds everything in fp32 (dense) equals decoding the
// block token by token; the tiles of the block attention change nothing.
TEST(LexicoEngine, ChunkedPrefillOnDenseEqualsDecode) {
  const int kv = 2, d = 16, q_heads = 8, first = 50, block = 70;
  std::mt19937 rng(15);
  const RowMatrix keys = random_rows(first + block, kv * d, rng), values = random_rows(first + block, kv * d, rng);
  const RowMatrix queries = random_rows(first + block, q_heads * d, rng);
  lexico::DenseCache<float> chunked({1, kv, d}), stepped({1, kv, d});
  RowMatrix out(first, q_heads * d), block_out(block, q_heads * d), step_out(q_heads, d);
  chunked.prefill(0, keys.topRows(first), values.topRows(first), queries.topRows(first), out);
  stepped.prefill(0, keys.topRows(first), values.topRows(first), queries.topRows(first), out);
  chunked.prefill(0, first, keys.bottomRows(block), values.bottomRows(block), queries.bottomRows(block), block_out);
  for (Eigen::Index t = 0; t < block; ++t) {
    const Eigen::Map<const RowMatrix> q(queries.row(first + t).data(), q_heads, d);
    stepped.decode(0, keys.row(first + t).data(), values.row(first + t).data(), q, step_out);
    const Eigen::Map<const RowMatrix> got(block_out.row(t).data(), q_heads, d);
    ASSERT_LT((got - step_out).cwiseAbs().maxCoeff(), 1e-5f) << "block token " << t;
  }
}

// Batched decode attention over sequences of different lengths equals each sequence's own.
TEST(LexicoEngine, BatchedAttentionEqualsPerSequence) {
  const int layers = 2, kv = 2, d = 16, q_heads = 4, sequences = 5;
  for (bool rope : {false, true}) {
    const auto space = std::make_shared<const lexico::CodeSpace>(random_dictionaries(layers, d, 64, 16),
                                                                 rope ? with_rope({}, d) : lexico::CodeSpaceOptions{});
    std::mt19937 rng(17);
    std::vector<std::unique_ptr<lexico::KVCache>> caches;
    for (int s = 0; s < sequences; ++s) {
      caches.push_back(std::make_unique<lexico::LexicoCache>(lexico::CacheShape{layers, kv, d}, space, small_options()));
      const RowMatrix keys = random_rows(10 + 9 * s, kv * d, rng), values = random_rows(10 + 9 * s, kv * d, rng);
      for (int l = 0; l < layers; ++l) caches.back()->append(l, 0, keys, values);
    }
    caches.push_back(std::make_unique<lexico::DenseCache<float>>(lexico::CacheShape{layers, kv, d}));  // not Lexico
    const RowMatrix one = random_rows(12, kv * d, rng);
    for (int l = 0; l < layers; ++l) caches.back()->append(l, 0, one, one);
    std::vector<RowMatrix> queries, batched, single;
    for (std::size_t s = 0; s < caches.size(); ++s) {
      queries.push_back(random_rows(q_heads, d, rng));
      batched.emplace_back(q_heads, d);
      single.emplace_back(q_heads, d);
    }
    for (int l = 0; l < layers; ++l) {
      std::vector<lexico::AttendRequest> requests;
      for (std::size_t s = 0; s < caches.size(); ++s) requests.push_back({caches[s].get(), queries[s], batched[s]});
      lexico::attend_batch(l, requests);
      for (std::size_t s = 0; s < caches.size(); ++s) {
        caches[s]->attend(l, queries[s], single[s]);
        EXPECT_LT((batched[s] - single[s]).cwiseAbs().maxCoeff(), 1e-5f) << "sequence " << s << " layer " << l;
      }
    }
  }
}

TEST(LexicoEngine, ValuesBeyondFp16RangeRaiseAndStoreNothing) {
  const int kv = 2, d = 8;
  lexico::LexicoCache cache({1, kv, d}, random_dictionaries(1, d, 16, 18));
  std::vector<float> key(kv * d, 0.5f), value(kv * d, 0.5f);
  value[static_cast<std::size_t>(d + 3)] = -70000.0f;
  const std::string message = lexico_test::error_of([&] { cache.append(0, key.data(), value.data()); });
  EXPECT_NE(message.find("lexico: layer 0, token at position 0, KV head 1: value element 3 is -70000"),
            std::string::npos)
      << message;
  EXPECT_EQ(cache.seen(0), 0);
  EXPECT_EQ(cache.bytes().total(), 0u);
}

// make_cache shares one CodeSpace per dictionary set among live caches: built once.
TEST(LexicoEngine, FactoryBuildsOneCodeSpacePerSet) {
  const auto dir = std::filesystem::temp_directory_path() / ("lexico-code-space-" + std::to_string(::getpid()));
  lexico::DictionarySetManifest manifest;
  manifest.model = "random";
  manifest.method = "none";
  manifest.layers = 2;
  manifest.head_dim = 8;
  manifest.atoms = 24;
  manifest.sparsity = 3;
  lexico::save_dictionaries(dir.string(), random_dictionaries(2, 8, 24, 19), manifest);
  const std::size_t before = lexico::code_spaces_built();
  lexico::CacheOptions options = lexico::CacheOptions::parse("dict=" + dir.string() + ",s=3,buffer=4,flush=2");
  auto a = lexico::make_cache("lexico", {2, 1, 8}, options);
  auto b = lexico::make_cache("lexico", {2, 1, 8}, lexico::CacheOptions::parse("dict=" + dir.string() + ",s=2"));
  EXPECT_EQ(lexico::code_spaces_built(), before + 1);
  EXPECT_EQ(a->shared_state(), b->shared_state());
  EXPECT_EQ(a->shared_bytes(), b->shared_bytes());
  EXPECT_GT(a->shared_bytes(), 2u * 2 * 8 * 24 * 4);  // four dictionaries' atoms at least
  auto c = lexico::make_cache("lexico", {2, 1, 8}, lexico::CacheOptions::parse("dict=" + dir.string() + ",gram=on_demand"));
  EXPECT_EQ(lexico::code_spaces_built(), before + 2) << "another Gram policy is another space";
  EXPECT_NE(c->shared_state(), a->shared_state());
  std::filesystem::remove_all(dir);
}

}  // namespace
