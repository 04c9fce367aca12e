#pragma once
// A dictionary: N unit-norm atoms of dimension d, stored as the columns of a d x N
// matrix.
//
// File format (little-endian), version 1:
//   8 bytes  magic "LEXDICT\0"
//   u32      format version
//   u32 d, u32 N, u32 scalar type (0 = f32)
//   u32      metadata entry count, then per entry: u32 length + key bytes, u32 length + value bytes
//   d*N f32  atoms, column after column
//   u64      FNV-1a hash of every byte before it

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "../base/error.hpp"

namespace lexico {

// Free-form description: model, layer, "K" or "V", training method and settings.
using DictionaryMetadata = std::map<std::string, std::string>;

namespace detail {

inline constexpr char dictionary_magic[8] = {'L', 'E', 'X', 'D', 'I', 'C', 'T', '\0'};
inline constexpr std::uint32_t dictionary_format_version = 1;
inline constexpr std::uint32_t dictionary_scalar_f32 = 0;

struct Fnv1a {
  std::uint64_t state = 14695981039346656037ull;
  void add(const void* data, std::size_t size) {
    const auto* bytes = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < size; ++i) {
      state ^= bytes[i];
      state *= 1099511628211ull;
    }
  }
};

}  // namespace detail

class Dictionary {
 public:
  static constexpr int max_dim = 256;
  static constexpr int max_atoms = 65536;  // indices fit in uint16

  Dictionary() = default;

  // Takes d x N atoms and scales every column to unit norm.
  explicit Dictionary(Eigen::MatrixXf atoms, DictionaryMetadata metadata = {})
      : Dictionary(std::move(atoms), std::move(metadata), true) {}

  // The same dictionary with every atom entry rounded to fp16 (norms stay within
  // 2^-11 of 1): what a CodeSpace codes with, so that attention may read the atoms as
  // fp16, half the bytes, and still see exactly the atoms the codes were fitted to.
  Dictionary rounded_to_fp16() const {
    Eigen::MatrixXf rounded = atoms_.unaryExpr([](float x) { return static_cast<float>(Eigen::half(x)); });
    return Dictionary(std::move(rounded), metadata_, false);
  }

  int dim() const { return static_cast<int>(atoms_.rows()); }
  int size() const { return static_cast<int>(atoms_.cols()); }
  const Eigen::MatrixXf& atoms() const { return atoms_; }
  const DictionaryMetadata& metadata() const { return metadata_; }

  // out (d floats) = Σ_{i < count} coefficient(i) · atom index(i): decodes one code,
  // whatever holds it (the encoder's SparseCodes, a CodeStore row).
  template <typename Index, typename Coefficient>
  void combine(int count, Index&& index, Coefficient&& coefficient, float* out) const {
    Eigen::Map<Eigen::VectorXf> vector(out, atoms_.rows());
    vector.setZero();
    for (int i = 0; i < count; ++i) {
      const int atom = static_cast<int>(index(i));
      require(atom >= 0 && atom < atoms_.cols(), "Dictionary::combine: atom ", atom, " of ", atoms_.cols());
      vector += coefficient(i) * atoms_.col(atom);
    }
  }

  // G = DᵀD, N x N in fp32, computed on each call (training and diagnostics; the encoder
  // reads its own form of G, see code_book.hpp).
  Eigen::MatrixXf gram() const { return atoms_.transpose() * atoms_; }

  // Largest |<a_i, a_j>| over distinct atoms: near 1 means near-duplicate atoms.
  float max_coherence() const {
    const Eigen::MatrixXf g = gram();
    float worst = 0.0f;
    for (Eigen::Index j = 0; j < g.cols(); ++j)
      for (Eigen::Index i = 0; i < g.rows(); ++i)
        if (i != j) worst = std::max(worst, std::fabs(g(i, j)));
    return worst;
  }

  void save(const std::string& path) const;
  static Dictionary load(const std::string& path);

 private:
  // load() keeps the stored atoms bit for bit (they were normalised before saving).
  Dictionary(Eigen::MatrixXf atoms, DictionaryMetadata metadata, bool normalise)
      : atoms_(std::move(atoms)), metadata_(std::move(metadata)) {
    require(atoms_.rows() >= 1 && atoms_.rows() <= max_dim, "Dictionary: dimension d = ", atoms_.rows(),
            " outside [1, ", max_dim, "]");
    require(atoms_.cols() >= 1 && atoms_.cols() <= max_atoms, "Dictionary: atom count N = ", atoms_.cols(),
            " outside [1, ", max_atoms, "]");
    for (Eigen::Index j = 0; j < atoms_.cols(); ++j) {
      require(atoms_.col(j).allFinite(), "Dictionary: atom ", j, " has a NaN or Inf entry");
      const float norm = atoms_.col(j).norm();
      require(norm > 1e-20f, "Dictionary: atom ", j, " is zero and cannot be normalised");
      if (normalise) atoms_.col(j) /= norm;
    }
  }

  Eigen::MatrixXf atoms_;
  DictionaryMetadata metadata_;
};

