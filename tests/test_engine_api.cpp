// The engine-facing API of every non-Lexico cache: truncate() against a cache that never
// saw the dropped tokens, truncate_floor(), chunked prefill against appending the block
// and against token-by-token decode, blocks at explicit positions, the central fp16 range
// check, and per-cache thread counts.
//
// Every cache is made by lexico::make_cache, as programs make them.
#include <lexico/cache/factory.hpp>

#include <algorithm>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cache_test_util.hpp"

namespace {

using lexico::CacheShape;
using lexico::KVCache;
using lexico::RowMatrix;
using lexico_test::query_heads;
using lexico_test::random_rows;

constexpr int layers = 2, kv_heads = 2, head_dim = 32, q_heads = 4;
const CacheShape shape{layers, kv_heads, head_dim};

// The scenario of the truncation tests: a prefill of `prompt` tokens, decode steps (append
// and attend) up to `decoded`, then a block appended without attention up to `total`.
constexpr Eigen::Index prompt = 20, decoded = 30, total = 36;

struct Config {
  std::string name, options;  // as make_cache takes them
  bool fp16 = false;          // stores K/V in fp16 where they enter
  bool pure = true;           // attention leaves the cache as it was
  std::int64_t floor = 0;     // truncate_floor() after the scenario

  std::string label() const { return name + " " + options; }
  std::unique_ptr<KVCache> make(const CacheShape& s) const {
    return lexico::make_cache(name, s, lexico::CacheOptions::parse(options));
  }
};

// The floors follow from the scenario: FP8 calibrates on the prefill; KIVI with R = 32
// quantizes a value at every settle from 33 tokens on, the last when token 35 arrives;
// H2O and TOVA change scores at every attention (the last at 30 tokens) and, when tight,
// evict at every append; StreamingLLM evicts at every append once full; SnapKV and
// PyramidKV select in the prefill (PyramidKV always counts as selecting).
std::vector<Config> configs() {
  return {
      {"dense", "dtype=fp32", false, true, 0},
      {"dense", "dtype=fp16", true, true, 0},
      {"dense", "dtype=bf16", false, true, 0},
      {"q8_0", "", false, true, 0},
      {"q4_0", "", false, true, 0},
      {"fp8", "", false, true, prompt},
      {"kivi", "bits=2,group=32,residual=32", true, true, 35},
      {"kivi", "bits=4,group=32,residual=64", true, true, 0},
      {"streaming", "budget=64,sinks=4", true, false, 0},
      // Full at the end of the scenario: evictions in the continuation depend on the
      // scores (H2O, TOVA) or the order (StreamingLLM).
      {"streaming", "budget=36,sinks=4", true, false, 0},
      {"streaming", "budget=24,sinks=4", true, false, total},
      {"h2o", "budget=64", true, false, decoded},
      {"h2o", "budget=36", true, false, decoded},
      {"h2o", "budget=16,window=4", true, false, total},
      {"snapkv", "budget=64,window=8,kernel=3", true, false, 0},
      {"snapkv", "budget=16,window=4,kernel=3", true, false, prompt},
      {"pyramidkv", "budget=16,window=4,kernel=3", true, false, prompt},
      {"tova", "budget=64", true, false, decoded},
      {"tova", "budget=36", true, false, decoded},
      {"tova", "budget=12,scope=layer", true, false, total},
  };
}

struct Tokens {
  RowMatrix keys, values, queries;
};

// Different tokens for every layer.
std::vector<Tokens> tokens(Eigen::Index count, unsigned seed, const CacheShape& s = shape, int heads = q_heads) {
  std::mt19937 rng(seed);
  std::vector<Tokens> data;
  for (int l = 0; l < s.layers; ++l) {
    RowMatrix keys = random_rows(count, s.kv_width(), rng), values = random_rows(count, s.kv_width(), rng);
    data.push_back({keys, values, random_rows(count, heads * s.head_dim, rng)});
  }
  return data;
}

RowMatrix decode_step(KVCache& cache, int layer, const Tokens& d, Eigen::Index t) {
  const RowMatrix q = query_heads(d.queries, t, cache.shape().head_dim);
  RowMatrix out(q.rows(), q.cols());
  cache.decode(layer, d.keys.row(t).data(), d.values.row(t).data(), q, out);
  return out;
}

// The scenario's operations on tokens [0, count).
void run_prefix(KVCache& cache, const std::vector<Tokens>& data, Eigen::Index count) {
  const int layer_count = cache.shape().layers;
  if (count > 0)
    for (int l = 0; l < layer_count; ++l) {
      const Tokens& d = data[static_cast<std::size_t>(l)];
      const Eigen::Index p = std::min(count, prompt);
      RowMatrix out(p, d.queries.cols());
      cache.prefill(l, 0, d.keys.topRows(p), d.values.topRows(p), d.queries.topRows(p), out);
    }
  for (Eigen::Index t = prompt; t < std::min(count, decoded); ++t)
    for (int l = 0; l < layer_count; ++l) decode_step(cache, l, data[static_cast<std::size_t>(l)], t);
  if (count > decoded)
    for (int l = 0; l < layer_count; ++l) {
      const Tokens& d = data[static_cast<std::size_t>(l)];
      const Eigen::Index rest = count - decoded;
      cache.append(l, decoded, d.keys.middleRows(decoded, rest), d.values.middleRows(decoded, rest));
    }
}

// What follows a truncation to `from` tokens: the same tokens again, 4 appended as a
// block and 16 decoded; returns the decode steps' attention.
std::vector<RowMatrix> continue_from(KVCache& cache, const std::vector<Tokens>& data, Eigen::Index from) {
  std::vector<RowMatrix> outputs;
  for (int l = 0; l < cache.shape().layers; ++l) {
    const Tokens& d = data[static_cast<std::size_t>(l)];
    cache.append(l, from, d.keys.middleRows(from, 4), d.values.middleRows(from, 4));
  }
  for (Eigen::Index t = from + 4; t < from + 20; ++t)
    for (int l = 0; l < cache.shape().layers; ++l)
      outputs.push_back(decode_step(cache, l, data[static_cast<std::size_t>(l)], t));
  return outputs;
}

void expect_same_bytes(const KVCache& a, const KVCache& b) {
  EXPECT_EQ(a.bytes().payload, b.bytes().payload);
  EXPECT_EQ(a.bytes().metadata, b.bytes().metadata);
  EXPECT_EQ(a.bytes().buffer, b.bytes().buffer);
}

void expect_bitwise_equal(const std::vector<RowMatrix>& a, const std::vector<RowMatrix>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].rows(), b[i].rows());
    ASSERT_EQ(a[i].cols(), b[i].cols());
    EXPECT_EQ(0, std::memcmp(a[i].data(), b[i].data(), sizeof(float) * static_cast<std::size_t>(a[i].size())))
        << "output " << i << ": max difference " << (a[i] - b[i]).cwiseAbs().maxCoeff();
  }
}

