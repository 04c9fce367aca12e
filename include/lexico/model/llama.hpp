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
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "../cache/attention.hpp"
#include "../cache/cache.hpp"
#include "../base/error.hpp"
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

  int q_width() const { return heads * head_dim; }
  int kv_width() const { return kv_heads * head_dim; }
  Rope rotary() const { return Rope(head_dim, rope_theta, rope); }
  int qkv_width() const { return q_width() + 2 * kv_width(); }
  CacheShape cache_shape() const { return {layers, kv_heads, head_dim}; }
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
  // Checks every shape against the config and every weight for NaN/Inf.
  LlamaModel(LlamaConfig config, LlamaWeights weights) : config_(config), weights_(std::move(weights)) { validate(); }

  // A directory is a Hugging Face checkpoint (config.json + safetensors), a file a
  // llama2.c .bin.
  static LlamaModel load(const std::string& path) {
    return std::filesystem::is_directory(path) ? load_hf(path) : load_llama2c(path);
  }
  static LlamaModel load_hf(const std::string& directory);
  static LlamaModel load_llama2c(const std::string& file);

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

// Reads tensor `name` of shape [rows, cols] (or [rows] when cols is 0) into dst.
inline void read_tensor(const SafetensorsCheckpoint& ckpt, const std::string& name, float* dst, std::int64_t rows,
                        std::int64_t cols) {
  const SafetensorsTensor& t = ckpt.tensor(name);
  const std::vector<std::int64_t> want = cols > 0 ? std::vector<std::int64_t>{rows, cols} : std::vector<std::int64_t>{rows};
  if (t.shape != want) {
    std::string found, expected;
    for (const auto d : t.shape) found += (found.empty() ? "" : ", ") + std::to_string(d);
    for (const auto d : want) expected += (expected.empty() ? "" : ", ") + std::to_string(d);
    throw error(concat(ckpt.file_of(name).path(), ": tensor '", name, "' has shape [", found, "], expected [", expected,
                       "]"));
  }
  ckpt.read_f32(name, dst, static_cast<std::size_t>(rows * (cols > 0 ? cols : 1)));
}

