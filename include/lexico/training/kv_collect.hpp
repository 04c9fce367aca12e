#pragma once
// Collecting KV vectors for dictionary training: the model runs over windows of a
// token corpus the way inference runs a prompt (each window starts with BOS, at
// position 0, in a fresh cache), and every layer's keys (after RoPE) and values are
// kept, all KV heads pooled: a vector is one (token, KV head).
//
// Vectors go to memory (small collections, tests) or to one file per layer and K/V
// (training sets of millions of vectors), which FileVectorSource streams back.
//
// Vector file (little-endian): 8 bytes magic "LEXVECS\0", u32 version 1, u32 d,
// u64 count, then count x d f32, one vector after another.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "../cache/dense.hpp"
#include "../coding/key_metric.hpp"
#include "../base/error.hpp"
#include "../base/files.hpp"
#include "../model/llama.hpp"
#include "train.hpp"

namespace lexico {

// Little-endian uint16 token ids (the proxies' .u16 corpora); `name` starts the errors.
inline std::vector<int> parse_u16_tokens(std::string_view bytes, const std::string& name) {
  require(bytes.size() % 2 == 0, name, ": ", bytes.size(), " bytes is not a whole number of uint16 tokens");
  require(!bytes.empty(), name, ": no tokens");
  std::vector<int> tokens(bytes.size() / 2);
  const auto* b = reinterpret_cast<const unsigned char*>(bytes.data());
  for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = b[2 * i] | (b[2 * i + 1] << 8);
  return tokens;
}

// Token files above this are refused before they are read (8 G tokens).
constexpr std::uint64_t max_token_file_bytes = std::uint64_t(1) << 34;

inline std::vector<int> read_u16_tokens(const std::string& path) {
  return parse_u16_tokens(read_file(path, max_token_file_bytes), path);
}

// Up to `count` windows of at most `length` tokens from consecutive, non-overlapping
// slices of the corpus, in a random order (so any prefix of the list samples the
// whole corpus). A slice that does not begin with BOS gets BOS in front, as a
// prompt would.
inline std::vector<std::vector<int>> sample_windows(const std::vector<int>& tokens, int length, int bos,
                                                    std::size_t count, std::uint64_t seed) {
  require(length >= 2, "sample_windows: window length ", length, " must be at least 2");
  require(!tokens.empty(), "sample_windows: no tokens");
  const std::size_t slice = static_cast<std::size_t>(length - 1);
  std::vector<std::size_t> starts;
  for (std::size_t start = 0; start < tokens.size(); start += slice) starts.push_back(start);
  std::mt19937_64 rng(seed);
  detail::shuffle(starts, rng);
  starts.resize(std::min(starts.size(), count));
  std::vector<std::vector<int>> windows;
  for (const std::size_t start : starts) {
    const auto first = tokens.begin() + static_cast<std::ptrdiff_t>(start);
    const auto last = tokens.begin() + static_cast<std::ptrdiff_t>(std::min(tokens.size(), start + slice));
    std::vector<int> window;
    if (*first != bos) window.push_back(bos);
    window.insert(window.end(), first, last);
    windows.push_back(std::move(window));
  }
  return windows;
}

// Runs the model over each window in a fresh dense cache, `observer` seeing every layer's
// queries, keys and values (LlamaRunner::KVObserver); `progress(done)` after each window.
inline void observe_windows(const LlamaModel& model, const std::vector<std::vector<int>>& windows,
                            LlamaRunner::KVObserver observer, const std::function<void(std::size_t)>& progress,
                            bool keys_before_rope = false) {
  LlamaRunner runner(model);
  runner.set_kv_observer(std::move(observer), keys_before_rope);
  for (std::size_t w = 0; w < windows.size(); ++w) {
    DenseCache<float> cache(model.config().cache_shape());
    runner.prefill(windows[w], cache);
    if (progress) progress(w + 1);
  }
}

// Sees every layer's vectors of one window: keys and values are d x (T·kv_heads),
// token-major (column t·kv_heads + h is token t, KV head h).
using KVSink = std::function<void(int layer, const Eigen::MatrixXf& keys, const Eigen::MatrixXf& values)>;

// Runs the model over each window in a fresh dense cache; `progress(done)` after each.
// Keys are taken after RoPE (what a cache stores) unless `keys_before_rope`.
inline void collect_kv(const LlamaModel& model, const std::vector<std::vector<int>>& windows, const KVSink& sink,
                       const std::function<void(std::size_t)>& progress = {}, bool keys_before_rope = false) {
  const LlamaConfig& config = model.config();
  const int d = config.head_dim, heads = config.kv_heads;
  Eigen::MatrixXf keys, values;
  observe_windows(model, windows, [&](int layer, ConstRowsRef, ConstRowsRef k, ConstRowsRef v) {
    // Row t holds the token's KV heads side by side: d x heads columns each.
    keys.resize(d, k.rows() * heads);
    values.resize(d, v.rows() * heads);
    for (Eigen::Index t = 0; t < k.rows(); ++t) {
      keys.middleCols(t * heads, heads) = Eigen::Map<const Eigen::MatrixXf>(k.row(t).data(), d, heads);
      values.middleCols(t * heads, heads) = Eigen::Map<const Eigen::MatrixXf>(v.row(t).data(), d, heads);
    }
    sink(layer, keys, values);
  }, progress, keys_before_rope);
}

// The queries' energy per layer and dimension over `windows` (key_metric.hpp), each
// window run in a fresh dense cache; `progress(done)` after each.
inline QueryEnergy collect_query_energy(const LlamaModel& model, const std::vector<std::vector<int>>& windows,
                                        const std::function<void(std::size_t)>& progress = {}) {
  QueryEnergy energy(model.config().layers, model.config().head_dim);
  observe_windows(model, windows, [&](int layer, ConstRowsRef queries, ConstRowsRef, ConstRowsRef) {
    energy.add(layer, queries);
  }, progress);
  return energy;
}

// Another source's vectors mapped by T (a key or value metric's map of one layer):
// dictionaries trained on it live in the metric's space.
class MappedSource final : public VectorSource {
 public:
  MappedSource(VectorSource& source, Eigen::MatrixXf map) : source_(source), map_(std::move(map)) {
    require(map_.rows() == source_.dim() && map_.cols() == source_.dim(), "MappedSource: a ", map_.rows(), " x ",
            map_.cols(), " map for vectors of ", source_.dim());
  }
  int dim() const override { return source_.dim(); }
  void next(Eigen::Ref<Eigen::MatrixXf> out) override {
    source_.next(out);
    out = map_ * out;
  }

