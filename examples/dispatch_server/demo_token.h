// SPDX-License-Identifier: MIT
// Demo-only login tokens for the dispatch example:
// "<userId>:<role>:<crewId>:<exp>:<sig>", where exp is the Unix time (seconds)
// from which the token is refused, and sig is the 16-hex-digit FNV-1a 64
// hash of kDemoSecret + "|" + "<userId>:<role>:<crewId>:<exp>". FNV is NOT
// a MAC: anyone who reads this file can mint tokens. It stands in for the
// JWT check a real server does (signature, then expiry), so that the
// example needs no key set-up; docs/protocol.md says how to compute one.
#ifndef ROOMKEEPER_EXAMPLES_DISPATCH_DEMO_TOKEN_H_
#define ROOMKEEPER_EXAMPLES_DISPATCH_DEMO_TOKEN_H_

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace dispatch {

inline constexpr std::string_view kDemoSecret = "roomkeeper-dispatch-demo";

struct Identity {
  std::string userId;
  std::string role;    // "admin", "dispatcher" or "crew"
  std::string crewId;  // may be empty, except for crew
};

/// [A-Za-z0-9_.-]{1,64}: the ids the demo accepts for users, crews, jobs,
/// threads and analytics types.
inline bool validId(std::string_view id) {
  if (id.empty() || id.size() > 64) return false;
  for (const char c : id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.';
    if (!ok) return false;
  }
  return true;
}

inline bool validRole(std::string_view role) {
  return role == "admin" || role == "dispatcher" || role == "crew";
}

inline std::string demoSignature(std::string_view claims) {
  std::uint64_t h = 14695981039346656037ull;
  auto mix = [&h](std::string_view s) {
    for (const char c : s) {
      h ^= static_cast<unsigned char>(c);
      h *= 1099511628211ull;
    }
  };
  mix(kDemoSecret);
  mix("|");
  mix(claims);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

/// Seconds since the Unix epoch, the unit of a token's exp.
inline std::int64_t unixNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

/// How long --print-token's tokens are good for unless told (24 h).
inline constexpr std::int64_t kDemoTokenTtlSeconds = 24 * 60 * 60;

/// The token a client sends in "authenticate", refused from `expiresAt`
/// (Unix seconds) on.
inline std::string makeDemoToken(const Identity& id, std::int64_t expiresAt) {
  const std::string claims =
      id.userId + ":" + id.role + ":" + id.crewId + ":" + std::to_string(expiresAt);
  return claims + ":" + demoSignature(claims);
}

enum class TokenCheck {
  kOk,       // well-formed, correctly signed, not expired
  kInvalid,  // malformed, badly signed, or claims the demo does not accept
  kExpired,  // well-formed and correctly signed, but now >= exp
};

/// Checks `token` at Unix time `now`; on kOk, `*who` is its identity.
inline TokenCheck verifyDemoToken(std::string_view token, std::int64_t now,
                                  Identity* who) {
  if (token.size() > 256) return TokenCheck::kInvalid;
  const std::size_t last = token.rfind(':');
  if (last == std::string_view::npos) return TokenCheck::kInvalid;
  const std::string_view claims = token.substr(0, last);
  if (token.substr(last + 1) != demoSignature(claims)) return TokenCheck::kInvalid;
  std::string_view field[4];
  std::size_t from = 0;
  for (int i = 0; i < 4; ++i) {
    const std::size_t colon = i < 3 ? claims.find(':', from) : claims.size();
    if (colon == std::string_view::npos) return TokenCheck::kInvalid;
    field[i] = claims.substr(from, colon - from);
    from = colon + 1;
  }
  Identity id{std::string(field[0]), std::string(field[1]), std::string(field[2])};
  if (!validId(id.userId) || !validRole(id.role)) return TokenCheck::kInvalid;
  if (!id.crewId.empty() && !validId(id.crewId)) return TokenCheck::kInvalid;
  if (id.role == "crew" && id.crewId.empty()) return TokenCheck::kInvalid;
  // exp: 1 to 18 decimal digits, no sign (so no overflow).
  const std::string_view exp = field[3];
  if (exp.empty() || exp.size() > 18) return TokenCheck::kInvalid;
  std::int64_t expiresAt = 0;
  for (const char c : exp) {
    if (c < '0' || c > '9') return TokenCheck::kInvalid;
    expiresAt = expiresAt * 10 + (c - '0');
  }
  if (now >= expiresAt) return TokenCheck::kExpired;
  *who = std::move(id);
  return TokenCheck::kOk;
}

}  // namespace dispatch

#endif  // ROOMKEEPER_EXAMPLES_DISPATCH_DEMO_TOKEN_H_
