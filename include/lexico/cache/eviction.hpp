#pragma once
// Token eviction: one cache for StreamingLLM, H2O, SnapKV, PyramidKV and TOVA, which
// differ only in their EvictionPolicy (streaming.hpp, h2o.hpp, snapkv.hpp, pyramidkv.hpp,
// tova.hpp name them). Per layer and KV head the cache keeps at most `limit` tokens in
// fp16, oldest first (positional order, as needed for sinks and recent windows):
//   protected  the first `sinks` tokens and the last `window` tokens are always kept;
//   scores     attention paid to each token, averaged over the query heads of the token's
//              GQA group (kvpress and SnapKV#22 do the same; the original SnapKV repeats
//              K/V per query head, which multiplies memory by the group size);
//   prefill    the block is scored by the attention of its last `observed` queries
//              (optionally max/avg-pooled over neighbours) and the protected tokens plus
//              the best-scored others are kept, at most limit;
//   decode     after each step's attention, while a head holds more than limit tokens, the
//              unprotected token with the lowest score is dropped (ties: the oldest):
//              `accumulated` scores add every step's attention (H2O), `current` scores are
//              the last step's attention only (TOVA), `oldest` drops the oldest unprotected
//              token before the new one is added (StreamingLLM), `keep` evicts nothing
//              after the prefill (SnapKV, PyramidKV).
// Every KV head keeps the same number of tokens; `layerwise` makes them the same tokens,
// chosen by the mean score over the heads (TOVA's reference code).
//
// Memory: kept tokens at fp16 (payload) plus, for `accumulated`, one fp32 score per kept
// token and KV head (metadata): state that H2O really stores. TOVA's `current` scores are
// rewritten from each step's attention and read right after it, so they are workspace,
// not counted; positions are not stored (keys carry RoPE already). Scored policies expect
// attend() after each append(); a token appended without one enters with score 0.
// Kept tokens are fp16: keys or values beyond its range are refused before anything is
// stored. Attention may evict and (H2O, TOVA) rewrites scores, so pure_attention() is
// false: a prefill block on a layer that holds tokens goes through append() and attend()
// token by token.
//
// Truncation: an evicted token cannot come back, and scores that later queries changed
// cannot be taken back, so truncate_floor() is the token count right after the last
// eviction, the last attention of a scored policy (H2O, TOVA: usually every step, so
// nothing can be undone once a token was attended), or the prefill when it selected or
// scored tokens (a kept-whole prefill under a count or fraction budget is the same as a
// prefill of any prefix, so it leaves the floor at 0; PyramidKV's layer budgets depend on
// the prefill length, so its prefill always sets the floor). Tokens appended since the
// floor sit, unevicted and with score 0 where scored, at the end of every head and are
// dropped from there. StreamingLLM can undo only until its budget fills; SnapKV and
// PyramidKV, which evict nothing after the prefill, can go back to the prefill.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <system_error>
#include <vector>

#include "cache.hpp"
#include "coded_rows.hpp"
#include "token_store.hpp"

namespace lexico {

// Tokens kept per KV head of a layer, protected ones included: a count, or a fraction of a
// reference length. Prefill-based methods (SnapKV, PyramidKV) take the fraction of the
// prefill length. Streaming methods (StreamingLLM, H2O, TOVA) take it of `context` when set
// (a fixed budget: budget=0.2 with context=1024 keeps 205 tokens), otherwise of the tokens
// seen so far, so that kept / seen stays at the fraction all along a sequence.
struct Budget {
  std::int64_t tokens = 0;   // a fixed count, or 0 for a fraction
  double fraction = 0;       // in (0, 1]
  std::int64_t context = 0;  // what a fraction is of; 0: the reference length

  static Budget count(std::int64_t tokens) {
    Budget budget;
    budget.tokens = tokens;
    budget.validate();
    return budget;
  }
  static Budget share(double fraction, std::int64_t context = 0) {
    Budget budget;
    budget.fraction = fraction;
    budget.context = context;
    budget.validate();
    return budget;
  }
  // "256" (an integer >= 1) is a count, "0.2" (a number in (0, 1]) a fraction.
  static Budget parse(const std::string& text) {
    const char* end = text.data() + text.size();
    std::int64_t tokens = 0;
    const auto whole = std::from_chars(text.data(), end, tokens);
    if (whole.ec == std::errc() && whole.ptr == end && tokens >= 1) return count(tokens);
    double fraction = 0;
    const auto real = std::from_chars(text.data(), end, fraction);
    require(real.ec == std::errc() && real.ptr == end && fraction > 0 && fraction <= 1, "Budget: '", text,
            "' is neither a token count >= 1 nor a fraction in (0, 1]");
    return share(fraction);
  }

