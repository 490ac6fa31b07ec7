// SPDX-License-Identifier: MIT
// typing_store_test: the dispatch demo's SQLite store keeps SQLite off the
// event loops. apply() (roomkeeper's persist callback, called on a loop)
// only queues; the store's writer thread writes, in order, a batch per
// transaction, so that a checkpoint's fsync (5-20 ms) stalls no loop
// (docs/benchmarks.md "End to end"). Checked here with the database locked
// by another connection: apply() still answers at once, nothing is lost or
// reordered, a full queue says "retry" (false) instead of growing, and the
// WAL stays bounded by SQLite's own checkpoint.
//
//   typing_store_test DIR    (a directory it may create a database in)
#include <sqlite3.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <string>

#include "typing_store.h"

namespace {

using roomkeeper::PersistCall;
using roomkeeper::PersistOp;

int failures = 0;

void check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAIL", what);
  if (!ok) ++failures;
}

long fileSize(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? long(st.st_size) : -1;
}

void removeDb(const std::string& path) {
  for (const char* suffix : {"", "-wal", "-shm"}) std::remove((path + suffix).c_str());
}

PersistCall started(int user, int thread) {
  return {PersistOp::kTypingStarted, "u" + std::to_string(user), "t" + std::to_string(thread)};
}
PersistCall stopped(int user, int thread) {
  return {PersistOp::kTypingStopped, "u" + std::to_string(user), "t" + std::to_string(thread)};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: typing_store_test DIR\n");
    return 2;
  }
  const std::string path = std::string(argv[1]) + "/typing_store_test.db";
  removeDb(path);
  std::string err;
  auto store = dispatch::TypingStore::open(path, &err);
  if (!store) {
    std::fprintf(stderr, "open %s: %s\n", path.c_str(), err.c_str());
    return 1;
  }

  // 1. Order across many batches: start, stop, start again ends with a row;
  //    start then stop ends without; the wildcard takes a user's rows.
  bool ok = true;
  for (int i = 0; i < 3000; ++i) {
    ok &= store->apply(started(i, i % 7));
    ok &= store->apply(stopped(i, i % 7));
    if (i % 3 == 0) ok &= store->apply(started(i, i % 7));
  }
  ok &= store->apply(started(5000, 1)) && store->apply(started(5000, 2));
  ok &= store->apply(PersistCall{PersistOp::kTypingStoppedAll, "u5000", ""});
  check(ok, "9,003 calls accepted");
  check(store->flush(), "flush");
  check(store->countRows() == 1000, "in order: 1,000 rows (started again), u5000's gone");
  check(store->queued() == 0, "flush: nothing queued");

  // 2. Another connection holds the write lock: apply() does not wait for
  //    it (a synchronous store would block 2 s per call and then fail).
  sqlite3* other = nullptr;
  sqlite3_open(path.c_str(), &other);
  const bool locked =
      sqlite3_exec(other, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) == SQLITE_OK;
  check(locked, "another connection holds the database's write lock");
  const auto t0 = std::chrono::steady_clock::now();
  ok = true;
  for (int i = 10000; i < 10500; ++i) ok &= store->apply(started(i, 0));
  const double ms = std::chrono::duration<double, std::milli>(
                        std::chrono::steady_clock::now() - t0).count();
  std::printf("   500 calls against the locked database: %.1f ms\n", ms);
  check(ok, "while it is locked, apply() accepts (the writer waits, not the caller)");
  //    A queue that cannot drain stops at kMaxQueued and says "retry".
  std::size_t accepted = 500, refused = 0;
  for (int i = 20000; refused == 0 && i < 20000 + 3 * int(dispatch::TypingStore::kMaxQueued);
       ++i) {
    if (store->apply(started(i, 0)))
      ++accepted;
    else
      ++refused;
  }
  std::printf("   accepted %zu before the first refusal\n", accepted);
  check(refused == 1, "a full queue refuses (false: roomkeeper keeps the call and retries)");
  check(store->queued() <= dispatch::TypingStore::kMaxQueued + accepted,
        "the queue stays bounded");
  sqlite3_exec(other, "COMMIT", nullptr, nullptr, nullptr);
  sqlite3_close(other);
  store->flush();
  check(store->countRows() == 1000 + std::int64_t(accepted),
        "once the lock goes, every accepted call is written, none twice");

  // 3. Many small transactions: SQLite's checkpoint (on the writer thread)
  //    keeps the WAL near its 1,000 pages.
  for (int round = 0; round < 200; ++round) {
    for (int i = 0; i < 50; ++i) store->apply(stopped(20000 + round * 50 + i, 0));
    store->flush();
  }
  const long wal = fileSize(path + "-wal");
  std::printf("   WAL after 200 more transactions: %ld bytes\n", wal);
  check(wal >= 0 && wal < 8L * 1024 * 1024, "the WAL stays under 8 MiB");
  const std::int64_t rows = store->countRows();

  // 4. Closing writes what is queued; the rows are there after a reopen.
  store->apply(started(1, 99));
  store.reset();
  store = dispatch::TypingStore::open(path, &err);
  check(store && store->countRows() == rows + 1, "reopened: every row, the last call's too");
  check(store && store->clearAll() == rows + 1 && store->countRows() == 0, "clearAll");
  store.reset();
  removeDb(path);
  std::printf(failures ? "FAIL: %d\n" : "PASS\n", failures);
  return failures ? 1 : 0;
}
