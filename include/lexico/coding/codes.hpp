#pragma once
// Compact storage of sparse codes, one row per coded vector: up to s atom indices
// and coefficients (FP8 E4M3) with one power-of-two scale byte (E8M0) per
// row, so coefficients never overflow the format.
//
// Indices take b = index_bits bits each (ceil(log2 N) for N atoms: 12 for N = 4096),
// packed, each row starting on a byte. Fixed rows hold exactly s entries (a code with
// fewer atoms is padded with zero coefficients): ceil(s·b/8) + s + 1 bytes a row, no
// row header (3s + 1 at b = 16). Variable rows, for codes that a residual tolerance
// stopped early, store only the k entries used plus a one-byte count.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../base/error.hpp"
#include "../base/fp8.hpp"

namespace lexico {

class CodeStore {
 public:
  CodeStore() = default;
  CodeStore(int sparsity, bool variable_rows, int index_bits = 16)
      : sparsity_(sparsity), index_bits_(index_bits), variable_(variable_rows) {
    require(sparsity >= 1 && sparsity <= 255, "CodeStore: sparsity ", sparsity, " outside [1, 255]");
    require(index_bits >= 1 && index_bits <= 16, "CodeStore: index_bits ", index_bits, " outside [1, 16]");
  }

  // Bits an index needs to address `atoms` atoms.
  static int bits_for(std::size_t atoms) {
    int bits = 1;
    while (bits < 16 && (std::size_t{1} << bits) < atoms) ++bits;
    return bits;
  }

  int sparsity() const { return sparsity_; }
  int index_bits() const { return index_bits_; }
  bool variable_rows() const { return variable_; }
  std::size_t rows() const { return scales_.size(); }

  // Appends one code of `count` <= s entries: indices[i] and fp32 coefficients[i].
  void append(const std::uint16_t* indices, const float* coefficients, int count) {
    require(count >= 0 && count <= sparsity_, "CodeStore::append: code has ", count, " entries, the store holds at most ",
            sparsity_);
    for (int i = 0; i < count; ++i)  // checked before anything changes
      require(indices[i] >> index_bits_ == 0, "CodeStore::append: atom index ", indices[i], " needs more than ",
              index_bits_, " bits");
    const int stored = variable_ ? count : sparsity_;
    const std::size_t begin = coefficients_.size(), packed = packed_bytes_;
    packed_bytes_ += index_bytes(stored);
    grow(indices_, packed_bytes_ + read_slack);
    grow(coefficients_, begin + static_cast<std::size_t>(stored));
    grow(scales_, scales_.size() + 1);
    if (variable_) grow(counts_, counts_.size() + 1);
    indices_.resize(packed_bytes_ + read_slack, 0);
    for (int i = 0; i < count; ++i) {
      const std::size_t bit = static_cast<std::size_t>(i) * static_cast<std::size_t>(index_bits_);
      std::uint32_t field = static_cast<std::uint32_t>(indices[i]) << (bit % 8);
      for (std::size_t b = packed + bit / 8; field != 0; ++b, field >>= 8) indices_[b] |= static_cast<std::uint8_t>(field);
    }
    coefficients_.resize(begin + static_cast<std::size_t>(stored), 0);  // FP8 code 0 is +0.0
    scales_.push_back(fp8_encode_scaled(coefficients, count, coefficients_.data() + begin));
    if (variable_) counts_.push_back(static_cast<std::uint8_t>(count));
  }

  // The indices of one row, read from their packed bits where they are used.
  class Indices {
   public:
    Indices(const std::uint8_t* row, int bits) : row_(row), bits_(bits), mask_((std::uint32_t{1} << bits) - 1) {}
    std::uint16_t operator[](int i) const {
      const std::size_t bit = static_cast<std::size_t>(i) * static_cast<std::size_t>(bits_);
      std::uint32_t word;  // little-endian: the field's bits start at bit % 8
      std::memcpy(&word, row_ + bit / 8, sizeof word);
      return static_cast<std::uint16_t>((word >> (bit % 8)) & mask_);
    }

