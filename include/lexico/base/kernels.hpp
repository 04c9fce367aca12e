#pragma once
// Small fp32 vector kernels written so that the compiler vectorises them without
// -ffast-math: a dot product keeps one partial sum per lane and adds the lanes
// only at the end, so no reassociation is needed inside the loop.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace lexico::detail {

inline constexpr int lanes = 16;  // one AVX-512 register of floats, two AVX2 ones

// out[g] = <row, queries[g]> for `group` queries of length n stored back to back.
inline void dot_group(const float* row, const float* queries, int group, int n, float* out) {
  for (int g = 0; g < group; ++g) {
    const float* q = queries + g * n;
    float partial[lanes] = {};
    int i = 0;
    for (; i + lanes <= n; i += lanes)
      for (int l = 0; l < lanes; ++l) partial[l] += row[i + l] * q[i + l];
    float sum = 0.0f;
    for (; i < n; ++i) sum += row[i] * q[i];
    for (int l = 0; l < lanes; ++l) sum += partial[l];
    out[g] = sum;
  }
}

// max(initial, values[0..n)) and Σ values[0..n), one partial per lane so that the loops
// vectorise (a single running max or sum is a chain of dependent scalar operations).
inline float max_value(const float* values, long n, float initial) {
  float partial[lanes];
  std::fill(partial, partial + lanes, initial);
  long i = 0;
  for (; i + lanes <= n; i += lanes)
    for (int l = 0; l < lanes; ++l) partial[l] = partial[l] < values[i + l] ? values[i + l] : partial[l];
  for (; i < n; ++i) initial = std::max(initial, values[i]);
  for (int l = 0; l < lanes; ++l) initial = std::max(initial, partial[l]);
  return initial;
}

inline float sum_values(const float* values, long n) {
  float partial[lanes] = {};
  long i = 0;
  for (; i + lanes <= n; i += lanes)
    for (int l = 0; l < lanes; ++l) partial[l] += values[i + l];
  float sum = 0.0f;
  for (; i < n; ++i) sum += values[i];
  for (int l = 0; l < lanes; ++l) sum += partial[l];
  return sum;
}

// out[g] += weights[g] * row for `group` outputs of length n stored back to back.
inline void axpy_group(const float* row, const float* weights, int group, int n, float* out) {
  for (int g = 0; g < group; ++g) {
    const float w = weights[g];
    float* o = out + g * n;
    for (int i = 0; i < n; ++i) o[i] += w * row[i];
  }
}

// exp(x) for x <= 0 (softmax arguments after subtracting the maximum), to about
// 3e-7 relative, on 16 floats at a time: std::exp is a library call per element,
// which dominated decode attention over long contexts. Cody-Waite range reduction
// x = n ln2 + r, |r| <= ln2/2, a degree-6 Taylor polynomial for e^r (truncation
// below 2e-8) and 2^n put into the exponent bits. GCC/Clang vector extensions keep
// it portable: they compile to AVX-512, AVX2 or scalar code as the target allows.
using float16v = float __attribute__((vector_size(64)));
using int16v = std::int32_t __attribute__((vector_size(64)));

// 16 values in place (a pointer, not a vector argument, keeps the ABI the same with
// and without AVX-512).
inline void exp_nonpositive16(float* values) {
  float16v x;
  std::memcpy(&x, values, sizeof x);
  x = x < -87.0f ? float16v{} - 87.0f : x;  // e^-87 ~ 1.6e-38: smaller results would be denormal
  const float16v n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f - 0.5f, int16v), float16v);
  const float16v r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 split hi + lo; n = round(x / ln2)
  float16v p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int16v bits = (__builtin_convertvector(n, int16v) + 127) << 23;
  float16v scale;
  std::memcpy(&scale, &bits, sizeof scale);
  x = p * scale;
  std::memcpy(values, &x, sizeof x);
}

