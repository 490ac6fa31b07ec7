// SPDX-License-Identifier: MIT
//
// The in-process backend. No lock is shared by every change:
//   * memberships are not copied at all (wantsMemberships() is false): a
//     broadcast goes to every other loop, whose Keeper delivers it to its
//     own members, and a room query asks every loop's Keeper;
//   * each node keeps what only it decides (its sessions per user) in a
//     table of its own, behind a mutex that only its Keeper's thread takes;
//   * what must be decided once for the whole process (a user's first and
//     last session anywhere, a user's typing indicator in a thread) is kept
//     in 64 shards by key, each behind its own mutex;
//   * commands for another loop go into that loop's inbox in the order they
//     were decided (pushed while the deciding lock is held), and the loop
//     is woken through the host's post function once per batch, after
//     every lock is released. A wake drains the whole inbox. Presence and
//     typing edges wake at the end of the deciding loop's turn (flushWakes,
//     posted to that loop once per batch); a broadcast wakes at once.
// Lock order: node -> shard -> inbox; never two nodes, never two shards.
#include "roomkeeper/cluster/in_process.h"

#include <array>
#include <atomic>
#include <functional>
#include <limits>
#include <mutex>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/hash/hash.h"
#include <utility>
#include <vector>

namespace roomkeeper::cluster {

namespace {

constexpr std::size_t kShards = 64;  // shardOf() takes the hash's top 6 bits

// The hub's lock (a spinning lock measured no better on W3t).
using Lock = std::mutex;

// One command for a Keeper, decided on another node.
struct Cmd {
  // kGone: offline, and the wildcard is this Keeper's to persist (the
  // user's last session anywhere went): relayPresence then relayUserGone.
  enum class Op : std::uint8_t { kPresence, kTyping, kGone, kBroadcast };
  Op op;
  bool flag = false;  // online / started
  std::string a, b;   // user, thread
  std::shared_ptr<const BroadcastMessage> msg;
};

// The most commands whose buffer an inbox keeps between drains.
constexpr std::size_t kKeptCmds = 1024;

// A node's queue of commands, drained on its Keeper's thread.
struct Inbox {
  Lock mu;
  std::vector<Cmd> q;
  std::vector<Cmd> spare;      // a drained batch's buffer, for q's next turn
  bool scheduled = false;      // a drain is posted and has not started yet
  BusTarget* keeper = nullptr;  // null before bind() and once the node is gone
  Post post;
  std::atomic<std::uint64_t> received{0};
};
using Wakes = std::vector<std::shared_ptr<Inbox>>;

void addWake(Wakes& wakes, const std::shared_ptr<Inbox>& in) {
  for (const auto& x : wakes)
    if (x == in) return;
  wakes.push_back(in);
}

// Under the lock that decided `c`: keeps the decision order. The inbox
// goes into `wakes` (to be woken by the caller) unless a drain is posted
// and not started yet: that drain will run `c`.
void push(const std::shared_ptr<Inbox>& in, Cmd c, Wakes& wakes) {
  {
    std::lock_guard<Lock> g(in->mu);
    if (in->keeper == nullptr) return;
    in->q.push_back(std::move(c));
    if (in->scheduled) return;
  }
  addWake(wakes, in);
}

void apply(BusTarget& k, const Cmd& c) {
  switch (c.op) {
    case Cmd::Op::kPresence:
      k.relayPresence(c.a, c.flag);
      break;
    case Cmd::Op::kTyping:
      (void)k.relayTyping(c.a, c.b, c.flag);
      break;
    case Cmd::Op::kGone:
      try {
        k.relayPresence(c.a, false);
      } catch (...) {
        // As for any command (see drain): the wildcard still goes.
      }
      (void)k.relayUserGone(c.a);
      break;
    case Cmd::Op::kBroadcast:
      (void)k.relayBroadcast(c.msg->targets(), c.msg->event, c.msg->payload);
      break;
  }
}

// Runs on the inbox's own thread (through its post function).
void drain(const std::shared_ptr<Inbox>& in) {
  // The batch's buffer goes back to the inbox afterwards (q and spare take
  // turns), so a busy inbox does not regrow its queue from nothing on the
  // pushing threads and free it on this one at every turn. Only a buffer
  // of up to kKeptCmds goes back: a burst's larger one is freed here. (A
  // command's strings longer than 15 bytes and a broadcast's message are
  // still allocated by the pushing thread and freed by this one.)
  std::vector<Cmd> batch;
  BusTarget* k = nullptr;
  {
    std::lock_guard<Lock> g(in->mu);
    batch.swap(in->q);
    in->q.swap(in->spare);
    in->scheduled = false;
    k = in->keeper;
  }
  if (k == nullptr) return;
  in->received.fetch_add(batch.size(), std::memory_order_relaxed);
  for (const Cmd& c : batch) {
    try {
      apply(*k, c);
    } catch (...) {
      // A Keeper's relay does not throw; a host callback's exception is
      // the Keeper's to count. Nothing else of the batch is lost.
    }
  }
  batch.clear();
  if (batch.capacity() > kKeptCmds) return;
  std::lock_guard<Lock> g(in->mu);
  if (in->keeper != nullptr && batch.capacity() > in->spare.capacity()) in->spare.swap(batch);
}

// The inbox's post function (empty before bind() and once the node is gone).
Post postOf(const std::shared_ptr<Inbox>& in) {
  std::lock_guard<Lock> g(in->mu);
  return in->post;
}

// With no lock held: posts a drain to each inbox that has commands and no
// drain posted (whoever pushed them, a drain posted once runs them all).
void wake(Wakes& wakes) {
  for (auto& in : wakes) {
    try {
      Post p;
      {
        std::lock_guard<Lock> g(in->mu);
        if (in->scheduled || in->keeper == nullptr || in->q.empty()) continue;
        p = in->post;  // a copy may allocate: before the mark
        in->scheduled = true;
      }
      p([in]() { drain(in); });
    } catch (...) {
      // Out of memory copying the post function or queueing the drain:
      // not marked (or unmarked), so the next command for this inbox
      // posts again; the other inboxes are still woken.
      std::lock_guard<Lock> g(in->mu);
      in->scheduled = false;
    }
  }
  wakes.clear();
}

std::string typingKey(std::string_view user, std::string_view thread) {
  std::string k(user);
  k.push_back('\x1f');
  k.append(thread);
  return k;
}

// The nodes (by id) holding one key: nearly always one or two, kept in
// the map's slot (no allocation, no second cache miss).
using Holders = absl::InlinedVector<std::uint32_t, 2>;
bool removeHolder(Holders& h, std::uint32_t id) {
  for (auto& x : h)
    if (x == id) {
      x = h.back();
      h.pop_back();
      return true;
    }
  return false;
}
bool holds(const Holders& h, std::uint32_t id) {
  for (auto x : h)
    if (x == id) return true;
  return false;
}

// Debian's Abseil has its own string_view for heterogeneous lookup.
absl::string_view key(std::string_view s) { return {s.data(), s.size()}; }

// One hash per key: its top bits choose the shard, the whole of it is
// the map's (find(key, hash)).
std::size_t hashOf(std::string_view k) {
  return absl::Hash<absl::string_view>{}(absl::string_view(k.data(), k.size()));
}

struct alignas(64) Shard {
  Lock mu;
  absl::flat_hash_map<std::string, Holders> map;
  // Typing shards: the nodes that held back their own typingStopped for a
  // key because typingElsewhere() said another node still typed; the stop
  // edge goes to them too (and to no other node that made it).
  absl::flat_hash_map<std::string, Holders> owed;
};

// What one node decides alone.
struct NodeState {
  explicit NodeState(std::uint32_t i) : id(i) {}
  const std::uint32_t id;
  Lock mu;
  absl::flat_hash_map<std::string, std::uint32_t> users;  // user -> sessions here
  std::uint64_t published = 0;
  std::shared_ptr<Inbox> inbox = std::make_shared<Inbox>();
  // Inboxes this node's changes have filled, woken by flushWakes() at the
  // end of its loop's turn (posted there once per batch) rather than at the
  // end of each change: an idle loop is then woken once for a batch of
  // commands, not once per command.
  Wakes later;
  bool flushPosted = false;
};
using Registry = std::vector<std::shared_ptr<NodeState>>;

// The user's last session anywhere went: every node hears it offline, and
// `heir` (if any) also persists the wildcard, in the same command.
void pushGone(const Registry& reg, const std::shared_ptr<NodeState>& heir,
              const std::string& user, Wakes& w) {
  for (auto& to : reg)
    if (to != heir) push(to->inbox, {Cmd::Op::kPresence, false, user, {}, {}}, w);
  if (heir) push(heir->inbox, {Cmd::Op::kGone, false, user, {}, {}}, w);
}

void flushWakes(const std::shared_ptr<NodeState>& n) {
  Wakes w;
  {
    std::lock_guard<Lock> g(n->mu);
    w.swap(n->later);
    n->flushPosted = false;
  }
  wake(w);
}

// With no lock held: the inboxes in `w` are woken at the end of this
// loop's turn (now, if that cannot be arranged).
void wakeLater(const std::shared_ptr<NodeState>& n, Wakes& w) {
  if (w.empty()) return;
  bool post = false;
  try {
    std::lock_guard<Lock> g(n->mu);
    for (const auto& in : w) addWake(n->later, in);
    if (!n->flushPosted) post = n->flushPosted = true;
  } catch (...) {
    wake(w);  // out of memory: woken now
    return;
  }
  w.clear();
  if (!post) return;
  try {
    if (Post p = postOf(n->inbox)) {
      p([n]() { flushWakes(n); });
      return;
    }
  } catch (...) {
    // The host could not queue it: woken now.
  }
  flushWakes(n);
}

}  // namespace

struct InProcessHub::State {
  Lock regMu;  // the registry: taken on bind, on a node's end, on a query
  std::uint32_t nextId = 0;
  std::size_t alive = 0;
  std::shared_ptr<const Registry> registry = std::make_shared<const Registry>();
  std::atomic<std::uint64_t> generation{0};
  std::array<Shard, kShards> users, typing;
  std::atomic<std::uint64_t> reaped{0};