 private:
  VectorSource& source_;
  Eigen::MatrixXf map_;
};

// Keys and values of one layer, d x M each.
struct LayerVectors {
  Eigen::MatrixXf keys, values;
};

// collect_kv into memory: per layer, the windows' vectors one after another.
inline std::vector<LayerVectors> collect_kv_vectors(const LlamaModel& model,
                                                    const std::vector<std::vector<int>>& windows) {
  const LlamaConfig& config = model.config();
  Eigen::Index total = 0;
  for (const auto& window : windows) total += static_cast<Eigen::Index>(window.size()) * config.kv_heads;
  std::vector<LayerVectors> layers(static_cast<std::size_t>(config.layers));
  for (auto& layer : layers) {
    layer.keys.resize(config.head_dim, total);
    layer.values.resize(config.head_dim, total);
  }
  std::vector<Eigen::Index> filled(layers.size(), 0);
  collect_kv(model, windows, [&](int l, const Eigen::MatrixXf& keys, const Eigen::MatrixXf& values) {
    LayerVectors& layer = layers[static_cast<std::size_t>(l)];
    Eigen::Index& at = filled[static_cast<std::size_t>(l)];
    layer.keys.middleCols(at, keys.cols()) = keys;
    layer.values.middleCols(at, values.cols()) = values;
    at += keys.cols();
  });
  return layers;
}

namespace detail {

inline constexpr char vector_file_magic[8] = {'L', 'E', 'X', 'V', 'E', 'C', 'S', '\0'};
inline constexpr std::uint32_t vector_file_version = 1;
inline constexpr std::size_t vector_file_header = 24;

}  // namespace detail

// Appends vectors to a vector file; close() writes the final count and puts the file in
// place (until then, and if never closed, the path keeps what it held before).
class VectorFileWriter {
 public:
  VectorFileWriter(const std::string& path, int dim) : path_(path), dim_(dim), out_(path) {
    require(dim >= 1, "VectorFileWriter: dimension ", dim, " must be positive");
    write_header();
  }
  VectorFileWriter(const VectorFileWriter&) = delete;
  VectorFileWriter& operator=(const VectorFileWriter&) = delete;

