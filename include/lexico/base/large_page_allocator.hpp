#pragma once
// An allocator for the long arrays a decode step streams through (a KV head's tokens):
// blocks of 2 MiB or more are aligned to 2 MiB and, on Linux, offered to transparent
// huge pages (madvise), which the kernel otherwise grants only on request on many
// machines. With 4 KiB pages, dense fp16 decode attention over 64k tokens ran at
// 10.4 GB/s on 2 threads; with huge pages and the kernels' row prefetch, 17-19 GB/s
// (BENCHMARKS.md, session 11). Smaller blocks come from operator new as usual.
//
// Bytes: a large block is rounded up to a multiple of 2 MiB (less than 2 MiB of slack
// per block, on top of std::vector's capacity slack).

#include <cstddef>
#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lexico {

template <typename T>
class LargePageAllocator {
 public:
  using value_type = T;
  static constexpr std::size_t page = std::size_t{2} << 20;

  LargePageAllocator() = default;
  template <typename U>
  LargePageAllocator(const LargePageAllocator<U>&) noexcept {}

  T* allocate(std::size_t n) {
    if (n > static_cast<std::size_t>(-1) / sizeof(T)) throw std::bad_array_new_length();
    const std::size_t bytes = n * sizeof(T);
    if (bytes < page) return static_cast<T*>(::operator new(bytes));
    const std::size_t rounded = (bytes + page - 1) / page * page;
    void* block = std::aligned_alloc(page, rounded);
    if (!block) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(block, rounded, MADV_HUGEPAGE);  // advice only: without huge pages it still works
#endif
    return static_cast<T*>(block);
  }

  void deallocate(T* block, std::size_t n) noexcept {
    if (n * sizeof(T) < page)
      ::operator delete(block);
    else
      std::free(block);
  }

  template <typename U>
  bool operator==(const LargePageAllocator<U>&) const noexcept {
    return true;
  }
  template <typename U>
  bool operator!=(const LargePageAllocator<U>&) const noexcept {
    return false;
  }
};

}  // namespace lexico
