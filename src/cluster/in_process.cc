// SPDX-License-Identifier: MIT
#include "roomkeeper/cluster/in_process.h"

#include <map>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace roomkeeper::cluster {

namespace {

struct Target {
  // Read and cleared on the node's own thread only (commands run there).
  std::shared_ptr<BusTarget*> keeper = std::make_shared<BusTarget*>(nullptr);
  Post post;
};

std::string typingKey(std::string_view user, std::string_view thread) {
  std::string k(user);
  k.push_back('\x1f');
  k.append(thread);
  return k;
}

// A deferred command: where to post it and what to run on that Keeper.
struct Send {
  Target to;
  std::function<void(BusTarget&)> fn;
};

void run(std::vector<Send>& out) {
  for (Send& s : out) {
    if (!s.to.post) continue;
    s.to.post([cell = s.to.keeper, fn = std::move(s.fn)]() {
      if (*cell) fn(**cell);
    });
  }
  out.clear();
}

}  // namespace

struct InProcessHub::State {
  mutable std::mutex mu;
  std::uint32_t nextId = 0;
  std::map<std::uint32_t, Target> nodes;  // bound nodes
  std::size_t alive = 0;
  // user -> node -> sessions of that user on it
  std::unordered_map<std::string, std::map<std::uint32_t, std::size_t>> users;
  // room -> node -> members there
  std::unordered_map<std::string, std::map<std::uint32_t, std::set<std::string>>> rooms;
  // user \x1f thread -> nodes with the user typing there
  std::unordered_map<std::string, std::set<std::uint32_t>> typing;
  std::uint64_t reaped = 0;

  // Each under mu; the commands they produce go to `out`.
  void toAllBut(std::uint32_t self, std::vector<Send>& out,
                const std::function<void(BusTarget&)>& fn) {
    for (auto& [id, t] : nodes)
      if (id != self) out.push_back({t, fn});
  }
  void toAll(std::vector<Send>& out, const std::function<void(BusTarget&)>& fn) {
    for (auto& [id, t] : nodes) out.push_back({t, fn});
  }
  std::size_t entries() const {
    std::size_t n = users.size() + typing.size();
    for (auto& [r, m] : rooms) n += 1 + m.size();
    return n;
  }
};

namespace {

class InProcessNode final : public Node {
 public:
  InProcessNode(std::shared_ptr<InProcessHub::State> hub, std::uint32_t id)
      : hub_(std::move(hub)), id_(id) {}

  ~InProcessNode() override {
    std::vector<Send> out;
    {
      std::lock_guard<std::mutex> g(hub_->mu);
      --hub_->alive;
      auto it = hub_->nodes.find(id_);
      if (it != hub_->nodes.end()) {
        *it->second.keeper = nullptr;  // no command reaches a gone Keeper
        hub_->nodes.erase(it);
      }
      reapLocked(out);
    }
    run(out);
  }

  bool bind(BusTarget& keeper, Post post) override {
    std::lock_guard<std::mutex> g(hub_->mu);
    if (bound_ || !post) return false;
    bound_ = true;
    Target t;
    *t.keeper = &keeper;
    t.post = std::move(post);
    self_ = t;
    hub_->nodes.emplace(id_, std::move(t));
    return true;
  }

  void sessionUp(std::string_view, std::string_view user) override {
    std::vector<Send> out;
    {
      std::lock_guard<std::mutex> g(hub_->mu);
      ++published_;
      auto& per = hub_->users[std::string(user)];
      const bool first = per.empty();
      ++per[id_];
      if (first)
        hub_->toAll(out, [u = std::string(user)](BusTarget& k) { k.relayPresence(u, true); });
    }
    run(out);
  }

  void sessionDown(std::string_view, std::string_view user) override {
    std::vector<Send> out;
    {
      std::lock_guard<std::mutex> g(hub_->mu);
      ++published_;
      auto it = hub_->users.find(std::string(user));
      if (it == hub_->users.end()) return;
      auto n = it->second.find(id_);
      if (n != it->second.end() && --n->second == 0) it->second.erase(n);
      if (it->second.empty()) {
        hub_->users.erase(it);
        const std::string u(user);
        hub_->toAll(out, [u](BusTarget& k) { k.relayPresence(u, false); });
        out.push_back({self_, [u](BusTarget& k) { k.relayUserGone(u); }});
      }
    }
    run(out);
  }

  void joined(std::string_view session, std::string_view room) override {
    std::lock_guard<std::mutex> g(hub_->mu);
    ++published_;
    hub_->rooms[std::string(room)][id_].emplace(session);
  }

  void left(std::string_view session, std::string_view room) override {
    std::lock_guard<std::mutex> g(hub_->mu);
    ++published_;
    auto it = hub_->rooms.find(std::string(room));
    if (it == hub_->rooms.end()) return;
    auto n = it->second.find(id_);
    if (n != it->second.end()) {
      n->second.erase(std::string(session));
      if (n->second.empty()) it->second.erase(n);
    }
    if (it->second.empty()) hub_->rooms.erase(it);
  }

  void typing(std::string_view user, std::string_view thread, bool started) override {
    std::vector<Send> out;
    {
      std::lock_guard<std::mutex> g(hub_->mu);
      ++published_;
      const std::string key = typingKey(user, thread);
      auto& who = hub_->typing[key];
      const bool was = !who.empty();
      if (started)
        who.insert(id_);
      else
        who.erase(id_);
      const bool is = !who.empty();
      if (!is) hub_->typing.erase(key);
      if (was != is)
        hub_->toAllBut(id_, out,
                       [u = std::string(user), t = std::string(thread), is](BusTarget& k) {
                         k.relayTyping(u, t, is);
                       });
    }
    run(out);
  }