std::int64_t floor_of(const KVCache& cache) {
  std::int64_t floor = 0;
  for (int l = 0; l < cache.shape().layers; ++l) floor = std::max(floor, cache.truncate_floor(l));
  return floor;
}

// (a) For every n from the floor up: truncate(n), then the same tokens again, stores and
// attends exactly as a cache that only ever saw the first n tokens.
TEST(EngineApi, TruncateThenReappendEqualsNeverAppended) {
  const std::vector<Tokens> data = tokens(total + 20, 1);
  for (const Config& config : configs()) {
    SCOPED_TRACE(config.label());
    auto probe = config.make(shape);
    run_prefix(*probe, data, total);
    const std::int64_t floor = floor_of(*probe);
    EXPECT_EQ(floor, config.floor);
    for (std::int64_t n = floor; n <= total; ++n) {
      SCOPED_TRACE(n);
      auto a = config.make(shape), b = config.make(shape);
      run_prefix(*a, data, total);
      a->truncate(n);
      run_prefix(*b, data, n);
      for (int l = 0; l < layers; ++l) {
        EXPECT_EQ(a->seen(l), n);
        EXPECT_EQ(a->next_position(l), n);
      }
      // KIVI's truncated windows are settled, as after the n-th token's attention; a
      // cache whose n-th token came in a block without attention has not settled yet.
      if (config.name != "kivi" || n <= decoded) expect_same_bytes(*a, *b);
      expect_bitwise_equal(continue_from(*a, data, n), continue_from(*b, data, n));
      expect_same_bytes(*a, *b);
      for (int l = 0; l < layers; ++l) EXPECT_EQ(a->truncate_floor(l), b->truncate_floor(l));
    }
  }
}