  bool is_fraction() const { return tokens == 0; }
  void validate() const {
    require(tokens > 0 || (tokens == 0 && fraction > 0 && fraction <= 1), "Budget: needs a token count >= 1 or a ",
            "fraction in (0, 1] (got ", tokens, " tokens, fraction ", fraction, ")");
    require(context >= 0 && (context == 0 || tokens == 0), "Budget: context ", context,
            " only applies to a fraction");
  }

  // Tokens to keep for a reference length: the count, or round(fraction · (context, or
  // else length)), at least 1.
  std::int64_t resolve(std::int64_t length) const {
    if (tokens > 0) return tokens;
    const double base = static_cast<double>(context > 0 ? context : length);
    return std::max<std::int64_t>(1, std::llround(fraction * base));
  }

  std::string to_string() const {
    if (tokens > 0) return std::to_string(tokens);
    return detail::concat(fraction, context > 0 ? detail::concat(" context=", context) : std::string());
  }
};

enum class Pool { max, avg };

enum class DecodeRule {
  keep,         // nothing is evicted after the prefill (SnapKV, PyramidKV)
  oldest,       // the oldest unprotected token makes room for the new one (StreamingLLM)
  accumulated,  // lowest attention summed over every query so far (H2O)
  current       // lowest attention of the current query (TOVA)
};

// Field order matters to the aggregate initialisations in the method headers.
struct EvictionPolicy {
  Budget budget;
  int sinks = 0;          // first tokens always kept
  int window = 0;         // most recent tokens always kept; -1: half the limit (H2O)
  int observed = 0;       // prefill scores: attention of the last `observed` queries (-1: all, 0: none)
  int kernel = 1;         // pooling width for prefill scores (odd; 1: none), SnapKV's clustering
  Pool pool = Pool::max;
  DecodeRule decode = DecodeRule::keep;
  double pyramid_beta = 0;  // > 0: PyramidKV's layer budgets (prefill-based policies only)
  bool layerwise = false;   // one choice of tokens for every KV head of a layer
  bool layerwise_by_default = false;  // the method's own scope (parameters() names the other one)
};

// PyramidKV's layer limits (Cai et al., arXiv 2406.02069; Zefan-Cai/PyramidKV
// pyramidkv_utils.py): with c = average - window selectable tokens on average and
// P = length - window available, layer budgets fall linearly from hi at layer 0 to
// lo = c / beta at the last, hi = 2c - lo (so the mean stays c); when hi > P, hi = P and
// lo = 2c - P. Unlike the reference (integer steps of (hi - lo) / layers, and a fallback
// to uniform budgets when length < 2c), budgets are rounded so that they sum to exactly
// layers · c. Returns each layer's limit, window included.
inline std::vector<std::int64_t> pyramid_limits(int layers, std::int64_t average, std::int64_t window,
                                                std::int64_t length, double beta) {
  require(layers > 0 && window >= 0 && average >= window && beta > 0, "pyramid_limits: bad arguments");
  const std::int64_t c = average - window, available = length - window;
  std::vector<std::int64_t> limits(static_cast<std::size_t>(layers), average);
  if (c >= available || layers == 1) return limits;
  double lo = static_cast<double>(c) / beta, hi = 2.0 * static_cast<double>(c) - lo;
  if (hi > static_cast<double>(available)) {
    hi = static_cast<double>(available);
    lo = 2.0 * static_cast<double>(c) - hi;
  }
  std::vector<double> exact(limits.size());
  std::int64_t total = 0;
  for (int l = 0; l < layers; ++l) {
    exact[static_cast<std::size_t>(l)] = hi - (hi - lo) * l / (layers - 1);
    limits[static_cast<std::size_t>(l)] = static_cast<std::int64_t>(std::floor(exact[static_cast<std::size_t>(l)]));
    total += limits[static_cast<std::size_t>(l)];
  }
  // Largest remainders get the tokens that flooring left over (earlier layers on ties).
  std::vector<int> order(limits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    const auto fa = exact[static_cast<std::size_t>(a)] - static_cast<double>(limits[static_cast<std::size_t>(a)]);
    const auto fb = exact[static_cast<std::size_t>(b)] - static_cast<double>(limits[static_cast<std::size_t>(b)]);
    return fa > fb;
  });
  for (std::int64_t i = 0; i < static_cast<std::int64_t>(layers) * c - total; ++i)
    ++limits[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])];
  for (auto& limit : limits) limit += window;
  return limits;
}