  void broadcast(const BroadcastTargets& targets, std::string_view event,
                 std::string_view payload) override {
    std::vector<Send> out;
    {
      std::lock_guard<std::mutex> g(hub_->mu);
      ++published_;
      // Only to nodes holding a member of a named room (every node when no
      // room is named: a broadcast to everyone).
      std::set<std::uint32_t> to;
      if (targets.rooms.empty()) {
        for (auto& [id, t] : hub_->nodes) to.insert(id);
      } else {
        for (auto r : targets.rooms) {
          auto it = hub_->rooms.find(std::string(r));
          if (it == hub_->rooms.end()) continue;
          for (auto& [id, m] : it->second) to.insert(id);
        }
      }
      to.erase(id_);
      if (to.empty()) return;
      auto msg = std::make_shared<const BroadcastMessage>(
          BroadcastMessage::copyOf(targets, event, payload));
      for (std::uint32_t id : to) {
        auto t = hub_->nodes.find(id);
        if (t == hub_->nodes.end()) continue;
        out.push_back({t->second, [msg](BusTarget& k) {
                         k.relayBroadcast(msg->targets(), msg->event, msg->payload);
                       }});
      }
    }
    run(out);
  }

  bool typingElsewhere(std::string_view user, std::string_view thread) const noexcept override {
    try {
      std::lock_guard<std::mutex> g(hub_->mu);
      auto it = hub_->typing.find(typingKey(user, thread));
      if (it == hub_->typing.end()) return false;
      return it->second.size() > 1 || it->second.count(id_) == 0;
    } catch (...) {
      return false;
    }
  }

  void roomSize(std::string room, std::function<void(std::size_t)> done) override {
    std::size_t n = 0;
    {
      std::lock_guard<std::mutex> g(hub_->mu);
      auto it = hub_->rooms.find(room);
      if (it != hub_->rooms.end())
        for (auto& [id, m] : it->second) n += m.size();
    }
    answer([done = std::move(done), n]() { done(n); });
  }

  void roomMembers(std::string room,
                   std::function<void(std::vector<std::string>)> done) override {
    std::vector<std::string> v;
    {
      std::lock_guard<std::mutex> g(hub_->mu);
      auto it = hub_->rooms.find(room);
      if (it != hub_->rooms.end())
        for (auto& [id, m] : it->second) v.insert(v.end(), m.begin(), m.end());
    }
    answer([done = std::move(done), v = std::move(v)]() { done(v); });
  }

  void isOnline(std::string user, std::function<void(bool)> done) override {
    bool on = false;
    {
      std::lock_guard<std::mutex> g(hub_->mu);
      on = hub_->users.count(user) != 0;
    }
    answer([done = std::move(done), on]() { done(on); });
  }

  std::string id() const override { return "loop-" + std::to_string(id_); }

  ClusterStats stats() const override {
    ClusterStats s;
    std::lock_guard<std::mutex> g(hub_->mu);
    s.connected = true;
    s.nodes = hub_->alive;
    s.published = published_;
    s.nodesReaped = hub_->reaped;
    return s;
  }

 private:
  void answer(std::function<void()> fn) {
    Post p;
    {
      std::lock_guard<std::mutex> g(hub_->mu);
      p = self_.post;
    }
    if (p)
      p(std::move(fn));
    else
      fn();
  }

  // Removes node `id` from every entry of `m` (a map of per-node maps or
  // sets); `gone(key)` for each entry left with no node. True if any held it.
  template <typename Map, typename F>
  static bool dropNode(Map& m, std::uint32_t id, F gone) {
    bool any = false;
    for (auto it = m.begin(); it != m.end();) {
      if (it->second.erase(id) == 0) {
        ++it;
        continue;
      }
      any = true;
      if (!it->second.empty()) {
        ++it;
        continue;
      }
      gone(it->first);
      it = m.erase(it);
    }
    return any;
  }

  // Everything this node still held goes, as a reaper would take it.
  void reapLocked(std::vector<Send>& out) {
    const Target* heir = hub_->nodes.empty() ? nullptr : &hub_->nodes.begin()->second;
    bool any = dropNode(hub_->users, id_, [&](const std::string& u) {
      hub_->toAll(out, [u](BusTarget& k) { k.relayPresence(u, false); });
      if (heir) out.push_back({*heir, [u](BusTarget& k) { k.relayUserGone(u); }});
    });
    any = dropNode(hub_->rooms, id_, [](const std::string&) {}) || any;
    any = dropNode(hub_->typing, id_, [&](const std::string& key) {
            const std::size_t cut = key.find('\x1f');
            hub_->toAll(out, [u = key.substr(0, cut), t = key.substr(cut + 1)](BusTarget& k) {
              k.relayTyping(u, t, false);
            });
          }) || any;
    if (any) ++hub_->reaped;
  }

  std::shared_ptr<InProcessHub::State> hub_;
  std::uint32_t id_;
  bool bound_ = false;
  Target self_;
  std::uint64_t published_ = 0;
};

}  // namespace

InProcessHub::InProcessHub() : state_(std::make_shared<State>()) {}
InProcessHub::~InProcessHub() = default;

std::unique_ptr<Node> InProcessHub::join() {
  std::uint32_t id;
  {
    std::lock_guard<std::mutex> g(state_->mu);
    id = ++state_->nextId;
    ++state_->alive;
  }
  return std::make_unique<InProcessNode>(state_, id);
}

std::size_t InProcessHub::nodes() const {
  std::lock_guard<std::mutex> g(state_->mu);
  return state_->alive;
}

std::size_t InProcessHub::entries() const {
  std::lock_guard<std::mutex> g(state_->mu);
  return state_->entries();
}

}  // namespace roomkeeper::cluster
