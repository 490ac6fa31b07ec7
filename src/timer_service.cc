// SPDX-License-Identifier: MIT
//
// A hierarchical timing wheel with 1 ms ticks: 8 levels of 64 slots, each
// level 64 times coarser than the one below (level k slot = 64^k ms), which
// covers every delay a std::chrono::nanoseconds can hold. A timer sits in the
// level of the highest 6-bit group in which its deadline differs from the
// wheel's time; when the wheel's time enters that slot's range, the slot's
// timers move down ("cascade"). Level 0 slots hold timers of one exact tick,
// so firing is exact. A 64-bit occupancy mask per level lets advance() jump
// straight to the next tick where something happens, so a long stall costs
// O(levels) per occupied slot, not one step per millisecond.
//
// Lazy restart: a restart to the same or a later deadline only writes the
// node's deadline. The node stays in the list it was in, which comes up no
// later than its old deadline; cascade() places every node by its current
// deadline, so there it moves on (or fires, at level 0, when due). Only a
// restart to an earlier deadline, or of a due node, unlinks and relinks.
#include "roomkeeper/timer_service.h"

#include <algorithm>
#include <deque>
#include <exception>
#include <stdexcept>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "fmt/format.h"

namespace roomkeeper {

SteadyClock& SteadyClock::instance() noexcept {
  static SteadyClock clock;
  return clock;
}

namespace {

constexpr std::uint32_t kNil = 0xFFFFFFFFu;
constexpr int kLevels = 8;
constexpr int kBits = 6;
constexpr int kSlots = 1 << kBits;
constexpr std::uint32_t kPageBits = detail::TimerView::kPageBits;
constexpr std::uint32_t kPage = 1u << kPageBits;

using NodeState = detail::TimerState;

// A timer is 28 bytes in two parts. The 16-byte Node (detail::TimerNode, in
// the header: restart()'s inline case reads it) is what a call about the
// timer reads (a restart reads and writes nothing else): aligned to 16, it
// never straddles a cache line. Its deadline is in ticks since the epoch; a
// deadline is at most (2^64 + 999999) / 10^6 < 2^45 ticks (see
// deadlineTick), so 48 bits hold it. `level` and `slot` say which wheel
// list holds it, which after a lazy restart (see restart()) is the list of
// an earlier deadline. The 12-byte Link holds the list pointers and the
// context, touched only when the timer is linked, unlinked or fired.
using Node = detail::TimerNode;
struct Link {
  std::uint32_t prev;
  std::uint32_t next;  // also the free-list link
  std::uint32_t data;
};
static_assert(sizeof(Node) == 16 && sizeof(Link) == 12, "a timer is 28 bytes");

// A slab page: the nodes first (16-byte aligned, as new gives), then links.
struct Page {
  Node nodes[kPage];
  Link links[kPage];
};

struct List {
  std::uint32_t head = kNil;
  std::uint32_t tail = kNil;
  bool empty() const noexcept { return head == kNil; }
};

// Bits of `mask` strictly above position `pos`.
inline std::uint64_t above(std::uint64_t mask, unsigned pos) noexcept {
  return pos >= 63 ? 0 : mask & (~std::uint64_t{0} << (pos + 1));
}

}  // namespace

struct TimerService::Impl {
  // `v` is the service's view_: the fields restart()'s inline case reads
  // (the clock's cell, the epoch, the page table, the high water, the latest
  // time advanced to) live there, and are kept up to date here.
  Impl(const Clock* c, detail::TimerView& v)
      : clock(c ? c : &SteadyClock::instance()), view(v) {
    view.cell = clock->cell();
    view.epoch = clock->now();
  }

  Node& node(std::uint32_t i) noexcept { return pages[i >> kPageBits][0].nodes[i & (kPage - 1)]; }
  const Node& node(std::uint32_t i) const noexcept {
    return pages[i >> kPageBits][0].nodes[i & (kPage - 1)];
  }
  Link& link(std::uint32_t i) noexcept { return pages[i >> kPageBits][0].links[i & (kPage - 1)]; }
  const Link& link(std::uint32_t i) const noexcept {
    return pages[i >> kPageBits][0].links[i & (kPage - 1)];
  }
  std::uint32_t resolve(TimerHandle h) const noexcept {
    if (!h.valid() || h.index >= view.highWater) return kNil;
    const Node& n = node(h.index);
    if (n.generation != h.generation || n.state == NodeState::kFree) return kNil;
    return h.index;
  }

