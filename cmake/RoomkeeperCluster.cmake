# roomkeeper::cluster (target roomkeeper_cluster). The in-process backend
# needs nothing beyond the core; the Redis backend needs hiredis (Debian's
# libhiredis-dev, found with pkg-config) and Boost.Asio's headers. Without
# them the option turns itself off with a message.
find_package(PkgConfig QUIET)
if(PkgConfig_FOUND)
  pkg_check_modules(HIREDIS QUIET IMPORTED_TARGET hiredis)
endif()
find_package(Boost 1.74 QUIET)
if(NOT HIREDIS_FOUND OR NOT Boost_FOUND)
  message(STATUS "roomkeeper: cluster off (hiredis found: ${HIREDIS_FOUND}, "
                 "Boost found: ${Boost_FOUND}); install libhiredis-dev and libboost-dev")
  set(ROOMKEEPER_BUILD_CLUSTER OFF CACHE BOOL "" FORCE)
  return()
endif()

add_library(roomkeeper_cluster
  src/cluster/node.cc
  src/cluster/in_process.cc
  src/cluster/redis_conn.cc
  src/cluster/redis_node.cc
)
add_library(roomkeeper::cluster ALIAS roomkeeper_cluster)
set_target_properties(roomkeeper_cluster PROPERTIES
  VERSION ${PROJECT_VERSION} SOVERSION ${PROJECT_VERSION_MAJOR}.${PROJECT_VERSION_MINOR}
  EXPORT_NAME cluster)
file(GLOB ROOMKEEPER_CLUSTER_HEADERS CONFIGURE_DEPENDS
     "${PROJECT_SOURCE_DIR}/include/roomkeeper/cluster/*.h")
target_sources(roomkeeper_cluster PUBLIC
  FILE_SET HEADERS BASE_DIRS "${PROJECT_SOURCE_DIR}/include"
  FILES ${ROOMKEEPER_CLUSTER_HEADERS})
set_target_properties(roomkeeper_cluster PROPERTIES
  VERIFY_INTERFACE_HEADER_SETS ${PROJECT_IS_TOP_LEVEL})
target_link_libraries(roomkeeper_cluster PUBLIC roomkeeper::roomkeeper Boost::headers
  PRIVATE fmt::fmt PkgConfig::HIREDIS absl::flat_hash_map absl::hash
  absl::inlined_vector)
if(PROJECT_IS_TOP_LEVEL AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(roomkeeper_cluster PRIVATE -Wall -Wextra -Wpedantic -Wshadow
    -Wconversion -Wno-sign-conversion $<$<BOOL:${ROOMKEEPER_WERROR}>:-Werror>)
endif()
