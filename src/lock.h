// SPDX-License-Identifier: MIT
// File: src/lock.h -- a lock that is a no-op unless a mutex was attached
// (SyncKeeper attaches one; the single-threaded path pays one branch).
#ifndef ROOMKEEPER_SRC_LOCK_H_
#define ROOMKEEPER_SRC_LOCK_H_

#include <mutex>

namespace roomkeeper::detail {

class MaybeLock {
 public:
  explicit MaybeLock(std::recursive_mutex* mu) : mu_(mu) {
    if (mu_) mu_->lock();
  }
  ~MaybeLock() {
    if (mu_) mu_->unlock();
  }
  MaybeLock(const MaybeLock&) = delete;
  MaybeLock& operator=(const MaybeLock&) = delete;

 private:
  std::recursive_mutex* mu_;
};

}  // namespace roomkeeper::detail

#endif  // ROOMKEEPER_SRC_LOCK_H_
