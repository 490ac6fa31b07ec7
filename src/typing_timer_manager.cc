// SPDX-License-Identifier: MIT
#include "roomkeeper/typing_timer_manager.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <exception>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "fmt/format.h"
#include "lock.h"
#include "registry_impl.h"
#include "typing_impl.h"

namespace roomkeeper {

std::string_view toString(PersistOp op) noexcept {
  switch (op) {
    case PersistOp::kTypingStarted: return "typing_started";
    case PersistOp::kTypingStopped: return "typing_stopped";
    case PersistOp::kTypingStoppedAll: return "typing_stopped_all";
  }
  return "unknown";
}

namespace {


// JSON string body escaping for the small payloads built here.
void appendJsonString(std::string& out, std::string_view s) {
  out.push_back('"');
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += fmt::format("\\u{:04x}", c);
        } else {
          out.push_back(ch);
        }
    }
  }
  out.push_back('"');
}

}  // namespace

std::size_t TypingTimerManager::Impl::heapOf(const PersistCall& c) noexcept {
  // What one waiting call holds: its queue element and its strings' heap
  // blocks (short ids stay in the string itself).
  auto heap = [](const std::string& str) {
    return str.capacity() > 15 ? str.capacity() + 1 : 0;
  };
  return sizeof(PersistEntry) + heap(c.user) + heap(c.thread);
}

std::size_t IndicatorHash::operator()(std::uint32_t i) const noexcept {
  const Indicator& e = (*slab)[i];
  return (*this)(TypingKeyView{e.user.view(), e.thread.view(), e.anon});
}
std::size_t IndicatorHash::operator()(const TypingKeyView& k) const noexcept {
  return absl::Hash<std::tuple<absl::string_view, absl::string_view, bool>>{}(
      std::make_tuple(absl::string_view(k.user.data(), k.user.size()),
                      absl::string_view(k.thread.data(), k.thread.size()), k.anon));
}

TypingTimerManager::Impl::Impl(SessionRegistry& r, TimerService& t, TypingCallbacks c,
                               TypingOptions o)
    : registry(r),
      reg(*r.impl_),
      timers(t),
      cb(std::move(c)),
      opt(std::move(o)),
      entries(&bytes),
      index(0, IndicatorHash{&entries}, IndicatorEq{&entries},
            detail::CountingAllocator<std::uint32_t>(&bytes)) {
  if (opt.timeout.count() < 0) opt.timeout = Millis(0);
  // A zero backoff would retry a failing database in a busy loop.
  if (opt.retryInitial < Millis(1)) opt.retryInitial = Millis(1);
  if (opt.retryMax < opt.retryInitial) opt.retryMax = opt.retryInitial;
  if (opt.maxPendingPersist < 2) opt.maxPendingPersist = 2;
  backoff = opt.retryInitial;
  expireHandler = timers.addHandler(
      [this](TimerHandle h, std::uint32_t idx) { onExpire(h, idx); });
  retryHandler = timers.addHandler([this](TimerHandle, std::uint32_t) {
    retryTimer = {};
    scheduleDrain(persistSeq);  // everything queued so far
    // Standalone (a host calling TimerService::advance itself) nobody else
    // would deliver the queued work; under Keeper/SyncKeeper delivery is
    // deferred and this is a no-op.
    reg.flush();
  });
}

TypingTimerManager::Impl::~Impl() {
  for (std::uint32_t i = 0; i < entries.highWater(); ++i) {
    Indicator& e = entries[i];
    if (!e.live) continue;
    timers.cancel(e.timer);  // the sessions' typing lists go with `lists`
  }
  timers.cancel(retryTimer);
  // A shared TimerService gets its two handler slots back.
  timers.removeHandler(expireHandler);
  timers.removeHandler(retryHandler);
  // Calls still queued are lost with the manager: never silently.
  if (!queue.empty() && cb.log) {
    try {
      cb.log(LogLevel::kError,
             fmt::format("roomkeeper: destroyed with {} undelivered persistence call(s)",
                         queue.size()));
      for (const PersistEntry& p : queue)
        cb.log(LogLevel::kError,
               fmt::format("roomkeeper: undelivered persistence call {} user={} thread={}",
                           toString(p.call.op), p.call.user, p.call.thread));
    } catch (...) {
      // A destructor must not throw; the host's log failed us.
    }
  }
}