namespace detail {

class DictionaryWriter {
 public:
  explicit DictionaryWriter(const std::string& path) : path_(path), out_(path, std::ios::binary) {
    require(out_.good(), "Dictionary::save: cannot open '", path, "' for writing");
  }
  void bytes(const void* data, std::size_t size) {
    hash_.add(data, size);
    out_.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  void u32(std::uint32_t value) { bytes(&value, sizeof value); }
  void text(const std::string& value) {
    u32(static_cast<std::uint32_t>(value.size()));
    bytes(value.data(), value.size());
  }
  void finish() {
    const std::uint64_t checksum = hash_.state;
    out_.write(reinterpret_cast<const char*>(&checksum), sizeof checksum);
    out_.close();
    require(!out_.fail(), "Dictionary::save: writing '", path_, "' failed");
  }

 private:
  std::string path_;
  std::ofstream out_;
  Fnv1a hash_;
};

class DictionaryReader {
 public:
  explicit DictionaryReader(const std::string& path) : path_(path) {
    std::ifstream in(path, std::ios::binary);
    require(in.good(), "Dictionary::load: cannot open '", path, "'");
    data_.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  void bytes(void* out, std::size_t size, const char* what) {
    require(size <= data_.size() - offset_, "Dictionary::load: '", path_, "' is truncated: ", what, " needs ", size,
            " bytes at offset ", offset_, " but the file has ", data_.size());
    std::memcpy(out, data_.data() + offset_, size);
    offset_ += size;
  }
  std::uint32_t u32(const char* what) {
    std::uint32_t value;
    bytes(&value, sizeof value, what);
    return value;
  }
  std::string text(const char* what) {
    const std::uint32_t length = u32(what);
    require(length <= data_.size() - offset_, "Dictionary::load: '", path_, "' is truncated: ", what, " of ",
            length, " bytes at offset ", offset_);
    std::string value(data_.data() + offset_, length);
    offset_ += length;
    return value;
  }
  void check_hash() {
    Fnv1a hash;
    hash.add(data_.data(), offset_);
    std::uint64_t stored;
    bytes(&stored, sizeof stored, "checksum");
    require(stored == hash.state, "Dictionary::load: '", path_, "' is corrupt: checksum mismatch");
    require(offset_ == data_.size(), "Dictionary::load: '", path_, "' has ", data_.size() - offset_,
            " unexpected bytes after the checksum");
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::vector<char> data_;
  std::size_t offset_ = 0;
};

}  // namespace detail

inline void Dictionary::save(const std::string& path) const {
  require(size() > 0, "Dictionary::save: the dictionary is empty");
  detail::DictionaryWriter out(path);
  out.bytes(detail::dictionary_magic, sizeof detail::dictionary_magic);
  out.u32(detail::dictionary_format_version);
  out.u32(static_cast<std::uint32_t>(dim()));
  out.u32(static_cast<std::uint32_t>(size()));
  out.u32(detail::dictionary_scalar_f32);
  out.u32(static_cast<std::uint32_t>(metadata_.size()));
  for (const auto& [key, value] : metadata_) {
    out.text(key);
    out.text(value);
  }
  out.bytes(atoms_.data(), sizeof(float) * static_cast<std::size_t>(atoms_.size()));
  out.finish();
}

inline Dictionary Dictionary::load(const std::string& path) {
  detail::DictionaryReader in(path);
  char magic[8];
  in.bytes(magic, sizeof magic, "magic");
  require(std::memcmp(magic, detail::dictionary_magic, sizeof magic) == 0, "Dictionary::load: '", path,
          "' is not a lexico dictionary (bad magic)");
  const std::uint32_t version = in.u32("format version");
  require(version == detail::dictionary_format_version, "Dictionary::load: '", path, "' has format version ",
          version, ", this build reads version ", detail::dictionary_format_version);
  const std::uint32_t d = in.u32("dimension"), n = in.u32("atom count"), scalar = in.u32("scalar type");
  require(d >= 1 && d <= static_cast<std::uint32_t>(max_dim) && n >= 1 && n <= static_cast<std::uint32_t>(max_atoms),
          "Dictionary::load: '", path, "' declares d = ", d, ", N = ", n, " (allowed d <= ", max_dim,
          ", N <= ", max_atoms, ")");
  require(scalar == detail::dictionary_scalar_f32, "Dictionary::load: '", path, "' has scalar type ", scalar,
          " (only 0 = f32 is defined)");
  const std::uint32_t entries = in.u32("metadata count");
  DictionaryMetadata metadata;
  for (std::uint32_t i = 0; i < entries; ++i) {
    std::string key = in.text("metadata key");
    metadata[key] = in.text("metadata value");
  }
  Eigen::MatrixXf atoms(d, n);
  in.bytes(atoms.data(), sizeof(float) * static_cast<std::size_t>(atoms.size()), "atoms");
  in.check_hash();
  for (Eigen::Index j = 0; j < atoms.cols(); ++j) {
    require(atoms.col(j).allFinite(), "Dictionary::load: '", path, "' atom ", j, " has a NaN or Inf entry");
    require(std::fabs(atoms.col(j).norm() - 1.0f) < 1e-5f, "Dictionary::load: '", path, "' atom ", j,
            " has norm ", atoms.col(j).norm(), ", expected 1");
  }
  return Dictionary(std::move(atoms), std::move(metadata), false);
}

}  // namespace lexico
