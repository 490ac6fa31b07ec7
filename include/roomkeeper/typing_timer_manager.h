// SPDX-License-Identifier: MIT
// File: roomkeeper/typing_timer_manager.h
//
// TypingTimerManager: "user-3 is typing in thread 42" indicators that clear
// themselves 5 s after the last keystroke, and that go when the session goes.
//
// Typing is per user per thread: a user typing on two devices in one thread
// is one indicator. The first startTyping() emits "typingStarted" to the
// thread's room ("thread:" + thread id) except the user's own sessions, and
// tells persistence; every later call within the window only pushes the
// auto-clear back. stopTyping(), the auto-clear and the disconnect of the
// last session typing in it end an indicator the same way: timer cancelled,
// "typingStopped" emitted once, persistence told.
//
// Order: for one change, the emits come first, then the persistence call
// (so a client may hear typingStopped a moment before the row is deleted).
//
// Persistence never loses a call silently: every call goes through a bounded
// FIFO (order per user and thread is kept because the whole queue is
// ordered). A call whose hook returns false (or throws) stays at the head and
// is retried with exponential backoff on the TimerService; when the queue is
// full the oldest call is dropped, counted and logged at error level.
// flushPersistence() makes a last attempt (shutdown) and returns how many
// calls could not be delivered.
//
// Use it through roomkeeper::Keeper, which runs the whole disconnect
// sequence; standalone, call onDisconnect(session) before the registry's
// disconnect(session).
//
// Thread safety: thread-compatible, on the same thread as its registry and
// timer service. Ownership: holds references to the registry and the timer
// service, which must outlive it. Callbacks (emit, persist, log) are queued
// and run after the state change, outside any lock when used via SyncKeeper;
// they may call back in; a throwing callback is counted and logged.
// Complexity: startTyping, stopTyping O(1) expected; clearTypingTimers and
// onDisconnect O(typing indicators of that session).
#ifndef ROOMKEEPER_TYPING_TIMER_MANAGER_H_
#define ROOMKEEPER_TYPING_TIMER_MANAGER_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "roomkeeper/callbacks.h"
#include "roomkeeper/result.h"
#include "roomkeeper/session_registry.h"
#include "roomkeeper/timer_service.h"

namespace roomkeeper {

/// One persistence call. `thread` is empty for kTypingStoppedAll (the
/// original's `stopTyping('*', user)`).
enum class PersistOp : std::uint8_t { kTypingStarted, kTypingStopped, kTypingStoppedAll };
std::string_view toString(PersistOp op) noexcept;

struct PersistCall {
  PersistOp op;
  std::string user;
  std::string thread;
};

/// Returns true when the call was stored; false (or an exception) means
/// "retry later".
using PersistFn = std::function<bool(const PersistCall&)>;

struct TypingOptions {
  Millis timeout{5000};                   // the auto-clear
  std::string threadRoomPrefix = "thread:";
  std::string startedEvent = "typingStarted";
  std::string stoppedEvent = "typingStopped";
  std::size_t maxTypingPerSession = 32;   // threads one session types in at once
  // Bounded retry queue: calls waiting, the one in flight included. Values
  // below 2 are taken as 2 (one in flight, one waiting behind it).
  std::size_t maxPendingPersist = 10000;
  Millis retryInitial{100};               // backoff: doubles up to retryMax
  Millis retryMax{30000};
  // A session may start (or join) an indicator only in a thread whose room
  // (threadRoomPrefix + thread) it is a member of: kNotMember otherwise, so
  // a client cannot fan typingStarted out to, or write persistence rows for,
  // a thread it was never let into. Checked when an indicator starts, not
  // on every keystroke; leaving the room does not end a running indicator
  // (its auto-clear or the disconnect does).
  bool requireMembership = true;
};

struct TypingCallbacks {
  /// Send an event to one session; payload is JSON
  /// {"threadId":"…","userId":"…"}.
  std::function<void(std::string_view session, std::string_view event,
                     std::string_view payload)>
      emit;
  PersistFn persist;
  LogFn log;
};

struct TypingStats {
  std::size_t indicators = 0;        // (user, thread) pairs typing now
  std::size_t timers = 0;            // typing timers armed (one per indicator)
  std::size_t sessionsTyping = 0;    // sessions with at least one indicator
  std::size_t persistPending = 0;    // calls waiting (failed, or behind one)
  std::uint64_t persistDelivered = 0;
  std::uint64_t persistFailures = 0;  // failed attempts (each is retried)
  std::uint64_t persistDropped = 0;   // dropped because the queue was full
  std::uint64_t callbackErrors = 0;
  std::size_t bytes = 0;
};

class TypingTimerManager {
 public:
  TypingTimerManager(SessionRegistry& registry, TimerService& timers,
                     TypingCallbacks callbacks = {}, TypingOptions options = {});
  ~TypingTimerManager();
  TypingTimerManager(const TypingTimerManager&) = delete;
  TypingTimerManager& operator=(const TypingTimerManager&) = delete;

  /// kOk: a new indicator (emit + persist). kAlreadyDone: already typing,
  /// the auto-clear was pushed back. Refused, nothing changed:
  /// kNotConnected, kClosing (its disconnect is running), kInvalidId (empty
  /// or too long thread), kNotMember (requireMembership and the session is
  /// not in the thread's room), kTooManyRooms (maxTypingPerSession),
  /// kOutOfMemory.
  /// The user key is fixed when an indicator starts: a session that typed
  /// anonymously and was then bound to a user keeps its anonymous indicator
  /// until it ends. An anonymous session's indicator is its own (a session
  /// id never matches a user id, even when the strings are equal); it is
  /// emitted (userId = the session id) but never persisted: persistence is
  /// per user. O(1).
  Result startTyping(std::string_view session, std::string_view thread);
  /// Ends the user's indicator in the thread (an anonymous session: only
  /// its own). kOk; kAlreadyDone if none; kNotConnected; kInvalidId. O(1).
  Result stopTyping(std::string_view session, std::string_view thread);
  /// The session stops contributing to every indicator it typed in; an
  /// indicator no other session of the user keeps alive ends. Returns the
  /// number of indicators the session was in. O(its indicators).
  std::size_t clearTypingTimers(std::string_view session);
  /// clearTypingTimers(), then, if this is the user's last session, the
  /// wildcard kTypingStoppedAll persistence call. Call before the
  /// registry's disconnect (and clearAll() before the registry's clear()):
  /// the registry does not tell this manager. A repeat call repeats the
  /// wildcard. Returns clearTypingTimers()'s count.
  std::size_t onDisconnect(std::string_view session);
  /// Ends every indicator (shutdown); returns how many.
  std::size_t clearAll();

  /// True while `user` (a user id, never an anonymous session) types there.
  bool isTyping(std::string_view user, std::string_view thread) const;
  /// A last attempt (shutdown): tries the pending persistence calls in order
  /// now, ignoring backoff, until one fails (or none is left; if a call is
  /// being delivered on another thread, it tries nothing). Returns how many
  /// are still undelivered; each is logged at error level and dropped.
  std::size_t flushPersistence();
  TypingStats stats() const noexcept;
  const TypingOptions& options() const noexcept;

 private:
  friend class Keeper;
  friend class SyncKeeper;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace roomkeeper

#endif  // ROOMKEEPER_TYPING_TIMER_MANAGER_H_