TypingKeyView TypingTimerManager::Impl::keyOf(std::uint32_t s,
                                              std::string_view thread) const {
  const SessionSlot& slot = reg.sessionSlots[s];
  if (slot.user == detail::kNone) return TypingKeyView{slot.name.view(), thread, true};
  return TypingKeyView{reg.userSlots[slot.user].name.view(), thread, false};
}

std::uint32_t TypingTimerManager::Impl::threadRoomSlot(std::string_view thread) const {
  // Never on the keystroke path: one lookup of the thread's room, its name
  // built on the stack when it fits.
  const std::size_t n = opt.threadRoomPrefix.size() + thread.size();
  char buf[512];
  std::string heap;  // may throw: the callers refuse or drop the call
  char* name = buf;
  if (n > sizeof buf) {
    heap.resize(n);
    name = heap.data();
  }
  std::memcpy(name, opt.threadRoomPrefix.data(), opt.threadRoomPrefix.size());
  std::memcpy(name + opt.threadRoomPrefix.size(), thread.data(), thread.size());
  return reg.findRoom(std::string_view(name, n));
}

bool TypingTimerManager::Impl::isMemberOfThread(std::uint32_t s,
                                                std::string_view thread) const {
  // Only when an indicator starts.
  const std::uint32_t r = threadRoomSlot(thread);
  return r != detail::kNone && reg.isMember(s, r);
}

void TypingTimerManager::Impl::reportError(std::string_view where) noexcept {
  // Called inside a catch block without the lock: counts under it, then
  // logs outside it (the log is a host callback).
  {
    detail::MaybeLock g(mu);
    ++callbackErrors;
  }
  if (!cb.log) return;
  try {
    std::string msg;
    try {
      throw;
    } catch (const std::exception& e) {
      msg = fmt::format("roomkeeper: typing {} callback threw: {}", where, e.what());
    } catch (...) {
      msg = fmt::format("roomkeeper: typing {} callback threw a non-exception", where);
    }
    cb.log(LogLevel::kError, msg);
  } catch (...) {
    detail::MaybeLock g(mu);
    ++callbackErrors;
  }
}

std::size_t TypingTimerManager::Impl::emitToThread(std::uint32_t s, const TypingKeyView& key,
                                                   const std::string& event) noexcept {
  if (!cb.emit) return 0;
  // Out of memory, some members may miss this event (counted as dropped);
  // the state change it reports has been made and stays made.
  try {
    // The thread room's members, in order, but not the typer: every
    // session of the same user is skipped (an anonymous typer is only its
    // own session). Collected before anything else is built, so a thread
    // with no one else here to tell costs one room lookup and nothing more.
    const std::uint32_t r = threadRoomSlot(key.thread);
    if (r == detail::kNone) return 0;
    const detail::EntryList& members = reg.roomSlots[r].members;
    detail::FanOut told;
    for (std::uint32_t i = 0; i < members.size(); ++i) {
      const std::uint32_t t = members[i].slot;
      if (t == s) continue;
      const SessionSlot& ts = reg.sessionSlots[t];
      if (!key.anon && ts.user != detail::kNone &&
          reg.userSlots[ts.user].name.view() == key.user)
        continue;
      told.add(ts.name.view());
    }
    const std::size_t n = told.size();
    if (n == 0) return 0;
    // One queued event for every member (the payload once, the names in
    // one buffer).
    std::string payload = "{\"threadId\":";
    appendJsonString(payload, key.thread);
    payload += ",\"userId\":";
    appendJsonString(payload, key.user);
    payload += "}";
    auto f = std::make_shared<detail::FanOut>(std::move(told));
    f->event = event;
    f->payload = std::move(payload);
    const bool queued = reg.events.tryPush([&](detail::Event& ev) {
      ev.kind = static_cast<std::uint8_t>(EventKind::kCustom);
      ev.fn = [this, f = std::move(f)]() {
        f->deliver(cb.emit, [this] { reportError("emit"); });
      };
    });
    return queued ? n : 0;
  } catch (...) {
    reg.events.countDropped();
    return 0;
  }
}

