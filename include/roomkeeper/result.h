// SPDX-License-Identifier: MIT
// File: roomkeeper/result.h
//
// The outcome of every roomkeeper call that can be refused. Expected
// outcomes (an unknown session, a limit reached, a repeat call) are values,
// never exceptions: every mutating call returns a `Result`, and a refused
// call changes nothing and allocates nothing.
//
// Use `ok(r)` to test for success and `toString(r)` for a log line.
#ifndef ROOMKEEPER_RESULT_H_
#define ROOMKEEPER_RESULT_H_

#include <cstdint>
#include <string_view>

namespace roomkeeper {

enum class [[nodiscard]] Result : std::uint8_t {
  kOk = 0,             // done; state changed
  kAlreadyDone,        // a repeat call (join of a room already joined, leave
                       // of a room not joined, stop of typing not running):
                       // nothing to do, nothing changed
  kInvalidId,          // empty id, or longer than Limits::maxIdLength
  kNotConnected,       // the session id is not connected: never connected,
                       // or already disconnected (the tombstone case)
  kStaleHandle,        // a SessionHandle whose session has since gone
  kAlreadyConnected,   // connect() of a session id that is live
  kClosing,            // the session is being disconnected right now (a
                       // callback of its own disconnect called in)
  kTooManyRooms,       // Limits::maxRoomsPerSession reached
  kTooManySessions,    // Limits::maxSessionsPerUser reached
  kRoomFull,           // Limits::maxMembersPerRoom reached
  kDenied,             // the host's canJoin hook said no
  kNotAuthenticated,   // the call needs an authenticated session
  kShutDown,           // the object was shut down; every call is refused
  kUserMismatch,       // bindUser() of a session bound to another user
  kBusy,               // a mutating call from inside a const visitor
                       // (forEachMember and friends): refused
  kOutOfMemory,        // an allocation failed; nothing was changed
  kNotMember,          // startTyping in a thread whose room the session is
                       // not a member of (TypingOptions::requireMembership)
  kRateLimited,        // a rate limit (KeeperOptions::rateLimits) said no:
                       // try again later; nothing changed
  kUnknownKind,        // allow() of a kind not in RateLimits::kinds
};

/// True for kOk and kAlreadyDone: the state the caller asked for holds.
constexpr bool ok(Result r) noexcept {
  return r == Result::kOk || r == Result::kAlreadyDone;
}

/// A stable, lower-case name for logs and metrics ("ok", "not_connected").
std::string_view toString(Result r) noexcept;

}  // namespace roomkeeper

#endif  // ROOMKEEPER_RESULT_H_
