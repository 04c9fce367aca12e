#pragma once
// A dictionary: N unit-norm atoms of dimension d, stored as the columns of a d x N
// matrix.
//
// File format (little-endian), version 1:
//   8 bytes  magic "LEXDICT\0"
//   u32      format version
//   u32 d, u32 N, u32 scalar type of the atoms (0 = f32, 1 = IEEE fp16)
//   u32      metadata entry count (<= 4096), then per entry: u32 length + key bytes, u32 length
//            + value bytes (each <= 1 MiB)
//   d*N      atoms, column after column, in the scalar type
//   u64      FNV-1a hash of every byte before it
// fp16 files hold exactly the atoms a CodeSpace codes with (it rounds them to fp16), in
// half the bytes; their norms are within 2^-11 of 1, and they load without renormalising.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include <Eigen/Core>

#include "../base/checked.hpp"
#include "../base/error.hpp"
#include "../base/files.hpp"

namespace lexico {

// Free-form description: model, layer, "K" or "V", training method and settings.
using DictionaryMetadata = std::map<std::string, std::string>;

// How a file stores the atoms (the format's scalar type).
enum class AtomType : std::uint32_t { f32 = 0, f16 = 1 };

inline const char* to_string(AtomType type) { return type == AtomType::f16 ? "f16" : "f32"; }

inline AtomType parse_atom_type(const std::string& text) {
  if (text == "f32") return AtomType::f32;
  if (text == "f16") return AtomType::f16;
  throw error("atom type '" + text + "': expected f32 or f16");
}

namespace detail {

inline constexpr char dictionary_magic[8] = {'L', 'E', 'X', 'D', 'I', 'C', 'T', '\0'};
inline constexpr std::uint32_t dictionary_format_version = 1;

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

  // The file's bytes (format above); save() writes them to a temporary file beside
  // `path`, flushed and renamed into place, so an interrupted save leaves the previous
  // file or the complete new one.
  std::string to_bytes(AtomType type = AtomType::f32) const;
  void save(const std::string& path, AtomType type = AtomType::f32) const;
  // Every size in the file is checked against the bytes it holds before anything is
  // allocated for it. The path and in-memory forms read through load(ByteSource).
  static Dictionary load(const ByteSource& source);
  static Dictionary load(const std::string& path) { return load(FileBytes(path)); }
  static Dictionary from_bytes(std::string_view bytes, std::string name = "<memory>") {
    return load(MemoryBytes(bytes, std::move(name)));
  }

  // Bounds of the metadata a file may hold: a few descriptive strings in practice.
  static constexpr std::uint32_t max_metadata_entries = 4096;
  static constexpr std::uint32_t max_metadata_text = 1u << 20;

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

  template <typename Sink>
  void write(Sink&& sink, AtomType type) const;

  Eigen::MatrixXf atoms_;
  DictionaryMetadata metadata_;
};

namespace detail {

// Reads a dictionary file field by field, hashing what it reads; every count is checked
// against the bytes left in the source before anything is allocated for it.
class DictionaryReader {
 public:
  explicit DictionaryReader(const ByteSource& source) : source_(source) {}

  const std::string& name() const { return source_.name(); }
  std::uint64_t left() const { return source_.size() - offset_; }

  void bytes(void* out, std::size_t size, std::string_view what) {
    source_.read(offset_, out, size, what);
    hash_.add(out, size);
    offset_ += size;
  }
  std::uint32_t u32(std::string_view what) {
    std::uint32_t value;
    bytes(&value, sizeof value, what);
    return value;
  }
  std::string text(std::string_view what) {
    const std::uint32_t length = u32(what);
    require(length <= Dictionary::max_metadata_text && length <= left(), "Dictionary::load: '", name(), "': ", what,
            " of ", length, " bytes at offset ", offset_, " (the limit is ", Dictionary::max_metadata_text,
            ", the file has ", left(), " bytes left)");
    std::string value(length, '\0');
    bytes(value.data(), length, what);
    return value;
  }
  // The stored FNV-1a hash of every byte before it, then the end of the file.
  void check_hash() {
    const std::uint64_t expected = hash_.state;
    std::uint64_t stored;
    source_.read(offset_, &stored, sizeof stored, "checksum");
    offset_ += sizeof stored;
    require(stored == expected, "Dictionary::load: '", name(), "' is corrupt: checksum mismatch");
    require(offset_ == source_.size(), "Dictionary::load: '", name(), "' has ", left(),
            " unexpected bytes after the checksum");
  }