void TypingTimerManager::Impl::announce(std::uint32_t s, const TypingKeyView& key,
                                        bool started, Indicator& e) noexcept {
  const std::string& event = started ? opt.startedEvent : opt.stoppedEvent;
  // Anonymous indicators are this Keeper's own: a session id means nothing
  // behind another one.
  if (!bus || key.anon) {
    emitToThread(s, key, event);
    return;
  }
  // A start is shown unless it already is (another Keeper's relay came
  // first: the table's entry passes to the indicator); a stop only if it
  // was shown and nobody else has the user typing there (else it stays
  // shown, in the table, until the bus's stop edge).
  try {
    bool show = false;
    if (started) {
      show = !markShown(key.user, key.thread, false);
      e.shown = true;
    } else if (e.shown) {
      bool elsewhere = false;
      try {
        elsewhere = bus->typingElsewhere(key.user, key.thread);
      } catch (...) {
        reportError("bus");
      }
      e.shown = false;
      if (elsewhere)
        (void)markShown(key.user, key.thread, true);
      else
        show = true;
    }
    if (show) emitToThread(s, key, event);
  } catch (...) {
    reg.events.countDropped();
  }
  try {
    reg.events.tryPush([&](detail::Event& ev) {
      ev.kind = static_cast<std::uint8_t>(EventKind::kCustom);
      ev.fn = [b = bus, u = std::string(key.user), t = std::string(key.thread), started]() {
        b->typing(u, t, started);
      };
    });
  } catch (...) {
    reg.events.countDropped();
  }
}

std::size_t TypingTimerManager::Impl::replayToBus() {
  std::size_t n = 0;
  for (const std::uint32_t idx : index) {
    const Indicator& e = entries[idx];
    if (!e.live || e.anon) continue;
    reg.events.tryPush([&](detail::Event& ev) {
      ev.kind = static_cast<std::uint8_t>(EventKind::kCustom);
      ev.fn = [b = bus, u = std::string(e.user.view()), t = std::string(e.thread.view())]() {
        b->typing(u, t, true);
      };
    });
    ++n;
  }
  return n;
}

std::size_t TypingTimerManager::Impl::relay(std::string_view user, std::string_view thread,
                                            bool started) noexcept {
  const auto own = index.find(TypingKeyView{user, thread, false});
  if (own != index.end()) {
    // A stop while this Keeper has the user typing there itself: its own
    // indicator speaks for it (its own stop comes later). A start it has
    // not shown yet (its start raced the relay's): shown now.
    Indicator& e = entries[*own];
    if (!started || e.shown) return 0;
    e.shown = true;
  } else {
    try {
      // A start for a thread with no room here has nobody to tell, and
      // nothing to remember: the stop then finds it not shown, and a
      // member who joins in between hears neither (as one who joins after
      // a shown start hears only its stop). Most relayed starts are these
      // on a loop or node that holds none of the thread's members.
      if (started && threadRoomSlot(thread) == detail::kNone) return 0;
      if (!markShown(user, thread, started)) return 0;  // shown already / not shown
    } catch (...) {
      reg.events.countDropped();
      return 0;
    }
  }
  return emitToThread(detail::kNone, TypingKeyView{user, thread, false},
                      started ? opt.startedEvent : opt.stoppedEvent);
}

namespace {
std::size_t heapOfString(std::string_view s) { return s.size() > 15 ? s.size() + 1 : 0; }
}  // namespace

bool TypingTimerManager::Impl::markShown(std::string_view user, std::string_view thread,
                                         bool on) {
  // (Debian's Abseil has its own string_view for heterogeneous lookup.)
  const absl::string_view key(user.data(), user.size());
  auto it = shown.find(key);
  if (on) {
    if (it == shown.end()) {
      it = shown.emplace(std::string(user), std::vector<std::string>{}).first;
      shownBytes += 64 + heapOfString(user);
    }
    for (const std::string& t : it->second)
      if (t == thread) return false;
    it->second.emplace_back(thread);
    shownBytes += sizeof(std::string) + heapOfString(thread);
    return true;
  }
  if (it == shown.end()) return false;
  auto& threads = it->second;
  for (std::size_t i = 0; i < threads.size(); ++i) {
    if (threads[i] != thread) continue;
    shownBytes -= sizeof(std::string) + heapOfString(thread);
    threads[i] = std::move(threads.back());
    threads.pop_back();
    if (threads.empty()) {
      shownBytes -= 64 + heapOfString(user);
      shown.erase(it);
    }
    return true;
  }
  return false;
}