  Shard& shardOf(std::array<Shard, kShards>& a, std::size_t hash) {
    static_assert(kShards == 64);
    return a[hash >> (std::numeric_limits<std::size_t>::digits - 6)];
  }
  std::shared_ptr<const Registry> snapshot() {
    std::lock_guard<Lock> g(regMu);
    return registry;
  }
};

namespace {

class InProcessNode final : public Node {
 public:
  InProcessNode(std::shared_ptr<InProcessHub::State> hub, std::uint32_t id)
      : hub_(std::move(hub)), me_(std::make_shared<NodeState>(id)) {}

  ~InProcessNode() override {
    {
      std::lock_guard<Lock> g(hub_->regMu);
      --hub_->alive;
      auto next = std::make_shared<Registry>();
      for (auto& n : *hub_->registry)
        if (n != me_) next->push_back(n);
      hub_->registry = std::move(next);
      hub_->generation.fetch_add(1, std::memory_order_release);
    }
    {
      std::lock_guard<Lock> g(me_->inbox->mu);
      me_->inbox->keeper = nullptr;  // no command reaches a gone Keeper
      me_->inbox->post = nullptr;    // and nothing more is posted to its loop
      std::vector<Cmd>().swap(me_->inbox->q);
      std::vector<Cmd>().swap(me_->inbox->spare);
    }
    reap();
    flushWakes(me_);  // what this node's last changes filled, woken now
  }

