// SPDX-License-Identifier: MIT
// Demo-only login tokens for the dispatch example: "<userId>:<role>:<crewId>:<sig>"
// where sig is the 16-hex-digit FNV-1a 64 hash of kDemoSecret + "|" +
// "<userId>:<role>:<crewId>". FNV is NOT a MAC: anyone who reads this file
// can mint tokens. It stands in for the JWT check a real server does, so that
// the example needs no key set-up; docs/protocol.md says how to compute one.
#ifndef ROOMKEEPER_EXAMPLES_DISPATCH_DEMO_TOKEN_H_
#define ROOMKEEPER_EXAMPLES_DISPATCH_DEMO_TOKEN_H_

#include <cstdint>
#include <cstdio>
#include <optional>
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

/// The token a client sends in "authenticate".
inline std::string makeDemoToken(const Identity& id) {
  const std::string claims = id.userId + ":" + id.role + ":" + id.crewId;
  return claims + ":" + demoSignature(claims);
}

/// The identity in a well-formed, correctly signed token; nullopt otherwise.
inline std::optional<Identity> verifyDemoToken(std::string_view token) {
  if (token.size() > 256) return std::nullopt;
  const std::size_t last = token.rfind(':');
  if (last == std::string_view::npos) return std::nullopt;
  const std::string_view claims = token.substr(0, last);
  if (token.substr(last + 1) != demoSignature(claims)) return std::nullopt;
  const std::size_t a = claims.find(':');
  if (a == std::string_view::npos) return std::nullopt;
  const std::size_t b = claims.find(':', a + 1);
  if (b == std::string_view::npos) return std::nullopt;
  Identity id{std::string(claims.substr(0, a)),
              std::string(claims.substr(a + 1, b - a - 1)),
              std::string(claims.substr(b + 1))};
  if (!validId(id.userId) || !validRole(id.role)) return std::nullopt;
  if (!id.crewId.empty() && !validId(id.crewId)) return std::nullopt;
  if (id.role == "crew" && id.crewId.empty()) return std::nullopt;
  return id;
}

}  // namespace dispatch

#endif  // ROOMKEEPER_EXAMPLES_DISPATCH_DEMO_TOKEN_H_