std::size_t TypingTimerManager::Impl::forgetShown(std::string_view user) noexcept {
  std::size_t n = 0;
  try {
    auto it = shown.find(absl::string_view(user.data(), user.size()));
    if (it == shown.end()) return 0;
    const std::vector<std::string> threads = std::move(it->second);
    shown.erase(it);
    shownBytes -= 64 + heapOfString(user);
    for (const std::string& t : threads) {
      shownBytes -= sizeof(std::string) + heapOfString(t);
      n += emitToThread(detail::kNone, TypingKeyView{user, t, false}, opt.stoppedEvent);
    }
  } catch (...) {
    reg.events.countDropped();
  }
  return n;
}

void TypingTimerManager::Impl::persist(PersistOp op, std::string_view user,
                                       std::string_view thread) noexcept {
  if (!cb.persist) return;
  // Bounded: at most maxPendingPersist calls wait, the one being delivered
  // included (the bound is clamped to >= 2, so one can always wait behind
  // a call in flight). Full: the oldest call not in flight is dropped.
  while (queue.size() >= opt.maxPendingPersist && !queue.empty()) {
    const std::size_t victim = inflight ? 1 : 0;
    if (victim >= queue.size()) break;
    queueHeap -= heapOf(queue[victim].call);
    const PersistEntry dropped = std::move(queue[victim]);
    queue.erase(queue.begin() + static_cast<std::ptrdiff_t>(victim));
    ++dropped_;
    if (cb.log) {
      try {
        std::string msg = fmt::format(
            "roomkeeper: persistence queue full ({}): dropped {} user={} thread={}",
            opt.maxPendingPersist, toString(dropped.call.op), dropped.call.user,
            dropped.call.thread);
        reg.events.tryPush([&](detail::Event& ev) {
          ev.kind = static_cast<std::uint8_t>(EventKind::kCustom);
          ev.fn = [this, m = std::move(msg)]() {
            try {
              cb.log(LogLevel::kError, m);
            } catch (...) {
              reportError("log");
            }
          };
        });
      } catch (...) {
        reg.events.countDropped();
      }
    }
  }
  try {
    PersistEntry entry{persistSeq + 1, PersistCall{op, std::string(user), std::string(thread)}};
    const std::size_t heap = heapOf(entry.call);
    queue.push_back(std::move(entry));
    ++persistSeq;
    queueHeap += heap;
  } catch (...) {
    // The call cannot even be queued: it is lost, and counted as dropped.
    ++dropped_;
    return;
  }
  if (!retryTimer.valid()) scheduleDrain(persistSeq);
}

void TypingTimerManager::Impl::scheduleDrain(std::uint64_t upTo) noexcept {
  // One delivery event per call, queued right behind the events of the
  // change that made it (typingStopped emit, then its persistence call), so
  // the host sees them in the order of the changes.
  const bool queued = reg.events.tryPush([&](detail::Event& ev) {
    ev.kind = static_cast<std::uint8_t>(EventKind::kCustom);
    ev.fn = [this, upTo]() { drain(false, upTo); };
  });
  // No delivery could be queued: the retry timer delivers instead, so no
  // call waits for a drain that never comes.
  if (!queued) ensureRetry(opt.retryInitial);
}

void TypingTimerManager::Impl::ensureRetry(Millis delay) noexcept {
  if (retryTimer.valid()) return;
  try {
    retryTimer = timers.arm(delay, retryHandler, 0);
  } catch (...) {
    // Not even a timer: the next persistence call or advance() will do.
  }
}

