// SPDX-License-Identifier: MIT
// TypingStore: the dispatch example's typing indicators in SQLite, written
// through roomkeeper's persistence hook. One row per (user, thread) that is
// typing now; roomkeeper's kTypingStarted inserts it, kTypingStopped deletes
// it, kTypingStoppedAll (the user's last session went) deletes all of the
// user's rows. So the table holds exactly the indicators roomkeeper holds.
//
// Thread safety: thread-safe; one mutex serializes every use of the
// writing SQLite connection (persistence runs on whichever thread made the
// change: an event loop).
//
// No fsync on an event loop: the file is in WAL mode with synchronous=NORMAL,
// so a commit only appends to the WAL. SQLite's automatic checkpoint (which
// copies the WAL into the database and fsyncs both, ~10 ms here) would run
// inside whichever commit crossed 1,000 pages, stalling that loop and every
// client on it; it is off. A checkpointer thread of the store's own, on a
// second connection, runs a PASSIVE checkpoint every 200 ms instead (it
// never blocks the writer), and a TRUNCATE one when the store closes.
#ifndef ROOMKEEPER_EXAMPLES_DISPATCH_TYPING_STORE_H_
#define ROOMKEEPER_EXAMPLES_DISPATCH_TYPING_STORE_H_

#include <roomkeeper/typing_timer_manager.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

struct sqlite3;
struct sqlite3_stmt;

namespace dispatch {

class TypingStore {
 public:
  /// Opens (creating the file and table on first run) the database at
  /// `path` (":memory:" for a private in-memory one). nullptr and `*error`
  /// set on failure.
  static std::unique_ptr<TypingStore> open(const std::string& path, std::string* error);
  ~TypingStore();
  TypingStore(const TypingStore&) = delete;
  TypingStore& operator=(const TypingStore&) = delete;

  /// roomkeeper's PersistFn: true when stored; false on an SQLite error
  /// (roomkeeper keeps the call and retries it with backoff).
  bool apply(const roomkeeper::PersistCall& call);
  /// Rows in the table now; -1 on error.
  std::int64_t countRows();
  /// Deletes every row (start-up: no one is connected, so no one types).
  /// Returns how many rows there were.
  std::int64_t clearAll();
  /// The writing connection's automatic checkpoint, in WAL pages: 0 (off)
  /// for a file, so a commit never runs a checkpoint on an event loop.
  int writerAutoCheckpoint();
  /// WAL frames the checkpointer thread has copied into the database file.
  std::uint64_t checkpointedFrames() const { return checkpointed_.load(); }

 private:
  TypingStore() = default;
  bool step(sqlite3_stmt* stmt);
  void checkpointLoop();
  std::mutex mu_;
  sqlite3* db_ = nullptr;
  sqlite3_stmt* insert_ = nullptr;
  sqlite3_stmt* deleteOne_ = nullptr;
  sqlite3_stmt* deleteUser_ = nullptr;
  sqlite3_stmt* count_ = nullptr;
  // The checkpointer (file databases only): its own connection and thread.
  sqlite3* checkpointDb_ = nullptr;
  std::thread checkpointer_;
  std::mutex checkpointMu_;
  std::condition_variable checkpointCv_;
  bool stopping_ = false;
  std::atomic<std::uint64_t> checkpointed_{0};
};

}  // namespace dispatch

#endif  // ROOMKEEPER_EXAMPLES_DISPATCH_TYPING_STORE_H_