// (b) Below the floor truncate() raises and changes nothing; so do lengths beyond seen().
TEST(EngineApi, TruncateBelowTheFloorRaises) {
  const std::vector<Tokens> data = tokens(total + 20, 2);
  for (const Config& config : configs()) {
    SCOPED_TRACE(config.label());
    auto cache = config.make(shape);
    run_prefix(*cache, data, total);
    const lexico::CacheBytes before = cache->bytes();
    const std::int64_t floor = floor_of(*cache);
    if (floor > 0) {
      EXPECT_THROW(cache->truncate(floor - 1), lexico::error);
    }
    EXPECT_THROW(cache->truncate(total + 1), lexico::error);
    EXPECT_THROW(cache->truncate(-1), lexico::error);
    for (int l = 0; l < layers; ++l) EXPECT_EQ(cache->seen(l), total);
    EXPECT_EQ(cache->bytes().total(), before.total());
    EXPECT_EQ(floor_of(*cache), floor);
  }
  // A floor above 0 in one layer holds the whole cache back: FP8 layer 1 calibrated on a
  // 10-token prefill, layer 0 on one token.
  lexico::Fp8Cache fp8(shape, lexico::Fp8Codec());
  for (Eigen::Index t = 0; t < 12; ++t) fp8.append(0, data[0].keys.row(t).data(), data[0].values.row(t).data());
  RowMatrix out(10, q_heads * head_dim);
  fp8.prefill(1, 0, data[1].keys.topRows(10), data[1].values.topRows(10), data[1].queries.topRows(10), out);
  fp8.append(1, 10, data[1].keys.middleRows(10, 2), data[1].values.middleRows(10, 2));
  EXPECT_EQ(fp8.truncate_floor(0), 1);
  EXPECT_EQ(fp8.truncate_floor(1), 10);
  EXPECT_THROW(fp8.truncate(9), lexico::error);
  EXPECT_EQ(fp8.seen(0), 12);
  fp8.truncate(10);
  EXPECT_EQ(fp8.seen(0), 10);
  EXPECT_EQ(fp8.seen(1), 10);
}

// Attention in double over explicit rows: query head h of block token t sees the layer's
// held rows of its KV head, then block tokens 0..t.
RowMatrix chunk_reference(const std::vector<RowMatrix>& held_keys, const std::vector<RowMatrix>& held_values,
                          const RowMatrix& keys, const RowMatrix& values, const RowMatrix& queries) {
  const int group = q_heads / kv_heads;
  RowMatrix out(queries.rows(), queries.cols());
  for (Eigen::Index t = 0; t < queries.rows(); ++t)
    for (int h = 0; h < q_heads; ++h) {
      const int kv = h / group;
      const Eigen::Index held = held_keys[static_cast<std::size_t>(kv)].rows();
      Eigen::MatrixXd k(held + t + 1, head_dim), v(held + t + 1, head_dim);
      k.topRows(held) = held_keys[static_cast<std::size_t>(kv)].cast<double>();
      v.topRows(held) = held_values[static_cast<std::size_t>(kv)].cast<double>();
      k.bottomRows(t + 1) = keys.block(0, kv * head_dim, t + 1, head_dim).cast<double>();
      v.bottomRows(t + 1) = values.block(0, kv * head_dim, t + 1, head_dim).cast<double>();
      const Eigen::VectorXd q = queries.row(t).segment(h * head_dim, head_dim).transpose().cast<double>();
      out.row(t).segment(h * head_dim, head_dim) = lexico_test::naive_attention(q, k, v).transpose().cast<float>();
    }
  return out;
}