 private:
  const ByteSource& source_;
  std::uint64_t offset_ = 0;
  Fnv1a hash_;
};

}  // namespace detail

// Streams the file to `sink(data, size)` (a string, an AtomicFile).
template <typename Sink>
void Dictionary::write(Sink&& sink, AtomType type) const {
  require(size() > 0, "Dictionary::save: the dictionary is empty");
  require(metadata_.size() <= max_metadata_entries, "Dictionary::save: ", metadata_.size(),
          " metadata entries, the format allows ", max_metadata_entries);
  detail::Fnv1a hash;
  const auto bytes = [&](const void* data, std::size_t count) {
    hash.add(data, count);
    sink(data, count);
  };
  const auto u32 = [&](std::uint32_t value) { bytes(&value, sizeof value); };
  const auto text = [&](const std::string& value) {
    require(value.size() <= max_metadata_text, "Dictionary::save: a metadata text of ", value.size(),
            " bytes, the format allows ", max_metadata_text);
    u32(static_cast<std::uint32_t>(value.size()));
    bytes(value.data(), value.size());
  };
  bytes(detail::dictionary_magic, sizeof detail::dictionary_magic);
  u32(detail::dictionary_format_version);
  u32(static_cast<std::uint32_t>(dim()));
  u32(static_cast<std::uint32_t>(size()));
  u32(static_cast<std::uint32_t>(type));
  u32(static_cast<std::uint32_t>(metadata_.size()));
  for (const auto& [key, value] : metadata_) {
    text(key);
    text(value);
  }
  if (type == AtomType::f16) {
    const Eigen::Matrix<Eigen::half, Eigen::Dynamic, Eigen::Dynamic> half = atoms_.cast<Eigen::half>();
    bytes(half.data(), sizeof(Eigen::half) * static_cast<std::size_t>(half.size()));
  } else {
    bytes(atoms_.data(), sizeof(float) * static_cast<std::size_t>(atoms_.size()));
  }
  const std::uint64_t checksum = hash.state;
  sink(&checksum, sizeof checksum);
}

inline std::string Dictionary::to_bytes(AtomType type) const {
  std::string out;
  write([&](const void* data, std::size_t size) { out.append(static_cast<const char*>(data), size); }, type);
  return out;
}

inline void Dictionary::save(const std::string& path, AtomType type) const {
  AtomicFile file(path);
  write([&](const void* data, std::size_t size) { file.write(data, size); }, type);
  file.commit();
}

inline Dictionary Dictionary::load(const ByteSource& source) {
  detail::DictionaryReader in(source);
  const std::string& name = source.name();
  char magic[8];
  in.bytes(magic, sizeof magic, "magic");
  require(std::memcmp(magic, detail::dictionary_magic, sizeof magic) == 0, "Dictionary::load: '", name,
          "' is not a lexico dictionary (bad magic)");
  const std::uint32_t version = in.u32("format version");
  require(version == detail::dictionary_format_version, "Dictionary::load: '", name, "' has format version ",
          version, ", this build reads version ", detail::dictionary_format_version);
  const std::uint32_t d = in.u32("dimension"), n = in.u32("atom count"), scalar = in.u32("scalar type");
  require(d >= 1 && d <= static_cast<std::uint32_t>(max_dim) && n >= 1 && n <= static_cast<std::uint32_t>(max_atoms),
          "Dictionary::load: '", name, "' declares d = ", d, ", N = ", n, " (allowed d <= ", max_dim,
          ", N <= ", max_atoms, ")");
  require(scalar == static_cast<std::uint32_t>(AtomType::f32) || scalar == static_cast<std::uint32_t>(AtomType::f16),
          "Dictionary::load: '", name, "' has scalar type ", scalar, " (0 = f32 and 1 = f16 are defined)");
  const bool half = scalar == static_cast<std::uint32_t>(AtomType::f16);
  const std::uint32_t entries = in.u32("metadata count");
  // An entry takes at least its two 4-byte lengths.
  require(entries <= max_metadata_entries && entries <= in.left() / 8, "Dictionary::load: '", name, "': metadata count ",
          entries, " (the limit is ", max_metadata_entries, "; the file has ", in.left(), " bytes left)");
  DictionaryMetadata metadata;
  for (std::uint32_t i = 0; i < entries; ++i) {
    std::string key = in.text("metadata key");
    std::string value = in.text("metadata value");
    // save() writes each key once; a repeat would silently drop a value.
    require(!metadata.count(key), "Dictionary::load: '", name, "': metadata key '", key, "' appears twice");
    metadata.emplace(std::move(key), std::move(value));
  }
  const std::int64_t scalar_bytes = half ? 2 : 4;
  const std::int64_t atom_bytes = checked_mul(checked_mul(d, n, "dictionary atoms"), scalar_bytes, "dictionary atoms");
  require(static_cast<std::uint64_t>(atom_bytes) + 8 <= in.left(), "Dictionary::load: '", name, "' is truncated: ",
          d, " x ", n, " atoms need ", atom_bytes, " bytes and an 8-byte checksum, the file has ", in.left(),
          " bytes left");
  Eigen::MatrixXf atoms(d, n);
  if (half) {
    Eigen::Matrix<Eigen::half, Eigen::Dynamic, Eigen::Dynamic> stored(d, n);
    in.bytes(stored.data(), static_cast<std::size_t>(atom_bytes), "atoms");
    atoms = stored.cast<float>();
  } else {
    in.bytes(atoms.data(), static_cast<std::size_t>(atom_bytes), "atoms");
  }
  in.check_hash();
  // fp16 rounding moves a unit norm by at most 2^-11.
  const float norm_tolerance = half ? 1e-3f : 1e-5f;
  for (Eigen::Index j = 0; j < atoms.cols(); ++j) {
    require(atoms.col(j).allFinite(), "Dictionary::load: '", name, "' atom ", j, " has a NaN or Inf entry");
    require(std::fabs(atoms.col(j).norm() - 1.0f) < norm_tolerance, "Dictionary::load: '", name, "' atom ", j,
            " has norm ", atoms.col(j).norm(), ", expected 1");
  }
  return Dictionary(std::move(atoms), std::move(metadata), false);
}

}  // namespace lexico
