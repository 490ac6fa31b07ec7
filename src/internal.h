// SPDX-License-Identifier: MIT
// File: src/internal.h -- private building blocks shared by the components:
// compact interned names, 8-byte entry lists, a paged slab, a counting
// allocator for the hash sets, and the deferred event queue.
#ifndef ROOMKEEPER_SRC_INTERNAL_H_
#define ROOMKEEPER_SRC_INTERNAL_H_

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/hash/hash.h"
#include "absl/strings/string_view.h"
#include "roomkeeper/callbacks.h"

namespace roomkeeper::detail {

inline constexpr std::uint32_t kNone = std::numeric_limits<std::uint32_t>::max();

/// A 16-byte string: up to 15 bytes inline, longer ones on the heap.
/// Byte 15 holds the inline length, or 0xFF for a heap name.
class Name {
 public:
  Name() noexcept { clearInline(); }
  ~Name() { reset(nullptr); }
  Name(const Name&) = delete;
  Name& operator=(const Name&) = delete;

  /// Assigns; returns the heap bytes now held. Throws std::bad_alloc with
  /// the name unchanged.
  std::size_t assign(std::string_view s, std::size_t* bytes) {
    if (s.size() <= kInline) {
      reset(bytes);
      std::memcpy(rep_, s.data(), s.size());
      rep_[kInline] = static_cast<char>(s.size());
      return 0;
    }
    char* p = static_cast<char*>(std::malloc(s.size()));
    if (p == nullptr) throw std::bad_alloc();
    std::memcpy(p, s.data(), s.size());
    reset(bytes);
    std::memcpy(rep_, &p, sizeof p);
    const std::uint32_t len = static_cast<std::uint32_t>(s.size());
    std::memcpy(rep_ + sizeof p, &len, sizeof len);
    rep_[kInline] = static_cast<char>(0xFF);
    if (bytes) *bytes += s.size();
    return s.size();
  }
  /// Frees the heap part, if any, and makes the name empty.
  void reset(std::size_t* bytes) noexcept {
    if (isHeap()) {
      char* p;
      std::memcpy(&p, rep_, sizeof p);
      if (bytes) *bytes -= size();
      std::free(p);
    }
    clearInline();
  }
  std::string_view view() const noexcept {
    if (!isHeap()) return {rep_, static_cast<std::size_t>(rep_[kInline])};
    const char* p;
    std::memcpy(&p, rep_, sizeof p);
    return {p, size()};
  }
  /// The free-list link of a free slab slot, kept in the bytes an empty
  /// name does not use (its length byte stays 0, so it is still empty).
  /// Only on an empty (reset) name.
  void setFreeLink(std::uint32_t next) noexcept {
    if (rep_[kInline] != 0) std::abort();  // a slot released with its name (inline or heap)
    std::memcpy(rep_, &next, sizeof next);
  }
  std::uint32_t freeLink() const noexcept {
    std::uint32_t next;
    std::memcpy(&next, rep_, sizeof next);
    return next;
  }

 private:
  static constexpr std::size_t kInline = 15;
  bool isHeap() const noexcept {
    return static_cast<unsigned char>(rep_[kInline]) == 0xFF;
  }
  std::size_t size() const noexcept {
    std::uint32_t len;
    std::memcpy(&len, rep_ + sizeof(char*), sizeof len);
    return len;
  }
  void clearInline() noexcept { rep_[kInline] = 0; }
  char rep_[16];
};
static_assert(sizeof(Name) == 16);

/// One side of a membership: the other side's slot and the position of the
/// mirror entry in the other side's list.
struct Entry {
  std::uint32_t slot;
  std::uint32_t pos;
};

/// A list of Entry in 16 bytes: up to two entries inline, more on the
/// heap, growing to 3, then 2c + 1 entries (7, 15, 31, ...), and from
/// kFineGrowth on by a quarter; it shrinks to (c - 1) / 2 when a quarter
/// full, and is freed when empty. Allocation goes through malloc/realloc
/// (Entry is trivially copyable).
///
/// The 16 bytes are two Entry. Inline, they are the entries themselves,
/// packed at the front; an unused one has the slot kEmpty. On the heap, the
/// first holds the size, tagged with kHeap, and the capacity; the second,
/// the pointer. So an entry's slot is at most kMaxSlot, and Slab hands out
/// no slot number above it. Aligned to 8, as the pointer it holds.
class alignas(8) EntryList {
 public:
  static constexpr std::uint32_t kHeap = 0x80000000u;
  static constexpr std::uint32_t kEmpty = 0x7FFFFFFFu;
  static constexpr std::uint32_t kMaxSlot = kEmpty - 1;
  static constexpr std::uint32_t kMaxSize = kHeap - 1;