template <typename Scalar>
RowMatrix rounded(const RowMatrix& x) {
  RowMatrix r(x.rows(), x.cols());
  for (Eigen::Index i = 0; i < x.size(); ++i) r.data()[i] = static_cast<float>(Scalar(x.data()[i]));
  return r;
}

// The rows a cache holds for one KV head, as attention reads them: `input` (all heads)
// rounded to the storage type for dense caches, the stored rows of the others.
std::vector<RowMatrix> held_rows(const KVCache& cache, int layer, const RowMatrix& input, bool keys) {
  std::vector<RowMatrix> rows;
  for (int h = 0; h < kv_heads; ++h) {
    const RowMatrix head = input.middleCols(h * head_dim, head_dim);
    if (dynamic_cast<const lexico::DenseCache<float>*>(&cache)) {
      rows.push_back(head);
    } else if (dynamic_cast<const lexico::DenseCache<Eigen::half>*>(&cache)) {
      rows.push_back(rounded<Eigen::half>(head));
    } else if (dynamic_cast<const lexico::DenseCache<Eigen::bfloat16>*>(&cache)) {
      rows.push_back(rounded<Eigen::bfloat16>(head));
    } else if (auto* q = dynamic_cast<const lexico::TokenQuantCache<lexico::BlockCodec>*>(&cache)) {
      rows.push_back(keys ? q->stored_keys(layer, h) : q->stored_values(layer, h));
    } else if (auto* f = dynamic_cast<const lexico::Fp8Cache*>(&cache)) {
      rows.push_back(keys ? f->stored_keys(layer, h) : f->stored_values(layer, h));
    } else if (auto* k = dynamic_cast<const lexico::KiviCache*>(&cache)) {
      rows.push_back(keys ? k->stored_keys(layer, h) : k->stored_values(layer, h));
    } else {
      ADD_FAILURE() << cache.name() << ": no held rows";
    }
  }
  return rows;
}

