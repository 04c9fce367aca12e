#pragma once
// Integer block quantization: a block of n values becomes n unsigned b-bit codes, packed,
// plus one or two fp16 parameters, and is read back as  x̂ = code · scale + offset.
// Three rules share the packing and the decoder:
//
//   min_max  KIVI (jy-yuan/KIVI quant/new_pack.py): scale = (max - min) / (2^b - 1) and
//            offset = min, both stored in fp16; code = round((x - min) / scale) clamped to
//            [0, 2^b - 1], computed from the fp16-rounded scale and min that are stored.
//            KIVI divides by zero when max == min; here a zero scale gives code 0, x̂ = min.
//   q8_0     llama.cpp (ggml/src/ggml-quants.c, quantize_row_q8_0_ref): d = max|x| / 127,
//            q = round(x / d) in [-127, 127] (half away from zero); d stored in fp16, the
//            codes from the fp32 d. Stored as q + 128, so offset = -128 d.
//   q4_0     llama.cpp quantize_row_q4_0_ref: d = v / -8 with v the value of largest
//            magnitude (the first one on ties), q = min(15, trunc(x / d + 8.5)); d stored
//            in fp16, x̂ = (q - 8) d, so offset = -8 d.
//
// Packing: code i of a block sits at bit (i·b mod 8) of byte i·b/8, first code in the low
// bits (KIVI's order within its int32 words). llama.cpp's q4_0 puts codes j and j+16 in one
// byte instead; blocks here are internal, so only the bits per element must match theirs.
// Every product code · d and the sum with the offset are exact in fp32 for q8_0 and q4_0
// (an 11-bit fp16 mantissa times an 8-bit code), so x̂ equals llama.cpp's dequantization.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include <Eigen/Core>

#include "attention.hpp"
#include "../base/error.hpp"
#include "../base/half.hpp"

namespace lexico {

enum class QuantScheme { min_max, q8_0, q4_0, symmetric };

inline const char* scheme_name(QuantScheme scheme) {
  switch (scheme) {
    case QuantScheme::q8_0: return "q8_0";
    case QuantScheme::q4_0: return "q4_0";
    case QuantScheme::symmetric: return "symmetric";
    default: return "min_max";
  }
}

namespace detail {

// out[i] = code_i · scale + offset for n codes of Bits bits.
template <int Bits>
void dequantize_codes(const std::uint8_t* packed, int n, float scale, float offset, float* out) {
  constexpr int per_byte = 8 / Bits;
  constexpr unsigned mask_bits = (1u << Bits) - 1u;
  int vectorised = 0;  // codes done 32 at a time
#if defined(__AVX512F__)
  if constexpr (Bits == 8 || Bits == 4) {
    // 32 codes at a time, one byte each after unpacking (nibbles low first), widened to
    // fp32: a quantized recent tier decodes every held token at every decode step.
    vectorised = n / 32 * 32;
    const __m512 s = _mm512_set1_ps(scale), o = _mm512_set1_ps(offset);
    for (int i = 0; i < vectorised; i += 32) {
      const std::uint8_t* bytes = packed + i / per_byte;
      __m128i low, high;
      if constexpr (Bits == 8) {
        low = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
        high = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16));
      } else {
        const __m128i both = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
        const __m128i nibble = _mm_set1_epi8(0x0F);
        const __m128i even = _mm_and_si128(both, nibble), odd = _mm_and_si128(_mm_srli_epi16(both, 4), nibble);
        low = _mm_unpacklo_epi8(even, odd);
        high = _mm_unpackhi_epi8(even, odd);
      }
      _mm512_storeu_ps(out + i, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(low)), s, o));
      _mm512_storeu_ps(out + i + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(high)), s, o));
    }
  } else {
    // 16 codes fill 32 or 16 bits: that word in every lane, lane j shifted right by j·Bits
    // (the residuals of lexico codes, read for every coded token at every decode step).
    vectorised = n / 32 * 32;
    const __m512 s = _mm512_set1_ps(scale), o = _mm512_set1_ps(offset);
    const __m512i shifts = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(Bits));
    const __m512i mask = _mm512_set1_epi32(static_cast<int>(mask_bits));
    for (int i = 0; i < vectorised; i += 16) {
      std::uint32_t word = 0;
      std::memcpy(&word, packed + i * Bits / 8, 2 * Bits);
      const __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts), mask);
      _mm512_storeu_ps(out + i, _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes), s, o));
    }
  }