std::size_t TypingTimerManager::Impl::drain(bool force, std::uint64_t upTo) {
  // Runs outside any lock: takes the lock only to touch the queue. A drain
  // that finds another one in flight (another thread, or further up the
  // stack) leaves its calls to it: drainUpTo is read under the same lock.
  if (!force) {
    detail::MaybeLock g(mu);
    drainUpTo = std::max(drainUpTo, upTo);
  }
  std::size_t delivered = 0;
  for (;;) {
    PersistEntry call;
    {
      detail::MaybeLock g(mu);
      if (inflight || queue.empty()) return delivered;
      if (retryTimer.valid() && !force) return delivered;
      if (!force && queue.front().seq > drainUpTo) return delivered;
      try {
        call = queue.front();  // copied: delivered outside the lock
      } catch (...) {
        // No memory for the copy: leave the call queued and come back on
        // the retry timer (never a call stranded without a drain).
        ensureRetry(backoff);
        return delivered;
      }
      inflight = true;
      inflightThread = std::this_thread::get_id();
    }
    bool ok = false;
    try {
      ok = cb.persist(call.call);
    } catch (...) {
      reportError("persist");
      ok = false;
    }
    detail::MaybeLock g(mu);
    inflight = false;
    inflightThread = std::thread::id();
    inflightDone.notify_all();
    if (ok) {
      if (!queue.empty() && queue.front().seq == call.seq) {
        queueHeap -= heapOf(queue.front().call);
        queue.pop_front();
      }
      ++delivered_;
      ++delivered;
      backoff = opt.retryInitial;
      continue;
    }
    ++failures;
    if (force) return delivered;
    if (!retryTimer.valid() && !queue.empty()) {
      retryTimer = timers.arm(backoff, retryHandler, 0);
      // Doubling Millis::max() would overflow: saturate at retryMax.
      backoff = backoff > opt.retryMax / 2 ? opt.retryMax : std::min(backoff * 2, opt.retryMax);
    }
    return delivered;
  }
}

// Removes indicator `idx` from the typing list of session `gen` of slot
// `sl`, if that list is still there. The list's own generation decides,
// not the registry's slot: a list left by a session whose onDisconnect was
// skipped is emptied here as its indicators end, whether or not the slot
// has a session now.
void TypingTimerManager::Impl::unlinkSession(std::uint32_t idx, std::uint32_t sl,
                                             std::uint32_t gen) {
  TypingList* t = listAt(sl);
  if (t == nullptr || t->generation != gen) return;
  detail::EntryList* list = &t->list;
  for (std::uint32_t i = 0; i < list->size(); ++i) {
    if ((*list)[i].slot != idx) continue;
    (*list)[i] = list->back();
    list->pop(&bytes);
    if (list->empty()) {
      --sessionsTyping;
      releaseListsIfIdle();
    }
    return;
  }
}

detail::EntryList* TypingTimerManager::Impl::makeList(std::uint32_t s) noexcept {
  const std::uint32_t p = s >> kTypingListPageBits;
  try {
    if (p >= lists.size()) {
      const std::size_t before = lists.capacity();
      lists.resize(p + 1);  // unchanged if it throws
      bytes += (lists.capacity() - before) * sizeof(void*);
    }
    if (!lists[p]) {
      lists[p].reset(new TypingList[kTypingListPage]);
      bytes += kTypingListPage * sizeof(TypingList);
    }
  } catch (...) {
    return nullptr;
  }
  TypingList& t = *listAt(s);  // its page is made
  const std::uint32_t gen = reg.sessionSlots[s].generation;
  if (t.generation != gen) {
    // An earlier session of this slot, whose onDisconnect was skipped
    // (standalone use): its list goes now. Its indicators still name that
    // session by generation, and unlinkSession() passes it by.
    if (!t.list.empty()) {
      t.list.release(&bytes);
      --sessionsTyping;
    }
    t.generation = gen;
  }
  return &t.list;
}

void TypingTimerManager::Impl::releaseLists() noexcept {
  if (sessionsTyping != 0 || lists.capacity() == 0) return;
  // Every list is empty: each non-empty one is counted in sessionsTyping.
  for (const auto& page : lists)
    if (page) bytes -= kTypingListPage * sizeof(TypingList);
  bytes -= lists.capacity() * sizeof(void*);
  std::vector<std::unique_ptr<TypingList[]>>().swap(lists);
}