   private:
    const std::uint8_t* row_;
    int bits_;
    std::uint32_t mask_;
  };

  // Visits every row in order: visit(row, indices, fp8 codes, count, scale factor).
  // Inlined into the kernels: a call keeps their loop state in memory, a third slower.
  template <typename Visitor>
#if defined(__GNUC__)
  __attribute__((always_inline))
#endif
  void for_each_row(Visitor&& visit) const {
    const auto& scale_of = detail::e8m0_table();
    const std::uint8_t* packed = indices_.data();
    const std::uint8_t* coefficients = coefficients_.data();
    for (std::size_t r = 0; r < scales_.size(); ++r) {
      const int count = variable_ ? counts_[r] : sparsity_;
      visit(r, Indices(packed, index_bits_), coefficients, count, scale_of[scales_[r]]);
      packed += index_bytes(count);
      coefficients += count;
    }
  }

  std::size_t payload_bytes() const { return packed_bytes_ + coefficients_.size(); }
  std::size_t metadata_bytes() const { return scales_.size() + counts_.size(); }
  // Bytes allocated beyond those two: growth room and the read slack.
  std::size_t spare_bytes() const {
    return indices_.capacity() - packed_bytes_ + coefficients_.capacity() - coefficients_.size() +
           scales_.capacity() - scales_.size() + counts_.capacity() - counts_.size();
  }

  // Drops the oldest `count` rows.
  void erase_front(std::size_t count) {
    require(count <= rows(), "CodeStore::erase_front: ", count, " rows asked, ", rows(), " held");
    std::size_t entries = count * static_cast<std::size_t>(sparsity_), packed = count * index_bytes(sparsity_);
    if (variable_) {
      entries = packed = 0;
      for (std::size_t r = 0; r < count; ++r) {
        entries += counts_[r];
        packed += index_bytes(counts_[r]);
      }
      counts_.erase(counts_.begin(), counts_.begin() + static_cast<std::ptrdiff_t>(count));
    }
    indices_.erase(indices_.begin(), indices_.begin() + static_cast<std::ptrdiff_t>(packed));
    packed_bytes_ -= packed;
    coefficients_.erase(coefficients_.begin(), coefficients_.begin() + static_cast<std::ptrdiff_t>(entries));
    scales_.erase(scales_.begin(), scales_.begin() + static_cast<std::ptrdiff_t>(count));
  }

  void clear() {
    indices_.clear();
    packed_bytes_ = 0;
    coefficients_.clear();
    scales_.clear();
    counts_.clear();
  }

 private:
  // Bytes kept after the last row so that Indices may load 4 bytes at any index.
  static constexpr std::size_t read_slack = 3;

  // Grows by an eighth (at least 256 bytes) rather than doubling: a long sequence's codes
  // then carry at most ~12 % of unused capacity.
  static void grow(std::vector<std::uint8_t>& bytes, std::size_t needed) {
    if (needed > bytes.capacity()) bytes.reserve(std::max(needed, bytes.capacity() + bytes.capacity() / 8 + 256));
  }

  std::size_t index_bytes(int count) const {
    return (static_cast<std::size_t>(count) * static_cast<std::size_t>(index_bits_) + 7) / 8;
  }

  int sparsity_ = 1, index_bits_ = 16;
  bool variable_ = false;
  std::size_t packed_bytes_ = 0;
  std::vector<std::uint8_t> indices_;  // packed, index_bits_ per index, then read_slack zero bytes
  std::vector<std::uint8_t> coefficients_;  // FP8 E4M3 codes
  std::vector<std::uint8_t> scales_;        // E8M0, one per row
  std::vector<std::uint8_t> counts_;        // entries per row, variable rows only
};

}  // namespace lexico