  EntryList() noexcept : e_{{kEmpty, 0}, {kEmpty, 0}} {}
  ~EntryList() { release(nullptr); }
  EntryList(const EntryList&) = delete;
  EntryList& operator=(const EntryList&) = delete;

  std::uint32_t size() const noexcept {
    const std::uint32_t w = e_[0].slot;
    if (w & kHeap) return w & ~kHeap;
    return (w != kEmpty ? 1u : 0u) + (e_[1].slot != kEmpty ? 1u : 0u);
  }
  bool empty() const noexcept { return e_[0].slot == kEmpty; }
  Entry* data() noexcept { return onHeap() ? heap() : e_; }
  const Entry* data() const noexcept { return onHeap() ? heap() : e_; }
  Entry& operator[](std::uint32_t i) noexcept { return data()[i]; }
  const Entry& operator[](std::uint32_t i) const noexcept { return data()[i]; }
  Entry& back() noexcept { return data()[size() - 1]; }
  const Entry& back() const noexcept { return data()[size() - 1]; }

  /// Ensures room for one more; false (nothing changed) if out of memory.
  bool reserveOneMore(std::size_t* bytes) noexcept {
    if (!onHeap()) return e_[1].slot == kEmpty || reallocTo(3, bytes);
    const std::uint32_t cap = e_[0].pos;
    if ((e_[0].slot & ~kHeap) < cap) return true;
    // 2 (inline), then 3, 7, 15, ... on the heap: 2^k - 1 entries make a
    // request of 16j - 8 bytes, which glibc's malloc serves with no slack
    // (a chunk is the request plus its 8-byte header, rounded to 16).
    // Doubling to 2^k entries would leave 8 bytes of every chunk unused and
    // round it up by 16: a 7-room session list is 64 bytes of chunk, not 80.
    //
    // From kFineGrowth entries (32 KB) on, a list grows by a quarter
    // instead of doubling: a big room holds at most 25 % more slots than
    // members, not up to 100 % (a room of 66,667 members: 74,462 slots
    // instead of 131,071, 0.5 MB less). It costs more reallocs, whose
    // copies add up to about 4 entries per push, and realloc moves blocks
    // that big by remapping pages rather than copying where it can.
    std::uint32_t ncap;
    if (cap < kFineGrowth) {
      ncap = cap * 2 + 1;
    } else {
      if (cap > kMaxSize - cap / 4) return false;  // the size must stay below kHeap
      ncap = cap + cap / 4;
    }
    return reallocTo(ncap, bytes);
  }
  static constexpr std::uint32_t kFineGrowth = 4095;
  /// Requires reserveOneMore() first, and e.slot <= kMaxSlot.
  std::uint32_t push(Entry e) noexcept {
    if (onHeap()) {
      const std::uint32_t n = e_[0].slot & ~kHeap;
      heap()[n] = e;
      e_[0].slot = (n + 1) | kHeap;
      return n;
    }
    if (e_[0].slot == kEmpty) {
      e_[0] = e;
      return 0;
    }
    e_[1] = e;
    return 1;
  }
  void pop(std::size_t* bytes) noexcept {
    if (!onHeap()) {
      (e_[1].slot != kEmpty ? e_[1] : e_[0]).slot = kEmpty;
      return;
    }
    const std::uint32_t n = (e_[0].slot & ~kHeap) - 1;
    e_[0].slot = n | kHeap;
    const std::uint32_t cap = e_[0].pos;
    if (n == 0) {
      release(bytes);
    } else if (cap > 4 && n <= cap / 4) {
      reallocTo((cap - 1) / 2, bytes);
    }
  }
  void release(std::size_t* bytes) noexcept {
    if (onHeap()) {
      std::free(heap());
      if (bytes) *bytes -= e_[0].pos * sizeof(Entry);
    }
    e_[0] = Entry{kEmpty, 0};
    e_[1] = Entry{kEmpty, 0};
  }

