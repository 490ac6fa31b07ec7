// SPDX-License-Identifier: MIT
#include "typing_store.h"

#include <sqlite3.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iterator>

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
    // WAL + NORMAL: a commit is not an fsync (checkpoints are), and a crash
    // loses at most the last few indicators -- which are stale by then
    // anyway (clearAll at start-up).
    sqlite3_exec(s->db_, "PRAGMA journal_mode=WAL", nullptr, nullptr, nullptr);
    sqlite3_exec(s->db_, "PRAGMA synchronous=NORMAL", nullptr, nullptr, nullptr);
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
  s->writer_ = std::thread([p = s.get()] { p->writerLoop(); });  // last: nothing fails after
  return s;
}

TypingStore::~TypingStore() {
  if (writer_.joinable()) {
    {
      std::lock_guard<std::mutex> g(mu_);
      stopping_ = true;
    }
    work_.notify_all();
    writer_.join();  // it writes what is queued first
  }
  for (sqlite3_stmt* st : {insert_, deleteOne_, deleteUser_, count_})
    sqlite3_finalize(st);
  sqlite3_close(db_);
}

bool TypingStore::apply(const roomkeeper::PersistCall& call) {
  try {
    std::lock_guard<std::mutex> g(mu_);
    if (stopping_ || queue_.size() >= kMaxQueued) return false;
    queue_.push_back(call);
    ++accepted_;
  } catch (...) {
    return false;  // out of memory: roomkeeper keeps the call and retries
  }
  work_.notify_one();
  return true;
}

void TypingStore::writerLoop() {
  std::vector<roomkeeper::PersistCall> batch;
  std::chrono::milliseconds backoff{0};
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    work_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and everything is written
    batch.swap(queue_);
    lk.unlock();
    bool ok;
    {
      std::lock_guard<std::mutex> g(dbMu_);
      ok = writeBatch(batch);
    }
    lk.lock();
    if (!ok) {
      // Rolled back: the batch keeps its place ahead of what came since.
      batch.insert(batch.end(), std::make_move_iterator(queue_.begin()),
                   std::make_move_iterator(queue_.end()));
      queue_.swap(batch);
      batch.clear();
      backoff = std::min(std::chrono::milliseconds(5000),
                         backoff.count() == 0 ? std::chrono::milliseconds(100) : backoff * 2);
      // Woken early only by stop; even then the batch is tried once more.
      work_.wait_for(lk, backoff, [&] { return stopping_; });
      if (stopping_ && backoff >= std::chrono::milliseconds(5000)) {
        std::fprintf(stderr, "dispatch_server: sqlite: %zu typing calls not written at exit\n",
                     queue_.size());
        written_ += queue_.size();
        queue_.clear();
        idle_.notify_all();
        return;
      }
      continue;
    }
    backoff = std::chrono::milliseconds(0);
    written_ += batch.size();
    batch.clear();
    idle_.notify_all();
  }
}

bool TypingStore::writeBatch(const std::vector<roomkeeper::PersistCall>& batch) {
  auto text = [](sqlite3_stmt* st, int i, const std::string& v) {
    sqlite3_bind_text(st, i, v.data(), static_cast<int>(v.size()), SQLITE_STATIC);
  };
  if (sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) != SQLITE_OK) {
    std::fprintf(stderr, "dispatch_server: sqlite: begin: %s (will retry)\n",
                 sqlite3_errmsg(db_));
    return false;
  }
  const std::int64_t now = nowMs();
  bool ok = true;
  for (const roomkeeper::PersistCall& call : batch) {
    switch (call.op) {
      case roomkeeper::PersistOp::kTypingStarted:
        text(insert_, 1, call.user);
        text(insert_, 2, call.thread);
        sqlite3_bind_int64(insert_, 3, now);
        ok = step(insert_);
        break;
      case roomkeeper::PersistOp::kTypingStopped:
        text(deleteOne_, 1, call.user);
        text(deleteOne_, 2, call.thread);
        ok = step(deleteOne_);
        break;
      case roomkeeper::PersistOp::kTypingStoppedAll:
        text(deleteUser_, 1, call.user);
        ok = step(deleteUser_);
        break;
    }
    if (!ok) break;
  }
  // The commit may run SQLite's checkpoint (and its fsyncs): here, on the
  // writer thread, it delays only the rows.
  if (ok && sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr) == SQLITE_OK) return true;
  if (ok)
    std::fprintf(stderr, "dispatch_server: sqlite: commit: %s (will retry)\n",
                 sqlite3_errmsg(db_));
  sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  return false;
}

bool TypingStore::step(sqlite3_stmt* stmt) {
  const int rc = sqlite3_step(stmt);
  sqlite3_reset(stmt);
  sqlite3_clear_bindings(stmt);
  if (rc == SQLITE_DONE || rc == SQLITE_ROW) return true;
  std::fprintf(stderr, "dispatch_server: sqlite: %s (will retry)\n", sqlite3_errmsg(db_));
  return false;
}

bool TypingStore::drain(std::unique_lock<std::mutex>& lk,
                        std::chrono::milliseconds timeout) {
  const std::uint64_t target = accepted_;
  return idle_.wait_for(lk, timeout, [&] { return written_ >= target; });
}

bool TypingStore::flush(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(mu_);
  return drain(lk, timeout);
}

std::size_t TypingStore::queued() {
  std::lock_guard<std::mutex> g(mu_);
  return static_cast<std::size_t>(accepted_ - written_);
}

std::int64_t TypingStore::countRows() {
  std::lock_guard<std::mutex> g(dbMu_);
  std::int64_t n = -1;
  if (sqlite3_step(count_) == SQLITE_ROW) n = sqlite3_column_int64(count_, 0);
  sqlite3_reset(count_);
  return n;
}

std::int64_t TypingStore::clearAll() {
  {
    std::unique_lock<std::mutex> lk(mu_);
    (void)drain(lk, std::chrono::seconds(10));
  }
  std::lock_guard<std::mutex> g(dbMu_);
  if (sqlite3_exec(db_, "DELETE FROM typing_indicators", nullptr, nullptr, nullptr) !=
      SQLITE_OK)
    return -1;
  return sqlite3_changes(db_);
}

}  // namespace dispatch