  bool bind(BusTarget& keeper, Post post) override {
    if (!post) return false;
    {
      std::lock_guard<Lock> g(me_->inbox->mu);
      if (me_->inbox->keeper != nullptr) return false;
      me_->inbox->keeper = &keeper;
      me_->inbox->post = std::move(post);
    }
    std::lock_guard<Lock> g(hub_->regMu);
    auto next = std::make_shared<Registry>(*hub_->registry);
    next->push_back(me_);
    hub_->registry = std::move(next);
    hub_->generation.fetch_add(1, std::memory_order_release);
    return true;
  }

  void sessionUp(std::string_view, std::string_view user) override {
    Wakes w;
    {
      std::lock_guard<Lock> g(me_->mu);
      ++me_->published;
      auto found = me_->users.find(key(user));
      if (found == me_->users.end()) found = me_->users.emplace(std::string(user), 0).first;
      if (found->second++ == 0) {
        const Registry& reg = registry();
        const std::size_t hash = hashOf(user);
        Shard& sh = hub_->shardOf(hub_->users, hash);
        std::lock_guard<Lock> s(sh.mu);
        auto at = sh.map.find(key(user), hash);
        if (at == sh.map.end()) at = sh.map.try_emplace(std::string(user)).first;
        Holders& h = at->second;
        h.push_back(me_->id);
        if (h.size() == 1)
          for (auto& to : reg) push(to->inbox, {Cmd::Op::kPresence, true, std::string(user), {}, {}}, w);
      }
    }
    wakeLater(me_, w);
  }