namespace detail {

// Attention that the last `observed` queries of a causal block pay to each of its tokens,
// per KV head, averaged over the head's query heads: T x kv_heads.
inline Eigen::MatrixXf observed_attention(ConstRowsRef keys, ConstRowsRef queries, int head_dim, int observed,
                                          int threads = 0) {
  const Eigen::Index tokens = keys.rows();
  const int kv_heads = static_cast<int>(keys.cols() / head_dim);
  const int group = static_cast<int>(queries.cols() / head_dim) / kv_heads;
  const Eigen::Index first = observed < 0 ? 0 : tokens - std::min<Eigen::Index>(observed, tokens);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  constexpr Eigen::Index chunk = 64;  // query rows per product, bounds the T x T memory of H2O
  Eigen::MatrixXf scores = Eigen::MatrixXf::Zero(tokens, kv_heads);
#pragma omp parallel for schedule(static) num_threads(thread_budget(threads)) \
    if ((tokens - first) * tokens * group > (1 << 20))
  for (int h = 0; h < kv_heads; ++h) {
    serial_eigen_products();
    const auto k = keys.middleCols(h * head_dim, head_dim);
    for (int g = 0; g < group; ++g) {
      for (Eigen::Index i = first; i < tokens; i += chunk) {
        const Eigen::Index rows = std::min(chunk, tokens - i), seen = i + rows;
        RowMatrix p = queries.block(i, (h * group + g) * head_dim, rows, head_dim) * k.topRows(seen).transpose();
        for (Eigen::Index r = 0; r < rows; ++r) {
          softmax_rows(p.row(r).data(), 1, i + r + 1, seen, scale);
          scores.col(h).head(i + r + 1) += p.row(r).head(i + r + 1).transpose();
        }
      }
    }
    scores.col(h) /= static_cast<float>(group);
  }
  return scores;
}

// Pools scores over [lo, hi) with a window of `kernel` neighbours, clipped at the range
// ends: max pooling, or the sum over `kernel` (PyTorch avg_pool1d counts padding zeros).
inline Eigen::VectorXf pooled(const Eigen::VectorXf& scores, Eigen::Index lo, Eigen::Index hi, int kernel, Pool pool) {
  Eigen::VectorXf out = scores;
  const Eigen::Index half = kernel / 2;
  for (Eigen::Index j = lo; j < hi; ++j) {
    const Eigen::Index a = std::max(lo, j - half), n = std::min(hi, j + half + 1) - a;
    out(j) = pool == Pool::max ? scores.segment(a, n).maxCoeff() : scores.segment(a, n).sum() / kernel;
  }
  return out;
}

}  // namespace detail

class EvictionCache : public KVCache {
 public:
  EvictionCache(CacheShape shape, std::string method, EvictionPolicy policy)
      : KVCache(shape), method_(std::move(method)), policy_(policy) {
    const EvictionPolicy& p = policy_;
    p.budget.validate();
    require(p.sinks >= 0 && p.window >= -1 && p.observed >= -1, method_, ": sinks (", p.sinks, "), window (", p.window,
            ") and observed (", p.observed, ") must be >= 0 (window and observed: -1 for their special meaning)");
    require(p.kernel >= 1 && p.kernel % 2 == 1, method_, ": kernel must be odd and >= 1 (got ", p.kernel, ")");
    require(p.pyramid_beta >= 0 && std::isfinite(p.pyramid_beta), method_, ": beta must be >= 0");
    require(p.decode != DecodeRule::keep || p.budget.context == 0, method_,
            ": a prefill-based budget is a fraction of the prefill, it takes no context");
    require(p.pyramid_beta == 0 || p.decode == DecodeRule::keep, method_,
            ": pyramid budgets apply to prefill-based policies");
    if (!p.budget.is_fraction()) {
      require(p.window <= p.budget.tokens, method_, ": window ", p.window, " exceeds the budget ", p.budget.tokens);
      require(p.sinks < p.budget.tokens, method_, ": sinks ", p.sinks, " leave no room in the budget ",
              p.budget.tokens);
    }
    require(shape.head_dim <= TokenStore<float>::max_head_dim, method_, ": head_dim ", shape.head_dim, " above ",
            TokenStore<float>::max_head_dim);
    for (int l = 0; l < shape.layers; ++l)
      layers_.push_back({TokenStore<Eigen::half>(shape.kv_heads, shape.head_dim),
                         TokenStore<Eigen::half>(shape.kv_heads, shape.head_dim),
                         std::vector<std::vector<float>>(static_cast<std::size_t>(shape.kv_heads))});
  }