void TypingTimerManager::Impl::end(std::uint32_t idx, std::uint32_t typer) {
  Indicator& e = entries[idx];
  timers.cancel(e.timer);  // false if it is the one firing: fine
  std::uint32_t s = typer;
  if (s == detail::kNone && !e.sessions.empty()) {
    const std::uint32_t first = e.sessions[0].slot;
    if (first < reg.sessionSlots.highWater() &&
        reg.sessionSlots[first].generation == e.sessions[0].pos)
      s = first;
  }
  for (std::uint32_t k = 0; k < e.sessions.size(); ++k)
    unlinkSession(idx, e.sessions[k].slot, e.sessions[k].pos);
  e.sessions.release(&bytes);
  index.erase(idx);
  e.live = false;
  e.timer = {};
  // The messages copy what they need (and never throw); then the names go.
  const TypingKeyView key{e.user.view(), e.thread.view(), e.anon};
  announce(s, key, false, e);
  if (!e.anon) persist(PersistOp::kTypingStopped, key.user, key.thread);
  e.user.reset(&bytes);
  e.thread.reset(&bytes);
  e.anon = false;
  e.shown = false;
  entries.release(idx);  // the last one returns every page
  if (index.empty()) releaseIdle();
}

void TypingTimerManager::Impl::releaseIdle() {
  // No indicator left: hand the index's memory back, as the registry does
  // when its last session goes, so that bytes return to 0 (the slab has
  // already returned its pages).
  if (index.capacity() > 0) {
    IndicatorIndex fresh(0, IndicatorHash{&entries}, IndicatorEq{&entries},
                         detail::CountingAllocator<std::uint32_t>(&bytes));
    index.swap(fresh);
  }
}

void TypingTimerManager::Impl::onExpire(TimerHandle h, std::uint32_t idx) {
  if (idx >= entries.highWater()) return;
  Indicator& e = entries[idx];
  if (!e.live || e.timer != h) return;
  end(idx, detail::kNone);
  reg.flush();  // standalone: deliver now (no-op under Keeper/SyncKeeper)
}

Result TypingTimerManager::Impl::start(std::string_view session, std::string_view thread) {
  const std::uint32_t s = reg.findSession(session);
  if (s == detail::kNone) return Result::kNotConnected;
  return startSlot(s, thread);
}

Result TypingTimerManager::Impl::startSlot(std::uint32_t s, std::string_view thread) {
  SessionSlot& ss = reg.sessionSlots[s];
  if (ss.state != SessionState::kLive) return Result::kClosing;
  if (thread.empty() || thread.size() > reg.limits.maxIdLength) return Result::kInvalidId;
  // The keystroke path: the session's own indicators, no hash lookup. An
  // entry's `pos` is 1 if the indicator was started while the session was
  // anonymous: it is the session's own only while the session still is
  // (standalone use can bind a user later; a bound user never changes).
  const detail::EntryList* own = listOf(s);
  const std::uint32_t ownCount = own != nullptr ? own->size() : 0;
  for (std::uint32_t i = 0; i < ownCount; ++i) {
    const detail::Entry mine = (*own)[i];
    if (mine.pos != 0 && ss.user != detail::kNone) continue;
    Indicator& e = entries[mine.slot];
    if (e.thread.view() == thread) {
      timers.restart(e.timer, opt.timeout);
      return Result::kAlreadyDone;
    }
  }
  const bool full = ownCount >= opt.maxTypingPerSession;
  if (opt.requireMembership) {
    bool member = false;
    try {
      member = isMemberOfThread(s, thread);
    } catch (...) {
      return Result::kOutOfMemory;
    }
    if (!member) return Result::kNotMember;
  }
  const TypingKeyView key = keyOf(s, thread);
  auto it = index.find(key);
  if (it != index.end()) {
    // Another device of the same user keeps this indicator alive.
    if (full) return Result::kTooManyRooms;
    if (!addSession(*it, s)) return Result::kOutOfMemory;
    timers.restart(entries[*it].timer, opt.timeout);
    return Result::kAlreadyDone;
  }
  if (full) return Result::kTooManyRooms;

  // Allocate everything first (slot, names, index entry, the timer and its
  // page, the list entries, room for the events); commit only then.
  if (!reg.events.reserveMore(2)) return Result::kOutOfMemory;
  std::uint32_t idx = detail::kNone;
  try {
    idx = entries.alloc();
    Indicator& e = entries[idx];
    e.user.assign(key.user, &bytes);
    e.thread.assign(thread, &bytes);
    e.anon = key.anon;
    e.timer = timers.arm(opt.timeout, expireHandler, idx);
    index.insert(idx);
  } catch (...) {
    if (idx != detail::kNone) undoStart(idx);
    return Result::kOutOfMemory;
  }
  if (!addSession(idx, s)) {
    index.erase(idx);
    undoStart(idx);
    return Result::kOutOfMemory;
  }
  Indicator& e = entries[idx];
  e.live = true;
  const TypingKeyView made{e.user.view(), e.thread.view(), e.anon};
  announce(s, made, true, e);
  if (!e.anon) persist(PersistOp::kTypingStarted, made.user, made.thread);
  return Result::kOk;
}

