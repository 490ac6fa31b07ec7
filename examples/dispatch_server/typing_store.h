// SPDX-License-Identifier: MIT
// TypingStore: the dispatch example's typing indicators in SQLite, written
// through roomkeeper's persistence hook. One row per (user, thread) that is
// typing now; roomkeeper's kTypingStarted inserts it, kTypingStopped deletes
// it, kTypingStoppedAll (the user's last session went) deletes all of the
// user's rows. So the table holds exactly the indicators roomkeeper holds.
//
// Thread safety: thread-safe; one mutex serializes every use of the single
// SQLite connection (persistence runs on whichever thread made the change).
#ifndef ROOMKEEPER_EXAMPLES_DISPATCH_TYPING_STORE_H_
#define ROOMKEEPER_EXAMPLES_DISPATCH_TYPING_STORE_H_

#include <roomkeeper/typing_timer_manager.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

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

 private:
  TypingStore() = default;
  bool step(sqlite3_stmt* stmt);
  std::mutex mu_;
  sqlite3* db_ = nullptr;
  sqlite3_stmt* insert_ = nullptr;
  sqlite3_stmt* deleteOne_ = nullptr;
  sqlite3_stmt* deleteUser_ = nullptr;
  sqlite3_stmt* count_ = nullptr;
};

}  // namespace dispatch

#endif  // ROOMKEEPER_EXAMPLES_DISPATCH_TYPING_STORE_H_
