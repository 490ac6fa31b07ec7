// SPDX-License-Identifier: MIT
// File: src/rate_limiter.cc
#include "rate_limiter.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/container/flat_hash_map.h"

namespace roomkeeper {
namespace detail {
namespace {

constexpr std::int64_t kNoLimit = std::numeric_limits<std::int64_t>::min();
// A key's index stays below the user tag bit of its timer data.
constexpr std::size_t kMaxKeyIndex = 0x7ffffffe;

Rule ruleOf(const RateLimit& l) noexcept {
  Rule r;
  if (!(l.perSecond > 0) || !std::isfinite(l.perSecond)) return r;  // off (also NaN)
  const double interval = 1e9 / l.perSecond;
  // Faster than a token a nanosecond is no limit anyone can reach.
  r.interval = interval < 1 ? 1 : static_cast<std::int64_t>(std::min(interval, 1e17));
  const double burst = l.burst >= 1 ? l.burst : 1;  // NaN and below 1: 1; inf: capped below
  r.tolerance = static_cast<std::int64_t>(
      std::min((burst - 1) * static_cast<double>(r.interval), 1e17));
  return r;
}

}  // namespace

// Address or user keys. A record in use is in `index`; with no session it
// is also in the idle list (oldest first) and has a forget timer.
struct RateLimiter::KeyTable {
  struct Rec {
    std::string name;
    std::uint32_t sessions = 0;
    std::uint32_t idlePrev = kNoKey;
    std::uint32_t idleNext = kNoKey;
    TimerHandle forget;
    bool used = false;
    bool idle = false;  // in the idle list
  };
  KeyTable(std::size_t stride_, std::uint32_t tag_, std::size_t cap_)
      : stride(stride_), tag(tag_), cap(cap_) {}

  std::size_t stride;  // stamps per record, the last one the refusal run
  std::uint32_t tag;   // timer data: tag | index
  std::size_t cap;
  absl::flat_hash_map<std::string, std::uint32_t> index;
  std::vector<Rec> recs;
  std::vector<std::int64_t> stamps;
  std::vector<std::uint32_t> freeList;
  std::uint32_t idleHead = kNoKey;
  std::uint32_t idleTail = kNoKey;
  std::size_t nameBytes = 0;  // heap bytes of names longer than the SSO