  std::string name() const override { return method_; }
  std::string parameters() const override {
    const EvictionPolicy& p = policy_;
    std::string text = "budget=" + p.budget.to_string();
    if (p.sinks > 0) text += detail::concat(" sinks=", p.sinks);
    if (p.window != 0) text += p.window < 0 ? std::string(" window=half") : detail::concat(" window=", p.window);
    if (p.kernel > 1) text += detail::concat(" kernel=", p.kernel, " pool=", p.pool == Pool::max ? "max" : "avg");
    if (p.pyramid_beta > 0) text += detail::concat(" beta=", p.pyramid_beta);
    if (p.layerwise != p.layerwise_by_default) text += p.layerwise ? " scope=layer" : " scope=head";
    return text;
  }
  const EvictionPolicy& policy() const { return policy_; }

  // The cache object, its stores' unused capacity, and the scores that are not K/V
  // metadata: TOVA's workspace scores, every score vector's slack and headers.
  std::size_t overhead_bytes() const override {
    std::size_t bytes = KVCache::overhead_bytes() + sizeof(*this) - sizeof(KVCache) + method_.capacity() +
                        layers_.capacity() * sizeof(Layer);
    for (const Layer& l : layers_) {
      bytes += l.keys.overhead_bytes() + l.values.overhead_bytes() + l.scores.capacity() * sizeof(l.scores[0]);
      for (const auto& s : l.scores)
        bytes += (policy_.decode == DecodeRule::accumulated ? s.capacity() - s.size() : s.capacity()) * sizeof(float);
    }
    return bytes;
  }

  // Tokens each KV head of a layer keeps.
  Eigen::Index kept(int layer) const { return count(at(layer)); }

  // The kept tokens of one KV head, oldest first, as attention reads them.
  RowMatrix stored_keys(int layer, int head) const { return rows(at(layer).keys, head); }
  RowMatrix stored_values(int layer, int head) const { return rows(at(layer).values, head); }

  // The most tokens a layer keeps after a prefill of `length` tokens (protected included).
  std::int64_t prefill_limit(int layer, std::int64_t length) const {
    const std::int64_t limit = policy_.budget.resolve(length);
    if (policy_.pyramid_beta == 0) return limit;
    const std::int64_t window = protect(limit).window;
    return pyramid_limits(shape().layers, limit, window, length, policy_.pyramid_beta)[static_cast<std::size_t>(
        checked_layer(layer))];
  }

 protected:
  void append_token(int layer, const float* key, const float* value) override {
    Layer& l = layers_[static_cast<std::size_t>(layer)];
    bool evicted = false;
    if (policy_.decode == DecodeRule::oldest) {
      const std::int64_t limit = policy_.budget.resolve(seen(layer) + 1);
      evicted = evict_to(l, limit - 1, protect(limit));  // room for the new token
    } else if (policy_.decode != DecodeRule::keep) {
      evicted = evict_to(l, policy_.budget.resolve(seen(layer)));  // only if the last step was not attended
    }
    if (evicted) l.floor = seen(layer) + 1;
    l.keys.append(key);
    l.values.append(value);
    if (scored()) {
      for (auto& s : l.scores) s.push_back(0.0f);
    }
  }

