#pragma once
// A minimal fp32 Llama: configuration, weights (Hugging Face safetensors, single or
// sharded, f32/f16/bf16; llama2.c .bin) and a runner that feeds every layer's K/V
// through any KVCache. RMSNorm, RoPE (rotate-half or interleaved pairs), GQA, SwiGLU.
//
// The runner never knows which cache it has: positions come from cache.next_position(),
// keys go before RoPE to a cache that codes them so (cache.key_rope()), the cache does
// the attention. It exists to evaluate caches on real models and to
// collect KV vectors for dictionary training, not to be a fast engine.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "../cache/attention.hpp"
#include "../cache/cache.hpp"
#include "../base/checked.hpp"
#include "../base/error.hpp"
#include "../base/files.hpp"
#include "../base/json.hpp"
#include "safetensors.hpp"
#include "../base/rope.hpp"

namespace lexico {

struct LlamaConfig {
  int dim = 0;         // hidden size
  int hidden_dim = 0;  // FFN width
  int layers = 0;
  int heads = 0;  // query heads
  int kv_heads = 0;
  int head_dim = 0;
  int vocab = 0;
  int max_context = 0;  // the length the model was trained for (not enforced)
  float norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  RopeStyle rope = RopeStyle::rotate_half;
  int bos_id = -1, eos_id = -1;

  // Bounds on the sizes a checkpoint may declare: far above any released Llama (405B:
  // dim 16384, FFN 53248, 126 layers, 128 heads of 128, vocab 128256) and small enough
  // that every width below fits int and every matrix's element count int64.
  static constexpr int max_dim = 1 << 17, max_hidden_dim = 1 << 20, max_layers = 1 << 12, max_heads = 1 << 12,
                       max_head_dim = 1 << 12, max_vocab = 1 << 22, max_context_limit = 1 << 30;

  // Checked, so that a config built by hand cannot wrap them either.
  int q_width() const { return width(heads, "LlamaConfig: q_width (heads x head_dim)"); }
  int kv_width() const { return width(kv_heads, "LlamaConfig: kv_width (kv_heads x head_dim)"); }
  Rope rotary() const { return Rope(head_dim, rope_theta, rope); }
  int qkv_width() const {
    return checked_int(std::int64_t{q_width()} + 2 * std::int64_t{kv_width()}, "LlamaConfig: qkv_width");
  }
  CacheShape cache_shape() const { return {layers, kv_heads, head_dim}; }

  // Throws, naming `where` (the file read) and the field, unless every size is within the
  // bounds above, the heads share kv heads evenly and RoPE's parameters are usable. The
  // loaders call it before allocating anything.
  void check(const std::string& where) const {
    const struct {
      int value;
      const char* name;
      int lo, hi;
    } sizes[] = {{dim, "dim", 1, max_dim},           {hidden_dim, "hidden_dim", 1, max_hidden_dim},
                 {layers, "layers", 1, max_layers},  {heads, "heads", 1, max_heads},
                 {kv_heads, "kv_heads", 1, max_heads}, {head_dim, "head_dim", 1, max_head_dim},
                 {vocab, "vocab", 1, max_vocab},     {max_context, "max_context", 0, max_context_limit}};
    for (const auto& size : sizes) checked_int(size.value, where + ": " + size.name, size.lo, size.hi);
    require(heads % kv_heads == 0, where, ": heads ", heads, " not a multiple of kv_heads ", kv_heads);
    require(head_dim % 2 == 0, where, ": RoPE needs an even head_dim, got ", head_dim);
    require(norm_eps > 0 && std::isfinite(norm_eps) && rope_theta > 1 && std::isfinite(rope_theta), where,
            ": norm_eps must be positive and rope_theta above 1 (both finite), got ", norm_eps, " and ", rope_theta);
  }

 private:
  int width(int count, const char* what) const { return checked_int(checked_mul(count, head_dim, what), what); }
};

// One decoder layer. Projections are [out, in] (y = W x) and fused where they read
// the same input: wqkv stacks q, k, v rows, w_gate_up stacks gate and up rows.
struct LlamaLayer {
  Eigen::VectorXf attn_norm, mlp_norm;
  RowMatrix wqkv, wo, w_gate_up, w_down;
};

struct LlamaWeights {
  RowMatrix embedding;  // vocab x dim
  std::vector<LlamaLayer> layers;
  Eigen::VectorXf final_norm;
  RowMatrix lm_head;  // vocab x dim; empty when tied to the embedding

