# Configures lexico with -fsanitize=thread and without OpenMP in WORK_DIR, builds the
# CodeSpace tests and runs the ones that drive caches from several threads.
function(run_step)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "step failed (${rc}): ${ARGV}\n${out}")
  endif()
  message(STATUS "${out}")
endfunction()
run_step(${CMAKE_COMMAND} -S ${LEXICO_SOURCE_DIR} -B ${WORK_DIR} -DCMAKE_BUILD_TYPE=RelWithDebInfo
         -DLEXICO_TSAN=ON -DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON
         -DLEXICO_BUILD_BENCHMARKS=OFF -DLEXICO_BUILD_EXAMPLES=OFF)
run_step(${CMAKE_COMMAND} --build ${WORK_DIR} --target test_code_space)
run_step(${CMAKE_COMMAND} -E env TSAN_OPTIONS=halt_on_error=1
         ${WORK_DIR}/tests/test_code_space --gtest_filter=CodeSpace.*)
