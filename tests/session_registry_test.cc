// SPDX-License-Identifier: MIT
#include <roomkeeper/session_registry.h>

#include <catch2/catch.hpp>

using roomkeeper::Result;
using roomkeeper::SessionRegistry;

TEST_CASE("a default registry connects, tracks and forgets", "[registry]") {
  SessionRegistry reg;
  REQUIRE(reg.connect("sock-1", "user-1") == Result::kOk);
  REQUIRE(reg.trackRoom("sock-1", "job:42") == Result::kOk);
  REQUIRE(reg.trackRoom("sock-1", "job:42") == Result::kAlreadyDone);
  REQUIRE(reg.roomSize("job:42") == 1);
  REQUIRE(reg.disconnect("sock-1") == Result::kOk);
  REQUIRE(reg.trackRoom("sock-1", "job:7") == Result::kNotConnected);
  REQUIRE(reg.getMemoryStats().bytes == 0);
}
