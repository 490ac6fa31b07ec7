# Abseil and fmt: Debian's packages (or any installed CMake package) first;
# FetchContent only when asked (ROOMKEEPER_FETCH_DEPS=ON) for users without
# them. CI never takes the network path.
include(FetchContent)
if(NOT TARGET absl::flat_hash_map)
  if(ROOMKEEPER_FETCH_DEPS)
    find_package(absl CONFIG QUIET)
    if(NOT absl_FOUND)
      set(ABSL_PROPAGATE_CXX_STD ON)
      FetchContent_Declare(absl
        URL https://github.com/abseil/abseil-cpp/archive/refs/tags/20220623.1.tar.gz)
      FetchContent_MakeAvailable(absl)
    endif()
  else()
    # No version: Abseil's version file demands an exact match.
    find_package(absl CONFIG REQUIRED)
  endif()
endif()
if(NOT TARGET fmt::fmt)
  if(ROOMKEEPER_FETCH_DEPS)
    find_package(fmt 9...<10 CONFIG QUIET)
    if(NOT fmt_FOUND)
      FetchContent_Declare(fmt
        URL https://github.com/fmtlib/fmt/releases/download/9.1.0/fmt-9.1.0.zip)
      FetchContent_MakeAvailable(fmt)
    endif()
  else()
    find_package(fmt 9...<10 CONFIG REQUIRED)
  endif()
endif()