  void sessionDown(std::string_view, std::string_view user) override {
    Wakes w;
    {
      std::lock_guard<Lock> g(me_->mu);
      ++me_->published;
      auto it = me_->users.find(key(user));
      if (it == me_->users.end() || --it->second != 0) return;
      me_->users.erase(it);
      const Registry& reg = registry();
      const std::size_t hash = hashOf(user);
      Shard& sh = hub_->shardOf(hub_->users, hash);
      std::lock_guard<Lock> s(sh.mu);
      auto h = sh.map.find(key(user), hash);
      if (h == sh.map.end()) return;
      removeHolder(h->second, me_->id);
      if (h->second.empty()) {
        sh.map.erase(h);
        // The wildcard is this node's to persist: its session was the last.
        pushGone(reg, me_, std::string(user), w);
      }
    }
    wakeLater(me_, w);
  }

  // Memberships stay in each Keeper (see wantsMemberships).
  bool wantsMemberships() const noexcept override { return false; }
  void joined(std::string_view, std::string_view) override {}
  void left(std::string_view, std::string_view) override {}

  void typing(std::string_view user, std::string_view thread, bool started) override {
    Wakes w;
    {
      std::lock_guard<Lock> g(me_->mu);
      ++me_->published;
      const Registry& reg = registry();
      const std::string key = typingKey(user, thread);
      const std::size_t hash = hashOf(key);
      Shard& sh = hub_->shardOf(hub_->typing, hash);
      std::lock_guard<Lock> s(sh.mu);
      auto it = sh.map.find(key, hash);
      const bool was = it != sh.map.end();
      bool is = was;
      if (started) {
        if (!was) it = sh.map.try_emplace(key).first;
        is = true;
        if (!holds(it->second, me_->id)) it->second.push_back(me_->id);
      } else if (was) {
        removeHolder(it->second, me_->id);
        if (it->second.empty()) {
          sh.map.erase(it);
          is = false;
        }
      }
      // Every other Keeper hears the edge. Its maker shows its own start
      // itself, and its own stop too unless it held it back (owed).
      if (was != is) {
        bool toMe = false;
        if (!is) {
          auto o = sh.owed.find(key, hash);
          if (o != sh.owed.end()) {
            toMe = holds(o->second, me_->id);
            sh.owed.erase(o);
          }
        }
        for (auto& to : reg)
          if (to != me_ || toMe)
            push(to->inbox, {Cmd::Op::kTyping, is, std::string(user), std::string(thread), {}},
                 w);
      }
    }
    wakeLater(me_, w);
  }