  std::uint32_t find(std::string_view name) const {
    // absl's own string_view: Debian's Abseil does not take std's here.
    auto it = index.find(absl::string_view(name.data(), name.size()));
    return it == index.end() ? kNoKey : it->second;
  }
  /// Room for one more key (if need be by forgetting the longest idle).
  bool canAdd() const noexcept { return index.size() < cap || idleHead != kNoKey; }
  std::int64_t* row(std::uint32_t i) noexcept { return stamps.data() + std::size_t{i} * stride; }
  // Refusals in a row, beside the stamps: a check touches one line.
  std::int64_t* runOf(std::uint32_t i) noexcept { return row(i) + stride - 1; }
  std::int64_t latest(std::uint32_t i) noexcept {
    std::int64_t m = 0;
    for (std::size_t k = 0; k + 1 < stride; ++k) m = std::max(m, row(i)[k]);
    return m;
  }
  void unlinkIdle(std::uint32_t i) noexcept {
    Rec& r = recs[i];
    if (!r.idle) return;
    r.idle = false;
    if (r.idlePrev == kNoKey) idleHead = r.idleNext; else recs[r.idlePrev].idleNext = r.idleNext;
    if (r.idleNext == kNoKey) idleTail = r.idlePrev; else recs[r.idleNext].idlePrev = r.idlePrev;
    r.idlePrev = r.idleNext = kNoKey;
  }
  void pushIdle(std::uint32_t i) noexcept {
    Rec& r = recs[i];
    r.idle = true;
    r.idlePrev = idleTail;
    r.idleNext = kNoKey;
    if (idleTail == kNoKey) idleHead = i; else recs[idleTail].idleNext = i;
    idleTail = i;
  }
  static std::size_t heapOf(const std::string& s) noexcept {
    return s.capacity() > 15 ? s.capacity() + 1 : 0;
  }
  /// Forgets an idle record (no session).
  void forget(std::uint32_t i, TimerService& timers) noexcept {
    Rec& r = recs[i];
    timers.cancel(r.forget);
    unlinkIdle(i);
    index.erase(r.name);
    nameBytes -= heapOf(r.name);
    r = Rec{};
    freeList.push_back(i);  // capacity reserved with recs: cannot throw
    if (index.empty()) {
      // Nobody left: every byte goes, so that bytes return to the start.
      std::vector<Rec>().swap(recs);
      std::vector<std::int64_t>().swap(stamps);
      std::vector<std::uint32_t>().swap(freeList);
      absl::flat_hash_map<std::string, std::uint32_t>().swap(index);
      idleHead = idleTail = kNoKey;
    }
  }
  /// A new key, full buckets, no session yet. Throws std::bad_alloc with
  /// nothing changed (beyond the idle key forgotten to make room, which
  /// only restarts that key's limit). Needs canAdd().
  std::uint32_t add(std::string_view name, TimerService& timers) {
    if (index.size() >= cap && idleHead != kNoKey) forget(idleHead, timers);
    std::string copy(name);
    std::uint32_t i;
    if (freeList.empty()) {
      const std::size_t n = recs.size();
      if (n >= kMaxKeyIndex) throw std::bad_alloc();
      // Each vector reserved against its own capacity, the index last: once
      // the index holds the name nothing below can throw. (freeList holds
      // every record when all are free: forget() pushes without growing.)
      const std::size_t c = std::max<std::size_t>(8, n * 2);
      if (recs.capacity() < n + 1) recs.reserve(c);
      if (stamps.capacity() < (n + 1) * stride) stamps.reserve(c * stride);
      if (freeList.capacity() < n + 1) freeList.reserve(c);
      index.emplace(copy, static_cast<std::uint32_t>(n));
      recs.emplace_back();
      stamps.resize(stamps.size() + stride, 0);
      i = static_cast<std::uint32_t>(n);
    } else {
      i = freeList.back();
      index.emplace(copy, i);
      freeList.pop_back();
      std::fill(row(i), row(i) + stride, 0);
    }
    Rec& r = recs[i];
    r.name = std::move(copy);
    r.used = true;
    nameBytes += heapOf(r.name);
    return i;
  }
  void hold(std::uint32_t i, TimerService& timers) noexcept {
    Rec& r = recs[i];
    if (r.sessions++ == 0 && r.idle) {
      unlinkIdle(i);
      timers.cancel(r.forget);
      r.forget = {};
    }
  }
  /// A session let go: with none left, idle until the buckets are full.
  void drop(std::uint32_t i, std::int64_t now, TimerService& timers,
            TimerHandlerId handler) noexcept {
    Rec& r = recs[i];
    if (--r.sessions > 0) return;
    idleRelease(i, now, timers, handler);
  }
  void idleRelease(std::uint32_t i, std::int64_t now, TimerService& timers,
                   TimerHandlerId handler) noexcept {
    const std::int64_t full = latest(i);
    if (full <= now) {
      forget(i, timers);
      return;
    }
    try {
      recs[i].forget = timers.arm(std::chrono::nanoseconds(full - now), handler, tag | i);
    } catch (...) {
      forget(i, timers);  // no timer to be had: forgotten early (full buckets)
      return;
    }
    pushIdle(i);
  }
  std::size_t bytes() const noexcept {
    return index.capacity() * (sizeof(std::pair<std::string, std::uint32_t>) + 1) +
           recs.capacity() * sizeof(Rec) + stamps.capacity() * sizeof(std::int64_t) +
           freeList.capacity() * sizeof(std::uint32_t) + nameBytes;
  }
};

namespace {
constexpr std::uint32_t kUserTag = 0x80000000u;  // timer data: tag | index
}

RateLimiter::RateLimiter(const RateLimits& limits, const Clock& clock, TimerService& timers)
    : limits_(limits), clock_(clock), cell_(clock.cell()), epoch_(clock.now()), timers_(timers) {
  connect_ = ruleOf(limits_.connectsPerAddress);
  builtin_[kJoins] = ruleOf(limits_.joinsPerSession);
  builtin_[kTyping] = ruleOf(limits_.typingPerSession);
  bool addressKinds = false;
  for (const RateKind& k : limits_.kinds) {
    HostKind hk;
    hk.rule = ruleOf(k.limit);
    hk.scope = k.scope;
    switch (k.scope) {
      case RateScope::kSession: hk.column = static_cast<std::uint32_t>(sessionStride_++); break;
      case RateScope::kUser: hk.column = static_cast<std::uint32_t>(userStride_++); break;
      case RateScope::kAddress:
        hk.column = static_cast<std::uint32_t>(addressStride_++);
        addressKinds = addressKinds || hk.rule.on();
        break;
    }
    hostKinds_.push_back(hk);
  }
  hostRefusals_.assign(limits_.kinds.size(), 0);
  ++sessionStride_;  // the last column: refusals in a row
  tracksAddresses_ = connect_.on() || limits_.maxSessionsPerAddress > 0 || addressKinds;
  const std::size_t cap = std::max<std::size_t>(1, std::min(limits_.maxKeys, kMaxKeyIndex));
  addresses_ = std::make_unique<KeyTable>(addressStride_ + 1, 0, cap);
  users_ = std::make_unique<KeyTable>(userStride_ + 1, kUserTag, cap);
  any_ = tracksAddresses_ || builtin_[0].on() || builtin_[1].on() || !limits_.kinds.empty();
  forgetHandler_ = timers_.addHandler([this](TimerHandle, std::uint32_t data) { onForget(data); });
}

RateLimiter::~RateLimiter() {
  clear();
  timers_.removeHandler(forgetHandler_);
}

void RateLimiter::countWarn(std::int64_t* run, Refusal why, std::string_view key,
                            RefusalWarning* warn) noexcept {
  ++refusals_[int(why)];
  if (*run < std::numeric_limits<std::int64_t>::max()) ++*run;
  if (warn && limits_.warnAfterRefusals > 0 && static_cast<std::size_t>(*run) == limits_.warnAfterRefusals) {
    warn->due = true;
    warn->why = why;
    warn->key = key;
    warn->run = *run;
  }
}

Result RateLimiter::prepareConnect(std::string_view address, std::string_view user,
                                   std::size_t slots, Prepared* p, RefusalWarning* warn) {
  *p = Prepared{};
  // 1. Every check, nothing made.
  std::uint32_t a = kNoKey;
  const bool byAddress = tracksAddresses_ && !address.empty();
  if (byAddress) {
    KeyTable& t = *addresses_;
    a = t.find(address);
    if (a == kNoKey) {
      if (!t.canAdd()) {
        countWarn(&keysFullRun_, Refusal::kKeysFull, address, warn);
        return Result::kRateLimited;
      }
    } else {
      const KeyTable::Rec& r = t.recs[a];
      if (limits_.maxSessionsPerAddress > 0 && r.sessions >= limits_.maxSessionsPerAddress) {
        countWarn(t.runOf(a), Refusal::kConcurrent, r.name, warn);
        return Result::kRateLimited;
      }
      std::int64_t next;
      if (connect_.on() && !connect_.admits(t.row(a)[0], now(), &next)) {
        countWarn(t.runOf(a), Refusal::kConnects, r.name, warn);
        return Result::kRateLimited;
      }
    }
  }
  const bool byUser = userStride_ > 0 && !user.empty();
  std::uint32_t u = byUser ? users_->find(user) : kNoKey;
  if (byUser && u == kNoKey && !users_->canAdd()) {
    countWarn(&keysFullRun_, Refusal::kKeysFull, user, warn);
    return Result::kRateLimited;
  }
  // 2. What the session needs; a throw undoes what this call made.
  ensureSlots(slots);
  if (byAddress && a == kNoKey) {
    a = addresses_->add(address, timers_);
    p->addressIsNew = true;
  }
  p->address = a;
  if (byUser && u == kNoKey) {
    try {
      u = users_->add(user, timers_);
    } catch (...) {
      abandon(*p);
      *p = Prepared{};  // abandoned: the caller's abandon() finds nothing
      throw;
    }
    p->userIsNew = true;
  }
  p->user = u;
  keysFullRun_ = 0;
  return Result::kOk;
}

Result RateLimiter::prepareUser(std::string_view user, Prepared* p, RefusalWarning* warn) {
  p->user = kNoKey;
  p->userIsNew = false;
  if (userStride_ == 0) return Result::kOk;
  KeyTable& t = *users_;
  const std::uint32_t i = t.find(user);
  if (i != kNoKey) {
    p->user = i;
    return Result::kOk;
  }
  if (!t.canAdd()) {
    countWarn(&keysFullRun_, Refusal::kKeysFull, user, warn);
    return Result::kRateLimited;
  }
  p->user = t.add(user, timers_);
  p->userIsNew = true;
  keysFullRun_ = 0;
  return Result::kOk;
}

void RateLimiter::abandon(const Prepared& p) noexcept {
  // A key made for this call and held by no session: gone again at once
  // (its buckets are full). An existing key was not touched.
  const std::int64_t t = now();
  if (p.addressIsNew && addresses_->recs[p.address].sessions == 0)
    addresses_->idleRelease(p.address, t, timers_, forgetHandler_);
  if (p.userIsNew && users_->recs[p.user].sessions == 0)
    users_->idleRelease(p.user, t, timers_, forgetHandler_);
  // The per-session arrays grown for the call, with nobody to use them.
  if (liveSessions_ == 0) releaseSessionArrays();
}

void RateLimiter::releaseSessionArrays() noexcept {
  std::vector<std::int64_t>().swap(sessionStamps_);
  std::vector<std::uint32_t>().swap(sessionAddress_);
  std::vector<std::uint32_t>().swap(sessionUser_);
}

void RateLimiter::ensureSlots(std::size_t need) {
  if (sessionAddress_.size() >= need) return;
  const std::size_t n = std::max(need, sessionAddress_.size() * 2);
  // Each resize either happens or throws leaving its vector as it was; the
  // ones before stay larger, which is harmless.
  sessionStamps_.resize(n * sessionStride_, 0);
  sessionUser_.resize(n, kNoKey);
  sessionAddress_.resize(n, kNoKey);
}

void RateLimiter::commitConnect(std::uint32_t slot, const Prepared& p) noexcept {
  std::fill(sessionRow(slot), sessionRow(slot) + sessionStride_, 0);
  sessionAddress_[slot] = p.address;
  sessionUser_[slot] = kNoKey;
  ++liveSessions_;
  if (p.address != kNoKey) {
    KeyTable& t = *addresses_;
    t.hold(p.address, timers_);
    *t.runOf(p.address) = 0;
    std::int64_t next;
    if (connect_.on() && connect_.admits(t.row(p.address)[0], now(), &next))
      t.row(p.address)[0] = next;
  }
  commitUser(slot, p);
}

void RateLimiter::commitUser(std::uint32_t slot, const Prepared& p) noexcept {
  if (p.user == kNoKey || slot >= sessionUser_.size()) return;
  users_->hold(p.user, timers_);
  sessionUser_[slot] = p.user;
}

void RateLimiter::release(std::uint32_t slot) noexcept {
  if (slot >= sessionAddress_.size() || liveSessions_ == 0) return;
  const std::int64_t t = now();
  if (sessionAddress_[slot] != kNoKey)
    addresses_->drop(sessionAddress_[slot], t, timers_, forgetHandler_);
  if (sessionUser_[slot] != kNoKey) users_->drop(sessionUser_[slot], t, timers_, forgetHandler_);
  sessionAddress_[slot] = kNoKey;
  sessionUser_[slot] = kNoKey;
  if (--liveSessions_ == 0) releaseSessionArrays();
}

bool RateLimiter::admit(std::uint32_t slot, std::size_t which, std::int64_t* next,
                        RefusalWarning* warn) noexcept {
  const Rule& rule = builtin_[which];
  *next = kNoLimit;
  if (!rule.on()) return true;
  std::int64_t* row = sessionRow(slot);
  if (rule.admits(row[which], now(), next)) return true;
  countWarn(runOf(slot), which == kJoins ? Refusal::kJoins : Refusal::kTyping, {}, warn);
  return false;
}

void RateLimiter::take(std::uint32_t slot, std::size_t which, std::int64_t next) noexcept {
  if (next == kNoLimit) return;
  std::int64_t* row = sessionRow(slot);
  row[which] = next;
  if (row[sessionStride_ - 1] != 0) row[sessionStride_ - 1] = 0;  // the refusal run ends
}

Result RateLimiter::allowSlow(std::uint32_t slot, RateKindId kind,
                              RefusalWarning* warn) noexcept {
  if (kind >= hostKinds_.size()) return Result::kUnknownKind;
  const HostKind& hk = hostKinds_[kind];
  // Only what the check needs is read: one row of stamps (the key's name
  // only if the call is refused).
  KeyTable* table = nullptr;
  std::uint32_t key = kNoKey;
  std::int64_t* row;
  std::int64_t* run;
  if (hk.scope == RateScope::kSession) {
    row = sessionRow(slot);
    run = runOf(slot);
  } else {
    const bool user = hk.scope == RateScope::kUser;
    const std::vector<std::uint32_t>& of = user ? sessionUser_ : sessionAddress_;
    key = slot < of.size() ? of[slot] : kNoKey;
    // A user kind before authenticate; an address kind without an address.
    if (key == kNoKey) return user ? Result::kNotAuthenticated : Result::kOk;
    table = user ? users_.get() : addresses_.get();
    row = table->row(key);
    run = table->runOf(key);
  }
  if (!hk.rule.on()) return Result::kOk;
  std::int64_t next;
  if (!hk.rule.admits(row[hk.column], now(), &next)) {
    ++hostRefusals_[kind];
    countWarn(run, Refusal::kHost, table ? std::string_view(table->recs[key].name) : "", warn);
    if (warn && warn->due) warn->kind = kind;
    return Result::kRateLimited;
  }
  row[hk.column] = next;
  if (*run != 0) *run = 0;
  return Result::kOk;
}

void RateLimiter::onForget(std::uint32_t data) {
  KeyTable& t = (data & kUserTag) ? *users_ : *addresses_;
  const std::uint32_t i = data & ~kUserTag;
  if (i >= t.recs.size() || !t.recs[i].used || t.recs[i].sessions > 0) return;
  t.recs[i].forget = {};
  t.unlinkIdle(i);
  // A stamp cannot move while no session holds the key: it is full now.
  t.idleRelease(i, now(), timers_, forgetHandler_);
}

std::size_t RateLimiter::keys() const noexcept {
  return addresses_->index.size() + users_->index.size();
}

std::size_t RateLimiter::bytes() const noexcept {
  const KeyTable& a = *addresses_;
  const KeyTable& u = *users_;
  return sessionStamps_.capacity() * sizeof(std::int64_t) +
         (sessionAddress_.capacity() + sessionUser_.capacity()) * sizeof(std::uint32_t) +
         a.bytes() + u.bytes();
}

void RateLimiter::clear() noexcept {
  for (KeyTable* t : {addresses_.get(), users_.get()}) {
    if (!t) continue;
    for (std::uint32_t i = 0; i < t->recs.size(); ++i) timers_.cancel(t->recs[i].forget);
    *t = KeyTable(t->stride, t->tag, t->cap);
  }
  releaseSessionArrays();
  liveSessions_ = 0;
}

}  // namespace detail
}  // namespace roomkeeper