inline int config_int(const json::Value& config, const std::string& source, const char* key, int fallback = -1) {
  const json::Value* v = config.find(key);
  if (v == nullptr || v->is_null()) {
    require(fallback >= 0, source, ": missing key \"", key, "\"");
    return fallback;
  }
  const std::int64_t n = v->as_int(source + ": " + key);
  require(n >= 0 && n <= (1 << 30), source, ": ", key, " = ", n, " out of range");
  return static_cast<int>(n);
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
  require(c.dim > 0 && c.hidden_dim > 0 && c.layers > 0 && c.heads > 0 && c.kv_heads > 0 && c.head_dim > 0 &&
              c.vocab > 0,
          "LlamaModel: config needs positive dim, hidden_dim, layers, heads, kv_heads, head_dim and vocab");
  require(c.heads % c.kv_heads == 0, "LlamaModel: heads ", c.heads, " not a multiple of kv_heads ", c.kv_heads);
  require(c.head_dim % 2 == 0, "LlamaModel: RoPE needs an even head_dim, got ", c.head_dim);
  require(c.norm_eps > 0 && std::isfinite(c.norm_eps) && c.rope_theta > 1 && std::isfinite(c.rope_theta),
          "LlamaModel: norm_eps must be positive and rope_theta above 1");
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

inline LlamaModel LlamaModel::load_hf(const std::string& directory) {
  const std::string config_path = directory + "/config.json";
  const json::Value json = json::parse_file(config_path);
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
  c.dim = detail::config_int(json, config_path, "hidden_size");
  c.hidden_dim = detail::config_int(json, config_path, "intermediate_size");
  c.layers = detail::config_int(json, config_path, "num_hidden_layers");
  c.heads = detail::config_int(json, config_path, "num_attention_heads");
  require(c.heads > 0, config_path, ": num_attention_heads must be positive");
  c.kv_heads = detail::config_int(json, config_path, "num_key_value_heads", c.heads);
  c.head_dim = detail::config_int(json, config_path, "head_dim", c.dim / c.heads);
  c.vocab = detail::config_int(json, config_path, "vocab_size");
  c.max_context = detail::config_int(json, config_path, "max_position_embeddings", 2048);
  c.norm_eps = static_cast<float>(detail::config_number(json, config_path, "rms_norm_eps", 1e-6));
  c.rope_theta = static_cast<float>(detail::config_number(json, config_path, "rope_theta", 10000.0));
  c.rope = RopeStyle::rotate_half;
  c.bos_id = detail::config_int(json, config_path, "bos_token_id", 1);
  c.eos_id = detail::config_int(json, config_path, "eos_token_id", 2);
  const bool tied = detail::config_bool(json, config_path, "tie_word_embeddings", false);
  require(c.dim > 0 && c.hidden_dim > 0 && c.layers > 0 && c.kv_heads > 0 && c.head_dim > 0 && c.vocab > 0,
          config_path, ": sizes must be positive");

  const SafetensorsCheckpoint ckpt(directory);
  LlamaWeights w;
  // Tied checkpoints may store the shared matrix under either name (656K keeps only lm_head).
  const std::string embedding_name =
      ckpt.contains("model.embed_tokens.weight") || !tied ? "model.embed_tokens.weight" : "lm_head.weight";
  w.embedding.resize(c.vocab, c.dim);
  detail::read_tensor(ckpt, embedding_name, w.embedding.data(), c.vocab, c.dim);
  if (!tied) {
    w.lm_head.resize(c.vocab, c.dim);
    detail::read_tensor(ckpt, "lm_head.weight", w.lm_head.data(), c.vocab, c.dim);
  }
  w.final_norm.resize(c.dim);
  detail::read_tensor(ckpt, "model.norm.weight", w.final_norm.data(), c.dim, 0);
  for (int l = 0; l < c.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LlamaLayer layer;
    layer.attn_norm.resize(c.dim);
    layer.mlp_norm.resize(c.dim);
    detail::read_tensor(ckpt, p + "input_layernorm.weight", layer.attn_norm.data(), c.dim, 0);
    detail::read_tensor(ckpt, p + "post_attention_layernorm.weight", layer.mlp_norm.data(), c.dim, 0);
    layer.wqkv.resize(c.qkv_width(), c.dim);
    detail::read_tensor(ckpt, p + "self_attn.q_proj.weight", layer.wqkv.data(), c.q_width(), c.dim);
    detail::read_tensor(ckpt, p + "self_attn.k_proj.weight", layer.wqkv.row(c.q_width()).data(), c.kv_width(), c.dim);
    detail::read_tensor(ckpt, p + "self_attn.v_proj.weight", layer.wqkv.row(c.q_width() + c.kv_width()).data(),
                        c.kv_width(), c.dim);
    layer.wo.resize(c.dim, c.q_width());
    detail::read_tensor(ckpt, p + "self_attn.o_proj.weight", layer.wo.data(), c.dim, c.q_width());
    layer.w_gate_up.resize(2 * c.hidden_dim, c.dim);
    detail::read_tensor(ckpt, p + "mlp.gate_proj.weight", layer.w_gate_up.data(), c.hidden_dim, c.dim);
    detail::read_tensor(ckpt, p + "mlp.up_proj.weight", layer.w_gate_up.row(c.hidden_dim).data(), c.hidden_dim, c.dim);
    layer.w_down.resize(c.dim, c.hidden_dim);
    detail::read_tensor(ckpt, p + "mlp.down_proj.weight", layer.w_down.data(), c.dim, c.hidden_dim);
    w.layers.push_back(std::move(layer));
  }
  return LlamaModel(c, std::move(w));
}

inline LlamaModel LlamaModel::load_llama2c(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  require(static_cast<bool>(in), file, ": cannot open file");
  in.seekg(0, std::ios::end);
  const std::int64_t size = static_cast<std::int64_t>(in.tellg());
  in.seekg(0);
  std::int32_t header[7];
  require(size >= static_cast<std::int64_t>(sizeof header), file, ": truncated: ", size,
          " bytes, shorter than the 28-byte llama2.c header");
  in.read(reinterpret_cast<char*>(header), sizeof header);
  const char* names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  for (int i = 0; i < 7; ++i)
    require(header[i] != 0 && header[i] > -(1 << 24) && header[i] < (1 << 24) && (i == 5 || header[i] > 0), file,
            ": header field ", names[i], " = ", header[i], " is out of range");
  LlamaConfig c;
  c.dim = header[0];
  c.hidden_dim = header[1];
  c.layers = header[2];
  c.heads = header[3];
  c.kv_heads = header[4];
  const bool shared = header[5] > 0;  // a negative vocab_size announces a separate classifier
  c.vocab = shared ? header[5] : -header[5];
  c.max_context = header[6];
  require(c.dim % c.heads == 0, file, ": dim ", c.dim, " is not a multiple of n_heads ", c.heads);
  c.head_dim = c.dim / c.heads;
  c.norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  c.rope = RopeStyle::interleaved;
  c.bos_id = 1;
  c.eos_id = 2;

  const std::int64_t L = c.layers, dim = c.dim, kv = c.kv_width(), hidden = c.hidden_dim, vocab = c.vocab;
  const std::int64_t rope_tables = 2 * static_cast<std::int64_t>(c.max_context) * (c.head_dim / 2);
  const std::int64_t floats = vocab * dim + L * (2 * dim + 2 * dim * dim + 2 * kv * dim + 3 * hidden * dim) + dim +
                              rope_tables + (shared ? 0 : vocab * dim);
  require(size == 28 + 4 * floats, file, ": ", size, " bytes, but the header (dim ", c.dim, ", hidden ", c.hidden_dim,
          ", layers ", c.layers, ", heads ", c.heads, "/", c.kv_heads, ", vocab ", header[5], ", seq_len ",
          c.max_context, ") needs ", 28 + 4 * floats);

  // Each tensor is stored for all layers before the next one.
  auto read = [&](float* dst, std::int64_t n, const char* what) {
    in.read(reinterpret_cast<char*>(dst), static_cast<std::streamsize>(4 * n));
    require(in.good(), file, ": read error in ", what);
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
  in.seekg(4 * rope_tables, std::ios::cur);  // legacy RoPE tables: recomputed instead
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
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const float inverse = 1.0f / std::sqrt(x.row(t).squaredNorm() / static_cast<float>(x.cols()) + eps);
    out.row(t) = (x.row(t) * inverse).cwiseProduct(weight.transpose());
  }
}

}  // namespace detail