  void broadcast(const BroadcastTargets& targets, std::string_view event,
                 std::string_view payload) override {
    // To every other loop: its Keeper finds its own members (or none) in
    // one lookup per room, cheaper than keeping a copy of every membership.
    Wakes w;
    {
      // Under this node's lock: one sender's broadcasts stay in order.
      std::lock_guard<Lock> g(me_->mu);
      ++me_->published;
      const Registry& reg = registry();
      if (reg.size() < 2) return;
      auto msg = std::make_shared<const BroadcastMessage>(
          BroadcastMessage::copyOf(targets, event, payload));
      for (auto& n : reg)
        if (n != me_) push(n->inbox, {Cmd::Op::kBroadcast, false, {}, {}, msg}, w);
    }
    // A broadcast is sent now: the host asked for it to go out, and its
    // latency is what users see. It also wakes whatever this node's
    // earlier edges put in the same inboxes, ahead of it (FIFO).
    wake(w);
  }

  bool typingElsewhere(std::string_view user, std::string_view thread) const noexcept override {
    try {
      const std::string key = typingKey(user, thread);
      const std::size_t hash = hashOf(key);
      Shard& sh = hub_->shardOf(hub_->typing, hash);
      std::lock_guard<Lock> s(sh.mu);
      auto it = sh.map.find(key, hash);
      if (it == sh.map.end()) return false;
      const bool elsewhere = it->second.size() > 1 || !holds(it->second, me_->id);
      // Asked before a stop: this node will not show it; the edge will.
      if (elsewhere) {
        Holders& o = sh.owed[key];
        if (!holds(o, me_->id)) o.push_back(me_->id);
      }
      return elsewhere;
    } catch (...) {
      return false;
    }
  }

  void roomSize(std::string room, std::function<void(std::size_t)> done) override {
    gather(std::move(room), [done = std::move(done)](std::vector<std::string>, std::size_t n) {
      done(n);
    }, false);
  }

  void roomMembers(std::string room,
                   std::function<void(std::vector<std::string>)> done) override {
    gather(std::move(room), [done = std::move(done)](std::vector<std::string> v, std::size_t) {
      done(std::move(v));
    }, true);
  }

  void isOnline(std::string user, std::function<void(bool)> done) override {
    bool on = false;
    {
      const std::size_t hash = hashOf(user);
      Shard& sh = hub_->shardOf(hub_->users, hash);
      std::lock_guard<Lock> s(sh.mu);
      on = sh.map.find(key(user), hash) != sh.map.end();
    }
    answer([done = std::move(done), on]() { done(on); });
  }

  std::string id() const override { return "loop-" + std::to_string(me_->id); }

  ClusterStats stats() const override {
    ClusterStats s;
    s.connected = true;
    {
      std::lock_guard<Lock> g(hub_->regMu);
      s.nodes = hub_->alive;
    }
    {
      std::lock_guard<Lock> g(me_->mu);
      s.published = me_->published;
    }
    s.received = me_->inbox->received.load(std::memory_order_relaxed);
    s.nodesReaped = hub_->reaped.load(std::memory_order_relaxed);
    return s;
  }

 private:
  // The bound nodes, as cached by this node (under me_->mu); refreshed
  // only when a node was bound or went since the last look.
  const Registry& registry() {
    const auto gen = hub_->generation.load(std::memory_order_acquire);
    if (!reg_ || gen != regGen_) {
      reg_ = hub_->snapshot();
      regGen_ = gen;
    }
    return *reg_;
  }

  // Asks every loop's Keeper about `room` on its own thread; the last one
  // to answer hands the total to this node's loop.
  void gather(std::string room,
              std::function<void(std::vector<std::string>, std::size_t)> done, bool names) {
    struct Ask {
      std::string room;
      bool names = false;
      Lock mu;
      std::size_t waiting = 0, total = 0;
      std::vector<std::string> members;
      std::function<void(std::vector<std::string>, std::size_t)> done;
      std::shared_ptr<Inbox> home;  // the asker's: the node itself may be gone by then
    };
    auto ask = std::make_shared<Ask>();
    ask->room = std::move(room);
    ask->names = names;
    ask->done = std::move(done);
    ask->home = me_->inbox;
    auto reg = hub_->snapshot();
    ask->waiting = reg->size();
    if (reg->empty()) return answer([ask]() { ask->done({}, 0); });
    for (auto& n : *reg) {
      auto in = n->inbox;
      auto one = [ask, in]() {
        std::size_t k = 0;
        std::vector<std::string> v;
        BusTarget* keeper = nullptr;
        {
          std::lock_guard<Lock> g(in->mu);
          keeper = in->keeper;
        }
        if (keeper != nullptr) {
          if (ask->names)
            v = keeper->localRoomMembers(ask->room);
          else
            k = keeper->localRoomSize(ask->room);
        }
        bool last = false;
        {
          std::lock_guard<Lock> g(ask->mu);
          ask->total += ask->names ? v.size() : k;
          ask->members.insert(ask->members.end(), std::make_move_iterator(v.begin()),
                              std::make_move_iterator(v.end()));
          last = --ask->waiting == 0;
        }
        if (!last) return;
        if (Post p = postOf(ask->home))
          p([ask]() { ask->done(std::move(ask->members), ask->total); });
      };
      if (Post p = postOf(in))
        p(std::move(one));
      else
        one();  // a node that went meanwhile: counted as 0
    }
  }