// (c) A block prefilled on a layer that holds tokens (two tiles of queries here).
// Pure caches: attention over the held tokens as stored plus the exact block; stored the
// same as append() of the block and as appending it token by token; dense fp32 also as
// decoding it token by token. The others: exactly token-by-token decode.
TEST(EngineApi, ChunkedPrefill) {
  constexpr Eigen::Index held = 40, block = 40;
  const std::vector<Tokens> data = tokens(held + block + 3, 3);
  for (const Config& config : configs()) {
    SCOPED_TRACE(config.label());
    auto chunked = config.make(shape), appended = config.make(shape), stepped = config.make(shape),
         decoded_cache = config.make(shape);
    std::vector<RowMatrix> chunk_out, decode_out;
    for (int l = 0; l < layers; ++l) {
      const Tokens& d = data[static_cast<std::size_t>(l)];
      RowMatrix out(held, d.queries.cols());
      for (KVCache* cache : {chunked.get(), appended.get(), stepped.get(), decoded_cache.get()})
        cache->prefill(l, d.keys.topRows(held), d.values.topRows(held), d.queries.topRows(held), out);
      const std::vector<RowMatrix> held_keys = config.pure ? held_rows(*chunked, l, d.keys.topRows(held), true)
                                                           : std::vector<RowMatrix>();
      const std::vector<RowMatrix> held_values = config.pure ? held_rows(*chunked, l, d.values.topRows(held), false)
                                                             : std::vector<RowMatrix>();
      const RowMatrix keys = d.keys.middleRows(held, block), values = d.values.middleRows(held, block);
      const RowMatrix queries = d.queries.middleRows(held, block);
      RowMatrix block_out(block, queries.cols());
      chunked->prefill(l, held, keys, values, queries, block_out);
      chunk_out.push_back(block_out);
      appended->append(l, held, keys, values);
      for (Eigen::Index t = 0; t < block; ++t) stepped->append(l, keys.row(t).data(), values.row(t).data());
      RowMatrix steps(block, queries.cols());
      for (Eigen::Index t = 0; t < block; ++t)
        steps.row(t) = Eigen::Map<const Eigen::RowVectorXf>(decode_step(*decoded_cache, l, d, held + t).data(),
                                                            queries.cols());
      decode_out.push_back(steps);
      EXPECT_EQ(chunked->next_position(l), held + block);
      if (config.pure) {
        const RowMatrix want = chunk_reference(held_keys, held_values, keys, values, queries);
        EXPECT_LT((block_out - want).cwiseAbs().maxCoeff(), 2e-5f) << "layer " << l;
      }
    }
    const auto after = [&](KVCache& cache) {
      std::vector<RowMatrix> out;
      for (Eigen::Index t = held + block; t < held + block + 3; ++t)
        for (int l = 0; l < layers; ++l) out.push_back(decode_step(cache, l, data[static_cast<std::size_t>(l)], t));
      return out;
    };
    if (config.pure) {
      expect_same_bytes(*chunked, *appended);
      expect_same_bytes(*chunked, *stepped);
      if (auto* kivi = dynamic_cast<const lexico::KiviCache*>(chunked.get())) {
        auto* other = dynamic_cast<const lexico::KiviCache*>(stepped.get());
        for (int l = 0; l < layers; ++l)
          for (int h = 0; h < kv_heads; ++h) {
            EXPECT_EQ(kivi->stored_keys(l, h), other->stored_keys(l, h));
            EXPECT_EQ(kivi->stored_values(l, h), other->stored_values(l, h));
          }
      }
      if (config.label() == "dense dtype=fp32") {
        expect_same_bytes(*chunked, *decoded_cache);
        for (int l = 0; l < layers; ++l)
          EXPECT_LT((chunk_out[static_cast<std::size_t>(l)] - decode_out[static_cast<std::size_t>(l)])
                        .cwiseAbs()
                        .maxCoeff(),
                    1e-5f);
      }
      const std::vector<RowMatrix> reference = after(*appended);
      expect_bitwise_equal(after(*chunked), reference);
      expect_bitwise_equal(after(*stepped), reference);
    } else {
      expect_bitwise_equal(chunk_out, decode_out);
      expect_same_bytes(*chunked, *decoded_cache);
      expect_bitwise_equal(after(*chunked), after(*decoded_cache));
    }
  }
}