// Runs a LlamaModel through any KVCache. Keeps its workspaces between calls, so
// decode() allocates nothing; the model must outlive the runner.
class LlamaRunner {
 public:
  // Sees every layer's new keys and values, T x kv_width each, before they reach the
  // cache: how dictionary training collects KV vectors. Keys are those the cache
  // stores (after RoPE) unless `keys_before_rope`.
  using KVObserver = std::function<void(int layer, ConstRowsRef keys, ConstRowsRef values)>;

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
    forward(tokens.data(), ws, cache);
    return std::move(ws.logits);
  }

  // One token; the logits (vocab) stay valid until the next call.
  Eigen::Map<const Eigen::VectorXf> decode(int token, KVCache& cache) {
    forward(&token, decode_ws_, cache);
    return Eigen::Map<const Eigen::VectorXf>(decode_ws_.logits.data(), decode_ws_.logits.cols());
  }

 private:
  struct Workspace {
    Workspace(const LlamaConfig& c, Eigen::Index tokens)
        : x(tokens, c.dim), xn(tokens, c.dim), qkv(tokens, c.qkv_width()), att(tokens, c.q_width()),
          mlp(tokens, 2 * c.hidden_dim), logits(tokens, c.vocab), cos(tokens, c.head_dim / 2),
          sin(tokens, c.head_dim / 2) {}
    RowMatrix x, xn, qkv, att, mlp, logits, cos, sin;
    RowMatrix unrotated_keys;  // keys before RoPE, for caches that code them so
  };

  void forward(const int* tokens, Workspace& ws, KVCache& cache) {
    const LlamaConfig& c = model_.config();
    const LlamaWeights& w = model_.weights();
    const CacheShape& shape = cache.shape();
    require(shape.layers == c.layers && shape.kv_heads == c.kv_heads && shape.head_dim == c.head_dim,
            "LlamaRunner: cache shape (", shape.layers, " layers, ", shape.kv_heads, " kv heads, head_dim ",
            shape.head_dim, ") does not match the model (", c.layers, ", ", c.kv_heads, ", ", c.head_dim, ")");
    const Eigen::Index T = ws.x.rows();
    const std::int64_t start = cache.next_position(0);
    for (Eigen::Index t = 0; t < T; ++t) {
      require(tokens[t] >= 0 && tokens[t] < c.vocab, "LlamaRunner: token ", tokens[t], " at index ", t,
              " outside the vocabulary [0, ", c.vocab, ")");
      ws.x.row(t) = w.embedding.row(tokens[t]);
    }
    rope_angles(start, ws);

    const int q_width = c.q_width(), kv_width = c.kv_width();
    for (int l = 0; l < c.layers; ++l) {
      const LlamaLayer& layer = w.layers[static_cast<std::size_t>(l)];
      require(cache.next_position(l) == start, "LlamaRunner: cache layer ", l, " is at position ",
              cache.next_position(l), ", layer 0 at ", start);
      detail::rms_norm(ws.x, layer.attn_norm, c.norm_eps, ws.xn);
      detail::linear(ws.xn, layer.wqkv, ws.qkv, false);
      const auto queries = ws.qkv.leftCols(q_width);
      const auto keys = ws.qkv.middleCols(q_width, kv_width);
      const auto values = ws.qkv.rightCols(kv_width);
      if (observer_ && observe_before_rope_) observer_(l, keys, values);
      // A cache that codes keys before RoPE takes them so: no rotation to undo.
      const Rope* cache_rope = cache.key_rope();
      if (cache_rope) {
        require(cache_rope->head_dim() == c.head_dim && cache_rope->theta() == rope_.theta() &&
                    cache_rope->style() == rope_.style(),
                "LlamaRunner: the cache codes keys before a RoPE (theta ", cache_rope->theta(), ", ",
                to_string(cache_rope->style()), ") that is not the model's (theta ", rope_.theta(), ", ",
                to_string(rope_.style()), ")");
        ws.unrotated_keys = keys;
      }
      rotate(ws, 0, c.heads);
      rotate(ws, q_width, c.kv_heads);
      if (observer_ && !observe_before_rope_) observer_(l, keys, values);
      const KeyForm form = cache_rope ? KeyForm::unrotated : KeyForm::rotated;
      const ConstRowsRef cache_keys = cache_rope ? ConstRowsRef(ws.unrotated_keys) : ConstRowsRef(keys);
      if (T == 1) {
        const Eigen::Map<const RowMatrix> q(ws.qkv.data(), c.heads, c.head_dim);
        Eigen::Map<RowMatrix> out(ws.att.data(), c.heads, c.head_dim);
        cache.append(l, start, cache_keys, values, form);
        cache.attend(l, q, out);
      } else {
        cache.prefill(l, start, cache_keys, values, queries, ws.att, form);
      }
      detail::linear(ws.att, layer.wo, ws.x, true);

      detail::rms_norm(ws.x, layer.mlp_norm, c.norm_eps, ws.xn);
      detail::linear(ws.xn, layer.w_gate_up, ws.mlp, false);
      auto gate = ws.mlp.leftCols(c.hidden_dim);
      gate = gate.array() / (1.0f + (-gate.array()).exp()) * ws.mlp.rightCols(c.hidden_dim).array();  // SwiGLU
      detail::linear(gate, layer.w_down, ws.x, true);
    }
    detail::rms_norm(ws.x, w.final_norm, c.norm_eps, ws.xn);
    detail::linear(ws.xn, w.output(), ws.logits, false);
  }

  void rope_angles(std::int64_t start, Workspace& ws) const {
    for (Eigen::Index t = 0; t < ws.cos.rows(); ++t) rope_.angles(start + t, ws.cos.row(t).data(), ws.sin.row(t).data());
  }

  // Rotates `heads` heads stored from column `first` of every qkv row.
  void rotate(Workspace& ws, int first, int heads) const {
    const int d = model_.config().head_dim;
    for (Eigen::Index t = 0; t < ws.qkv.rows(); ++t)
      for (int h = 0; h < heads; ++h) rope_.rotate(ws.qkv.row(t).data() + first + h * d, ws.cos.row(t).data(), ws.sin.row(t).data());
  }

  const LlamaModel& model_;
  Workspace decode_ws_;
  Rope rope_;
  KVObserver observer_;
  bool observe_before_rope_ = false;
};

}  // namespace lexico