  // ---- time ----
  std::uint64_t floorTick(SteadyTime t) const noexcept {
    if (t <= view.epoch) return 0;
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t - view.epoch).count();
    return static_cast<std::uint64_t>(ns) / 1000000u;
  }
  std::uint64_t deadlineTick(std::chrono::nanoseconds delay) const noexcept {
    const SteadyTime t = view.cell ? *view.cell : clock->now();
    const std::int64_t d = delay.count();
    if (d <= 0) {
      // Due at once; never before the wheel's own time.
      return std::min<std::uint64_t>(now, view.baseNs(t) / 1000000u);
    }
    return view.tickAfter(t, d);
  }
  SteadyTime tickTime(std::uint64_t tick) const noexcept {
    // Saturate: a deadline past the clock's range (nanoseconds::max()) must
    // not wrap around into the past.
    constexpr std::int64_t kMaxNs = std::numeric_limits<std::int64_t>::max();
    if (tick > static_cast<std::uint64_t>(kMaxNs / 1000000)) return SteadyTime::max();
    const std::chrono::nanoseconds d(static_cast<std::int64_t>(tick) * 1000000);
    if (view.epoch > SteadyTime{} && d > SteadyTime::max() - view.epoch) return SteadyTime::max();
    return view.epoch + d;
  }

  // ---- lists ----
  void pushBack(List& l, std::uint32_t i) noexcept {
    Link& n = link(i);
    n.next = kNil;
    n.prev = l.tail;
    if (l.tail == kNil) l.head = i; else link(l.tail).next = i;
    l.tail = i;
  }
  void unlink(List& l, std::uint32_t i) noexcept {
    const Link& n = link(i);
    if (n.prev == kNil) l.head = n.next; else link(n.prev).next = n.next;
    if (n.next == kNil) l.tail = n.prev; else link(n.next).prev = n.prev;
  }
  // Removes a node from whatever list holds it (not kFiring/kFree).
  void detach(std::uint32_t i) noexcept {
    Node& n = node(i);
    switch (n.state) {
      case NodeState::kWheel: {
        const int level = n.level;
        const unsigned slot = n.slot;
        List& l = wheel[level][slot];
        unlink(l, i);
        if (l.empty()) masks[level] &= ~(std::uint64_t{1} << slot);
        break;
      }
      case NodeState::kDue:
        unlink(due, i);
        --dueCount;
        break;
      case NodeState::kNextDue:
        unlink(nextDue, i);
        break;
      default:
        break;
    }
  }
  // Puts a node with its deadline set where it belongs relative to `now`.
  void place(std::uint32_t i) noexcept {
    Node& n = node(i);
    const std::uint64_t d = n.deadline();
    if (d <= now) {
      if (firing) {
        n.state = NodeState::kNextDue;
        pushBack(nextDue, i);
      } else {
        n.state = NodeState::kDue;
        pushBack(due, i);
        ++dueCount;
      }
      return;
    }
    const std::uint64_t diff = d ^ now;
    int level = (63 - __builtin_clzll(diff)) / kBits;
    if (level >= kLevels) level = kLevels - 1;
    const unsigned slot = static_cast<unsigned>((d >> (kBits * level)) & (kSlots - 1));
    n.state = NodeState::kWheel;
    n.level = static_cast<std::uint8_t>(level);
    n.slot = static_cast<std::uint8_t>(slot);
    pushBack(wheel[level][slot], i);
    masks[level] |= std::uint64_t{1} << slot;
  }

  // restart() when its inline case (in the header) does not apply.
  bool restartSlow(TimerHandle timer, std::chrono::nanoseconds delay) noexcept {
    Impl& im = *this;
    const std::uint64_t d = im.deadlineTick(delay);
    if (view.cell != nullptr && delay.count() > 0) {
      // The inline case's entry: the next restart at this time with this
      // delay takes d from here (deadlineTick read the same *cell).
      view.cacheTime = *view.cell;
      view.cacheDelay = delay.count();
      view.cacheTick = d;
    }
    const std::uint32_t i = im.resolve(timer);
    if (i == kNil) return false;
    Node& n = im.node(i);
    if (n.state == NodeState::kWheel && d >= n.deadline()) {
      n.setDeadline(d);
      return true;
    }
    if (n.state == NodeState::kFiring) {
      ++im.pending;  // re-armed from its own callback: it lives on
    } else {
      im.detach(i);
    }
    n.setDeadline(d);
    im.place(i);
    return true;
  }