// values[i] = exp(values[i]) for n values <= 0.
inline void exp_nonpositive(float* values, long n) {
  long i = 0;
  for (; i + 16 <= n; i += 16) exp_nonpositive16(values + i);
  if (i < n) {
    float tail[16] = {};
    std::memcpy(tail, values + i, sizeof(float) * static_cast<std::size_t>(n - i));
    exp_nonpositive16(tail);
    std::memcpy(values + i, tail, sizeof(float) * static_cast<std::size_t>(n - i));
  }
}

}  // namespace lexico::detail

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lexico::detail {

#if defined(__AVX512F__)
// Lane sums of 16 vectors: lane t of the result is Σ lanes of v[t]. A transposition tree
// (unpack, then 128-bit lane shuffles): 45 instructions for 16 sums instead of 16
// horizontal reductions of about 10 each.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // quads[i]: 128-bit lane L holds tokens 4i..4i+3 summed over the elements of lane L.
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Σ_c x[c] ⊙ q[16c ..] for chunks >= 1 as one vector of partial sums, the even and odd
// chunks summed apart: chains of chunks / 2 dependent FMAs instead of chunks, which left
// the FMA units waiting on their own latency (with the register-sized passes of
// fp16_accumulate_group: dense decode attention in L2 about 10 % faster).
inline __m512 dot_chunks(const __m512* x, const float* q, int chunks) {
  __m512 sum[2] = {_mm512_mul_ps(x[0], _mm512_loadu_ps(q)), _mm512_setzero_ps()};
  for (int c = 1; c < chunks; ++c) sum[c & 1] = _mm512_fmadd_ps(x[c], _mm512_loadu_ps(q + 16 * c), sum[c & 1]);
  return _mm512_add_ps(sum[0], sum[1]);
}

inline __m512 load_fp16x16(const std::uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Rows a streaming kernel asks for ahead of the one it reads (d fp16 each). Out of L2
// (64k tokens), the hardware prefetcher alone left dense decode attention waiting on
// memory half the time; 8 rows (2 KiB at d = 128) ahead: 10.4 -> 17-19 GB/s on 2
// threads with large pages (BENCHMARKS.md, session 11). A prefetch never faults, so
// the rows past the end of a head need no bound (the address is formed as an integer:
// a pointer past the end of the array would be undefined).
inline constexpr long rows_ahead = 8;
inline void prefetch_row_ahead(const std::uint16_t* row, int d) {
  const std::uintptr_t ahead = reinterpret_cast<std::uintptr_t>(row) + static_cast<std::uintptr_t>(2 * rows_ahead * d);
  for (int line = 0; line < 2 * d; line += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + line), _MM_HINT_T0);
}
#endif

// Decode attention over fp16 rows (count x d, contiguous, d a multiple of 16), the
// kernels that set a dense cache's pace: each row is read once for the whole GQA group.
// Both return false (nothing done) where the CPU or the shape has no fast path.
#if defined(__AVX512F__)
// out[g] += Σ_t probabilities[g * ld + t] · row t over columns [16 c0, 16 (c0 + Width)):
// Group x Width sums in registers (the group is a template argument: with a run-time
// group the compiler kept the sums on the stack).
template <int Group, int Width>
void fp16_accumulate_columns(const std::uint16_t* rows, long count, int d, int c0, const float* probabilities, long ld,
                             float* out) {
  __m512 sum[Group][Width];
  for (int g = 0; g < Group; ++g)
    for (int c = 0; c < Width; ++c) sum[g][c] = _mm512_loadu_ps(out + g * d + 16 * (c0 + c));
  for (long t = 0; t < count; ++t) {
    if (c0 == 0) prefetch_row_ahead(rows + t * d, d);  // later passes find the rows in cache
    const std::uint16_t* row = rows + t * d + 16 * c0;
    __m512 value[Width];
    for (int c = 0; c < Width; ++c) value[c] = load_fp16x16(row + 16 * c);
    for (int g = 0; g < Group; ++g) {
      const __m512 p = _mm512_set1_ps(probabilities[g * ld + t]);
      for (int c = 0; c < Width; ++c) sum[g][c] = _mm512_fmadd_ps(p, value[c], sum[g][c]);
    }
  }
  for (int g = 0; g < Group; ++g)
    for (int c = 0; c < Width; ++c) _mm512_storeu_ps(out + g * d + 16 * (c0 + c), sum[g][c]);
}

// Passes of as many columns as fit the 32 registers with their sums, one row's values
// and a weight (Group · width + width + 1): at Group 4 a width of 8 (41 registers) kept
// half the sums on the stack, a store and a load around every FMA (that kernel was 30 %
// of dense decode attention's samples at 16k tokens; BENCHMARKS.md, session 15); later
// passes find the rows in L1 or L2.
template <int Group>
void fp16_accumulate_group(const std::uint16_t* rows, long count, int d, const float* probabilities, long ld,
                           float* out) {
  constexpr int width = Group * 8 + 9 <= 32 ? 8 : Group * 4 + 5 <= 32 ? 4 : 2;
  const int chunks = d / 16;
  int c0 = 0;
  for (; c0 + width <= chunks; c0 += width)
    fp16_accumulate_columns<Group, width>(rows, count, d, c0, probabilities, ld, out);
  for (; c0 < chunks; ++c0) fp16_accumulate_columns<Group, 1>(rows, count, d, c0, probabilities, ld, out);
}

// Calls kernel(std::integral_constant<int, G>()) for the group size G in 1..8.
template <typename Kernel>
void with_group(int group, Kernel&& kernel) {
  switch (group) {
    case 1: return kernel(std::integral_constant<int, 1>());
    case 2: return kernel(std::integral_constant<int, 2>());
    case 3: return kernel(std::integral_constant<int, 3>());
    case 4: return kernel(std::integral_constant<int, 4>());
    case 5: return kernel(std::integral_constant<int, 5>());
    case 6: return kernel(std::integral_constant<int, 6>());
    case 7: return kernel(std::integral_constant<int, 7>());
    default: return kernel(std::integral_constant<int, 8>());
  }
}

// scores[g * ld + t] = <queries[g], row t>: 16 rows at a time, one vector of partial
// sums per (row, query), reduced together by sum_lanes16. Chunks (d / 16) is a template
// argument for the common head sizes: with a run-time count every FMA of the dot product
// waited behind a bounds check (1.7x slower at d = 128); 0 takes it from d.
template <int Chunks>
void fp16_scores_chunks(const std::uint16_t* rows, long count, int d, const float* queries, int group, float* scores,
                        long ld) {
  const int chunks = Chunks > 0 ? Chunks : d / 16;
  __m512 partial[8][16];
  long t0 = 0;
  for (; t0 + 16 <= count; t0 += 16) {
    for (int r = 0; r < 16; ++r) {
      const std::uint16_t* row = rows + (t0 + r) * d;
      prefetch_row_ahead(row, d);
      __m512 key[16];
      for (int c = 0; c < chunks; ++c) key[c] = load_fp16x16(row + 16 * c);
      for (int g = 0; g < group; ++g) partial[g][r] = dot_chunks(key, queries + g * d, chunks);
    }
    for (int g = 0; g < group; ++g) _mm512_storeu_ps(scores + g * ld + t0, sum_lanes16(partial[g]));
  }
  for (long t = t0; t < count; ++t)
    for (int g = 0; g < group; ++g) {
      __m512 sum = _mm512_setzero_ps();
      for (int c = 0; c < chunks; ++c)
        sum = _mm512_fmadd_ps(load_fp16x16(rows + t * d + 16 * c), _mm512_loadu_ps(queries + g * d + 16 * c), sum);
      scores[g * ld + t] = _mm512_reduce_add_ps(sum);
    }
}
#endif

// scores[g * ld + t] = <queries[g], row t>.
inline bool fp16_scores(const std::uint16_t* rows, long count, int d, const float* queries, int group, float* scores,
                        long ld) {
#if defined(__AVX512F__)
  if (d % 16 != 0 || d > 256 || group < 1 || group > 8) return false;
  if (d == 128)
    fp16_scores_chunks<8>(rows, count, d, queries, group, scores, ld);
  else if (d == 64)
    fp16_scores_chunks<4>(rows, count, d, queries, group, scores, ld);
  else
    fp16_scores_chunks<0>(rows, count, d, queries, group, scores, ld);
  return true;
#else
  (void)rows, (void)count, (void)d, (void)queries, (void)group, (void)scores, (void)ld;
  return false;
#endif
}

// out[g] += Σ_t probabilities[g * ld + t] · row t.
inline bool fp16_accumulate(const std::uint16_t* rows, long count, int d, const float* probabilities, long ld,
                            int group, float* out) {
#if defined(__AVX512F__)
  if (d % 16 != 0 || d > 256 || group < 1 || group > 8) return false;
  with_group(group, [&](auto g) {
    fp16_accumulate_group<decltype(g)::value>(rows, count, d, probabilities, ld, out);
  });
  return true;
#else
  (void)rows, (void)count, (void)d, (void)probabilities, (void)ld, (void)group, (void)out;
  return false;
#endif
}

// Appends to `used` every row r < n of the row-major n x m matrix `weights` that holds a
// nonzero value, in order. A scalar loop with an early exit mispredicts on rows used at
// random (about half of them in a decode step): 8 ns per row against well under 1 here.
inline void nonzero_rows(const float* weights, long n, int m, std::vector<int>& used) {
  const std::size_t start = used.size();
  used.resize(start + static_cast<std::size_t>(n) + 16);  // room for a whole vector past the last row
  int* out = used.data() + start;
  long found = 0, r = 0;
#if defined(__AVX512F__)
  if (m == 1 || m == 2 || m == 4 || m == 8 || m == 16) {
    // 16 floats cover 16 / m rows: a lane mask per row, the used rows' indices packed in a
    // register and stored whole (a compressing store to memory is microcoded on Zen 4).
    const int rows_per_vector = 16 / m;
    const __m512 zero = _mm512_setzero_ps();
    const __m512i row_of_lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (; r + rows_per_vector <= n; r += rows_per_vector) {
      const unsigned lanes = _mm512_cmp_ps_mask(_mm512_loadu_ps(weights + r * m), zero, _CMP_NEQ_UQ);
      if (lanes == 0) continue;
      // Row j of this vector is used when any of its m lanes is: (x + 2^m - 1) >> m is 1
      // for any nonzero m-bit x, without a branch (which would mispredict on random rows).
      const unsigned row_lanes = (1u << m) - 1u;
      unsigned rows_mask = 0;
      for (int j = 0; j < rows_per_vector; ++j) rows_mask |= ((((lanes >> (j * m)) & row_lanes) + row_lanes) >> m) << j;
      const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(r)), row_of_lane);
      _mm512_storeu_si512(out + found, _mm512_maskz_compress_epi32(static_cast<__mmask16>(rows_mask), ids));
      found += __builtin_popcount(rows_mask);
    }
  }