  const RowMatrix& output() const { return lm_head.size() > 0 ? lm_head : embedding; }
};

class LlamaModel {
 public:
  // Checks the config, every shape against it and every weight for NaN/Inf.
  LlamaModel(LlamaConfig config, LlamaWeights weights) : config_(config), weights_(std::move(weights)) { validate(); }

  // A directory is a Hugging Face checkpoint (config.json + safetensors), a file a
  // llama2.c .bin.
  static LlamaModel load(const std::string& path) {
    return std::filesystem::is_directory(path) ? load_hf(path) : load_llama2c(path);
  }
  // config.json and model.safetensors (or model.safetensors.index.json and its shards) of `folder`.
  static LlamaModel load_hf(const Folder& folder);
  static LlamaModel load_hf(const std::string& directory) { return load_hf(DiskFolder(directory)); }
  // A whole llama2.c checkpoint.
  static LlamaModel load_llama2c(const ByteSource& file);
  static LlamaModel load_llama2c(const std::string& file) { return load_llama2c(FileBytes(file)); }

  const LlamaConfig& config() const { return config_; }
  const LlamaWeights& weights() const { return weights_; }

 private:
  void validate() const;

  LlamaConfig config_;
  LlamaWeights weights_;
};

namespace detail {


inline void check_shape(const std::string& what, Eigen::Index rows, Eigen::Index cols, Eigen::Index want_rows,
                        Eigen::Index want_cols) {
  require(rows == want_rows && cols == want_cols, "LlamaModel: ", what, " is ", rows, "x", cols, ", expected ",
          want_rows, "x", want_cols);
}

template <typename Derived>
void check_weight(const std::string& what, const Eigen::MatrixBase<Derived>& w, Eigen::Index rows, Eigen::Index cols) {
  check_shape(what, w.rows(), w.cols(), rows, cols);
  require(w.allFinite(), "LlamaModel: ", what, " holds NaN or Inf");
}

// Throws unless tensor `name` has shape [rows, cols] ([rows] when cols is 0) in its header.
inline void check_tensor_shape(const SafetensorsCheckpoint& ckpt, const std::string& name, std::int64_t rows,
                               std::int64_t cols) {
  const SafetensorsTensor& t = ckpt.tensor(name);
  const std::vector<std::int64_t> want = cols > 0 ? std::vector<std::int64_t>{rows, cols} : std::vector<std::int64_t>{rows};
  if (t.shape == want) return;
  std::string found, expected;
  for (const auto d : t.shape) found += (found.empty() ? "" : ", ") + std::to_string(d);
  for (const auto d : want) expected += (expected.empty() ? "" : ", ") + std::to_string(d);
  throw error(concat(ckpt.file_of(name).path(), ": tensor '", name, "' has shape [", found, "], expected [", expected,
                     "]"));
}

inline void resize_for_read(RowMatrix& dst, std::int64_t rows, std::int64_t cols) { dst.resize(rows, cols); }
inline void resize_for_read(Eigen::VectorXf& dst, std::int64_t rows, std::int64_t) { dst.resize(rows); }

// Reads the tensors `parts` ({name, rows} each; all `cols` wide, or vectors when cols is
// 0) stacked into dst, as the fused matrices hold them. Every part's header shape is
// checked before dst is allocated: the header bounds each tensor by the file's size, so
// no config can make this allocate more than the file holds.
template <typename Dst>
void read_stacked(const SafetensorsCheckpoint& ckpt, Dst& dst,
                  std::initializer_list<std::pair<std::string, std::int64_t>> parts, std::int64_t cols) {
  std::int64_t rows = 0;
  for (const auto& [name, n] : parts) {
    check_tensor_shape(ckpt, name, n, cols);
    rows = checked_add(rows, n, name);
  }
  resize_for_read(dst, rows, cols);
  float* out = dst.data();
  for (const auto& [name, n] : parts) {
    const std::size_t count = static_cast<std::size_t>(n * std::max<std::int64_t>(cols, 1));
    ckpt.read_f32(name, out, count);
    out += count;
  }
}

// An integer of config.json within [lo, hi]; `fallback` when absent or null (none when negative).
inline int config_int(const json::Value& config, const std::string& source, const char* key, std::int64_t lo,
                      std::int64_t hi, int fallback = -1) {
  const json::Value* v = config.find(key);
  if (v == nullptr || v->is_null()) {
    require(fallback >= 0, source, ": missing key \"", key, "\"");
    return fallback;
  }
  return checked_int(v->as_int(source + ": " + key), source + ": " + key, lo, hi);
}

inline double config_number(const json::Value& config, const std::string& source, const char* key, double fallback) {
  const json::Value* v = config.find(key);
  return v == nullptr || v->is_null() ? fallback : v->as_double(source + ": " + key);
}

inline bool config_bool(const json::Value& config, const std::string& source, const char* key, bool fallback) {
  const json::Value* v = config.find(key);
  return v == nullptr || v->is_null() ? fallback : v->as_bool(source + ": " + key);
}

}  // namespace detail

inline void LlamaModel::validate() const {
  const LlamaConfig& c = config_;
  c.check("LlamaModel: config");
  const LlamaWeights& w = weights_;
  detail::check_weight("embedding", w.embedding, c.vocab, c.dim);
  if (w.lm_head.size() > 0) detail::check_weight("lm_head", w.lm_head, c.vocab, c.dim);
  detail::check_weight("final_norm", w.final_norm, c.dim, 1);
  require(static_cast<int>(w.layers.size()) == c.layers, "LlamaModel: ", w.layers.size(), " layers of weights, config says ",
          c.layers);
  for (int l = 0; l < c.layers; ++l) {
    const LlamaLayer& layer = w.layers[static_cast<std::size_t>(l)];
    const std::string at = "layer " + std::to_string(l) + " ";
    detail::check_weight(at + "attn_norm", layer.attn_norm, c.dim, 1);
    detail::check_weight(at + "mlp_norm", layer.mlp_norm, c.dim, 1);
    detail::check_weight(at + "wqkv", layer.wqkv, c.qkv_width(), c.dim);
    detail::check_weight(at + "wo", layer.wo, c.dim, c.q_width());
    detail::check_weight(at + "w_gate_up", layer.w_gate_up, 2 * c.hidden_dim, c.dim);
    detail::check_weight(at + "w_down", layer.w_down, c.dim, c.hidden_dim);
  }
}

inline LlamaModel LlamaModel::load_hf(const Folder& folder) {
  const std::unique_ptr<ByteSource> config_file = folder.open("config.json");
  const std::string config_path = config_file->name();
  const json::Value json = json::parse(*config_file, json::Limits::config());
  require(json.is_object(), config_path, ": must hold a JSON object");
  if (const json::Value* type = json.find("model_type"))
    require(type->as_string(config_path + ": model_type") == "llama", config_path, ": model_type '", type->as_string(),
            "' is not supported (only llama)");
  if (const json::Value* act = json.find("hidden_act"))
    require(act->as_string(config_path + ": hidden_act") == "silu", config_path, ": hidden_act '", act->as_string(),
            "' is not supported (only silu)");
  const json::Value* scaling = json.find("rope_scaling");
  require(scaling == nullptr || scaling->is_null(), config_path, ": rope_scaling is not supported");
  require(!detail::config_bool(json, config_path, "attention_bias", false) &&
              !detail::config_bool(json, config_path, "mlp_bias", false),
          config_path, ": attention_bias and mlp_bias are not supported");

  LlamaConfig c;
  auto size = [&](const char* key, int hi, int fallback = -1) {
    return detail::config_int(json, config_path, key, 1, hi, fallback);
  };
  c.dim = size("hidden_size", LlamaConfig::max_dim);
  c.hidden_dim = size("intermediate_size", LlamaConfig::max_hidden_dim);
  c.layers = size("num_hidden_layers", LlamaConfig::max_layers);
  c.heads = size("num_attention_heads", LlamaConfig::max_heads);
  c.kv_heads = size("num_key_value_heads", LlamaConfig::max_heads, c.heads);
  c.head_dim = size("head_dim", LlamaConfig::max_head_dim, c.dim / c.heads);
  c.vocab = size("vocab_size", LlamaConfig::max_vocab);
  c.max_context =
      detail::config_int(json, config_path, "max_position_embeddings", 0, LlamaConfig::max_context_limit, 2048);
  c.norm_eps = static_cast<float>(detail::config_number(json, config_path, "rms_norm_eps", 1e-6));
  c.rope_theta = static_cast<float>(detail::config_number(json, config_path, "rope_theta", 10000.0));
  c.rope = RopeStyle::rotate_half;
  c.bos_id = detail::config_int(json, config_path, "bos_token_id", 0, LlamaConfig::max_vocab, 1);
  c.eos_id = detail::config_int(json, config_path, "eos_token_id", 0, LlamaConfig::max_vocab, 2);
  const bool tied = detail::config_bool(json, config_path, "tie_word_embeddings", false);
  c.check(config_path);

  const SafetensorsCheckpoint ckpt(folder);
  LlamaWeights w;
  // Tied checkpoints may store the shared matrix under either name (656K keeps only lm_head).
  const std::string embedding_name =
      ckpt.contains("model.embed_tokens.weight") || !tied ? "model.embed_tokens.weight" : "lm_head.weight";
  detail::read_stacked(ckpt, w.embedding, {{embedding_name, c.vocab}}, c.dim);
  if (!tied) detail::read_stacked(ckpt, w.lm_head, {{"lm_head.weight", c.vocab}}, c.dim);
  detail::read_stacked(ckpt, w.final_norm, {{"model.norm.weight", c.dim}}, 0);
  for (int l = 0; l < c.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LlamaLayer layer;
    detail::read_stacked(ckpt, layer.attn_norm, {{p + "input_layernorm.weight", c.dim}}, 0);
    detail::read_stacked(ckpt, layer.mlp_norm, {{p + "post_attention_layernorm.weight", c.dim}}, 0);
    detail::read_stacked(ckpt, layer.wqkv,
                         {{p + "self_attn.q_proj.weight", c.q_width()},
                          {p + "self_attn.k_proj.weight", c.kv_width()},
                          {p + "self_attn.v_proj.weight", c.kv_width()}},
                         c.dim);
    detail::read_stacked(ckpt, layer.wo, {{p + "self_attn.o_proj.weight", c.dim}}, c.q_width());
    detail::read_stacked(ckpt, layer.w_gate_up,
                         {{p + "mlp.gate_proj.weight", c.hidden_dim}, {p + "mlp.up_proj.weight", c.hidden_dim}}, c.dim);
    detail::read_stacked(ckpt, layer.w_down, {{p + "mlp.down_proj.weight", c.dim}}, c.hidden_dim);
    w.layers.push_back(std::move(layer));
  }
  return LlamaModel(c, std::move(w));
}

inline LlamaModel LlamaModel::load_llama2c(const ByteSource& file) {
  const std::string& name = file.name();
  const std::uint64_t size = file.size();
  std::int32_t header[7];
  require(size >= sizeof header, name, ": truncated: ", size, " bytes, shorter than the 28-byte llama2.c header");
  file.read(0, header, sizeof header, "the header");
  // A negative vocab_size announces a separate classifier; its magnitude is the vocabulary.
  const bool shared = header[5] > 0;
  const struct {
    const char* name;
    std::int64_t value;
    int hi;
  } fields[7] = {{"dim", header[0], LlamaConfig::max_dim},
                 {"hidden_dim", header[1], LlamaConfig::max_hidden_dim},
                 {"n_layers", header[2], LlamaConfig::max_layers},
                 {"n_heads", header[3], LlamaConfig::max_heads},
                 {"n_kv_heads", header[4], LlamaConfig::max_heads},
                 {"vocab_size", shared ? header[5] : -static_cast<std::int64_t>(header[5]), LlamaConfig::max_vocab},
                 {"seq_len", header[6], LlamaConfig::max_context_limit}};
  int value[7];
  for (int i = 0; i < 7; ++i)
    value[i] = checked_int(fields[i].value, name + ": header field " + fields[i].name, 1, fields[i].hi);
  LlamaConfig c;
  c.dim = value[0];
  c.hidden_dim = value[1];
  c.layers = value[2];
  c.heads = value[3];
  c.kv_heads = value[4];
  c.vocab = value[5];
  c.max_context = value[6];
  require(c.dim % c.heads == 0, name, ": dim ", c.dim, " is not a multiple of n_heads ", c.heads);
  c.head_dim = c.dim / c.heads;
  c.norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  c.rope = RopeStyle::interleaved;
  c.bos_id = 1;
  c.eos_id = 2;
  c.check(name);

  // The bounds above keep these far from overflow; checked all the same, since a wrapped
  // count could pass the size check below and leave the allocations after it unguarded.
  const std::string what = name + ": the size the header implies";
  const auto mul = [&](std::int64_t a, std::int64_t b) { return checked_mul(a, b, what); };
  const auto add = [&](std::initializer_list<std::int64_t> terms) {
    std::int64_t sum = 0;
    for (const std::int64_t t : terms) sum = checked_add(sum, t, what);
    return sum;
  };
  const std::int64_t L = c.layers, dim = c.dim, kv = c.kv_width(), hidden = c.hidden_dim, vocab = c.vocab;
  const std::int64_t rope_tables = mul(c.max_context, c.head_dim);  // cos and sin, head_dim / 2 each
  const std::int64_t per_layer =
      add({mul(2, dim), mul(2, mul(dim, dim)), mul(2, mul(kv, dim)), mul(3, mul(hidden, dim))});
  const std::int64_t floats = add({mul(vocab, dim), mul(L, per_layer), dim, rope_tables, shared ? 0 : mul(vocab, dim)});
  const std::int64_t expected = add({28, mul(4, floats)});
  require(size == static_cast<std::uint64_t>(expected), name, ": ", size, " bytes, but the header (dim ", c.dim,
          ", hidden ", c.hidden_dim, ", layers ", c.layers, ", heads ", c.heads, "/", c.kv_heads, ", vocab ", header[5],
          ", seq_len ", c.max_context, ") needs ", expected);

  // Each tensor is stored for all layers before the next one. Every allocation below is
  // part of the `floats` the file was just found to hold.
  std::uint64_t offset = sizeof header;
  auto read = [&](float* dst, std::int64_t n, const char* tensor) {
    file.read(offset, dst, static_cast<std::size_t>(4 * n), tensor);
    offset += static_cast<std::uint64_t>(4 * n);
  };
  LlamaWeights w;
  w.embedding.resize(vocab, dim);
  w.final_norm.resize(dim);
  w.layers.resize(static_cast<std::size_t>(L));
  for (auto& layer : w.layers) {
    layer.attn_norm.resize(dim);
    layer.mlp_norm.resize(dim);
    layer.wqkv.resize(c.qkv_width(), dim);
    layer.wo.resize(dim, c.q_width());
    layer.w_gate_up.resize(2 * hidden, dim);
    layer.w_down.resize(dim, hidden);
  }
  read(w.embedding.data(), vocab * dim, "the embedding");
  for (auto& layer : w.layers) read(layer.attn_norm.data(), dim, "rms_att_weight");
  for (auto& layer : w.layers) read(layer.wqkv.data(), dim * dim, "wq");
  for (auto& layer : w.layers) read(layer.wqkv.row(c.q_width()).data(), kv * dim, "wk");
  for (auto& layer : w.layers) read(layer.wqkv.row(c.q_width() + c.kv_width()).data(), kv * dim, "wv");
  for (auto& layer : w.layers) read(layer.wo.data(), dim * dim, "wo");
  for (auto& layer : w.layers) read(layer.mlp_norm.data(), dim, "rms_ffn_weight");
  for (auto& layer : w.layers) read(layer.w_gate_up.data(), hidden * dim, "w1");  // gate
  for (auto& layer : w.layers) read(layer.w_down.data(), dim * hidden, "w2");
  for (auto& layer : w.layers) read(layer.w_gate_up.row(c.hidden_dim).data(), hidden * dim, "w3");  // up
  read(w.final_norm.data(), dim, "rms_final_weight");
  offset += static_cast<std::uint64_t>(4 * rope_tables);  // legacy RoPE tables: recomputed instead
  if (!shared) {
    w.lm_head.resize(vocab, dim);
    read(w.lm_head.data(), vocab * dim, "the classifier");
  }
  return LlamaModel(c, std::move(w));
}

namespace detail {

// y = x Wᵀ (+ y when accumulating) for W [out, in]. One row is a GEMV whose rows are
// split over the OpenMP threads (decode is memory-bound: one core cannot draw the
// bandwidth); blocks go to Eigen's GEMM, which threads itself.
inline void linear(ConstRowsRef x, const RowMatrix& w, RowsRef y, bool accumulate) {
  if (x.rows() > 1) {
    if (accumulate) y.noalias() += x * w.transpose();
    else y.noalias() = x * w.transpose();
    return;
  }
  const Eigen::Index rows = w.rows(), cols = w.cols(), block = 64;
  const Eigen::Map<const Eigen::VectorXf> in(x.data(), cols);
  const int blocks = static_cast<int>((rows + block - 1) / block);
#pragma omp parallel for schedule(static) if (rows * cols >= (1 << 16))
  for (int b = 0; b < blocks; ++b) {
    const Eigen::Index r0 = b * block, n = std::min(block, rows - r0);
    Eigen::Map<Eigen::VectorXf> out(y.data() + r0, n);
    if (accumulate) out.noalias() += w.middleRows(r0, n) * in;
    else out.noalias() = w.middleRows(r0, n) * in;
  }
}

inline void rms_norm(ConstRowsRef x, const Eigen::VectorXf& weight, float eps, RowsRef out) {
  const auto n = static_cast<float>(x.cols());
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const float mean_square = x.row(t).squaredNorm() / n;
    if (std::isfinite(mean_square) || !x.row(t).allFinite()) {
      const float inverse = 1.0f / std::sqrt(mean_square + eps);
      out.row(t) = (x.row(t) * inverse).cwiseProduct(weight.transpose());
    } else {
      // A finite row above ~1e19 overflows the fp32 sum of squares and would normalise
      // to 0: such rows, and only they, are normalised in double (every other row rounds
      // as before), where neither the sum nor 1 / rms can leave the range.
      const Eigen::RowVectorXd row = x.row(t).cast<double>();
      const double inverse = 1.0 / std::sqrt(row.squaredNorm() / static_cast<double>(n) + eps);
      out.row(t) = (row * inverse).cast<float>().cwiseProduct(weight.transpose());
    }
  }
}

// Throws unless every row of `rows` (row t at positions[t]) is finite: the residual
// stream after `layer`, or the logits when layer < 0. Allocates nothing unless it throws.
inline void require_finite(ConstRowsRef rows, const std::vector<std::int64_t>& positions, int layer) {
  if (rows.allFinite()) return;
  Eigen::Index t = 0;
  while (rows.row(t).allFinite()) ++t;
  const std::string what = layer < 0 ? std::string("logits") : concat("activations after layer ", layer);
  throw error(concat("LlamaRunner: non-finite ", what, " at position ", positions[static_cast<std::size_t>(t)], " (token ", t,
                     " of this call): the weights overflow fp32 on this input"));
}

}  // namespace detail