  // Appends the columns of a d x M matrix.
  void append(const Eigen::MatrixXf& vectors) {
    require(vectors.rows() == dim_, "VectorFileWriter: '", path_, "' holds ", dim_, "-dimensional vectors, got ",
            vectors.rows());
    out_.write(vectors.data(), sizeof(float) * static_cast<std::size_t>(vectors.size()));
    count_ += static_cast<std::uint64_t>(vectors.cols());
  }

  void close() {
    out_.write_at(detail::vector_file_header - sizeof count_, &count_, sizeof count_);
    out_.commit();
  }

 private:
  void write_header() {
    const std::uint32_t version = detail::vector_file_version, dim = static_cast<std::uint32_t>(dim_);
    out_.write(detail::vector_file_magic, sizeof detail::vector_file_magic);
    out_.write(&version, sizeof version);
    out_.write(&dim, sizeof dim);
    out_.write(&count_, sizeof count_);
  }

  std::string path_;
  int dim_;
  AtomicFile out_;
  std::uint64_t count_ = 0;
};

// Random access to the vectors of a vector file (a path, or any ByteSource).
class VectorFile {
 public:
  explicit VectorFile(const std::string& path) : VectorFile(std::make_unique<FileBytes>(path)) {}
  explicit VectorFile(std::unique_ptr<const ByteSource> source) : source_(std::move(source)) {
    const std::string& path = source_->name();
    char magic[8];
    std::uint32_t version = 0, dim = 0;
    std::uint64_t count = 0;
    source_->read(0, magic, sizeof magic, "VectorFile: the magic");
    source_->read(8, &version, sizeof version, "VectorFile: the version");
    source_->read(12, &dim, sizeof dim, "VectorFile: the dimension");
    source_->read(16, &count, sizeof count, "VectorFile: the vector count");
    require(std::memcmp(magic, detail::vector_file_magic, sizeof magic) == 0, "VectorFile: '", path,
            "' is not a lexico vector file (bad magic)");
    require(version == detail::vector_file_version, "VectorFile: '", path, "' has version ", version, ", expected ",
            detail::vector_file_version);
    require(dim >= 1 && dim <= 65536, "VectorFile: '", path, "' declares dimension ", dim);
    const std::uint64_t size = source_->size();
    // Bound count first so that a corrupt header cannot overflow the size check.
    require(count <= size / (sizeof(float) * dim) &&
                size == detail::vector_file_header + count * dim * sizeof(float),
            "VectorFile: '", path, "' has ", size,
            " bytes, its header (", count, " vectors of ", dim, " floats) needs ",
            detail::vector_file_header + count * dim * sizeof(float));
    dim_ = static_cast<int>(dim);
    count_ = static_cast<Eigen::Index>(count);
  }

  const std::string& path() const { return source_->name(); }
  int dim() const { return dim_; }
  Eigen::Index count() const { return count_; }

  // Vectors [first, first + out.cols()) into the columns of out.
  void read(Eigen::Index first, Eigen::Ref<Eigen::MatrixXf> out) {
    require(out.rows() == dim_ && first >= 0 && first + out.cols() <= count_, "VectorFile::read: vectors [", first,
            ", ", first + out.cols(), ") of dimension ", out.rows(), " from '", path(), "' (", count_, " of dimension ",
            dim_, ")");
    const std::uint64_t start = detail::vector_file_header + sizeof(float) * static_cast<std::uint64_t>(first * dim_);
    const std::size_t column = sizeof(float) * static_cast<std::size_t>(dim_);
    // out may have an outer stride: read column by column only then.
    if (out.outerStride() == dim_) {
      source_->read(start, out.data(), column * static_cast<std::size_t>(out.cols()), "VectorFile::read");
    } else {
      for (Eigen::Index b = 0; b < out.cols(); ++b)
        source_->read(start + column * static_cast<std::uint64_t>(b), out.col(b).data(), column, "VectorFile::read");
    }
  }

