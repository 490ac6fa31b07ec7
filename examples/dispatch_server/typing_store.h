// SPDX-License-Identifier: MIT
// TypingStore: the dispatch example's typing indicators in SQLite, written
// through roomkeeper's persistence hook. One row per (user, thread) that is
// typing now; roomkeeper's kTypingStarted inserts it, kTypingStopped deletes
// it, kTypingStoppedAll (the user's last session went) deletes all of the
// user's rows. So the table holds exactly the indicators roomkeeper holds.
//
// Nothing of SQLite runs on an event loop. apply() -- roomkeeper's persist
// callback, called on the loop that made the change -- only queues the call
// and returns; the store's writer thread applies the queue in order, a batch
// per transaction. A write is usually microseconds, but now and then one is
// not: SQLite's automatic checkpoint runs inside the commit that crosses
// 1,000 WAL pages and fsyncs the WAL and the database (5-20 ms on this
// project's VM), and the first commit into a reused WAL fsyncs its header.
// Done on a loop, that stalled every client of the loop (it was the demo's
// login-latency tail, docs/benchmarks.md "End to end"); on the writer
// thread it only delays the rows. The checkpoint keeps its default (every
// 1,000 pages), so the WAL stays bounded.
//
// Order and loss: calls are applied in the order apply() accepted them. A
// batch that fails (disk full, a lock held too long) is rolled back and
// retried with backoff, keeping its place; while the queue is full
// (kMaxQueued), apply() returns false and roomkeeper keeps the call and
// retries it (its own bounded queue and backoff). countRows() counts what is
// written (what a second process reading the file sees); flush() waits for
// everything accepted so far to be written. Neither belongs on an event
// loop in a hot path: /stats calls countRows() once a request.
//
// Thread safety: thread-safe.
#ifndef ROOMKEEPER_EXAMPLES_DISPATCH_TYPING_STORE_H_
#define ROOMKEEPER_EXAMPLES_DISPATCH_TYPING_STORE_H_

#include <roomkeeper/typing_timer_manager.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct sqlite3;
struct sqlite3_stmt;

namespace dispatch {

class TypingStore {
 public:
  /// Calls waiting for the writer at most; beyond, apply() says "retry".
  static constexpr std::size_t kMaxQueued = 100000;

  /// Opens (creating the file and table on first run) the database at
  /// `path` (":memory:" for a private in-memory one) and starts the writer
  /// thread. nullptr and `*error` set on failure.
  static std::unique_ptr<TypingStore> open(const std::string& path, std::string* error);
  /// Writes what is queued, then stops the writer and closes the database.
  ~TypingStore();
  TypingStore(const TypingStore&) = delete;
  TypingStore& operator=(const TypingStore&) = delete;

  /// roomkeeper's PersistFn: queues the call for the writer thread and
  /// returns true at once; false (roomkeeper retries later) if the queue
  /// is full. Never touches SQLite.
  bool apply(const roomkeeper::PersistCall& call);
  /// Rows in the table, as written so far; -1 on error.
  std::int64_t countRows();
  /// Waits until every call accepted before it is written; false if that
  /// took longer than `timeout` (a database that keeps failing).
  bool flush(std::chrono::milliseconds timeout = std::chrono::seconds(10));
  /// Calls accepted and not yet written.
  std::size_t queued();
  /// Deletes every row (start-up: no one is connected, so no one types).
  /// Returns how many rows there were.
  std::int64_t clearAll();

 private:
  TypingStore() = default;
  void writerLoop();
  bool writeBatch(const std::vector<roomkeeper::PersistCall>& batch);
  bool step(sqlite3_stmt* stmt);
  /// Waits until the writer has written everything queued before the call.
  bool drain(std::unique_lock<std::mutex>& lk, std::chrono::milliseconds timeout);

  // The queue, shared by apply() and the writer.
  std::mutex mu_;
  std::condition_variable work_;  // the writer: something queued, or stop
  std::condition_variable idle_;  // drain(): the queue is written
  std::vector<roomkeeper::PersistCall> queue_;
  std::uint64_t accepted_ = 0, written_ = 0;  // calls, for drain()
  bool stopping_ = false;
  std::thread writer_;

  // The connection: the writer's, and countRows/clearAll's under dbMu_.
  std::mutex dbMu_;
  sqlite3* db_ = nullptr;
  sqlite3_stmt* insert_ = nullptr;
  sqlite3_stmt* deleteOne_ = nullptr;
  sqlite3_stmt* deleteUser_ = nullptr;
  sqlite3_stmt* count_ = nullptr;
};

}  // namespace dispatch

#endif  // ROOMKEEPER_EXAMPLES_DISPATCH_TYPING_STORE_H_