#endif
  for (int byte = vectorised / per_byte; byte < n / per_byte; ++byte) {
    const unsigned bits = packed[byte];
    for (int j = 0; j < per_byte; ++j)
      out[byte * per_byte + j] = static_cast<float>((bits >> (j * Bits)) & mask_bits) * scale + offset;
  }
}

}  // namespace detail

class BlockQuantizer {
 public:
  // min_max takes bits 2, 4 or 8, symmetric 1, 2 or 4; q8_0 and q4_0 have their own widths.
  explicit BlockQuantizer(QuantScheme scheme, int bits = 0)
      : scheme_(scheme), bits_(scheme == QuantScheme::q8_0 ? 8 : scheme == QuantScheme::q4_0 ? 4 : bits) {
    if (scheme == QuantScheme::symmetric)
      require(bits_ == 1 || bits_ == 2 || bits_ == 4, "BlockQuantizer: symmetric codes need 1, 2 or 4 bits (got ",
              bits, ")");
    else
      require(bits_ == 2 || bits_ == 4 || bits_ == 8, "BlockQuantizer: min_max codes need 2, 4 or 8 bits (got ", bits,
              ")");
  }

  QuantScheme scheme() const { return scheme_; }
  int bits() const { return bits_; }
  // fp16 parameters per block: scale and minimum, or the scale alone.
  int parameters() const { return scheme_ == QuantScheme::min_max ? 2 : 1; }
  // Bytes of packed codes for a block of n values (n a multiple of 8 / bits).
  int code_bytes(int n) const { return n * bits_ / 8; }
  bool packs(int n) const { return n > 0 && n * bits_ % 8 == 0; }

  // Codes the n values x[0], x[stride], ... into packed (code_bytes(n) bytes) and params.
  void quantize(const float* x, int n, Eigen::Index stride, std::uint8_t* packed, Eigen::half* params) const {
    float low = x[0], high = x[0], largest = x[0], magnitude = 0.0f;
    for (int i = 0; i < n; ++i) {
      const float v = x[i * stride];
      require(std::isfinite(v), "BlockQuantizer: value ", i, " of a block is ", v);
      low = std::min(low, v);
      high = std::max(high, v);
      magnitude += std::fabs(v);
      if (std::fabs(v) > std::fabs(largest)) largest = v;
    }
    std::memset(packed, 0, static_cast<std::size_t>(code_bytes(n)));
    float inverse = 0.0f, shift = 0.0f;  // code = f(x · inverse + shift), per scheme
    switch (scheme_) {
      case QuantScheme::min_max: {
        params[0] = Eigen::half((high - low) / static_cast<float>((1 << bits_) - 1));
        params[1] = Eigen::half(low);
        const float scale = static_cast<float>(params[0]);
        inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
        shift = -static_cast<float>(params[1]) * inverse;
        break;
      }
      case QuantScheme::q8_0: {
        const float d = std::fabs(largest) / 127.0f;
        params[0] = Eigen::half(d);
        inverse = d > 0.0f ? 1.0f / d : 0.0f;
        break;
      }
      case QuantScheme::q4_0: {
        const float d = largest / -8.0f;
        params[0] = Eigen::half(d);
        inverse = d != 0.0f ? 1.0f / d : 0.0f;
        shift = 8.5f;
        break;
      }
      case QuantScheme::symmetric: {
        // Capped at fp16's largest value: legal fp16 vectors may leave a code's residual up
        // to twice their size, and a residual, a correction, may saturate where a value may not.
        const float d = std::min(65504.0f, bits_ == 1 ? 2.0f * magnitude / static_cast<float>(n)
                                                      : std::fabs(largest) / static_cast<float>(1 << (bits_ - 1)));
        params[0] = Eigen::half(d);
        const float stored = static_cast<float>(params[0]);
        inverse = stored > 0.0f ? 1.0f / stored : 0.0f;
        shift = static_cast<float>(1 << (bits_ - 1));
        break;
      }
    }
    for (int k = 0; k < parameters(); ++k)
      require(std::isfinite(static_cast<float>(params[k])), "BlockQuantizer: a ", scheme_name(scheme_),
              " block parameter overflows fp16 (values up to ", std::fabs(largest), ")");
    const float top = static_cast<float>((1 << bits_) - 1);
    for (int i = 0; i < n; ++i) {
      const float v = x[i * stride];
      float code;
      if (scheme_ == QuantScheme::min_max) {
        code = inverse > 0.0f ? std::nearbyint(std::clamp(v * inverse + shift, 0.0f, top)) : 0.0f;
      } else if (scheme_ == QuantScheme::q8_0) {
        code = std::round(v * inverse) + 128.0f;
      } else if (scheme_ == QuantScheme::symmetric) {
        code = std::clamp(std::floor(v * inverse) + shift, 0.0f, top);
      } else {
        code = std::min(top, std::trunc(v * inverse + shift));
      }
      packed[i * bits_ / 8] |= static_cast<std::uint8_t>(static_cast<unsigned>(code) << (i * bits_ % 8));
    }
  }