 private:
  bool onHeap() const noexcept { return (e_[0].slot & kHeap) != 0; }
  Entry* heap() const noexcept {
    Entry* p;
    std::memcpy(&p, &e_[1], sizeof p);
    return p;
  }
  bool reallocTo(std::uint32_t ncap, std::size_t* bytes) noexcept {
    Entry* fresh;
    std::uint32_t n;
    if (onHeap()) {
      n = e_[0].slot & ~kHeap;
      // realloc: grows in place when it can, and moves large blocks by
      // remapping pages rather than copying them.
      fresh = static_cast<Entry*>(std::realloc(heap(), ncap * sizeof(Entry)));
      if (fresh == nullptr) return false;
      if (bytes) *bytes -= e_[0].pos * sizeof(Entry);
    } else {
      n = size();
      fresh = static_cast<Entry*>(std::malloc(ncap * sizeof(Entry)));
      if (fresh == nullptr) return false;
      std::memcpy(fresh, e_, n * sizeof(Entry));
    }
    e_[0] = Entry{n | kHeap, ncap};
    static_assert(sizeof(Entry*) == sizeof(Entry), "the pointer takes one entry's place");
    std::memcpy(&e_[1], &fresh, sizeof fresh);
    if (bytes) *bytes += ncap * sizeof(Entry);
    return true;
  }
  Entry e_[2];
};
static_assert(sizeof(EntryList) == 16 && alignof(EntryList) == 8);

/// Paged slab of T: indices stay valid while the slot is live, pages never
/// move. All pages are returned once every slot is free. The free slots
/// form a LIFO list linked through their (empty) name `T::*kLink`, so a
/// slot costs sizeof(T) and nothing else.
template <typename T, Name T::*kLink, std::size_t kPageBits = 10>
class Slab {
 public:
  static constexpr std::size_t kPage = std::size_t{1} << kPageBits;
  explicit Slab(std::size_t* bytes) : bytes_(bytes) {}
  ~Slab() { releaseAll(); }
  Slab(const Slab&) = delete;
  Slab& operator=(const Slab&) = delete;

  T& operator[](std::uint32_t i) noexcept {
    return pages_[i >> kPageBits][i & (kPage - 1)];
  }
  const T& operator[](std::uint32_t i) const noexcept {
    return pages_[i >> kPageBits][i & (kPage - 1)];
  }
  /// Throws std::bad_alloc with nothing changed, also past
  /// EntryList::kMaxSlot slots (an entry could not name the next one).
  std::uint32_t alloc() {
    if (freeHead_ == kNone) {
      if (next_ > EntryList::kMaxSlot) throw std::bad_alloc();
      if (next_ == pages_.size() * kPage) addPage();
      ++live_;
      return static_cast<std::uint32_t>(next_++);
    }
    const std::uint32_t i = freeHead_;
    freeHead_ = ((*this)[i].*kLink).freeLink();
    ++live_;
    return i;
  }
  /// The slot must be reset by the caller first (its name empty). Never
  /// throws: the link goes into the slot itself.
  void release(std::uint32_t i) noexcept {
    ((*this)[i].*kLink).setFreeLink(freeHead_);
    freeHead_ = i;
    if (--live_ == 0) releaseAll();
  }
  std::size_t live() const noexcept { return live_; }
  std::size_t highWater() const noexcept { return next_; }

 private:
  void addPage() {
    // The page first: if it cannot be had, nothing else has grown.
    std::unique_ptr<T[]> page(new T[kPage]);
    const std::size_t pbefore = pages_.capacity();
    pages_.reserve(pages_.size() + 1);
    *bytes_ += (pages_.capacity() - pbefore) * sizeof(void*);
    pages_.push_back(std::move(page));
    *bytes_ += kPage * sizeof(T);
  }
  void releaseAll() noexcept {
    *bytes_ -= pages_.size() * kPage * sizeof(T);
    *bytes_ -= pages_.capacity() * sizeof(void*);
    std::vector<std::unique_ptr<T[]>>().swap(pages_);
    freeHead_ = kNone;
    next_ = 0;
    live_ = 0;
  }
  std::vector<std::unique_ptr<T[]>> pages_;
  std::uint32_t freeHead_ = kNone;  // the free list's first slot
  std::size_t next_ = 0;
  std::size_t live_ = 0;
  std::size_t* bytes_;
};

/// Counts the bytes a container allocates into *counter.
template <typename T>
struct CountingAllocator {
  using value_type = T;
  std::size_t* counter;
  explicit CountingAllocator(std::size_t* c) noexcept : counter(c) {}
  template <typename U>
  CountingAllocator(const CountingAllocator<U>& o) noexcept  // NOLINT
      : counter(o.counter) {}
  T* allocate(std::size_t n) {
    T* p = std::allocator<T>().allocate(n);
    *counter += n * sizeof(T);
    return p;
  }
  void deallocate(T* p, std::size_t n) noexcept {
    std::allocator<T>().deallocate(p, n);
    *counter -= n * sizeof(T);
  }
  template <typename U>
  bool operator==(const CountingAllocator<U>& o) const noexcept {
    return counter == o.counter;
  }
  template <typename U>
  bool operator!=(const CountingAllocator<U>& o) const noexcept {
    return counter != o.counter;
  }
};

inline std::size_t hashName(std::string_view s) noexcept {
  return absl::Hash<absl::string_view>{}(absl::string_view(s.data(), s.size()));
}

/// Hash and equality for a hash set of slot numbers looked up by name:
/// the set stores 4 bytes per entry, the names live in the slab.
template <typename SlabT>
struct SlotHash {
  using is_transparent = void;
  const SlabT* slab;
  std::size_t operator()(std::uint32_t i) const noexcept {
    return hashName((*slab)[i].name.view());
  }
  std::size_t operator()(std::string_view s) const noexcept { return hashName(s); }
};
template <typename SlabT>
struct SlotEq {
  using is_transparent = void;
  const SlabT* slab;
  bool operator()(std::uint32_t a, std::uint32_t b) const noexcept { return a == b; }
  bool operator()(std::uint32_t a, std::string_view b) const noexcept {
    return (*slab)[a].name.view() == b;
  }
  bool operator()(std::string_view a, std::uint32_t b) const noexcept {
    return a == (*slab)[b].name.view();
  }
};

/// One message for several sessions, queued as one event instead of one
/// per member: the message once, the members' names one after another in
/// one buffer (a few allocations per fan-out, however many members).
struct FanOut {
  std::string event, payload, names;
  std::vector<std::size_t> ends;  // names[ends[i-1], ends[i]) is member i