  // ---- slab ----
  std::uint32_t allocNode() {
    if (freeHead != kNil) {
      const std::uint32_t i = freeHead;
      freeHead = link(i).next;
      return i;
    }
    if (view.highWater == pages.size() * kPage) {
      // The page first: if either allocation fails, nothing has grown.
      // Array new, like every slab page of the library (one element).
      std::unique_ptr<Page[]> page(new Page[1]);
      pages.reserve(pages.size() + 1);
      pageNodes.reserve(pages.size() + 1);
      for (std::uint32_t k = 0; k < kPage; ++k) {
        page[0].nodes[k].generation = generationBase;
        page[0].nodes[k].state = NodeState::kFree;
      }
      pageNodes.push_back(page[0].nodes);  // no throw: reserved
      view.pages = pageNodes.data();
      pages.push_back(std::move(page));
    }
    return view.highWater++;
  }
  // Returns a node to the free list; a pending one also leaves the count
  // (a firing node already left it when its callback began).
  void freeNode(std::uint32_t i) noexcept {
    if (node(i).state != NodeState::kFiring) --pending;
    Node& n = node(i);
    n.state = NodeState::kFree;
    // A node at the last generation is never reused (retired: 28 bytes
    // after 2^32 - 1 timers in it), so a kept handle stays stale forever.
    if (n.generation == std::numeric_limits<std::uint32_t>::max()) return;
    link(i).next = freeHead;
    freeHead = i;
  }

  // ---- advancing ----
  // The next tick > now at which a slot must be cascaded or fired.
  bool nextEventTick(std::uint64_t* out) const noexcept {
    for (int k = 0; k < kLevels; ++k) {
      if (masks[k] == 0) continue;
      const unsigned cur = static_cast<unsigned>((now >> (kBits * k)) & (kSlots - 1));
      const std::uint64_t m = above(masks[k], cur);
      if (m == 0) continue;  // only slots behind: reached after a wrap above
      const unsigned j = static_cast<unsigned>(__builtin_ctzll(m));
      const int shift = kBits * (k + 1);
      const std::uint64_t base = shift >= 64 ? 0 : (now >> shift) << shift;
      *out = base + (std::uint64_t{j} << (kBits * k));
      return true;  // lower levels always hold earlier deadlines
    }
    // Every occupied slot is behind the current position of its level: the
    // next event is where the lowest such level wraps into a later epoch.
    for (int k = 0; k < kLevels; ++k) {
      if (masks[k] == 0) continue;
      const unsigned j = static_cast<unsigned>(__builtin_ctzll(masks[k]));
      const int shift = kBits * (k + 1);
      const std::uint64_t base = shift >= 64 ? 0 : ((now >> shift) + 1) << shift;
      *out = base + (std::uint64_t{j} << (kBits * k));
      return true;
    }
    return false;
  }
  void cascade(int level, unsigned slot) noexcept {
    List l = wheel[level][slot];
    wheel[level][slot] = List{};
    masks[level] &= ~(std::uint64_t{1} << slot);
    for (std::uint32_t i = l.head; i != kNil;) {
      const std::uint32_t nx = link(i).next;
      place(i);
      i = nx;
    }
  }
  void processTick(std::uint64_t t) noexcept {
    for (int k = kLevels - 1; k >= 1; --k) {
      const std::uint64_t low = (std::uint64_t{1} << (kBits * k)) - 1;
      if ((t & low) != 0) continue;
      const unsigned slot = static_cast<unsigned>((t >> (kBits * k)) & (kSlots - 1));
      if (masks[k] & (std::uint64_t{1} << slot)) cascade(k, slot);
    }
    const unsigned slot0 = static_cast<unsigned>(t & (kSlots - 1));
    if (masks[0] & (std::uint64_t{1} << slot0)) cascade(0, slot0);  // d == t: due
  }
  void moveTo(std::uint64_t target) noexcept {
    while (now < target) {
      std::uint64_t t;
      if (!nextEventTick(&t) || t > target) {
        now = target;
        return;
      }
      now = t;
      processTick(t);
    }
  }

  void reportError() noexcept {
    ++errors;
    if (!log) return;
    try {
      std::string msg;
      try {
        throw;
      } catch (const std::exception& e) {
        msg = fmt::format("roomkeeper: timer callback threw: {}", e.what());
      } catch (...) {
        msg = "roomkeeper: timer callback threw a non-exception";
      }
      log(LogLevel::kError, msg);
    } catch (...) {
      ++errors;
    }
  }