#endif
  for (; r < n; ++r) {
    int any = 0;
    for (int g = 0; g < m; ++g) any |= weights[r * m + g] != 0.0f;
    if (any) out[found++] = static_cast<int>(r);
  }
  used.resize(start + static_cast<std::size_t>(found));
}

// out[g] (g < m; `width` columns of rows d apart) = Σ_i weights[atoms[i] * m + g] · the
// first `width` columns of row atoms[i] of an fp16 matrix whose rows are d apart: a
// weighted sum of selected rows for m outputs at once, in passes over 32 or 64 columns
// so that every output's sums stay in registers. Returns false where the CPU or the
// shape has no fast path.
inline bool fp16_combination_fits(int width, int m) {
#if defined(__AVX512F__)
  return width % 32 == 0 && m <= 8;
#else
  (void)width, (void)m;
  return false;
#endif
}

#if defined(__AVX512F__)
// One pass of fp16_combination over columns [c0, c0 + 16 · Chunks), m · Chunks <= 16 sums.
// The rows are scattered (the atoms in use) and, in a decode step, usually out of cache:
// the first pass fetches each row's whole width a few rows ahead, later passes find it
// in L2 (out of cache, 2,000 rows of 16 dictionaries: 84 -> 63 ns per row). Fewer, wider
// passes read each row from L2 fewer times.
template <int Chunks>
void fp16_combination_pass(const std::uint16_t* rows, int d, int width, int c0, const int* atoms, long count,
                           const float* weights, int m, float* out) {
  constexpr long ahead = 16;
  __m512 sum[16 / Chunks][Chunks];
  for (int g = 0; g < m; ++g)
    for (int c = 0; c < Chunks; ++c) sum[g][c] = _mm512_setzero_ps();
  for (long i = 0; i < count; ++i) {
    if (c0 == 0 && i + ahead < count) {
      const char* next = reinterpret_cast<const char*>(rows + static_cast<long>(atoms[i + ahead]) * d);
      for (int line = 0; line < 2 * width; line += 64) _mm_prefetch(next + line, _MM_HINT_T0);
    }
    const std::uint16_t* row = rows + static_cast<long>(atoms[i]) * d + c0;
    __m512 part[Chunks];
    for (int c = 0; c < Chunks; ++c) part[c] = load_fp16x16(row + 16 * c);
    const float* w = weights + static_cast<long>(atoms[i]) * m;
    for (int g = 0; g < m; ++g) {
      const __m512 weight = _mm512_set1_ps(w[g]);
      for (int c = 0; c < Chunks; ++c) sum[g][c] = _mm512_fmadd_ps(weight, part[c], sum[g][c]);
    }
  }
  for (int g = 0; g < m; ++g)
    for (int c = 0; c < Chunks; ++c) _mm512_storeu_ps(out + g * d + c0 + 16 * c, sum[g][c]);
}
#endif

inline bool fp16_combination(const std::uint16_t* rows, int d, int width, const int* atoms, long count,
                             const float* weights, int m, float* out) {
#if defined(__AVX512F__)
  if (!fp16_combination_fits(width, m)) return false;
  const bool wide = m <= 4 && width % 64 == 0;
  for (int c0 = 0; c0 < width; c0 += wide ? 64 : 32)
    if (wide)
      fp16_combination_pass<4>(rows, d, width, c0, atoms, count, weights, m, out);
    else
      fp16_combination_pass<2>(rows, d, width, c0, atoms, count, weights, m, out);
  return true;
#else
  (void)rows, (void)d, (void)width, (void)atoms, (void)count, (void)weights, (void)m, (void)out;
  return false;
#endif
}

}  // namespace lexico::detail