  void store_prefill(int layer, ConstRowsRef keys, ConstRowsRef values, ConstRowsRef queries, KeyForm form) override {
    require(form == KeyForm::rotated, method_, ": takes keys after RoPE only");
    const Eigen::Index tokens = keys.rows();
    const std::int64_t limit = std::min<std::int64_t>(prefill_limit(layer, tokens), tokens);
    const int heads = shape().kv_heads;
    const bool select = limit < tokens;
    const Eigen::MatrixXf scores =
        select || policy_.decode == DecodeRule::accumulated
            ? detail::observed_attention(keys, queries, shape().head_dim, policy_.observed, threads())
            : Eigen::MatrixXf::Zero(tokens, heads);
    std::vector<std::vector<Eigen::Index>> keep(static_cast<std::size_t>(heads));
    if (select) {
      const Protected p = protect(limit);
      const Eigen::Index lo = p.sinks, hi = tokens - p.window;
      Eigen::MatrixXf ranked(tokens, heads);
      for (int h = 0; h < heads; ++h) ranked.col(h) = detail::pooled(scores.col(h), lo, hi, policy_.kernel, policy_.pool);
      if (policy_.layerwise) ranked.colwise() = Eigen::VectorXf(ranked.rowwise().mean());
      for (int h = 0; h < heads; ++h)
        keep[static_cast<std::size_t>(h)] = best(ranked.col(h), lo, hi, limit - p.sinks - p.window);
    } else {
      for (auto& k : keep) {
        k.resize(static_cast<std::size_t>(tokens));
        std::iota(k.begin(), k.end(), Eigen::Index(0));
      }
    }
    Layer& l = layers_[static_cast<std::size_t>(layer)];
    std::vector<float> key(static_cast<std::size_t>(shape().kv_width())), value(key.size());
    const int d = shape().head_dim;
    for (std::size_t r = 0; r < keep[0].size(); ++r) {
      for (int h = 0; h < heads; ++h) {
        const Eigen::Index t = keep[static_cast<std::size_t>(h)][r];
        std::copy_n(keys.row(t).data() + h * d, d, key.data() + h * d);
        std::copy_n(values.row(t).data() + h * d, d, value.data() + h * d);
        if (scored()) l.scores[static_cast<std::size_t>(h)].push_back(scores(t, h));
      }
      l.keys.append(key.data());
      l.values.append(value.data());
    }
    // A prefix of the block would not have been kept or scored the same way.
    if (select || policy_.decode == DecodeRule::accumulated || policy_.pyramid_beta > 0) l.floor = tokens;
  }

  void attend_tokens(int layer, ConstRowsRef queries, RowsRef out, float* log_sum_exp) override {
    Layer& l = layers_[static_cast<std::size_t>(layer)];
    grouped_decode_attention(
        queries, shape().kv_heads, count(l), out,
        [&](int h, const float* q, int group, float* scores, Eigen::Index ld) { l.keys.scores(h, q, group, scores, ld); },
        [&](int h, const float* p, Eigen::Index ld, int group, float* o) {
          if (scored()) record(l.scores[static_cast<std::size_t>(h)], p, ld, group);
          l.values.accumulate(h, p, ld, group, o);
        },
        log_sum_exp, threads());
    const bool evicted = policy_.decode != DecodeRule::keep && evict_to(l, policy_.budget.resolve(seen(layer)));
    if (evicted || scored()) l.floor = seen(layer);
  }

  CacheBytes layer_bytes(int layer) const override {
    const Layer& l = layers_[static_cast<std::size_t>(layer)];
    CacheBytes bytes;
    bytes.payload = l.keys.bytes() + l.values.bytes();
    if (policy_.decode == DecodeRule::accumulated)
      for (const auto& s : l.scores) bytes.metadata += s.size() * sizeof(float);
    return bytes;
  }

  void clear_layer(int layer) override {
    Layer& l = layers_[static_cast<std::size_t>(layer)];
    l.keys.clear();
    l.values.clear();
    for (auto& s : l.scores) s.clear();
    l.floor = 0;
  }

  bool pure_attention() const override { return false; }
  bool narrows_to_fp16() const override { return true; }

  std::int64_t rollback_floor(int layer) const override { return layers_[static_cast<std::size_t>(layer)].floor; }
  // The tokens appended since the floor were neither evicted nor attended (scored
  // policies): they are the newest of every head, with score 0.
  void truncate_layer(int layer, std::int64_t tokens) override {
    Layer& l = layers_[static_cast<std::size_t>(layer)];
    const Eigen::Index drop = seen(layer) - tokens;
    l.keys.erase_back(drop);
    l.values.erase_back(drop);
    if (scored())
      for (auto& s : l.scores) s.resize(s.size() - static_cast<std::size_t>(drop));
  }

 private:
  struct Layer {
    TokenStore<Eigen::half> keys, values;  // every head holds the same number of tokens
    std::vector<std::vector<float>> scores;  // [head] -> one score per kept token (scored rules)
    std::int64_t floor = 0;                  // the truncation floor (see the header)
  };
  struct Protected {
    Eigen::Index sinks, window;
  };

  bool scored() const { return policy_.decode == DecodeRule::accumulated || policy_.decode == DecodeRule::current; }
  const Layer& at(int layer) const { return layers_[static_cast<std::size_t>(checked_layer(layer))]; }
  static Eigen::Index count(const Layer& l) { return l.keys.head_tokens(0); }