  std::size_t fire(std::size_t maxFire) {
    std::size_t fired = 0;
    const bool outer = !firing;
    firing = true;
    while (fired < maxFire && due.head != kNil) {
      const std::uint32_t i = due.head;
      unlink(due, i);
      --dueCount;
      Node& n = node(i);
      n.state = NodeState::kFiring;
      --pending;  // running: no longer pending (restart() counts it again)
      const TimerHandle h{i, n.generation};
      const std::uint32_t data = link(i).data;
      const TimerHandlerId hid = n.handler;
      ++fired;
      try {
        handlers[hid](h, data);
      } catch (...) {
        reportError();
      }
      Node& after = node(i);  // pages never move, but be explicit
      if (after.state == NodeState::kFiring && after.generation == h.generation)
        freeNode(i);
    }
    if (outer) {
      firing = false;
      // Timers made due by callbacks wait for the next advance().
      while (nextDue.head != kNil) {
        const std::uint32_t i = nextDue.head;
        unlink(nextDue, i);
        node(i).state = NodeState::kDue;
        pushBack(due, i);
        ++dueCount;
      }
    }
    return fired;
  }

  const Clock* clock;
  detail::TimerView& view;  // the service's view_ (see the constructor)
  std::uint64_t now = 0;  // wheel time, in ticks since epoch
  List wheel[kLevels][kSlots];
  std::uint64_t masks[kLevels] = {};
  List due;
  List nextDue;
  std::size_t dueCount = 0;
  std::size_t pending = 0;
  std::vector<std::unique_ptr<Page[]>> pages;
  std::vector<Node*> pageNodes;  // each page's first node: view.pages
  std::uint32_t freeHead = kNil;
  std::uint32_t generationBase = 0;
  std::uint32_t maxGeneration = 0;
  // A deque: a callback may add a handler while its own runs, and deque
  // growth never moves the elements (a vector's would move the running one).
  std::deque<Handler> handlers;
  std::vector<bool> handlerLive;
  std::vector<TimerHandlerId> freeHandlers;
  std::uint64_t errors = 0;
  bool firing = false;
  LogFn log;
};

TimerService::TimerService(const Clock* clock) : impl_(std::make_unique<Impl>(clock, view_)) {}
TimerService::~TimerService() = default;

TimerHandlerId TimerService::addHandler(Handler handler) {
  Impl& im = *impl_;
  if (!im.freeHandlers.empty()) {
    const TimerHandlerId id = im.freeHandlers.back();
    im.handlers[id] = std::move(handler);
    im.handlerLive[id] = true;
    im.freeHandlers.pop_back();
    return id;
  }
  if (im.handlers.size() >= 0xFFFFu)
    throw std::length_error("roomkeeper::TimerService: more than 65535 handler kinds");
  im.freeHandlers.reserve(im.handlers.size() + 1);  // removeHandler never allocates
  im.handlerLive.push_back(true);
  try {
    im.handlers.push_back(std::move(handler));
  } catch (...) {
    im.handlerLive.pop_back();
    throw;
  }
  return static_cast<TimerHandlerId>(im.handlers.size() - 1);
}

bool TimerService::removeHandler(TimerHandlerId handler) {
  Impl& im = *impl_;
  if (handler >= im.handlers.size() || !im.handlerLive[handler]) return false;
  for (std::uint32_t i = 0; i < im.view.highWater; ++i) {
    Node& n = im.node(i);
    if (n.handler != handler) continue;
    if (n.state == NodeState::kWheel || n.state == NodeState::kDue ||
        n.state == NodeState::kNextDue) {
      im.detach(i);
      im.freeNode(i);
    }
  }
  im.handlerLive[handler] = false;
  // A callback of this kind may be running: it keeps its own copy alive
  // (handlers is a deque; the slot is only overwritten by a later add).
  if (!im.firing) im.handlers[handler] = nullptr;
  im.freeHandlers.push_back(handler);
  return true;
}

TimerHandle TimerService::arm(std::chrono::nanoseconds delay, TimerHandlerId handler,
                              std::uint32_t data) {
  Impl& im = *impl_;
  if (handler >= im.handlers.size() || !im.handlerLive[handler]) return {};
  const std::uint32_t i = im.allocNode();
  Node& n = im.node(i);
  ++n.generation;  // never wraps: see freeNode (and new pages start above 0)
  if (n.generation > im.maxGeneration) im.maxGeneration = n.generation;
  im.link(i).data = data;
  n.handler = handler;
  n.setDeadline(im.deadlineTick(delay));
  ++im.pending;
  im.place(i);
  return TimerHandle{i, n.generation};
}

// restart() is inline in the header for its common case; this is the rest.
bool TimerService::restartSlow(TimerHandle timer, std::chrono::nanoseconds delay) noexcept {
  return impl_->restartSlow(timer, delay);
}