// Runs a LlamaModel through any KVCache. Keeps its workspaces between calls, so
// decode() allocates nothing; the model must outlive the runner.
class LlamaRunner {
 public:
  // Sees every layer's new queries (T x q_width), keys and values (T x kv_width each)
  // before they reach the cache: how dictionary training collects KV vectors and the
  // queries' key metric. Queries and keys are those the cache sees (after RoPE) unless
  // `keys_before_rope`.
  using KVObserver = std::function<void(int layer, ConstRowsRef queries, ConstRowsRef keys, ConstRowsRef values)>;

  explicit LlamaRunner(const LlamaModel& model)
      : model_(model), decode_ws_(model.config(), 1), rope_(model.config().rotary()) {}

  const LlamaModel& model() const { return model_; }
  void set_kv_observer(KVObserver observer, bool keys_before_rope = false) {
    observer_ = std::move(observer);
    observe_before_rope_ = keys_before_rope;
  }

  // Runs `tokens` after what the cache already holds; returns their logits, T x vocab
  // (row t predicts the token after tokens[t]).
  RowMatrix prefill(const std::vector<int>& tokens, KVCache& cache) {
    require(!tokens.empty(), "LlamaRunner::prefill: no tokens");
    Workspace ws(model_.config(), static_cast<Eigen::Index>(tokens.size()));
    KVCache* one = &cache;
    forward(tokens.data(), ws, &one, false);
    return std::move(ws.logits);
  }