// (d) A block at position p0 on an empty layer starts the layer there; later blocks must
// come at next_position().
TEST(EngineApi, BlocksAtExplicitPositions) {
  const std::vector<Tokens> data = tokens(12, 4);
  const Tokens& d = data[0];
  for (const Config& config : configs()) {
    SCOPED_TRACE(config.label());
    auto cache = config.make(shape);
    cache->append(0, 100, d.keys.topRows(5), d.values.topRows(5));
    EXPECT_EQ(cache->first_position(0), 100);
    EXPECT_EQ(cache->next_position(0), 105);
    EXPECT_EQ(cache->seen(0), 5);
    EXPECT_EQ(cache->next_position(1), 0);
    const lexico::CacheBytes before = cache->bytes();
    for (std::int64_t wrong : {0, 100, 104, 106})
      EXPECT_THROW(cache->append(0, wrong, d.keys.middleRows(5, 2), d.values.middleRows(5, 2)), lexico::error) << wrong;
    EXPECT_THROW(cache->append(0, -1, d.keys.middleRows(5, 2), d.values.middleRows(5, 2)), lexico::error);
    // These caches store keys after RoPE: keys before it are refused.
    EXPECT_EQ(cache->key_rope(), nullptr);
    EXPECT_THROW(cache->append(0, 105, d.keys.middleRows(5, 2), d.values.middleRows(5, 2), lexico::KeyForm::unrotated),
                 lexico::error);
    RowMatrix out(2, d.queries.cols());
    EXPECT_THROW(
        cache->prefill(0, 104, d.keys.middleRows(5, 2), d.values.middleRows(5, 2), d.queries.middleRows(5, 2), out),
        lexico::error);
    EXPECT_EQ(cache->seen(0), 5);
    EXPECT_EQ(cache->bytes().total(), before.total());
    cache->append(0, 105, d.keys.middleRows(5, 2), d.values.middleRows(5, 2));
    cache->append(0, d.keys.row(7).data(), d.values.row(7).data());
    EXPECT_EQ(cache->next_position(0), 108);
    cache->prefill(0, 108, d.keys.middleRows(8, 2), d.values.middleRows(8, 2), d.queries.middleRows(8, 2), out);
    EXPECT_EQ(cache->next_position(0), 110);
    EXPECT_TRUE(out.allFinite());
    RowMatrix prompt_out(4, d.queries.cols());
    cache->prefill(1, 50, d.keys.topRows(4), d.values.topRows(4), d.queries.topRows(4), prompt_out);
    EXPECT_EQ(cache->first_position(1), 50);
    EXPECT_EQ(cache->next_position(1), 54);
    // An empty block on an empty layer only fixes the start.
    auto empty = config.make(shape);
    empty->append(1, 7, d.keys.topRows(0), d.values.topRows(0));
    EXPECT_EQ(empty->next_position(1), 7);
    EXPECT_EQ(empty->seen(1), 0);
    cache->clear();
    EXPECT_EQ(cache->next_position(0), 0);
  }
}

