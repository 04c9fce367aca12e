#pragma once
// The thread budget of a call, and keeping Eigen inside it.

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lexico {

// OpenMP threads for a call: the caller's budget, or the OpenMP default when it is 0.
inline int thread_budget(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

// Eigen runs a large product on omp_get_max_threads() threads of its own whenever it is
// not inside a team of several threads, with a blocking (and so rounding) that depends on
// that count. Kernels that parallelise themselves call this first in their parallel
// region: it sets the nthreads ICV of the calling implicit task only (never the caller's),
// so Eigen stays serial there and results do not depend on the threads a call was given.
inline void serial_eigen_products() {
#ifdef _OPENMP
  omp_set_num_threads(1);
#endif
}

}  // namespace lexico