void TypingTimerManager::Impl::undoStart(std::uint32_t idx) noexcept {
  Indicator& e = entries[idx];
  timers.cancel(e.timer);
  e.timer = {};
  e.user.reset(&bytes);
  e.thread.reset(&bytes);
  e.anon = false;
  entries.release(idx);
}

bool TypingTimerManager::Impl::addSession(std::uint32_t idx, std::uint32_t s) {
  const SessionSlot& ss = reg.sessionSlots[s];
  Indicator& e = entries[idx];
  detail::EntryList* list = makeList(s);
  if (list == nullptr || !list->reserveOneMore(&bytes) || !e.sessions.reserveOneMore(&bytes)) {
    releaseListsIfIdle();  // a page just made for nobody goes again
    return false;
  }
  if (list->empty()) ++sessionsTyping;
  list->push(detail::Entry{idx, ss.user == detail::kNone ? 1u : 0u});
  e.sessions.push(detail::Entry{s, ss.generation});
  return true;
}

Result TypingTimerManager::Impl::stop(std::string_view session, std::string_view thread) {
  const std::uint32_t s = reg.findSession(session);
  if (s == detail::kNone) return Result::kNotConnected;
  return stopSlot(s, thread);
}

Result TypingTimerManager::Impl::stopSlot(std::uint32_t s, std::string_view thread) {
  if (thread.empty() || thread.size() > reg.limits.maxIdLength) return Result::kInvalidId;
  // The session's own indicators first (covers one started before bindUser).
  const SessionSlot& ss = reg.sessionSlots[s];
  const detail::EntryList* own = listOf(s);
  for (std::uint32_t i = 0; own != nullptr && i < own->size(); ++i) {
    const std::uint32_t idx = (*own)[i].slot;
    if (entries[idx].thread.view() == thread) {
      end(idx, s);
      return Result::kOk;
    }
  }
  // Then the user's indicator kept alive by another device. An anonymous
  // session has no other device: its own list was the whole answer.
  if (ss.user == detail::kNone) return Result::kAlreadyDone;
  auto it = index.find(keyOf(s, thread));
  if (it == index.end()) return Result::kAlreadyDone;
  end(*it, s);
  return Result::kOk;
}

std::size_t TypingTimerManager::Impl::clearSession(std::uint32_t s) {
  detail::EntryList* list = listOf(s);
  if (list == nullptr || list->empty()) return 0;
  const std::uint32_t gen = reg.sessionSlots[s].generation;
  // No allocation here (it runs inside disconnect). In the order the
  // session started them; end() never touches this session's own list
  // (its entry has left the indicator first), which is released after.
  // The list pages stay meanwhile: this session still counts as typing.
  std::size_t n = 0;
  for (std::uint32_t i = 0; i < list->size(); ++i) {
    const std::uint32_t idx = (*list)[i].slot;
    ++n;
    Indicator& e = entries[idx];
    for (std::uint32_t k = 0; k < e.sessions.size(); ++k) {
      if (e.sessions[k].slot == s && e.sessions[k].pos == gen) {
        e.sessions[k] = e.sessions.back();
        e.sessions.pop(&bytes);
        break;
      }
    }
    if (e.sessions.empty()) end(idx, s);
  }
  list->release(&bytes);
  --sessionsTyping;
  releaseListsIfIdle();
  return n;
}

std::size_t TypingTimerManager::Impl::onDisconnect(std::uint32_t s) {
  const std::size_t n = clearSession(s);
  const SessionSlot& slot = reg.sessionSlots[s];
  // With a bus the cluster decides (Keeper::relayUserGone).
  if (!bus && slot.user != detail::kNone && reg.userSlots[slot.user].sessions.size() <= 1)
    persist(PersistOp::kTypingStoppedAll, reg.userSlots[slot.user].name.view(), {});
  return n;
}