// Expects `f` to raise lexico::error naming every part; returns the message.
template <typename F>
std::string expect_error_naming(F&& f, std::initializer_list<const char*> parts) {
  try {
    f();
  } catch (const lexico::error& e) {
    for (const char* part : parts) EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no lexico::error raised";
  return {};
}

// (e) |x| = 70000 does not fit fp16: caches that store K or V in fp16 refuse it before
// storing anything, naming the layer, the token's position, the KV head and the value;
// the others store it.
TEST(EngineApi, Fp16OverflowRaisesWhereTheCacheStoresFp16) {
  const std::vector<Tokens> data = tokens(8, 5);
  const Tokens& d = data[0];
  RowMatrix keys = d.keys.topRows(6), values = d.values.topRows(6);
  keys(5, 1 * head_dim + 7) = 70000.0f;  // token 5 (position 5), KV head 1, element 7
  RowMatrix bad_values = d.values.topRows(6);
  bad_values(4, 0 * head_dim + 3) = -70000.0f;
  for (const Config& config : configs()) {
    SCOPED_TRACE(config.label());
    auto cache = config.make(shape);
    RowMatrix out(3, d.queries.cols());
    cache->prefill(1, keys.topRows(3), values.topRows(3), d.queries.topRows(3), out);
    const lexico::CacheBytes before = cache->bytes();
    if (!config.fp16) {
      cache->append(1, 3, keys.bottomRows(3), values.bottomRows(3));
      EXPECT_EQ(cache->seen(1), 6);
      continue;
    }
    expect_error_naming([&] { cache->append(1, 3, keys.bottomRows(3), values.bottomRows(3)); },
                        {"layer 1", "position 5", "KV head 1", "key element 7", "70000"});
    expect_error_naming([&] { cache->append(1, 3, keys.middleRows(3, 2), bad_values.middleRows(3, 2)); },
                        {"layer 1", "position 4", "KV head 0", "value element 3", "-70000"});
    expect_error_naming([&] { cache->append(1, keys.row(5).data(), values.row(5).data()); },
                        {"layer 1", "position 3", "KV head 1", "70000"});
    RowMatrix block_out(3, d.queries.cols());
    expect_error_naming(
        [&] { cache->prefill(1, 3, keys.bottomRows(3), values.bottomRows(3), d.queries.middleRows(3, 3), block_out); },
        {"layer 1", "position 5", "KV head 1", "70000"});
    EXPECT_EQ(cache->seen(1), 3);
    EXPECT_EQ(cache->bytes().total(), before.total());
    // On an empty layer too.
    RowMatrix prompt_out(6, d.queries.cols());
    expect_error_naming([&] { cache->prefill(0, 20, keys, values, d.queries.topRows(6), prompt_out); },
                        {"layer 0", "position 25", "KV head 1", "70000"});
    EXPECT_EQ(cache->seen(0), 0);
    EXPECT_EQ(cache->bytes().total(), before.total());
    // The limit itself fits.
    keys(5, 1 * head_dim + 7) = 65504.0f;
    cache->append(1, 3, keys.bottomRows(3), values.bottomRows(3));
    EXPECT_EQ(cache->seen(1), 6);
    keys(5, 1 * head_dim + 7) = 70000.0f;
  }
}

// (f) One and two threads give the same bits. Sizes make every parallel region run:
// 1100 prompt tokens, 4 KV heads (decode runs heads in parallel from 4096 scores).
TEST(EngineApi, ThreadCountDoesNotChangeResults) {
  const CacheShape wide{1, 4, head_dim};
  constexpr int heads = 8;
  constexpr Eigen::Index held = 1100, block = 40;
  const std::vector<Tokens> data = tokens(held + block + 2, 6, wide, heads);
  const Tokens& d = data[0];
  const std::vector<Config> wide_configs = {
      {"dense", "dtype=fp32"},        {"dense", "dtype=fp16"},       {"q4_0", ""},
      {"fp8", ""},                    {"kivi", ""},                  {"streaming", "budget=1050"},
      {"h2o", "budget=1050"},         {"snapkv", "budget=1050"},     {"pyramidkv", "budget=1050"},
      {"tova", "budget=1050"},
  };
  for (const Config& config : wide_configs) {
    SCOPED_TRACE(config.label());
    std::vector<std::vector<RowMatrix>> results;
    for (int threads : {1, 2}) {
      auto cache = config.make(wide);
      cache->set_threads(threads);
      EXPECT_EQ(cache->threads(), threads);
      std::vector<RowMatrix> out;
      RowMatrix prompt_out(held, d.queries.cols()), block_out(block, d.queries.cols());
      cache->prefill(0, d.keys.topRows(held), d.values.topRows(held), d.queries.topRows(held), prompt_out);
      cache->prefill(0, held, d.keys.middleRows(held, block), d.values.middleRows(held, block),
                     d.queries.middleRows(held, block), block_out);
      out.push_back(prompt_out);
      out.push_back(block_out);
      for (Eigen::Index t = held + block; t < held + block + 2; ++t) out.push_back(decode_step(*cache, 0, d, t));
      results.push_back(out);
    }
    expect_bitwise_equal(results[0], results[1]);
  }
  lexico::DenseCache<float> cache(wide);
  EXPECT_THROW(cache.set_threads(-1), lexico::error);
}

// overhead_bytes(): at least the cache object, and what is not K/V (TOVA's workspace
// scores, every kept token and KV head) on top of capacity slack.
TEST(EngineApi, OverheadBytes) {
  const std::vector<Tokens> data = tokens(total + 20, 7);
  for (const Config& config : configs()) {
    SCOPED_TRACE(config.label());
    auto cache = config.make(shape);
    const std::size_t empty = cache->overhead_bytes();
    EXPECT_GT(empty, sizeof(KVCache));
    run_prefix(*cache, data, total);
    EXPECT_GE(cache->overhead_bytes(), empty);
    EXPECT_LT(cache->overhead_bytes(), empty + 4 * cache->bytes().total() + 4096);
    if (auto* tova = dynamic_cast<const lexico::TovaCache*>(cache.get())) {
      std::size_t scores = 0;
      for (int l = 0; l < layers; ++l) scores += static_cast<std::size_t>(tova->kept(l)) * kv_heads * sizeof(float);
      EXPECT_GE(cache->overhead_bytes(), empty + scores);
    }
  }
}

}  // namespace
