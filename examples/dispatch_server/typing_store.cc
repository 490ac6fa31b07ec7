// SPDX-License-Identifier: MIT
#include "typing_store.h"

#include <sqlite3.h>

#include <chrono>
#include <cstdio>

namespace dispatch {

namespace {

constexpr const char* kSchema =
    "CREATE TABLE IF NOT EXISTS typing_indicators ("
    "  user_id TEXT NOT NULL,"
    "  thread_id TEXT NOT NULL,"
    "  started_at_ms INTEGER NOT NULL,"
    "  PRIMARY KEY (user_id, thread_id)"
    ") WITHOUT ROWID";

std::int64_t nowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

std::unique_ptr<TypingStore> TypingStore::open(const std::string& path,
                                               std::string* error) {
  std::unique_ptr<TypingStore> s(new TypingStore());
  auto fail = [&](const char* what) {
    *error =
        std::string(what) + ": " + (s->db_ ? sqlite3_errmsg(s->db_) : "out of memory");
    return nullptr;
  };
  if (sqlite3_open_v2(path.c_str(), &s->db_,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                      nullptr) != SQLITE_OK)
    return fail("open");
  sqlite3_busy_timeout(s->db_, 2000);
  if (path != ":memory:") {
    // WAL + NORMAL: a commit is not an fsync, so a persistence call costs
    // microseconds, and a crash loses at most the last few indicators --
    // which are stale by then anyway (clearAll at start-up).
    sqlite3_exec(s->db_, "PRAGMA journal_mode=WAL", nullptr, nullptr, nullptr);
    sqlite3_exec(s->db_, "PRAGMA synchronous=NORMAL", nullptr, nullptr, nullptr);
    // Checkpoints off the event loops (the header says why).
    sqlite3_exec(s->db_, "PRAGMA wal_autocheckpoint=0", nullptr, nullptr, nullptr);
  }
  if (sqlite3_exec(s->db_, kSchema, nullptr, nullptr, nullptr) != SQLITE_OK)
    return fail("create table");
  auto prepare = [&](const char* sql, sqlite3_stmt** stmt) {
    return sqlite3_prepare_v2(s->db_, sql, -1, stmt, nullptr) == SQLITE_OK;
  };
  if (!prepare("INSERT OR REPLACE INTO typing_indicators (user_id, thread_id, "
               "started_at_ms) VALUES (?1, ?2, ?3)",
               &s->insert_) ||
      !prepare("DELETE FROM typing_indicators WHERE user_id = ?1 AND thread_id = ?2",
               &s->deleteOne_) ||
      !prepare("DELETE FROM typing_indicators WHERE user_id = ?1", &s->deleteUser_) ||
      !prepare("SELECT COUNT(*) FROM typing_indicators", &s->count_))
    return fail("prepare");
  if (path != ":memory:") {
    if (sqlite3_open_v2(path.c_str(), &s->checkpointDb_,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr) != SQLITE_OK) {
      *error = std::string("open the checkpointer's connection: ") +
               (s->checkpointDb_ ? sqlite3_errmsg(s->checkpointDb_) : "out of memory");
      return nullptr;
    }
    sqlite3_busy_timeout(s->checkpointDb_, 2000);
    // A connection learns the file is in WAL mode when it first reads it;
    // until then a checkpoint on it does nothing.
    sqlite3_exec(s->checkpointDb_, "PRAGMA journal_mode=WAL", nullptr, nullptr, nullptr);
    s->checkpointer_ = std::thread([p = s.get()] { p->checkpointLoop(); });
  }
  return s;
}

void TypingStore::checkpointLoop() {
  std::unique_lock<std::mutex> lk(checkpointMu_);
  int lastFrames = 0, lastCopied = 0;
  while (!stopping_) {
    checkpointCv_.wait_for(lk, std::chrono::milliseconds(200));
    if (stopping_) break;
    lk.unlock();
    // PASSIVE: copies what it can without waiting for the writer; SQLITE_BUSY
    // (another checkpoint) only means "next time".
    // `copied` counts from the start of the WAL, which the writer rewinds
    // once everything in it is copied: count only what is new.
    int frames = 0, copied = 0;
    if (sqlite3_wal_checkpoint_v2(checkpointDb_, nullptr, SQLITE_CHECKPOINT_PASSIVE, &frames,
                                  &copied) == SQLITE_OK) {
      if (frames < lastFrames) lastCopied = 0;  // rewound since the last run
      if (copied > lastCopied) checkpointed_ += static_cast<std::uint64_t>(copied - lastCopied);
      lastFrames = frames;
      lastCopied = copied;
    }
    lk.lock();
  }
}

TypingStore::~TypingStore() {
  if (checkpointer_.joinable()) {
    {
      std::lock_guard<std::mutex> g(checkpointMu_);
      stopping_ = true;
    }
    checkpointCv_.notify_all();
    checkpointer_.join();
  }
  // Everything into the database file, the WAL emptied.
  if (checkpointDb_)
    sqlite3_wal_checkpoint_v2(checkpointDb_, nullptr, SQLITE_CHECKPOINT_TRUNCATE, nullptr,
                              nullptr);
  sqlite3_close(checkpointDb_);
  for (sqlite3_stmt* st : {insert_, deleteOne_, deleteUser_, count_})
    sqlite3_finalize(st);
  sqlite3_close(db_);
}

bool TypingStore::step(sqlite3_stmt* stmt) {
  const int rc = sqlite3_step(stmt);
  sqlite3_reset(stmt);
  sqlite3_clear_bindings(stmt);
  if (rc == SQLITE_DONE || rc == SQLITE_ROW) return true;
  std::fprintf(stderr, "dispatch_server: sqlite: %s (roomkeeper will retry)\n",
               sqlite3_errmsg(db_));
  return false;
}

bool TypingStore::apply(const roomkeeper::PersistCall& call) {
  std::lock_guard<std::mutex> g(mu_);
  auto text = [](sqlite3_stmt* st, int i, const std::string& v) {
    sqlite3_bind_text(st, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  };
  switch (call.op) {
    case roomkeeper::PersistOp::kTypingStarted:
      text(insert_, 1, call.user);
      text(insert_, 2, call.thread);
      sqlite3_bind_int64(insert_, 3, nowMs());
      return step(insert_);
    case roomkeeper::PersistOp::kTypingStopped:
      text(deleteOne_, 1, call.user);
      text(deleteOne_, 2, call.thread);
      return step(deleteOne_);
    case roomkeeper::PersistOp::kTypingStoppedAll:
      text(deleteUser_, 1, call.user);
      return step(deleteUser_);
  }
  return false;
}

std::int64_t TypingStore::countRows() {
  std::lock_guard<std::mutex> g(mu_);
  std::int64_t n = -1;
  if (sqlite3_step(count_) == SQLITE_ROW) n = sqlite3_column_int64(count_, 0);
  sqlite3_reset(count_);
  return n;
}

int TypingStore::writerAutoCheckpoint() {
  std::lock_guard<std::mutex> g(mu_);
  sqlite3_stmt* st = nullptr;
  int pages = -1;
  if (sqlite3_prepare_v2(db_, "PRAGMA wal_autocheckpoint", -1, &st, nullptr) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW)
    pages = sqlite3_column_int(st, 0);
  sqlite3_finalize(st);
  return pages;
}

std::int64_t TypingStore::clearAll() {
  std::lock_guard<std::mutex> g(mu_);
  if (sqlite3_exec(db_, "DELETE FROM typing_indicators", nullptr, nullptr, nullptr) !=
      SQLITE_OK)
    return -1;
  return sqlite3_changes(db_);
}

}  // namespace dispatch