bool TimerService::cancel(TimerHandle timer) noexcept {
  Impl& im = *impl_;
  const std::uint32_t i = im.resolve(timer);
  if (i == kNil) return false;
  Node& n = im.node(i);
  if (n.state == NodeState::kFiring) return false;  // it is running: not pending
  im.detach(i);
  im.freeNode(i);
  return true;
}

bool TimerService::isPending(TimerHandle timer) const noexcept {
  const std::uint32_t i = impl_->resolve(timer);
  return i != kNil && impl_->node(i).state != NodeState::kFiring;
}

std::optional<std::uint32_t> TimerService::dataOf(TimerHandle timer) const noexcept {
  const std::uint32_t i = impl_->resolve(timer);
  if (i == kNil) return std::nullopt;
  return impl_->link(i).data;
}

std::size_t TimerService::cancelAll() noexcept {
  Impl& im = *impl_;
  std::size_t n = 0;
  auto drop = [&](List& l, bool isDue) {
    for (std::uint32_t i = l.head; i != kNil;) {
      const std::uint32_t nx = im.link(i).next;
      im.freeNode(i);
      ++n;
      i = nx;
    }
    l = List{};
    if (isDue) im.dueCount = 0;
  };
  for (int k = 0; k < kLevels; ++k) {
    for (int s = 0; s < kSlots; ++s)
      if (im.masks[k] & (std::uint64_t{1} << s)) drop(im.wheel[k][s], false);
    im.masks[k] = 0;
  }
  drop(im.due, true);
  drop(im.nextDue, false);
  return n;
}

std::optional<SteadyTime> TimerService::nextDeadline() const noexcept {
  const Impl& im = *impl_;
  if (im.due.head != kNil || im.nextDue.head != kNil) {
    // Due now. A backlog left by a bounded advance may be older than the
    // wheel's time; the due list is in deadline order, so its head is the
    // earliest.
    std::uint64_t due = im.now;
    if (im.due.head != kNil) due = std::min(due, im.node(im.due.head).deadline());
    if (im.nextDue.head != kNil) due = std::min(due, im.node(im.nextDue.head).deadline());
    return im.tickTime(due);
  }
  std::uint64_t t;
  if (!im.nextEventTick(&t)) return std::nullopt;
  return im.tickTime(t);
}

std::size_t TimerService::advance(SteadyTime now, std::size_t maxFire) {
  Impl& im = *impl_;
  if (im.firing) {
    // Called from inside a timer callback: move nothing, fire nothing
    // (the outer advance() is still running its batch).
    return 0;
  }
  const std::uint64_t target = im.floorTick(now);
  if (now > im.view.epoch) {
    const std::int64_t ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(now - im.view.epoch).count();
    if (ns > im.view.lastAdvanceNs) {
      im.view.lastAdvanceNs = ns;
      im.view.cacheTick = 0;  // restart()'s entry counted from the old value
    }
  }
  if (target > im.now) im.moveTo(target);  // earlier times are clamped
  return im.fire(maxFire);
}

std::size_t TimerService::advance() { return advance(impl_->clock->now()); }

std::size_t TimerService::dueCount() const noexcept { return impl_->dueCount; }
std::size_t TimerService::size() const noexcept { return impl_->pending; }
std::size_t TimerService::bytes() const noexcept {
  const Impl& im = *impl_;
  return im.pages.size() * sizeof(Page) +
         (im.pages.capacity() + im.pageNodes.capacity()) * sizeof(void*);
}
std::uint64_t TimerService::callbackErrors() const noexcept { return impl_->errors; }

void TimerService::shrinkToFit() {
  Impl& im = *impl_;
  if (im.pending != 0 || im.firing) return;
  // New pages start above every issued handle. Past half the generation
  // range the pages are kept instead (each node then keeps counting on its
  // own), so that base never nears the maximum.
  if (im.maxGeneration >= 0x80000000u) return;
  im.generationBase = im.maxGeneration;
  std::vector<std::unique_ptr<Page[]>>().swap(im.pages);
  std::vector<Node*>().swap(im.pageNodes);
  im.view.pages = nullptr;
  im.view.highWater = 0;
  im.freeHead = kNil;
}

const Clock& TimerService::clock() const noexcept { return *impl_->clock; }

void detail::TestAccess::ageTimers(TimerService& timers, std::uint32_t g) {
  TimerService::Impl& im = *timers.impl_;
  for (std::uint32_t i = 0; i < im.view.highWater; ++i)
    if (im.node(i).state == NodeState::kFree) im.node(i).generation = g;
  im.generationBase = std::max(im.generationBase, g);
  im.maxGeneration = std::max(im.maxGeneration, g);
}
void TimerService::setLog(LogFn log) { impl_->log = std::move(log); }

}  // namespace roomkeeper
