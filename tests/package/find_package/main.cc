// A program outside the roomkeeper tree: it must build against the package
// and behave, or the packaging test fails.
#include <roomkeeper/roomkeeper.h>

#include <cstdio>

int main() {
  roomkeeper::SessionRegistry registry;
  if (registry.connect("sock-1", "user-1") != roomkeeper::Result::kOk) return 1;
  if (registry.trackRoom("sock-1", "job:42") != roomkeeper::Result::kOk) return 2;
  if (registry.roomSize("job:42") != 1) return 3;
  if (registry.disconnect("sock-1") != roomkeeper::Result::kOk) return 4;
  if (registry.trackRoom("sock-1", "job:7") != roomkeeper::Result::kNotConnected) return 5;
  const roomkeeper::RegistryStats stats = registry.getMemoryStats();
  if (stats.sessions != 0 || stats.rooms != 0 || stats.bytes != 0) return 6;
  std::printf("roomkeeper consumer: ok\n");
  return 0;
}