  // x̂ of a block: n values into out.
  void dequantize(const std::uint8_t* packed, const Eigen::half* params, int n, float* out) const {
    const float scale = half_to_float(params[0]);
    // q8_0 / q4_0 codes sit 2^(b-1) above zero, symmetric ones half a step less.
    const float offset = scheme_ == QuantScheme::min_max   ? half_to_float(params[1])
                         : scheme_ == QuantScheme::symmetric ? -static_cast<float>((1 << bits_) - 1) * 0.5f * scale
                                                             : -static_cast<float>(1 << (bits_ - 1)) * scale;
    switch (bits_) {
      case 1: return detail::dequantize_codes<1>(packed, n, scale, offset, out);
      case 2: return detail::dequantize_codes<2>(packed, n, scale, offset, out);
      case 4: return detail::dequantize_codes<4>(packed, n, scale, offset, out);
      default: return detail::dequantize_codes<8>(packed, n, scale, offset, out);
    }
  }

 private:
  QuantScheme scheme_;
  int bits_;
};

// A row codec (see coded_rows.hpp) cutting each token row of one head into blocks of
// `block` consecutive channels: llama.cpp q8_0 / q4_0 with block 32, and KIVI's per-token
// value quantization with min_max and the group size. A row is the packed codes of every
// block, then the fp16 parameters of every block.
class BlockCodec {
 public:
  BlockCodec(BlockQuantizer quantizer, int block) : quantizer_(quantizer), block_(block) {
    require(quantizer.packs(block), "BlockCodec: a block of ", block, " values does not fill whole bytes at ",
            quantizer.bits(), " bits");
  }

  const BlockQuantizer& quantizer() const { return quantizer_; }
  int block() const { return block_; }
  std::string name() const { return scheme_name(quantizer_.scheme()); }
  std::string parameters() const {
    return detail::concat("bits=", quantizer_.bits(), " block=", block_);
  }

  void check(int head_dim) const {
    require(head_dim % block_ == 0, "BlockCodec: head_dim ", head_dim, " is not a multiple of the block ", block_);
  }
  int payload_bytes(int head_dim) const { return quantizer_.code_bytes(head_dim); }
  int metadata_bytes(int head_dim) const {
    return head_dim / block_ * quantizer_.parameters() * static_cast<int>(sizeof(Eigen::half));
  }
  std::size_t shared_bytes() const { return 0; }
  bool data_dependent() const { return false; }
  void calibrate(ConstRowsRef /*tokens*/) {}

  void encode(const float* x, int head_dim, std::uint8_t* row) const {
    std::uint8_t* metadata = row + payload_bytes(head_dim);
    const int count = quantizer_.parameters();
    for (int b = 0; b < head_dim / block_; ++b) {
      Eigen::half params[2];
      quantizer_.quantize(x + b * block_, block_, 1, row + b * quantizer_.code_bytes(block_), params);
      std::memcpy(metadata + b * count * sizeof(Eigen::half), params, count * sizeof(Eigen::half));
    }
  }

  void decode(const std::uint8_t* row, int head_dim, float* x) const {
    const std::uint8_t* metadata = row + payload_bytes(head_dim);
    const int count = quantizer_.parameters();
    for (int b = 0; b < head_dim / block_; ++b) {
      // Fixed-size copies, no loop: a copy of run-time length went byte by byte, and the
      // parameter's load then waited on those stores.
      Eigen::half params[2];
      const std::uint8_t* block_params = metadata + b * count * sizeof(Eigen::half);
      std::memcpy(params, block_params, sizeof(Eigen::half));
      if (count == 2) std::memcpy(params + 1, block_params + sizeof(Eigen::half), sizeof(Eigen::half));
      quantizer_.dequantize(row + b * quantizer_.code_bytes(block_), params, block_, x + b * block_);
    }
  }

 private:
  BlockQuantizer quantizer_;
  int block_;
};

}  // namespace lexico
