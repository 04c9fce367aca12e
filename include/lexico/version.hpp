#pragma once

#define LEXICO_VERSION_MAJOR 0
#define LEXICO_VERSION_MINOR 1
#define LEXICO_VERSION_PATCH 0

namespace lexico {
inline constexpr const char* version_string = "0.1.0";
}
