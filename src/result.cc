// SPDX-License-Identifier: MIT
#include "roomkeeper/result.h"

#include "roomkeeper/callbacks.h"

namespace roomkeeper {

std::string_view toString(Result r) noexcept {
  switch (r) {
    case Result::kOk: return "ok";
    case Result::kAlreadyDone: return "already_done";
    case Result::kInvalidId: return "invalid_id";
    case Result::kNotConnected: return "not_connected";
    case Result::kStaleHandle: return "stale_handle";
    case Result::kAlreadyConnected: return "already_connected";
    case Result::kClosing: return "closing";
    case Result::kTooManyRooms: return "too_many_rooms";
    case Result::kTooManySessions: return "too_many_sessions";
    case Result::kRoomFull: return "room_full";
    case Result::kDenied: return "denied";
    case Result::kNotAuthenticated: return "not_authenticated";
    case Result::kShutDown: return "shut_down";
    case Result::kUserMismatch: return "user_mismatch";
    case Result::kBusy: return "busy";
    case Result::kOutOfMemory: return "out_of_memory";
    case Result::kNotMember: return "not_member";
    case Result::kRateLimited: return "rate_limited";
    case Result::kUnknownKind: return "unknown_kind";
  }
  return "unknown";
}

std::string_view toString(LogLevel level) noexcept {
  switch (level) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
  }
  return "unknown";
}

}  // namespace roomkeeper
