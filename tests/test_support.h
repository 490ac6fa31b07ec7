// SPDX-License-Identifier: MIT
// File: tests/test_support.h -- what several test files share: stats
// comparison and printing for Catch, and "every count is back to 0".
#ifndef ROOMKEEPER_TESTS_TEST_SUPPORT_H_
#define ROOMKEEPER_TESTS_TEST_SUPPORT_H_

#include <roomkeeper/roomkeeper.h>

#include <catch2/catch.hpp>
#include <sstream>
#include <string>

namespace roomkeeper {
// Test-only comparisons, found by argument-dependent lookup from Catch.
inline bool operator==(const RegistryStats& a, const RegistryStats& b) {
  return a.sessions == b.sessions && a.users == b.users && a.rooms == b.rooms &&
         a.memberships == b.memberships && a.sessionsWithRooms == b.sessionsWithRooms &&
         a.bytes == b.bytes && a.callbackErrors == b.callbackErrors;
}
inline bool operator==(const MemoryStats& a, const MemoryStats& b) {
  return a.connectedClients == b.connectedClients && a.authenticated == b.authenticated &&
         a.userSockets == b.userSockets && a.connectionTimers == b.connectionTimers &&
         a.typingTimers == b.typingTimers && a.trackedRooms == b.trackedRooms &&
         a.sessionsWithRooms == b.sessionsWithRooms && a.rooms == b.rooms &&
         a.totalEntries == b.totalEntries && a.timersPending == b.timersPending &&
         a.pendingPersistence == b.pendingPersistence &&
         a.persistDelivered == b.persistDelivered &&
         a.persistFailures == b.persistFailures && a.persistDropped == b.persistDropped &&
         a.callbackErrors == b.callbackErrors && a.authTimeouts == b.authTimeouts &&
         a.forcedCleanups == b.forcedCleanups && a.bytes == b.bytes;
}
}  // namespace roomkeeper

namespace Catch {
template <>
struct StringMaker<roomkeeper::Result> {
  static std::string convert(roomkeeper::Result r) {
    return std::string(roomkeeper::toString(r));
  }
};
template <>
struct StringMaker<roomkeeper::RegistryStats> {
  static std::string convert(const roomkeeper::RegistryStats& s) {
    std::ostringstream o;
    o << "{sessions=" << s.sessions << " users=" << s.users << " rooms=" << s.rooms
      << " memberships=" << s.memberships << " sessionsWithRooms=" << s.sessionsWithRooms
      << " bytes=" << s.bytes << " callbackErrors=" << s.callbackErrors << "}";
    return o.str();
  }
};
template <>
struct StringMaker<roomkeeper::MemoryStats> {
  static std::string convert(const roomkeeper::MemoryStats& s) {
    std::ostringstream o;
    o << "{clients=" << s.connectedClients << " authenticated=" << s.authenticated
      << " userSockets=" << s.userSockets << " connectionTimers=" << s.connectionTimers
      << " typingTimers=" << s.typingTimers << " trackedRooms=" << s.trackedRooms
      << " sessionsWithRooms=" << s.sessionsWithRooms << " rooms=" << s.rooms
      << " totalEntries=" << s.totalEntries << " timersPending=" << s.timersPending
      << " pendingPersistence=" << s.pendingPersistence
      << " persistDelivered=" << s.persistDelivered
      << " persistFailures=" << s.persistFailures
      << " persistDropped=" << s.persistDropped << " callbackErrors=" << s.callbackErrors
      << " authTimeouts=" << s.authTimeouts << " forcedCleanups=" << s.forcedCleanups
      << " bytes=" << s.bytes << "}";
    return o.str();
  }
};
}  // namespace Catch

inline void requireEmpty(const roomkeeper::MemoryStats& s) {
  INFO(Catch::StringMaker<roomkeeper::MemoryStats>::convert(s));
  CHECK(s.connectedClients == 0);
  CHECK(s.authenticated == 0);
  CHECK(s.userSockets == 0);
  CHECK(s.connectionTimers == 0);
  CHECK(s.typingTimers == 0);
  CHECK(s.trackedRooms == 0);
  CHECK(s.sessionsWithRooms == 0);
  CHECK(s.rooms == 0);
  CHECK(s.totalEntries == 0);
  CHECK(s.pendingPersistence == 0);
  CHECK(s.rateLimitKeys == 0);
}

#endif  // ROOMKEEPER_TESTS_TEST_SUPPORT_H_