  void answer(std::function<void()> fn) {
    if (Post p = postOf(me_->inbox))
      p(std::move(fn));
    else
      fn();
  }

  // Takes node `id` out of every entry of `shards`; `gone(key)` (under the
  // shard's lock) for each entry left with no node. True if any held it.
  template <typename F>
  static bool dropFrom(std::array<Shard, kShards>& shards, std::uint32_t id, F gone) {
    bool any = false;
    for (Shard& sh : shards) {
      std::lock_guard<Lock> s(sh.mu);
      for (auto it = sh.map.begin(); it != sh.map.end();) {
        const bool held = removeHolder(it->second, id);
        any = any || held;
        if (!held || !it->second.empty()) {
          ++it;
          continue;
        }
        gone(it->first);
        sh.owed.erase(it->first);
        sh.map.erase(it++);  // (Abseil's erase returns nothing)
      }
    }
    return any;
  }

  // Everything this node still held goes, as a reaper would take it.
  void reap() {
    const auto reg = hub_->snapshot();
    const std::shared_ptr<NodeState> heir = reg->empty() ? nullptr : reg->front();
    Wakes w;
    bool any = dropFrom(hub_->users, me_->id,
                        [&](const std::string& user) { pushGone(*reg, heir, user, w); });
    any = dropFrom(hub_->typing, me_->id, [&](const std::string& key) {
            const std::size_t cut = key.find('\x1f');
            for (auto& to : *reg)
              push(to->inbox,
                   {Cmd::Op::kTyping, false, key.substr(0, cut), key.substr(cut + 1), {}}, w);
          }) || any;
    {
      std::lock_guard<Lock> g(me_->mu);
      me_->users.clear();
    }
    if (any) hub_->reaped.fetch_add(1, std::memory_order_relaxed);
    wake(w);
  }

  std::shared_ptr<InProcessHub::State> hub_;
  std::shared_ptr<NodeState> me_;
  std::shared_ptr<const Registry> reg_;  // under me_->mu
  std::uint64_t regGen_ = 0;
};

}  // namespace

InProcessHub::InProcessHub() : state_(std::make_shared<State>()) {}
InProcessHub::~InProcessHub() = default;

std::unique_ptr<Node> InProcessHub::join() {
  std::uint32_t id;
  {
    std::lock_guard<Lock> g(state_->regMu);
    id = ++state_->nextId;
    ++state_->alive;
  }
  return std::make_unique<InProcessNode>(state_, id);
}

std::size_t InProcessHub::nodes() const {
  std::lock_guard<Lock> g(state_->regMu);
  return state_->alive;
}

std::size_t InProcessHub::entries() const {
  std::size_t n = 0;
  for (Shard& sh : state_->users) {
    std::lock_guard<Lock> g(sh.mu);
    n += sh.map.size();
  }
  for (Shard& sh : state_->typing) {
    std::lock_guard<Lock> g(sh.mu);
    n += sh.map.size() + sh.owed.size();
  }
  for (auto& node : *state_->snapshot()) {
    std::lock_guard<Lock> g(node->mu);
    n += node->users.size();
  }
  return n;
}

}  // namespace roomkeeper::cluster
