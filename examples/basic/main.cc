// SPDX-License-Identifier: MIT
// A small tour: sessions join rooms, a broadcast reaches a room minus the
// sender, a disconnect leaves every room, and the statistics return to 0.
#include <roomkeeper/roomkeeper.h>

#include <cstdio>
#include <string>

int main() {
  roomkeeper::RegistryCallbacks cb;
  cb.leave = [](std::string_view s, std::string_view r) {
    std::printf("  transport: %.*s leaves %.*s\n", int(s.size()), s.data(), int(r.size()), r.data());
  };
  cb.emit = [](std::string_view s, std::string_view ev, std::string_view payload) {
    std::printf("  emit to %.*s: %.*s %.*s\n", int(s.size()), s.data(), int(ev.size()), ev.data(),
                int(payload.size()), payload.data());
  };
  cb.userOffline = [](std::string_view u) {
    std::printf("  %.*s is offline\n", int(u.size()), u.data());
  };
  roomkeeper::SessionRegistry reg(std::move(cb));

  for (int s = 0; s < 4; ++s) {
    const std::string id = "sock-" + std::to_string(s);
    (void)reg.connect(id, "user-" + std::to_string(s % 2));
    (void)reg.trackRoom(id, "crew:7");
    (void)reg.trackRoom(id, "thread:" + std::to_string(s % 2));
  }
  std::printf("crew:7 has %zu members\n", reg.roomSize("crew:7"));
  std::printf("broadcast to thread:0 except the sender sock-0:\n");
  reg.broadcast({{"thread:0"}, {}, "sock-0"}, "typing", R"({"user":"user-0"})");

  std::printf("disconnecting everyone:\n");
  for (int s = 0; s < 4; ++s) (void)reg.disconnect("sock-" + std::to_string(s));
  const roomkeeper::RegistryStats st = reg.getMemoryStats();
  std::printf("sessions=%zu rooms=%zu memberships=%zu bytes=%zu\n", st.sessions, st.rooms,
              st.memberships, st.bytes);
  if (st.sessions == 0 && st.rooms == 0 && st.memberships == 0 && st.bytes == 0)
    std::printf("everything released\n");
  return 0;
}
