#pragma once
// Umbrella header: everything the library offers.

#include "version.hpp"
#include "error.hpp"
#include "fp8.hpp"
#include "half.hpp"
#include "dictionary.hpp"
#include "attention.hpp"
#include "cache/cache.hpp"
#include "cache/token_store.hpp"
#include "cache/dense.hpp"
