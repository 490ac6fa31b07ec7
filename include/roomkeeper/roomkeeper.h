// SPDX-License-Identifier: MIT
// File: roomkeeper/roomkeeper.h
//
// The umbrella header: everything roomkeeper offers.
//   SessionRegistry     which session is in which room (session_registry.h)
//   TimerService        the timing wheel every timer runs on (timer_service.h)
//   TypingTimerManager  typing indicators with a 5 s auto-clear
//   Keeper              the whole lifecycle in one object (keeper.h)
//   SyncKeeper          a Keeper for thread pools, with a driver thread
#ifndef ROOMKEEPER_ROOMKEEPER_H_
#define ROOMKEEPER_ROOMKEEPER_H_

#include "roomkeeper/callbacks.h"
#include "roomkeeper/rate_limits.h"
#include "roomkeeper/result.h"
#include "roomkeeper/keeper.h"
#include "roomkeeper/session_registry.h"
#include "roomkeeper/sync_keeper.h"
#include "roomkeeper/timer_service.h"
#include "roomkeeper/typing_timer_manager.h"
#include "roomkeeper/version.h"

#endif  // ROOMKEEPER_ROOMKEEPER_H_