std::size_t TypingTimerManager::Impl::clearAll() {
  std::size_t n = 0;
  shown.clear();  // shutdown: nobody is told anything more
  shownBytes = 0;
  // highWater() drops to 0 when the last indicator returns the pages.
  for (std::uint32_t i = 0; i < entries.highWater(); ++i) {
    if (!entries[i].live) continue;
    end(i, detail::kNone);
    ++n;
  }
  return n;
}

TypingStats TypingTimerManager::Impl::stats() const noexcept {
  TypingStats st;
  st.indicators = index.size();
  st.timers = index.size();
  st.sessionsTyping = sessionsTyping;
  st.persistPending = queue.size();
  st.persistDelivered = delivered_;
  st.persistFailures = failures;
  st.persistDropped = dropped_;
  st.callbackErrors = callbackErrors;
  st.bytes = bytes + queueHeap + shownBytes;
  return st;
}

// ------------------------------------------------------------- Public ---

TypingTimerManager::TypingTimerManager(SessionRegistry& registry, TimerService& timers,
                                       TypingCallbacks callbacks, TypingOptions options)
    : impl_(std::make_unique<Impl>(registry, timers, std::move(callbacks),
                                   std::move(options))) {}
TypingTimerManager::~TypingTimerManager() = default;

Result TypingTimerManager::startTyping(std::string_view session, std::string_view thread) {
  const Result r = impl_->start(session, thread);
  impl_->reg.flush();
  return r;
}
Result TypingTimerManager::stopTyping(std::string_view session, std::string_view thread) {
  const Result r = impl_->stop(session, thread);
  impl_->reg.flush();
  return r;
}
std::size_t TypingTimerManager::clearTypingTimers(std::string_view session) {
  const std::uint32_t s = impl_->reg.findSession(session);
  if (s == detail::kNone) return 0;
  const std::size_t n = impl_->clearSession(s);
  impl_->reg.flush();
  return n;
}
std::size_t TypingTimerManager::onDisconnect(std::string_view session) {
  const std::uint32_t s = impl_->reg.findSession(session);
  if (s == detail::kNone) return 0;
  const std::size_t n = impl_->onDisconnect(s);
  impl_->reg.flush();
  return n;
}
std::size_t TypingTimerManager::clearAll() {
  const std::size_t n = impl_->clearAll();
  impl_->reg.flush();
  return n;
}
bool TypingTimerManager::isTyping(std::string_view user, std::string_view thread) const {
  return impl_->index.find(TypingKeyView{user, thread, false}) != impl_->index.end();
}
std::size_t TypingTimerManager::flushPersistence() {
  impl_->reg.flush();
  return impl_->finalFlush();
}

std::size_t TypingTimerManager::Impl::finalFlush() {
  // A call in flight on another thread (one slow write) is waited for
  // first: the last attempt must include every call, the stops this
  // shutdown made among them. One in flight further up this thread's own
  // stack (shutdown from inside persist) cannot be waited for.
  if (mu != nullptr) {
    std::unique_lock<std::recursive_mutex> lk(*mu);
    inflightDone.wait(lk, [&] {
      return !inflight || inflightThread == std::this_thread::get_id();
    });
  }
  // A last attempt, then every call still queued is reported, outside the
  // lock: nothing is dropped silently.
  drain(true, 0);
  std::vector<std::string> lines;
  std::size_t left = 0;
  {
    detail::MaybeLock g(mu);
    left = queue.size();
    if (cb.log)
      for (const PersistEntry& p : queue)
        lines.push_back(fmt::format(
            "roomkeeper: undelivered persistence call {} user={} thread={}",
            toString(p.call.op), p.call.user, p.call.thread));
  }
  for (const std::string& line : lines) {
    try {
      cb.log(LogLevel::kError, line);
    } catch (...) {
      reportError("log");
    }
  }
  return left;
}

std::size_t TypingTimerManager::Impl::discardPersistence() {
  // After shutdown's last attempt: what is left was reported; let it go.
  detail::MaybeLock g(mu);
  const std::size_t n = queue.size();
  std::deque<PersistEntry>().swap(queue);
  queueHeap = 0;
  timers.cancel(retryTimer);
  retryTimer = {};
  return n;
}
TypingStats TypingTimerManager::stats() const noexcept { return impl_->stats(); }
const TypingOptions& TypingTimerManager::options() const noexcept { return impl_->opt; }

}  // namespace roomkeeper