  // The first min(count, limit) vectors.
  Eigen::MatrixXf read_head(Eigen::Index limit) {
    Eigen::MatrixXf out(dim_, std::min(limit, count_));
    read(0, out);
    return out;
  }

 private:
  std::unique_ptr<const ByteSource> source_;
  int dim_ = 0;
  Eigen::Index count_ = 0;
};

// Streams a vector file with bounded memory: blocks of `buffer` consecutive vectors
// in a random order each pass, each block shuffled. Collection writes whole windows
// in random corpus order, so a block already mixes many documents; the shuffle
// breaks up the token order inside windows.
class FileVectorSource final : public VectorSource {
 public:
  FileVectorSource(const std::string& path, Eigen::Index buffer, std::uint64_t seed, Eigen::Index limit = 0)
      : file_(path), rng_(seed) {
    count_ = limit > 0 ? std::min(limit, file_.count()) : file_.count();
    require(count_ > 0, "FileVectorSource: '", path, "' holds no vectors");
    require(buffer > 0, "FileVectorSource: buffer must be positive");
    block_ = std::min(buffer, count_);
    for (Eigen::Index first = 0; first < count_; first += block_) blocks_.push_back(first);
    next_block_ = blocks_.size();
  }

  int dim() const override { return file_.dim(); }
  Eigen::Index count() const { return count_; }

  void next(Eigen::Ref<Eigen::MatrixXf> out) override {
    require(out.rows() == file_.dim(), "FileVectorSource::next: asked for dimension ", out.rows(), ", '",
            file_.path(), "' holds ", file_.dim());
    for (Eigen::Index b = 0; b < out.cols(); ++b) {
      if (position_ == order_.size()) load_block();
      out.col(b) = data_.col(order_[position_++]);
    }
  }

 private:
  void load_block() {
    if (next_block_ == blocks_.size()) {
      detail::shuffle(blocks_, rng_);
      next_block_ = 0;
    }
    const Eigen::Index first = blocks_[next_block_++];
    data_.resize(file_.dim(), std::min(block_, count_ - first));
    file_.read(first, data_);
    order_.resize(static_cast<std::size_t>(data_.cols()));
    std::iota(order_.begin(), order_.end(), Eigen::Index(0));
    detail::shuffle(order_, rng_);
    position_ = 0;
  }

  VectorFile file_;
  std::mt19937_64 rng_;
  Eigen::Index count_ = 0, block_ = 0;
  std::vector<Eigen::Index> blocks_;
  std::size_t next_block_ = 0;
  Eigen::MatrixXf data_;
  std::vector<Eigen::Index> order_;
  std::size_t position_ = 0;
};

// Where collect_kv_files puts layer l's keys or values.
inline std::string kv_vector_path(const std::string& directory, int layer, bool keys) {
  char name[32];
  std::snprintf(name, sizeof name, "layer%02d.%s.vec", layer, keys ? "k" : "v");
  return (std::filesystem::path(directory) / name).string();
}

// collect_kv into one vector file per layer and K/V under `directory`.
inline void collect_kv_files(const LlamaModel& model, const std::vector<std::vector<int>>& windows,
                             const std::string& directory, const std::function<void(std::size_t)>& progress = {},
                             bool keys_before_rope = false) {
  const LlamaConfig& config = model.config();
  std::filesystem::create_directories(directory);
  std::vector<std::unique_ptr<VectorFileWriter>> keys, values;
  for (int l = 0; l < config.layers; ++l) {
    keys.push_back(std::make_unique<VectorFileWriter>(kv_vector_path(directory, l, true), config.head_dim));
    values.push_back(std::make_unique<VectorFileWriter>(kv_vector_path(directory, l, false), config.head_dim));
  }
  collect_kv(
      model, windows,
      [&](int l, const Eigen::MatrixXf& k, const Eigen::MatrixXf& v) {
        keys[static_cast<std::size_t>(l)]->append(k);
        values[static_cast<std::size_t>(l)]->append(v);
      },
      progress, keys_before_rope);
  for (int l = 0; l < config.layers; ++l) {
    keys[static_cast<std::size_t>(l)]->close();
    values[static_cast<std::size_t>(l)]->close();
  }
}

}  // namespace lexico
