// SPDX-License-Identifier: MIT
#include "roomkeeper/typing_timer_manager.h"

#include <algorithm>
#include <deque>
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

std::size_t IndicatorHash::operator()(std::uint32_t i) const noexcept {
  const Indicator& e = (*slab)[i];
  return (*this)(TypingKeyView{e.user.view(), e.thread.view()});
}
std::size_t IndicatorHash::operator()(const TypingKeyView& k) const noexcept {
  return absl::Hash<std::tuple<absl::string_view, absl::string_view>>{}(
      std::make_tuple(absl::string_view(k.user.data(), k.user.size()),
                      absl::string_view(k.thread.data(), k.thread.size())));
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
    timers.cancel(e.timer);
    // Leave the registry's sessions without a dangling typing list.
    for (std::uint32_t k = 0; k < e.sessions.size(); ++k) {
      const std::uint32_t sl = e.sessions[k].slot;
      if (sl < reg.sessionSlots.highWater() &&
          reg.sessionSlots[sl].generation == e.sessions[k].pos)
        reg.sessionSlots[sl].typing.release(nullptr);
    }
  }
  timers.cancel(retryTimer);
}

std::string_view TypingTimerManager::Impl::userKeyOf(std::uint32_t s) const {
  const SessionSlot& slot = reg.sessionSlots[s];
  return slot.user == detail::kNone ? slot.name.view()
                                    : reg.userSlots[slot.user].name.view();
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

void TypingTimerManager::Impl::emitToThread(std::uint32_t s, std::string_view userKey,
                                            std::string_view thread,
                                            const std::string& event) {
  if (!cb.emit) return;
  std::string room = opt.threadRoomPrefix;
  room.append(thread.data(), thread.size());
  std::string payload = "{\"threadId\":";
  appendJsonString(payload, thread);
  payload += ",\"userId\":";
  appendJsonString(payload, userKey);
  payload += "}";
  BroadcastTargets targets;
  targets.rooms.push_back(room);
  if (s != detail::kNone) targets.sender = reg.sessionSlots[s].name.view();
  // Not to the typer: skip every session of the same user.
  const std::string user(userKey);
  reg.forEachTarget(targets, [&](std::string_view target) {
    const std::uint32_t t = reg.findSession(target);
    if (t == detail::kNone || userKeyOf(t) == user) return;
    detail::Event& ev = reg.events.push();
    ev.kind = static_cast<std::uint8_t>(EventKind::kCustom);
    ev.fn = [this, to = std::string(target), event, payload]() {
      try {
        cb.emit(to, event, payload);
      } catch (...) {
        reportError("emit");
      }
    };
  });
}

void TypingTimerManager::Impl::persist(PersistOp op, std::string_view user,
                                       std::string_view thread) {
  if (!cb.persist) return;
  if (queue.size() >= opt.maxPendingPersist && !queue.empty()) {
    // Full: drop the oldest call that is not being delivered right now.
    const std::size_t victim = inflight && queue.size() > 1 ? 1 : 0;
    if (!(inflight && victim == 0)) {
      const PersistEntry dropped = queue[victim];
      queue.erase(queue.begin() + static_cast<std::ptrdiff_t>(victim));
      ++dropped_;
      if (cb.log) {
        const std::string msg = fmt::format(
            "roomkeeper: persistence queue full ({}): dropped {} user={} thread={}",
            opt.maxPendingPersist, toString(dropped.call.op), dropped.call.user,
            dropped.call.thread);
        detail::Event& ev = reg.events.push();
        ev.kind = static_cast<std::uint8_t>(EventKind::kCustom);
        ev.fn = [this, msg]() {
          try {
            cb.log(LogLevel::kError, msg);
          } catch (...) {
            reportError("log");
          }
        };
      }
    }
  }
  queue.push_back(PersistEntry{++persistSeq, PersistCall{op, std::string(user),
                                                         std::string(thread)}});
  if (!retryTimer.valid()) scheduleDrain(persistSeq);
}

void TypingTimerManager::Impl::scheduleDrain(std::uint64_t upTo) {
  // One delivery event per call, queued right behind the events of the
  // change that made it (typingStopped emit, then its persistence call), so
  // the host sees them in the order of the changes.
  detail::Event& ev = reg.events.push();
  ev.kind = static_cast<std::uint8_t>(EventKind::kCustom);
  ev.fn = [this, upTo]() { drain(false, upTo); };
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
      call = queue.front();
      inflight = true;
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
    if (ok) {
      if (!queue.empty() && queue.front().seq == call.seq) queue.pop_front();
      ++delivered_;
      ++delivered;
      backoff = opt.retryInitial;
      continue;
    }
    ++failures;
    if (force) return delivered;
    if (!retryTimer.valid() && !queue.empty()) {
      retryTimer = timers.arm(backoff, retryHandler, 0);
      backoff = std::min(backoff * 2, opt.retryMax);
    }
    return delivered;
  }
}