  // The protected tokens under a limit: the window first, then sinks, leaving at least
  // one unprotected slot for the newest token unless the window covers the whole limit.
  Protected protect(std::int64_t limit) const {
    const std::int64_t window = policy_.window < 0 ? limit / 2 : std::min<std::int64_t>(policy_.window, limit);
    const std::int64_t sinks = std::max<std::int64_t>(0, std::min<std::int64_t>(policy_.sinks, limit - window - 1));
    return {sinks, window};
  }

  // Indices of the `count` best scores in [lo, hi) (ties: the newer), with [0, lo) and
  // [hi, T) added, in increasing order.
  static std::vector<Eigen::Index> best(const Eigen::VectorXf& scores, Eigen::Index lo, Eigen::Index hi,
                                        std::int64_t count) {
    std::vector<Eigen::Index> candidates(static_cast<std::size_t>(hi - lo));
    std::iota(candidates.begin(), candidates.end(), lo);
    std::sort(candidates.begin(), candidates.end(),
              [&](Eigen::Index a, Eigen::Index b) { return scores(a) != scores(b) ? scores(a) > scores(b) : a > b; });
    candidates.resize(static_cast<std::size_t>(count));
    for (Eigen::Index t = 0; t < lo; ++t) candidates.push_back(t);
    for (Eigen::Index t = hi; t < scores.size(); ++t) candidates.push_back(t);
    std::sort(candidates.begin(), candidates.end());
    return candidates;
  }

  // Folds one step's attention (group x tokens, row stride ld), averaged over the group, into the scores.
  void record(std::vector<float>& scores, const float* p, Eigen::Index ld, int group) const {
    const Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>> probabilities(
        p, group, static_cast<Eigen::Index>(scores.size()), Eigen::OuterStride<>(ld));
    Eigen::Map<Eigen::RowVectorXf> s(scores.data(), static_cast<Eigen::Index>(scores.size()));
    if (policy_.decode == DecodeRule::accumulated) {
      s += probabilities.colwise().mean();
    } else {
      s = probabilities.colwise().mean();
    }
  }

  // Drops one unprotected token per head (the lowest score, the oldest on ties) until
  // every head holds at most `target` tokens; says whether it dropped any.
  bool evict_to(Layer& l, std::int64_t limit) const { return evict_to(l, limit, protect(limit)); }
  bool evict_to(Layer& l, std::int64_t target, Protected p) const {
    const int heads = shape().kv_heads;
    std::vector<Eigen::Index> victims(static_cast<std::size_t>(heads));
    bool evicted = false;
    while (count(l) > target) {
      evicted = true;
      const Eigen::Index lo = p.sinks, hi = count(l) - p.window;
      require(lo < hi, method_, ": every kept token is protected");  // excluded by protect()
      for (int h = 0; h < heads; ++h) {
        if (!scored()) {
          victims[static_cast<std::size_t>(h)] = lo;
          continue;
        }
        Eigen::Index victim = lo;
        float lowest = score(l, h, lo);
        for (Eigen::Index t = lo + 1; t < hi; ++t) {
          const float s = score(l, h, t);
          if (s < lowest) lowest = s, victim = t;
        }
        victims[static_cast<std::size_t>(h)] = victim;
      }
      for (int h = 0; h < heads; ++h) {
        const Eigen::Index t = victims[static_cast<std::size_t>(h)];
        l.keys.erase(h, t);
        l.values.erase(h, t);
        if (scored()) l.scores[static_cast<std::size_t>(h)].erase(l.scores[static_cast<std::size_t>(h)].begin() + t);
      }
    }
    return evicted;
  }

  // Token t's score for head h: its own, or the mean over heads when choices are layer-wide.
  float score(const Layer& l, int h, Eigen::Index t) const {
    if (!policy_.layerwise) return l.scores[static_cast<std::size_t>(h)][static_cast<std::size_t>(t)];
    float sum = 0.0f;
    for (const auto& s : l.scores) sum += s[static_cast<std::size_t>(t)];
    return sum / static_cast<float>(l.scores.size());
  }

  RowMatrix rows(const TokenStore<Eigen::half>& store, int head) const {
    require(head >= 0 && head < shape().kv_heads, method_, ": head ", head, " out of range");
    RowMatrix out(store.head_tokens(head), shape().head_dim);
    detail::copy_rows(store, head, out.rows(), out, 0);
    return out;
  }

  std::string method_;
  EvictionPolicy policy_;
  std::vector<Layer> layers_;
};

}  // namespace lexico
