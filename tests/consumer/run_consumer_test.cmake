# Installs lexico from a fresh configure into a temporary prefix, then configures,
# builds and runs the consumer project against that prefix only.
file(REMOVE_RECURSE ${WORK_DIR})
function(run_step)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "step failed (${rc}): ${ARGV}\n${out}")
  endif()
endfunction()
run_step(${CMAKE_COMMAND} -S ${LEXICO_SOURCE_DIR} -B ${WORK_DIR}/lexico-build
         -DLEXICO_BUILD_TESTS=OFF -DLEXICO_BUILD_BENCHMARKS=OFF -DLEXICO_BUILD_EXAMPLES=OFF
         -DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix)
run_step(${CMAKE_COMMAND} --install ${WORK_DIR}/lexico-build)
run_step(${CMAKE_COMMAND} -S ${LEXICO_SOURCE_DIR}/tests/consumer -B ${WORK_DIR}/consumer-build
         -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix -DCMAKE_BUILD_TYPE=Release)
run_step(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer-build)
run_step(${WORK_DIR}/consumer-build/consumer)
message(STATUS "consumer project built and ran against the installed lexico")
