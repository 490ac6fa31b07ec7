// SPDX-License-Identifier: MIT
// File: roomkeeper/rate_limits.h
//
// Rate limits per session, per user and per client address, configured in
// KeeperOptions::rateLimits and enforced by the Keeper itself: a client that
// opens sockets in a loop, joins and leaves rooms in a loop or restarts
// typing a thousand times a second is refused with Result::kRateLimited,
// and the call changes nothing and allocates nothing.
//
//   roomkeeper::KeeperOptions o;
//   o.rateLimits.connectsPerAddress = {5, 20};     // 5/s, bursts of 20
//   o.rateLimits.maxSessionsPerAddress = 50;       // open at once
//   o.rateLimits.joinsPerSession = {20, 40};       // trackRoom + untrackRoom
//   o.rateLimits.typingPerSession = {10, 10};      // startTyping
//   o.rateLimits.kinds = {{"message", roomkeeper::RateScope::kSession, {30, 60}}};
//   roomkeeper::Keeper keeper(cb, o);
//   keeper.connect("sock-17", roomkeeper::ClientAddress{"10.1.2.3"});
//   if (keeper.allow("sock-17", 0) == roomkeeper::Result::kRateLimited) ...
//
// Each limit is a token bucket: it holds `burst` tokens, a call takes one,
// and tokens come back at `perSecond`. It is stored as one time stamp (the
// "theoretical arrival time" of GCRA, the generic cell rate algorithm,
// which is that bucket exactly), refilled lazily from the Keeper's clock
// (KeeperOptions::clock) at each check: no timer per bucket, O(1) per check.
//
// What counts: a call is counted only when it is otherwise carried out (kOk
// or kAlreadyDone); a call refused for any other reason (kNotConnected,
// kRoomFull, ...) takes no token. A limit that refuses counts the refusal
// (MemoryStats::rateLimited*) and, when one session or key is refused
// warnAfterRefusals times in a row, logs one warning (kWarning, at most one
// per KeeperOptions::warnInterval).
//
// Keys and memory: a session's buckets live and die with the session. An
// address or user key lives while a session holds it; when its last session
// goes, it is kept until its buckets are full again (so that reconnecting
// does not reset a limit), then forgotten on the timer service. So memory is
// bounded by the active keys, and after everyone has gone and the buckets
// have refilled every count and `bytes` is back where it started. A flood of
// distinct addresses is bounded by maxKeys per scope: when a new key is
// needed and the table is full, the key that has been idle (no session)
// longest is forgotten early (that one client's limit restarts, full); if no
// key is idle, the call that needed the new key is refused with
// kRateLimited (MemoryStats::rateLimitedKeysFull).
//
// A session connected without an address (connect(session)) is not limited
// per address; an address kind allowed for it says kOk. User-scoped limits
// apply once the session is authenticated.
#ifndef ROOMKEEPER_RATE_LIMITS_H_
#define ROOMKEEPER_RATE_LIMITS_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace roomkeeper {

/// One token bucket. perSecond <= 0 (or NaN) turns the limit off; a burst
/// below 1 counts as 1.
struct RateLimit {
  double perSecond = 0;  // tokens back per second: the sustained rate
  double burst = 1;      // bucket size: how many at once after a quiet spell
};

/// Whose bucket a host kind draws from.
enum class RateScope : std::uint8_t {
  kSession,  // each session its own
  kUser,     // every session of the user together (once authenticated)
  kAddress,  // every session from the client address together
};

/// A host-defined kind (a chat message, a file upload), checked by
/// Keeper::allow(session, kind) where `kind` is its index in
/// RateLimits::kinds.
struct RateKind {
  std::string name;  // for logs, Prometheus and JSON ("message")
  RateScope scope = RateScope::kSession;
  RateLimit limit;
};
using RateKindId = std::size_t;

struct RateLimits {
  /// connect() and connectAuthenticated() per client address.
  RateLimit connectsPerAddress;
  /// Sessions open at once per client address; 0 = no cap.
  std::size_t maxSessionsPerAddress = 0;
  /// trackRoom() and untrackRoom() per session, together.
  RateLimit joinsPerSession;
  /// startTyping() per session (a restart of a running indicator counts).
  RateLimit typingPerSession;
  /// Host kinds, for Keeper::allow().
  std::vector<RateKind> kinds;
  /// Most addresses, and most users, tracked at once (see above).
  std::size_t maxKeys = 100000;
  /// One warning when a session or key is refused this many times in a
  /// row; 0 = never.
  std::size_t warnAfterRefusals = 100;
};

/// The client address a session connects from (the remote IP the host's
/// transport saw), for the per-address limits. Any non-empty string up to
/// Limits::maxIdLength bytes; compared as bytes.
struct ClientAddress {
  std::string_view address;
};

}  // namespace roomkeeper

#endif  // ROOMKEEPER_RATE_LIMITS_H_