// Removes indicator `idx` from session slot `sl`'s typing list, if that
// session is still the one (generation `gen`) that typed in it.
void TypingTimerManager::Impl::unlinkSession(std::uint32_t idx, std::uint32_t sl,
                                             std::uint32_t gen) {
  if (sl >= reg.sessionSlots.highWater()) return;
  SessionSlot& ss = reg.sessionSlots[sl];
  if (ss.generation != gen) return;
  detail::EntryList& list = ss.typing;
  for (std::uint32_t i = 0; i < list.size(); ++i) {
    if (list[i].slot != idx) continue;
    list[i] = list.back();
    list.pop(&bytes);
    if (list.empty()) --sessionsTyping;
    return;
  }
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
  const std::string user(e.user.view());
  const std::string thread(e.thread.view());
  e.user.reset(&bytes);
  e.thread.reset(&bytes);
  e.live = false;
  e.timer = {};
  entries.release(idx);  // the last one returns every page
  if (index.empty()) releaseIdle();
  emitToThread(s, user, thread, opt.stoppedEvent);
  persist(PersistOp::kTypingStopped, user, thread);
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
  for (std::uint32_t i = 0; i < ss.typing.size(); ++i) {
    const detail::Entry mine = ss.typing[i];
    if (mine.pos != 0 && ss.user != detail::kNone) continue;
    Indicator& e = entries[mine.slot];
    if (e.thread.view() == thread) {
      timers.restart(e.timer, opt.timeout);
      return Result::kAlreadyDone;
    }
  }
  const bool full = ss.typing.size() >= opt.maxTypingPerSession;
  const std::string_view user = userKeyOf(s);
  auto it = index.find(TypingKeyView{user, thread});
  if (it != index.end()) {
    // Another device of the same user keeps this indicator alive.
    if (full) return Result::kTooManyRooms;
    if (!addSession(*it, s)) return Result::kOutOfMemory;
    timers.restart(entries[*it].timer, opt.timeout);
    return Result::kAlreadyDone;
  }
  if (full) return Result::kTooManyRooms;

  std::uint32_t idx = detail::kNone;
  try {
    idx = entries.alloc();
    Indicator& e = entries[idx];
    e.user.assign(user, &bytes);
    e.thread.assign(thread, &bytes);
    index.insert(idx);
  } catch (const std::bad_alloc&) {
    if (idx != detail::kNone) {
      entries[idx].user.reset(&bytes);
      entries[idx].thread.reset(&bytes);
      entries.release(idx);
    }
    return Result::kOutOfMemory;
  }
  if (!addSession(idx, s)) {
    index.erase(idx);
    entries[idx].user.reset(&bytes);
    entries[idx].thread.reset(&bytes);
    entries.release(idx);
    return Result::kOutOfMemory;
  }
  Indicator& e = entries[idx];
  e.live = true;
  e.timer = timers.arm(opt.timeout, expireHandler, idx);
  emitToThread(s, e.user.view(), e.thread.view(), opt.startedEvent);
  persist(PersistOp::kTypingStarted, e.user.view(), e.thread.view());
  return Result::kOk;
}

bool TypingTimerManager::Impl::addSession(std::uint32_t idx, std::uint32_t s) {
  SessionSlot& ss = reg.sessionSlots[s];
  Indicator& e = entries[idx];
  if (!ss.typing.reserveOneMore(&bytes) || !e.sessions.reserveOneMore(&bytes)) return false;
  if (ss.typing.empty()) ++sessionsTyping;
  ss.typing.push(detail::Entry{idx, ss.user == detail::kNone ? 1u : 0u});
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
  for (std::uint32_t i = 0; i < ss.typing.size(); ++i) {
    const std::uint32_t idx = ss.typing[i].slot;
    if (entries[idx].thread.view() == thread) {
      end(idx, s);
      return Result::kOk;
    }
  }
  auto it = index.find(TypingKeyView{userKeyOf(s), thread});
  if (it == index.end()) return Result::kAlreadyDone;
  end(*it, s);
  return Result::kOk;
}

std::size_t TypingTimerManager::Impl::clearSession(std::uint32_t s) {
  SessionSlot& ss = reg.sessionSlots[s];
  if (ss.typing.empty()) return 0;
  const std::uint32_t gen = ss.generation;
  std::vector<std::uint32_t> mine;
  mine.reserve(ss.typing.size());
  for (std::uint32_t i = 0; i < ss.typing.size(); ++i) mine.push_back(ss.typing[i].slot);
  ss.typing.release(&bytes);
  --sessionsTyping;
  for (const std::uint32_t idx : mine) {
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
  return mine.size();
}

std::size_t TypingTimerManager::Impl::onDisconnect(std::uint32_t s) {
  const std::size_t n = clearSession(s);
  const SessionSlot& slot = reg.sessionSlots[s];
  if (slot.user != detail::kNone && reg.userSlots[slot.user].sessions.size() <= 1)
    persist(PersistOp::kTypingStoppedAll, reg.userSlots[slot.user].name.view(), {});
  return n;
}

std::size_t TypingTimerManager::Impl::clearAll() {
  std::size_t n = 0;
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
  st.bytes = bytes;
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
  return impl_->index.find(TypingKeyView{user, thread}) != impl_->index.end();
}
std::size_t TypingTimerManager::flushPersistence() {
  impl_->reg.flush();
  return impl_->finalFlush();
}

std::size_t TypingTimerManager::Impl::finalFlush() {
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
  timers.cancel(retryTimer);
  retryTimer = {};
  return n;
}
TypingStats TypingTimerManager::stats() const noexcept { return impl_->stats(); }
const TypingOptions& TypingTimerManager::options() const noexcept { return impl_->opt; }

}  // namespace roomkeeper
