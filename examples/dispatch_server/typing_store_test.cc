// SPDX-License-Identifier: MIT
// typing_store_test: the dispatch demo's SQLite store keeps fsync off the
// event loops. With SQLite's automatic checkpoint, the commit that crosses
// 1,000 WAL pages copies the WAL into the database and fsyncs both inside
// the persistence call (~10 ms on this project's VM), stalling the loop
// that made it and every client on it: docs/benchmarks.md "End to end". So
// the writing connection has it off, and the store's own checkpointer thread
// copies the WAL; the rows survive a close and reopen.
//
//   typing_store_test DIR    (a directory it may create a database in)
#include <roomkeeper/typing_timer_manager.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <sys/stat.h>
#include <thread>

#include "typing_store.h"

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAIL", what);
  if (!ok) ++failures;
}

long fileSize(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? long(st.st_size) : -1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: typing_store_test DIR\n");
    return 2;
  }
  const std::string path = std::string(argv[1]) + "/typing_store_test.db";
  std::remove(path.c_str());
  std::remove((path + "-wal").c_str());
  std::remove((path + "-shm").c_str());
  using roomkeeper::PersistCall;
  using roomkeeper::PersistOp;
  {
    std::string err;
    auto store = dispatch::TypingStore::open(path, &err);
    if (!store) {
      std::fprintf(stderr, "open %s: %s\n", path.c_str(), err.c_str());
      return 1;
    }
    check(store->writerAutoCheckpoint() == 0,
          "the writing connection never checkpoints (wal_autocheckpoint 0)");
    // Enough commits for several of SQLite's 1,000-page checkpoints.
    bool stored = true;
    for (int i = 0; i < 3000; ++i) {
      const std::string user = "u" + std::to_string(i), thread = "t" + std::to_string(i % 50);
      stored &= store->apply(PersistCall{PersistOp::kTypingStarted, user, thread});
      if (i % 3 != 0) stored &= store->apply(PersistCall{PersistOp::kTypingStopped, user, thread});
    }
    check(stored, "6,000 persistence calls stored");
    check(store->countRows() == 1000, "1,000 rows (one in three never stopped)");
    // The checkpointer runs every 200 ms; give it up to 5 s on a busy machine.
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (store->checkpointedFrames() < 3000 && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::printf("   checkpointer copied %llu WAL frames\n",
                static_cast<unsigned long long>(store->checkpointedFrames()));
    check(store->checkpointedFrames() >= 3000,
          "the checkpointer thread copied the WAL into the database (>= 3,000 frames)");
  }
  check(fileSize(path + "-wal") <= 0, "closing empties the WAL (TRUNCATE checkpoint)");
  {
    std::string err;
    auto store = dispatch::TypingStore::open(path, &err);
    check(store && store->countRows() == 1000, "reopened: the 1,000 rows are there");
    check(store && store->apply(PersistCall{PersistOp::kTypingStoppedAll, "u3", ""}) &&
              store->countRows() == 999,
          "kTypingStoppedAll deletes the user's row");
    check(store && store->clearAll() == 999 && store->countRows() == 0, "clearAll");
  }
  std::remove(path.c_str());
  std::remove((path + "-wal").c_str());
  std::remove((path + "-shm").c_str());
  std::printf(failures ? "FAIL: %d\n" : "PASS\n", failures);
  return failures ? 1 : 0;
}