  void add(std::string_view name) {
    names.append(name.data(), name.size());
    ends.push_back(names.size());
  }
  std::size_t size() const noexcept { return ends.size(); }
  /// Calls `emit(member, event, payload)` for each member in order; one
  /// that throws is handed to `onError` (inside the catch) and the next
  /// member is still told.
  template <typename Emit, typename OnError>
  void deliver(Emit&& emit, OnError&& onError) const {
    std::size_t at = 0;
    for (const std::size_t end : ends) {
      const std::string_view to(names.data() + at, end - at);
      at = end;
      try {
        emit(to, event, payload);
      } catch (...) {
        onError();
      }
    }
  }
};

/// Work deferred until the state is consistent and no container is being
/// iterated: callbacks are queued by a mutating call and run when the
/// outermost call finishes (or, under SyncKeeper, after the lock is
/// released). Strings are owned copies, so a callback may change anything.
struct Event {
  std::uint8_t kind = 0;
  std::string a;
  std::string b;
  std::function<void()> fn;  // for kinds that carry their own work
};

class EventQueue {
 public:
  using Deliver = std::function<void(Event&)>;
  /// Runs every queued event, including those queued while running, unless
  /// already running further up the stack or delivery is deferred.
  template <typename F>
  void drain(F&& deliver) {
    if (running_ || deferred_ > 0) return;
    running_ = true;
    for (std::size_t i = 0; i < events_.size(); ++i) {
      Event ev = std::move(events_[i]);
      deliver(ev);  // must not throw
    }
    events_.clear();
    if (events_.capacity() > 1024) events_.shrink_to_fit();
    running_ = false;
  }
  /// Queues one event, filled in by `fill(Event&)`. Never throws: if the
  /// queue cannot grow or `fill` runs out of memory, nothing is queued and
  /// the loss is counted (dropped()). State changes never depend on it.
  template <typename Fill>
  bool tryPush(Fill&& fill) noexcept {
    try {
      Event& ev = events_.emplace_back();
      try {
        fill(ev);
      } catch (...) {
        events_.pop_back();
        throw;
      }
      return true;
    } catch (...) {
      ++dropped_;
      return false;
    }
  }
  /// Room for `n` more events, so that the events of a change about to be
  /// committed cannot fail for want of queue space. False: out of memory.
  bool reserveMore(std::size_t n) noexcept {
    try {
      events_.reserve(events_.size() + n);
      return true;
    } catch (...) {
      return false;
    }
  }
  /// Counts an event lost to an allocation failure outside tryPush.
  void countDropped() noexcept { ++dropped_; }
  std::uint64_t dropped() const noexcept { return dropped_; }
  bool empty() const noexcept { return events_.empty(); }
  std::size_t size() const noexcept { return events_.size(); }
  /// True while drain() delivers (a callback is running).
  bool running() const noexcept { return running_; }
  std::vector<Event> take() {
    std::vector<Event> out;
    out.swap(events_);
    return out;
  }
  int deferred_ = 0;  // >0: SyncKeeper collects and delivers after unlock

 private:
  std::vector<Event> events_;
  std::uint64_t dropped_ = 0;
  bool running_ = false;
};

}  // namespace roomkeeper::detail

#endif  // ROOMKEEPER_SRC_INTERNAL_H_