  // One token; the logits (vocab) stay valid until the next call.
  Eigen::Map<const Eigen::VectorXf> decode(int token, KVCache& cache) {
    KVCache* one = &cache;
    forward(&token, decode_ws_, &one, false);
    return Eigen::Map<const Eigen::VectorXf>(decode_ws_.logits.data(), decode_ws_.logits.cols());
  }

  // One token for each of B sequences, sequence b in caches[b] at that cache's next
  // position: the layers' weights are read once for the batch (decode is bound by
  // reading them), attention runs per cache. Returns B x vocab logits, row b for
  // sequence b, valid until the next call. The caches must be distinct.
  const RowMatrix& decode_batch(const std::vector<int>& tokens, const std::vector<KVCache*>& caches) {
    require(!tokens.empty() && tokens.size() == caches.size(), "LlamaRunner::decode_batch: ", tokens.size(),
            " tokens for ", caches.size(), " caches");
    for (std::size_t b = 0; b < caches.size(); ++b) {
      require(caches[b] != nullptr, "LlamaRunner::decode_batch: cache ", b, " is null");
      for (std::size_t a = 0; a < b; ++a)
        require(caches[a] != caches[b], "LlamaRunner::decode_batch: caches ", a, " and ", b,
                " are the same cache (one sequence per cache)");
    }
    const auto batch = static_cast<Eigen::Index>(tokens.size());
    if (!batch_ws_ || batch_ws_->x.rows() != batch) batch_ws_ = std::make_unique<Workspace>(model_.config(), batch);
    forward(tokens.data(), *batch_ws_, caches.data(), true);
    return batch_ws_->logits;
  }

 private:
  struct Workspace {
    Workspace(const LlamaConfig& c, Eigen::Index tokens)
        : x(tokens, c.dim), xn(tokens, c.dim), qkv(tokens, c.qkv_width()), att(tokens, c.q_width()),
          mlp(tokens, 2 * c.hidden_dim), logits(tokens, c.vocab), cos(tokens, c.head_dim / 2),
          sin(tokens, c.head_dim / 2), positions(static_cast<std::size_t>(tokens)) {}
    RowMatrix x, xn, qkv, att, mlp, logits, cos, sin;
    RowMatrix unrotated_keys;  // keys before RoPE, for caches that code them so
    std::vector<std::int64_t> positions;  // of each row
  };

  // The rows of ws are either T consecutive tokens of one sequence in caches[0]
  // (`batched` false), or one token of each sequence in caches[0 .. T).
  void forward(const int* tokens, Workspace& ws, KVCache* const* caches, bool batched) {
    const LlamaConfig& c = model_.config();
    const LlamaWeights& w = model_.weights();
    const Eigen::Index T = ws.x.rows();
    const auto cache_of = [&](Eigen::Index t) -> KVCache& { return *caches[batched ? t : 0]; };
    bool any_unrotated = false;
    for (Eigen::Index t = 0; t < (batched ? T : 1); ++t) {
      const KVCache& cache = cache_of(t);
      const CacheShape& shape = cache.shape();
      require(shape.layers == c.layers && shape.kv_heads == c.kv_heads && shape.head_dim == c.head_dim,
              "LlamaRunner: cache shape (", shape.layers, " layers, ", shape.kv_heads, " kv heads, head_dim ",
              shape.head_dim, ") does not match the model (", c.layers, ", ", c.kv_heads, ", ", c.head_dim, ")");
      // A cache that codes keys before RoPE takes them so: no rotation to undo.
      if (const Rope* cache_rope = cache.key_rope()) {
        require(cache_rope->head_dim() == c.head_dim && cache_rope->theta() == rope_.theta() &&
                    cache_rope->style() == rope_.style(),
                "LlamaRunner: the cache codes keys before a RoPE (theta ", cache_rope->theta(), ", ",
                to_string(cache_rope->style()), ") that is not the model's (theta ", rope_.theta(), ", ",
                to_string(rope_.style()), ")");
        any_unrotated = true;
      }
    }
    for (Eigen::Index t = 0; t < T; ++t) {
      require(tokens[t] >= 0 && tokens[t] < c.vocab, "LlamaRunner: token ", tokens[t], " at index ", t,
              " outside the vocabulary [0, ", c.vocab, ")");
      ws.x.row(t) = w.embedding.row(tokens[t]);
      ws.positions[static_cast<std::size_t>(t)] = batched ? cache_of(t).next_position(0) : cache_of(0).next_position(0) + t;
    }
    rope_angles(ws);

    const int q_width = c.q_width(), kv_width = c.kv_width();
    for (int l = 0; l < c.layers; ++l) {
      const LlamaLayer& layer = w.layers[static_cast<std::size_t>(l)];
      for (Eigen::Index t = 0; t < (batched ? T : 1); ++t)
        require(cache_of(t).next_position(l) == ws.positions[static_cast<std::size_t>(t)], "LlamaRunner: cache layer ",
                l, " is at position ", cache_of(t).next_position(l), ", layer 0 at ",
                ws.positions[static_cast<std::size_t>(t)]);
      detail::rms_norm(ws.x, layer.attn_norm, c.norm_eps, ws.xn);
      detail::linear(ws.xn, layer.wqkv, ws.qkv, false);
      const auto queries = ws.qkv.leftCols(q_width);
      const auto keys = ws.qkv.middleCols(q_width, kv_width);
      const auto values = ws.qkv.rightCols(kv_width);
      if (observer_ && observe_before_rope_) observer_(l, queries, keys, values);
      if (any_unrotated) ws.unrotated_keys = keys;
      rotate(ws, 0, c.heads);
      rotate(ws, q_width, c.kv_heads);
      if (observer_ && !observe_before_rope_) observer_(l, queries, keys, values);
      if (batched || T == 1) {
        for (Eigen::Index t = 0; t < T; ++t) {
          KVCache& cache = cache_of(t);
          const bool unrotated = cache.key_rope() != nullptr;
          const ConstRowsRef cache_keys = unrotated ? ConstRowsRef(ws.unrotated_keys.middleRows(t, 1))
                                                    : ConstRowsRef(keys.middleRows(t, 1));
          const Eigen::Map<const RowMatrix> q(ws.qkv.row(t).data(), c.heads, c.head_dim);
          Eigen::Map<RowMatrix> out(ws.att.row(t).data(), c.heads, c.head_dim);
          cache.append(l, ws.positions[static_cast<std::size_t>(t)], cache_keys, values.middleRows(t, 1),
                       unrotated ? KeyForm::unrotated : KeyForm::rotated);
          cache.attend(l, q, out);
        }
      } else {
        KVCache& cache = cache_of(0);
        const bool unrotated = cache.key_rope() != nullptr;
        cache.prefill(l, ws.positions.front(), unrotated ? ConstRowsRef(ws.unrotated_keys) : ConstRowsRef(keys), values,
                      queries, ws.att, unrotated ? KeyForm::unrotated : KeyForm::rotated);
      }
      detail::linear(ws.att, layer.wo, ws.x, true);

      detail::rms_norm(ws.x, layer.mlp_norm, c.norm_eps, ws.xn);
      detail::linear(ws.xn, layer.w_gate_up, ws.mlp, false);
      auto gate = ws.mlp.leftCols(c.hidden_dim);
      gate = gate.array() / (1.0f + (-gate.array()).exp()) * ws.mlp.rightCols(c.hidden_dim).array();  // SwiGLU
      detail::linear(gate, layer.w_down, ws.x, true);
      // Finite weights can still overflow fp32 (validate() admits 3e38); no bound on
      // single weights rules that out without refusing real checkpoints with outliers, so
      // the residual stream is checked instead: T x dim compares beside the layer's
      // T x dim x dim multiply-adds. NaN from the attention surfaces here too.
      detail::require_finite(ws.x, ws.positions, l);
    }
    detail::rms_norm(ws.x, w.final_norm, c.norm_eps, ws.xn);
    detail::linear(ws.xn, w.output(), ws.logits, false);
    detail::require_finite(ws.logits, ws.positions, -1);
  }

  void rope_angles(Workspace& ws) const {
    for (Eigen::Index t = 0; t < ws.cos.rows(); ++t)
      rope_.angles(ws.positions[static_cast<std::size_t>(t)], ws.cos.row(t).data(), ws.sin.row(t).data());
  }

  // Rotates `heads` heads stored from column `first` of every qkv row.
  void rotate(Workspace& ws, int first, int heads) const {
    const int d = model_.config().head_dim;
    for (Eigen::Index t = 0; t < ws.qkv.rows(); ++t)
      for (int h = 0; h < heads; ++h) rope_.rotate(ws.qkv.row(t).data() + first + h * d, ws.cos.row(t).data(), ws.sin.row(t).data());
  }

  const LlamaModel& model_;
  Workspace decode_ws_;
  std::unique_ptr<Workspace> batch_ws_;  // decode_batch's, rebuilt when B changes
  Rope rope_;
  KVObserver observer_;
  bool observe_before_rope_ = false;
};

}  // namespace lexico
