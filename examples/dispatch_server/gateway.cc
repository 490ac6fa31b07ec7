// SPDX-License-Identifier: MIT
// The dispatch gateway. Who owns what:
//   * --threads N event loops (Loop): each an io_context run by one thread,
//     with a roomkeeper::SyncKeeper of its own for the sessions accepted
//     onto it (round-robin). The Keeper owns every piece of per-socket
//     bookkeeping the original server kept by hand: rooms, typing timers,
//     auth deadlines, user -> sockets. Its driver thread fires the timers.
//     The loops' Keepers are joined by a roomkeeper::cluster::InProcessHub
//     (or, with --redis, each is a node of the Redis cluster), so rooms,
//     presence and typing span loops: docs/design.md "Threads".
//   * Each loop keeps one map, "sock-<n>" -> Session, so that its Keeper's
//     callbacks (which name sessions by id) reach a live connection. A
//     session enters it after the WebSocket handshake and leaves it when its
//     read loop ends, right after roomkeeper's disconnect.
//   * A Session does all its I/O on its own strand. Anything from another
//     thread (roomkeeper callbacks: emit, closeSession) is posted there.
//     Writes are queued; one async_write is outstanding at a time, and a
//     close waits behind the queued writes.
#include "gateway.h"

#if DISPATCH_CLUSTER
#include <roomkeeper/cluster/in_process.h>
#include <roomkeeper/cluster/redis_node.h>
#endif
#include <roomkeeper/roomkeeper.h>
#include <sys/resource.h>

#include <atomic>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <chrono>
#include <cstdio>
#include <deque>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "dashboard_html.h"
#include "demo_token.h"
#include "typing_store.h"

namespace dispatch {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;
using json = nlohmann::json;
using roomkeeper::Result;
using Clock = std::chrono::steady_clock;

// Close codes beyond RFC 6455's (see docs/protocol.md).
constexpr std::uint16_t kCloseAuthTimeout = 4001;
constexpr std::uint16_t kCloseAuthFailed = 4003;
// The host kind of rate limit in KeeperOptions::rateLimits::kinds.
constexpr roomkeeper::RateKindId kMessageKind = 0;

std::string sv(std::string_view s) { return std::string(s); }

/// JSON text; invalid UTF-8 (which Beast's text-frame check already keeps
/// out) would be replaced rather than throw.
std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

/// {"event":<event>,"data":<payload>}; payload is JSON already.
std::string wireEvent(std::string_view event, std::string_view payload) {
  std::string out = R"({"event":)";
  out += json(sv(event)).dump();
  out += R"(,"data":)";
  out += payload.empty() ? std::string_view("{}") : payload;
  out += '}';
  return out;
}

class Gateway;
class Session;

// ---- One event loop -------------------------------------------------------

struct Loop {
  asio::io_context ioc{1};
#if DISPATCH_CLUSTER
  std::unique_ptr<roomkeeper::cluster::Node> node;  // its bus; outlives the Keeper
  roomkeeper::cluster::RedisNode* redis = nullptr;  // node, when it is a Redis one
#endif
  std::unique_ptr<roomkeeper::SyncKeeper> keeperPtr;
  std::string prefix = "sock-";  // session ids: unique across the cluster
  std::mutex mu;
  std::unordered_map<std::string, std::shared_ptr<Session>> sessions;

  roomkeeper::SyncKeeper& keeper() { return *keeperPtr; }
  void addSession(const std::shared_ptr<Session>& s);
  void removeSession(const std::string& id) {
    std::lock_guard<std::mutex> g(mu);
    sessions.erase(id);
  }
  std::shared_ptr<Session> findSession(std::string_view id) {
    std::lock_guard<std::mutex> g(mu);
    auto it = sessions.find(sv(id));
    return it == sessions.end() ? nullptr : it->second;
  }
  std::size_t sessionCount() {
    std::lock_guard<std::mutex> g(mu);
    return sessions.size();
  }
};

// ---- One WebSocket connection ---------------------------------------------

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(Gateway& gw, Loop& loop, beast::tcp_stream&& stream)
      : gw_(gw), loop_(loop), ws_(std::move(stream)), ex_(ws_.get_executor()), dropTimer_(ex_) {}

  void start(http::request<http::string_body> req);

  // Thread-safe: post to the session's strand.
  void postSend(std::string msg) {
    asio::post(ex_, [self = shared_from_this(), m = std::move(msg)]() mutable {
      self->send(std::move(m));
    });
  }
  void postClose(std::uint16_t code, std::string reason) {
    asio::post(ex_, [self = shared_from_this(), code, r = std::move(reason)]() {
      self->requestClose(
          websocket::close_reason(static_cast<websocket::close_code>(code), r));
    });
  }
  const std::string& id() const { return id_; }

 private:
  void onAccept(beast::error_code ec);
  void doRead();
  void onRead(beast::error_code ec, std::size_t bytes);
  void finish(beast::error_code ec);
  void send(std::string msg);
  void doWrite();
  void onWrite(beast::error_code ec, std::size_t bytes);
  void requestClose(websocket::close_reason reason);
  void teardown();

  void handleMessage(std::string_view text);
  void route(const std::string& event, const json& id, const json& data);
  void onAuthenticate(const std::string& ev, const json& id, const json& data);
  void joinRoom(const std::string& ev, const json& id, const std::string& room,
                json extra = json::object());
  void leaveRoom(const std::string& ev, const json& id, const std::string& room,
                 json extra = json::object());
  void onAnalytics(bool subscribe, const std::string& ev, const json& id,
                   const json& data);
  void onTyping(bool start, const std::string& ev, const json& id, const json& data);
  void onMessageSend(const std::string& ev, const json& id, const json& data);
  void onJobUpdate(const std::string& ev, const json& id, const json& data);

  void ack(const json& id, const std::string& forEvent, json data);
  void error(const json& id, const std::string& forEvent, std::string_view code,
             std::string message);
  void resultError(const json& id, const std::string& forEvent, Result r);
  /// A field that names an id: a string or an integer matching validId.
  std::optional<std::string> idField(const json& data, const char* key) const;

  Gateway& gw_;
  Loop& loop_;  // the session's loop: its Keeper, its map
  websocket::stream<beast::tcp_stream> ws_;
  const asio::any_io_executor ex_;  // the strand
  asio::steady_timer dropTimer_;    // bounds the close of a peer that stopped reading
  beast::flat_buffer buffer_;
  std::string id_;
  std::deque<std::string> outbox_;
  bool registered_ = false;      // in the map and connected to roomkeeper
  bool writing_ = false;         // an async_write is outstanding
  bool reading_ = false;         // an async_read_some is outstanding
  bool closeRequested_ = false;  // a close waits behind the queued writes
  bool closing_ = false;         // async_close started
  bool finished_ = false;        // the read loop ended
  websocket::close_reason closeReason_;
  std::optional<Identity> identity_;
  std::set<std::string> analyticsTypes_;
};

void Loop::addSession(const std::shared_ptr<Session>& s) {
  std::lock_guard<std::mutex> g(mu);
  sessions.emplace(s->id(), s);
}

// ---- The server -----------------------------------------------------------

class Gateway {
 public:
  Gateway(const ServerOptions& opt, TypingStore& store)
      : opt_(opt),
        store_(store),
        loops_(makeLoops(opt.threads)),
        acceptor_(asio::make_strand(loops_[0]->ioc)),
        signals_(loops_[0]->ioc, SIGINT, SIGTERM),
        shutdownTimer_(loops_[0]->ioc) {
    for (auto& l : loops_) makeKeeper(*l);
  }

  ~Gateway() {
    for (auto& l : loops_) l->keeperPtr.reset();  // stops the drivers before the maps go
    for (auto& l : loops_) {
      std::lock_guard<std::mutex> g(l->mu);
      l->sessions.clear();
    }
  }

  bool listen(std::string* error) {
    beast::error_code ec;
    const auto address = asio::ip::make_address(opt_.host, ec);
    if (ec) return *error = "bad --host: " + ec.message(), false;
    const tcp::endpoint ep(address, opt_.port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return *error = "listen on " + opt_.host + ": " + ec.message(), false;
    return true;
  }
  unsigned short port() const { return acceptor_.local_endpoint().port(); }

  void start() {
    for (auto& l : loops_) {
#if DISPATCH_CLUSTER
      if (l->redis) l->redis->start();
#endif
      l->keeper().startDriver();
      work_.emplace_back(asio::make_work_guard(l->ioc));
    }
    signals_.async_wait([this](const beast::error_code& ec, int signo) {
      if (!ec) beginShutdown(signo);
    });
    asio::post(acceptor_.get_executor(), [this] { doAccept(); });
  }

  /// Runs loop 0 on the calling thread and every other loop on a thread of
  /// its own; returns when all have stopped.
  void run() {
    std::vector<std::thread> pool;
    for (std::size_t i = 1; i < loops_.size(); ++i)
      pool.emplace_back([l = loops_[i].get()] { l->ioc.run(); });
    loops_[0]->ioc.run();
    for (std::thread& t : pool) t.join();
  }

  const ServerOptions& options() const { return opt_; }
  std::size_t loopCount() const { return loops_.size(); }

  std::string nextSessionId(Loop& l) { return l.prefix + std::to_string(++nextId_); }
  std::size_t sessionCount() {
    std::size_t n = 0;
    for (auto& l : loops_) n += l->sessionCount();
    return n;
  }
  /// Every loop's statistics, summed.
  roomkeeper::MemoryStats memoryStats() {
    roomkeeper::MemoryStats sum;
    for (auto& l : loops_) sum += l->keeper().getMemoryStats();
    return sum;
  }

  /// roomkeeper's statistics (summed over the loops) plus what only the
  /// host knows.
  std::string statsJson() {
    roomkeeper::MemoryStats sum;
    std::string perLoop;
    for (auto& l : loops_) {
      // Our open connections against roomkeeper's sessions: the library
      // warns if it holds sessions whose socket we no longer have.
      (void)l->keeper().checkTransport(l->sessionCount());
      const roomkeeper::MemoryStats st = l->keeper().getMemoryStats();
      sum += st;
      perLoop += (perLoop.empty() ? "" : ",") + std::to_string(st.connectedClients);
    }
    std::string s = roomkeeper::statsJson(sum);
    s.pop_back();  // the closing brace
    s += ",\"typingRows\":" + std::to_string(store_.countRows());
    s += ",\"typingRowsQueued\":" + std::to_string(store_.queued());
    s += ",\"serverSessions\":" + std::to_string(sessionCount());
    s += ",\"loops\":" + std::to_string(loops_.size());
    s += ",\"connectedPerLoop\":[" + perLoop + "]";
    s += ",\"authTimeoutMs\":" + std::to_string(opt_.authTimeoutMs);
    s += ",\"typingTimeoutMs\":" + std::to_string(opt_.typingTimeoutMs);
    s += ",\"shuttingDown\":" + std::string(shuttingDown_ ? "true" : "false");
    {
      // roomkeeper's recent warnings (the dashboard shows them).
      std::lock_guard<std::mutex> lock(warningsMutex_);
      s += ",\"warnings\":" + json(warnings_).dump();
    }
#if DISPATCH_CLUSTER
    // Loop 0's node (with --redis every loop is a node of its own).
    if (loops_[0]->redis) s += ",\"cluster\":" + loops_[0]->node->statsJson();
#endif
    return s + "}";
  }
  std::string metricsText() {
    std::string s = roomkeeper::prometheusText(memoryStats());
    s += "# HELP dispatch_typing_rows Typing indicator rows in SQLite.\n"
         "# TYPE dispatch_typing_rows gauge\n"
         "dispatch_typing_rows " +
         std::to_string(store_.countRows()) + "\n";
    s += "# HELP dispatch_server_sessions WebSocket sessions in the gateway's maps.\n"
         "# TYPE dispatch_server_sessions gauge\n"
         "dispatch_server_sessions " +
         std::to_string(sessionCount()) + "\n";
    s += "# HELP dispatch_loop_connected_clients Sessions connected, per event loop.\n"
         "# TYPE dispatch_loop_connected_clients gauge\n";
    for (std::size_t i = 0; i < loops_.size(); ++i)
      s += "dispatch_loop_connected_clients{loop=\"" + std::to_string(i) + "\"} " +
           std::to_string(loops_[i]->keeper().getMemoryStats().connectedClients) + "\n";
#if DISPATCH_CLUSTER
    if (loops_[0]->redis) s += loops_[0]->node->prometheusText();
#endif
    return s;
  }

 private:
  static std::vector<std::unique_ptr<Loop>> makeLoops(int n) {
    std::vector<std::unique_ptr<Loop>> v;
    for (int i = 0; i < std::max(n, 1); ++i) v.push_back(std::make_unique<Loop>());
    return v;
  }

  void makeKeeper(Loop& l) {
    roomkeeper::KeeperCallbacks cb;
    // Rooms live in roomkeeper; plain WebSocket has no transport rooms, so
    // cb.leave is not needed. A loop's Keeper only ever names its own
    // loop's sessions.
    cb.emit = [&l](std::string_view session, std::string_view event, std::string_view payload) {
      if (auto s = l.findSession(session)) s->postSend(wireEvent(event, payload));
    };
    cb.closeSession = [&l](std::string_view session, std::string_view reason) {
      if (auto s = l.findSession(session)) {
        const std::uint16_t code = reason == "auth_timeout"
                                       ? kCloseAuthTimeout
                                       : std::uint16_t(websocket::close_code::going_away);
        s->postClose(code, sv(reason));
      }
    };
    cb.persist = [this](const roomkeeper::PersistCall& call) { return store_.apply(call); };
    cb.log = [this](roomkeeper::LogLevel level, std::string_view msg) {
      if (level >= roomkeeper::LogLevel::kWarning || opt_.verbose)
        std::fprintf(stderr, "[%s] %.*s\n", std::string(roomkeeper::toString(level)).c_str(),
                     int(msg.size()), msg.data());
      if (level >= roomkeeper::LogLevel::kWarning) noteWarning(msg);
    };
    roomkeeper::KeeperOptions ko;
    ko.authTimeout = roomkeeper::Millis(opt_.authTimeoutMs);
    ko.typing.timeout = roomkeeper::Millis(opt_.typingTimeoutMs);
    // The leak warnings keep roomkeeper's defaults (relative to what is
    // connected): no thresholds tuned to this demo's traffic.
    ko.statsLogInterval = roomkeeper::Millis(opt_.statsIntervalMs);
    // Rate limits, all in roomkeeper (docs/protocol.md): messages, joins
    // and leaves, typing starts per socket (bursts of twice the rate), and
    // per client address the sockets open at once and new ones a second.
    // Each event loop's Keeper counts its own sockets.
    auto bucket = [](double rate) { return roomkeeper::RateLimit{rate, 2 * rate}; };
    ko.rateLimits.kinds = {{"message", roomkeeper::RateScope::kSession, bucket(opt_.rateLimit)}};
    ko.rateLimits.joinsPerSession = bucket(opt_.joinRate);
    ko.rateLimits.typingPerSession = bucket(opt_.typingRate);
    ko.rateLimits.maxSessionsPerAddress = opt_.maxPerIp;
    ko.rateLimits.connectsPerAddress = bucket(opt_.connectsPerIp);
#if DISPATCH_CLUSTER
    if (!opt_.redis.empty()) {
      // One node of a cluster: rooms, presence and typing span every
      // server on the same Redis (docs/cluster.md).
      roomkeeper::cluster::RedisConfig rc;
      const auto colon = opt_.redis.rfind(':');
      rc.host = opt_.redis.substr(0, colon);
      rc.port = static_cast<std::uint16_t>(std::stoi(opt_.redis.substr(colon + 1)));
      rc.log = cb.log;
      auto node = std::make_unique<roomkeeper::cluster::RedisNode>(l.ioc, rc);
      l.redis = node.get();
      l.prefix = "sock-" + node->id().substr(0, 8) + "-";
      l.node = std::move(node);
    } else if (loops_.size() > 1) {
      l.node = hub_.join();  // the loops of this process, as one
    }
    if (l.node) ko.bus = l.node.get();
#endif
    l.keeperPtr = std::make_unique<roomkeeper::SyncKeeper>(std::move(cb), ko);
#if DISPATCH_CLUSTER
    if (l.redis) {
      l.node->bind(l.keeper(),
                   [io = &l.ioc](std::function<void()> fn) { asio::post(*io, std::move(fn)); });
    } else if (l.node) {
      // The loops shut down together: what one loop's shutdown tells the
      // others (typingStopped, userOffline) is not delivered, so that every
      // client hears serverShutdown and nothing else (docs/protocol.md).
      l.node->bind(l.keeper(), [this, io = &l.ioc](std::function<void()> fn) {
        asio::post(*io, [this, fn = std::move(fn)]() {
          if (!shuttingDown_) fn();
        });
      });
    }
#endif
  }

  // One accept at a time; each socket goes to the next loop in turn.
  void doAccept() {
    Loop& l = *loops_[nextLoop_++ % loops_.size()];
    acceptor_.async_accept(asio::make_strand(l.ioc),
                           [this, &l](beast::error_code ec, tcp::socket socket) {
                             onAccept(ec, std::move(socket), l);
                           });
  }
  void onAccept(beast::error_code ec, tcp::socket socket, Loop& l);

  void beginShutdown(int signo) {
    if (shuttingDown_.exchange(true)) return;
    std::printf("dispatch_server: signal %d: shutting down\n", signo);
    std::fflush(stdout);
    asio::post(acceptor_.get_executor(), [this] {
      beast::error_code ignored;
      acceptor_.close(ignored);
    });
    // serverShutdown to every session, a close (1001) for each, and every
    // session's disconnect sequence: typing rows deleted, rooms left.
    roomkeeper::ShutdownReport rep;
    for (auto& l : loops_) {
      const roomkeeper::ShutdownReport r = l->keeper().shutdown();
      rep.sessionsClosed += r.sessionsClosed;
      rep.timersCancelled += r.timersCancelled;
      rep.persistUndelivered += r.persistUndelivered;
    }
    std::printf(
        "dispatch_server: told %zu sessions; %zu timers cancelled; "
        "%zu persistence calls undelivered\n",
        rep.sessionsClosed, rep.timersCancelled, rep.persistUndelivered);
    std::fflush(stdout);
    shutdownDeadline_ = Clock::now() + std::chrono::milliseconds(opt_.shutdownGraceMs);
    pollShutdown();
  }
  void pollShutdown() {
    if (sessionCount() == 0 || Clock::now() >= shutdownDeadline_) {
      // A cluster node removes what it still holds in Redis, then goes.
#if DISPATCH_CLUSTER
      if (loops_[0]->redis) {
        auto left = std::make_shared<std::atomic<std::size_t>>(loops_.size());
        for (auto& l : loops_)
          l->redis->stop([this, left] {
            if (--*left == 0) stopLoops();
          });
        return;
      }
#endif
      stopLoops();
      return;
    }
    shutdownTimer_.expires_after(std::chrono::milliseconds(20));
    shutdownTimer_.async_wait([this](const beast::error_code&) { pollShutdown(); });
  }
  void stopLoops() {
    for (auto& l : loops_) l->ioc.stop();
  }

  ServerOptions opt_;
  TypingStore& store_;
#if DISPATCH_CLUSTER
  roomkeeper::cluster::InProcessHub hub_;  // outlives the loops' nodes
#endif
  std::vector<std::unique_ptr<Loop>> loops_;
  std::vector<asio::executor_work_guard<asio::io_context::executor_type>> work_;
  tcp::acceptor acceptor_;
  asio::signal_set signals_;
  asio::steady_timer shutdownTimer_;
  Clock::time_point shutdownDeadline_{};
  std::atomic<bool> shuttingDown_{false};
  std::atomic<std::uint64_t> nextId_{0};
  std::size_t nextLoop_ = 0;  // on the acceptor's strand
  // The last warnings roomkeeper logged (from any loop's thread), newest last.
  std::mutex warningsMutex_;
  std::deque<std::string> warnings_;
  void noteWarning(std::string_view msg) {
    std::lock_guard<std::mutex> lock(warningsMutex_);
    warnings_.emplace_back(msg);
    if (warnings_.size() > 10) warnings_.pop_front();
  }
};

// ---- Plain HTTP (GET /metrics, /stats, /healthz) and the upgrade -----------

/// A request body is read (so that the answer is not lost to a reset) and
/// ignored; a larger one gets 413.
constexpr std::uint64_t kMaxHttpBody = 16 * 1024;

class HttpConnection : public std::enable_shared_from_this<HttpConnection> {
 public:
  HttpConnection(Gateway& gw, Loop& loop, tcp::socket&& socket)
      : gw_(gw), loop_(loop), stream_(std::move(socket)) {}

  void start() {
    stream_.expires_after(std::chrono::seconds(10));
    parser_.emplace();
    parser_->header_limit(8 * 1024);
    parser_->body_limit(kMaxHttpBody);
    http::async_read(
        stream_, buffer_, *parser_,
        beast::bind_front_handler(&HttpConnection::onRead, shared_from_this()));
  }

 private:
  void onRead(beast::error_code ec, std::size_t) {
    if (ec) return onReadError(ec);
    http::request<http::string_body> req = parser_->release();
    // The query string is not part of the route: /stats?x=1 is /stats.
    const beast::string_view target = req.target();
    const beast::string_view path = target.substr(0, target.find('?'));
    head_ = req.method() == http::verb::head;
    version_ = req.version();
    if (websocket::is_upgrade(req)) {
      if (path != "/" && path != "/ws")
        return respond(http::status::not_found, "text/plain", "not found\n");
      stream_.expires_never();  // the WebSocket stream keeps its own timeouts
      std::make_shared<Session>(gw_, loop_, std::move(stream_))->start(std::move(req));
      return;
    }
    if (req.method() != http::verb::get && !head_)
      return respond(http::status::method_not_allowed, "text/plain", "GET or HEAD\n");
    if (path == "/metrics")
      return respond(http::status::ok, "text/plain; version=0.0.4; charset=utf-8",
                     gw_.metricsText());
    if (path == "/stats")
      return respond(http::status::ok, "application/json", gw_.statsJson() + "\n");
    if (path == "/healthz") return respond(http::status::ok, "text/plain", "ok\n");
    if (path == "/")  // the live dashboard
      return respond(http::status::ok, "text/html; charset=utf-8",
                     std::string(dispatch::kDashboardHtml));
    respond(http::status::not_found, "text/plain", "not found\n");
  }

  /// A request Beast could not parse gets a 4xx; a peer that went away or
  /// stayed silent past the deadline gets nothing.
  void onReadError(beast::error_code ec) {
    if (ec.category() != http::make_error_code(http::error::end_of_stream).category() ||
        ec == http::error::end_of_stream || ec == http::error::partial_message)
      return;
    if (parser_->is_header_done()) version_ = parser_->get().version();
    if (ec == http::error::body_limit)
      return respond(http::status::payload_too_large, "text/plain", "body too large\n");
    if (ec == http::error::header_limit)
      return respond(http::status::request_header_fields_too_large, "text/plain",
                     "header too large\n");
    respond(http::status::bad_request, "text/plain", "bad request\n");
  }

  /// Writes the response (headers only for HEAD), then closes politely: our
  /// side first, then whatever the peer still sends is read and discarded
  /// until it closes too (at most 2 s), so that the kernel never answers
  /// unread input with a reset that would destroy the response in flight.
  void respond(http::status status, const char* type, std::string body) {
    auto res = std::make_shared<http::response<http::string_body>>(status, version_);
    res->set(http::field::server, "roomkeeper-dispatch");
    res->set(http::field::content_type, type);
    if (status == http::status::method_not_allowed)
      res->set(http::field::allow, "GET, HEAD");
    res->keep_alive(false);
    res->body() = std::move(body);
    res->prepare_payload();  // Content-Length of the body a GET would get
    if (head_) res->body().clear();
    http::async_write(
        stream_, *res,
        [self = shared_from_this(), res](beast::error_code ec, std::size_t) {
          if (ec) return;
          beast::error_code ignored;
          self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
          self->stream_.expires_after(std::chrono::seconds(2));
          self->drain();
        });
  }
  void drain() {
    stream_.async_read_some(
        asio::buffer(scratch_),
        [self = shared_from_this()](beast::error_code ec, std::size_t) {
          if (!ec) self->drain();
        });
  }

  Gateway& gw_;
  Loop& loop_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  bool head_ = false;
  unsigned version_ = 11;
  char scratch_[4096];
};

void Gateway::onAccept(beast::error_code ec, tcp::socket socket, Loop& l) {
  if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
  if (ec) {
    // EMFILE and friends: log, breathe, go on accepting.
    std::fprintf(stderr, "dispatch_server: accept: %s\n", ec.message().c_str());
    auto t = std::make_shared<asio::steady_timer>(acceptor_.get_executor(),
                                                  std::chrono::milliseconds(50));
    t->async_wait([this, t](const beast::error_code&) { doAccept(); });
    return;
  }
  // Every reply is a small frame sent once the request is read: with Nagle's
  // algorithm on, a reply written while an earlier one is still unacknowledged
  // waits for the peer's delayed ACK (~40 ms on Linux).
  beast::error_code ignored;
  socket.set_option(tcp::no_delay(true), ignored);
  std::make_shared<HttpConnection>(*this, l, std::move(socket))->start();
  doAccept();
}

// ---- Session ---------------------------------------------------------------

void Session::start(http::request<http::string_body> req) {
  websocket::stream_base::timeout t =
      websocket::stream_base::timeout::suggested(beast::role_type::server);
  t.handshake_timeout = std::chrono::seconds(5);  // also bounds the close handshake
  t.idle_timeout = std::chrono::seconds(30);      // ping, then drop a silent peer
  t.keep_alive_pings = true;
  ws_.set_option(t);
  ws_.set_option(websocket::stream_base::decorator([](websocket::response_type& res) {
    res.set(http::field::server, "roomkeeper-dispatch");
  }));
  // The size limit is ours (onRead), not Beast's: Beast answers a frame over
  // its limit with close 1009 and then closes the socket with the rest of
  // the frame unread, so the kernel resets the connection and the client,
  // still writing, usually loses the close frame (1006).
  ws_.read_message_max(0);
  ws_.async_accept(req,
                   beast::bind_front_handler(&Session::onAccept, shared_from_this()));
}

void Session::onAccept(beast::error_code ec) {
  if (ec) return;  // handshake failed: nothing was registered
  id_ = gw_.nextSessionId(loop_);
  loop_.addSession(shared_from_this());
  // The remote address, for roomkeeper's per-address limits (--max-per-ip,
  // --connects-per-ip).
  beast::error_code aec;
  const std::string address =
      beast::get_lowest_layer(ws_).socket().remote_endpoint(aec).address().to_string();
  const Result r = loop_.keeper().connect(
      id_, roomkeeper::ClientAddress{aec ? std::string_view{} : std::string_view{address}},
      nullptr);  // arms the auth deadline
  if (r == Result::kOk) {
    registered_ = true;
  } else if (r == Result::kRateLimited) {
    loop_.removeSession(id_);
    std::fprintf(stderr, "dispatch_server: %s: too many connections from %s, closing\n",
                 id_.c_str(), address.c_str());
    requestClose(websocket::close_reason(websocket::close_code::policy_error, "rate_limit"));
  } else {
    loop_.removeSession(id_);
    // Only after shutdown() (ids are unique): the same close as everyone's.
    requestClose(websocket::close_reason(websocket::close_code::going_away, "shutdown"));
  }
  doRead();
}

void Session::doRead() {
  // At most one byte past the limit: enough to know a message is too big.
  const std::size_t room = gw_.options().maxMessageBytes + 1 - buffer_.size();
  reading_ = true;
  ws_.async_read_some(buffer_, room,
                      beast::bind_front_handler(&Session::onRead, shared_from_this()));
}

void Session::onRead(beast::error_code ec, std::size_t) {
  reading_ = false;
  if (ec) return finish(ec);
  if (buffer_.size() > gw_.options().maxMessageBytes) {
    // Too big: no more reading here. The close handshake (doWrite's
    // async_close) sends 1009, then reads and discards the rest of this
    // frame and anything after it until the client's close frame arrives,
    // so the client can read our close before the TCP connection goes.
    // Beast bounds that with the handshake timeout (5 s).
    buffer_.consume(buffer_.size());
    return requestClose(
        websocket::close_reason(websocket::close_code::too_big, "too_big"));
  }
  if (!ws_.is_message_done()) return doRead();
  const std::string text = beast::buffers_to_string(buffer_.data());
  buffer_.consume(buffer_.size());
  if (!closeRequested_ && !finished_) {  // closing: ignore the rest
    // Messages per socket: roomkeeper's "message" kind (kMessageKind).
    if (registered_ && loop_.keeper().allow(id_, kMessageKind) == Result::kRateLimited) {
      std::fprintf(stderr, "dispatch_server: %s: rate limit exceeded, closing\n",
                   id_.c_str());
      requestClose(
          websocket::close_reason(websocket::close_code::policy_error, "rate_limit"));
    } else if (!ws_.got_text()) {
      error(json(), "", "bad_frame", "binary frames are not supported; send JSON text");
    } else {
      handleMessage(text);
    }
  }
  doRead();  // keep reading: even while closing, the peer's close frame must arrive
}

void Session::finish(beast::error_code ec) {
  if (finished_) return;
  finished_ = true;
  if (registered_) {
    // A close handshake (either side's, including ours for a frame over the
    // limit): the ordinary disconnect. Anything else (EOF or reset without a
    // close frame, timeout): the transport lost it, so forceCleanup (same
    // cleanup, counted in forcedCleanups).
    const bool lost = ec != websocket::error::closed && !closeRequested_;
    const Result r = lost ? loop_.keeper().forceCleanup(id_) : loop_.keeper().disconnect(id_);
    (void)r;  // kNotConnected after an auth timeout, kShutDown after shutdown: fine
    loop_.removeSession(id_);
  }
  outbox_.clear();
  dropTimer_.cancel();
  teardown();
}

void Session::send(std::string msg) {
  if (closeRequested_ || finished_) return;
  if (outbox_.size() >= gw_.options().maxOutbox) {
    // A peer that does not read: close it rather than buffer without bound.
    // What is queued is dropped, except the message being written (a frame
    // cannot be cut); the close frame follows it, so the client, if it
    // reads again, learns why (1008 send_queue_full) instead of seeing a
    // bare reset. If it has not read that far within 5 s, drop the TCP
    // connection.
    std::fprintf(stderr, "dispatch_server: %s: send queue full, closing\n", id_.c_str());
    if (writing_) {
      outbox_.erase(outbox_.begin() + 1, outbox_.end());
    } else {
      outbox_.clear();
    }
    requestClose(
        websocket::close_reason(websocket::close_code::policy_error, "send_queue_full"));
    dropTimer_.expires_after(std::chrono::seconds(5));
    dropTimer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (!ec && !self->finished_) self->teardown();
    });
    return;
  }
  outbox_.push_back(std::move(msg));
  if (!writing_) doWrite();
}

void Session::doWrite() {
  if (outbox_.empty()) {
    if (closeRequested_ && !closing_ && !finished_) {
      closing_ = true;
      ws_.async_close(closeReason_, [self = shared_from_this()](beast::error_code ec) {
        // With a read outstanding, the read loop ends (closed or failed)
        // and cleans up; without one (a frame over the limit), here.
        if (!self->reading_) return self->finish(websocket::error::closed);
        if (ec) self->teardown();
      });
    }
    return;
  }
  writing_ = true;
  ws_.text(true);
  ws_.async_write(asio::buffer(outbox_.front()),
                  beast::bind_front_handler(&Session::onWrite, shared_from_this()));
}

void Session::onWrite(beast::error_code ec, std::size_t) {
  writing_ = false;
  if (ec) return teardown();
  outbox_.pop_front();
  doWrite();
}

void Session::requestClose(websocket::close_reason reason) {
  if (closeRequested_ || finished_) return;
  closeRequested_ = true;
  closeReason_ = reason;
  if (!writing_) doWrite();
}

void Session::teardown() {
  beast::error_code ignored;
  beast::get_lowest_layer(ws_).socket().shutdown(tcp::socket::shutdown_both, ignored);
  beast::get_lowest_layer(ws_).socket().close(ignored);
}

// ---- Messages ----------------------------------------------------------------

void Session::ack(const json& id, const std::string& forEvent, json data) {
  data["for"] = forEvent;
  json msg = {{"event", "ack"}, {"data", std::move(data)}};
  if (!id.is_null()) msg["id"] = id;
  send(dump(msg));
}

void Session::error(const json& id, const std::string& forEvent, std::string_view code,
                    std::string message) {
  json msg = {{"event", "error"},
              {"data", {{"for", forEvent}, {"code", sv(code)}, {"message", message}}}};
  if (!id.is_null()) msg["id"] = id;
  send(dump(msg));
}

void Session::resultError(const json& id, const std::string& forEvent, Result r) {
  error(id, forEvent, roomkeeper::toString(r),
        "roomkeeper refused: " + sv(roomkeeper::toString(r)));
}

std::optional<std::string> Session::idField(const json& data, const char* key) const {
  auto it = data.find(key);
  if (it == data.end()) return std::nullopt;
  std::string v;
  if (it->is_string()) {
    v = it->get<std::string>();
  } else if (it->is_number_integer()) {
    v = it->dump();
  } else {
    return std::nullopt;
  }
  if (!validId(v)) return std::nullopt;
  return v;
}

void Session::handleMessage(std::string_view text) {
  const json msg = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (msg.is_discarded()) return error(json(), "", "bad_json", "the message is not JSON");
  if (!msg.is_object()) {
    return error(json(), "", "bad_request",
                 R"(expected {"event": "...", "data": {...}})");
  }
  json id;
  if (auto it = msg.find("id"); it != msg.end()) {
    if (!it->is_number_integer() && !it->is_string())
      return error(json(), "", "bad_request", "\"id\" must be an integer or a string");
    if (it->is_string() && it->get_ref<const std::string&>().size() > 64)
      return error(json(), "", "bad_request", "\"id\" is too long");
    id = *it;
  }
  auto ev = msg.find("event");
  if (ev == msg.end() || !ev->is_string())
    return error(id, "", "bad_request", "\"event\" must be a string");
  const std::string& event = ev->get_ref<const std::string&>();
  if (event.size() > 64) return error(id, "", "unknown_event", "unknown event");
  json data = json::object();
  if (auto d = msg.find("data"); d != msg.end()) {
    if (!d->is_object())
      return error(id, event, "bad_request", "\"data\" must be an object");
    data = *d;
  }
  route(event, id, data);
}

void Session::route(const std::string& ev, const json& id, const json& data) {
  if (ev == "ping") return ack(id, ev, {{"pong", true}});
  if (ev == "authenticate") return onAuthenticate(ev, id, data);
  static const std::set<std::string> kKnown = {
      "subscribeToJob",     "unsubscribeFromJob",   "thread.subscribe",
      "thread.unsubscribe", "subscribeToAnalytics", "unsubscribeFromAnalytics",
      "typing.start",       "typing.stop",          "message.send",
      "job.update"};
  if (!kKnown.count(ev)) return error(id, ev, "unknown_event", "unknown event: " + ev);
  if (!identity_) return error(id, ev, "not_authenticated", "authenticate first");

  if (ev == "subscribeToJob" || ev == "unsubscribeFromJob") {
    const auto job = idField(data, "jobId");
    if (!job) return error(id, ev, "bad_request", "data.jobId: [A-Za-z0-9_.-]{1,64}");
    const std::string room = "job:" + *job;
    return ev == "subscribeToJob" ? joinRoom(ev, id, room, {{"jobId", *job}})
                                  : leaveRoom(ev, id, room, {{"jobId", *job}});
  }
  if (ev == "thread.subscribe" || ev == "thread.unsubscribe") {
    const auto thread = idField(data, "threadId");
    if (!thread)
      return error(id, ev, "bad_request", "data.threadId: [A-Za-z0-9_.-]{1,64}");
    const std::string room = "thread:" + *thread;
    if (ev == "thread.subscribe") return joinRoom(ev, id, room, {{"threadId", *thread}});
    // Leaving a thread ends this user's typing indicator in it.
    (void)loop_.keeper().stopTyping(id_, *thread);
    return leaveRoom(ev, id, room, {{"threadId", *thread}});
  }
  if (ev == "subscribeToAnalytics") return onAnalytics(true, ev, id, data);
  if (ev == "unsubscribeFromAnalytics") return onAnalytics(false, ev, id, data);
  if (ev == "typing.start") return onTyping(true, ev, id, data);
  if (ev == "typing.stop") return onTyping(false, ev, id, data);
  if (ev == "message.send") return onMessageSend(ev, id, data);
  if (ev == "job.update") return onJobUpdate(ev, id, data);
}

void Session::onAuthenticate(const std::string& ev, const json& id, const json& data) {
  if (identity_) return error(id, ev, "already_authenticated", "already authenticated");
  auto tok = data.find("token");
  if (tok == data.end() || !tok->is_string())
    return error(id, ev, "bad_request", "data.token must be a string");
  Identity who;
  const TokenCheck check =
      verifyDemoToken(tok->get_ref<const std::string&>(), unixNow(), &who);
  if (check == TokenCheck::kInvalid) {
    error(id, ev, "auth_failed", "invalid token");
    return requestClose(websocket::close_reason(
        static_cast<websocket::close_code>(kCloseAuthFailed), "auth_failed"));
  }
  // An expired token is an ordinary event in a client's life, not an attack:
  // the connection stays open, unauthenticated (the auth deadline still
  // runs), so that the client can send a fresh one.
  if (check == TokenCheck::kExpired)
    return error(id, ev, "token_expired", "the token has expired; send a fresh one");
  // On refusal (too_many_sessions) nothing changes: still unauthenticated.
  const Result r = loop_.keeper().authenticate(id_, who.userId);  // cancels the deadline
  if (r != Result::kOk) return resultError(id, ev, r);
  identity_ = std::move(who);
  std::vector<std::string> rooms = {"role:" + identity_->role,
                                    "user:" + identity_->userId};
  if (!identity_->crewId.empty()) rooms.push_back("crew:" + identity_->crewId);
  // The connection's rooms in one call (their lookups overlap); each gets
  // what trackRoom would give it, and the first refusal is the answer.
  std::vector<Result> joined;
  (void)loop_.keeper().trackRooms(id_, rooms, &joined);
  for (const Result j : joined)
    if (!roomkeeper::ok(j)) return resultError(id, ev, j);
  ack(id, ev,
      {{"userId", identity_->userId},
       {"role", identity_->role},
       {"crewId", identity_->crewId},
       {"rooms", rooms}});
}

void Session::joinRoom(const std::string& ev, const json& id, const std::string& room,
                       json extra) {
  const Result r = loop_.keeper().trackRoom(id_, room);
  if (!roomkeeper::ok(r)) return resultError(id, ev, r);
  extra["room"] = room;
  extra["result"] = sv(roomkeeper::toString(r));
  ack(id, ev, std::move(extra));
}

void Session::leaveRoom(const std::string& ev, const json& id, const std::string& room,
                        json extra) {
  const Result r = loop_.keeper().untrackRoom(id_, room);
  if (!roomkeeper::ok(r)) return resultError(id, ev, r);
  extra["room"] = room;
  extra["result"] = sv(roomkeeper::toString(r));
  ack(id, ev, std::move(extra));
}

void Session::onAnalytics(bool subscribe, const std::string& ev, const json& id,
                          const json& data) {
  if (identity_->role == "crew")
    return error(id, ev, "forbidden", "analytics are for admins and dispatchers");
  const auto type = idField(data, "type");
  if (!type) return error(id, ev, "bad_request", "data.type: [A-Za-z0-9_.-]{1,64}");
  const std::string room = "analytics:" + *type;
  roomkeeper::SyncKeeper& k = loop_.keeper();
  if (subscribe) {
    const Result r = k.trackRoom(id_, room);
    if (!roomkeeper::ok(r)) return resultError(id, ev, r);
    const Result b = k.trackRoom(id_, "analytics:subscribers");
    if (!roomkeeper::ok(b)) {
      if (r == Result::kOk) (void)k.untrackRoom(id_, room);
      return resultError(id, ev, b);
    }
    analyticsTypes_.insert(*type);
    return ack(id, ev, {{"type", *type}, {"room", room}, {"result", sv(toString(r))}});
  }
  const Result r = k.untrackRoom(id_, room);
  if (!roomkeeper::ok(r)) return resultError(id, ev, r);
  analyticsTypes_.erase(*type);
  // The base room goes with the session's last dashboard.
  if (analyticsTypes_.empty()) (void)k.untrackRoom(id_, "analytics:subscribers");
  ack(id, ev, {{"type", *type}, {"room", room}, {"result", sv(toString(r))}});
}

void Session::onTyping(bool start, const std::string& ev, const json& id,
                       const json& data) {
  const auto thread = idField(data, "threadId");
  if (!thread) return error(id, ev, "bad_request", "data.threadId: [A-Za-z0-9_.-]{1,64}");
  roomkeeper::SyncKeeper& k = loop_.keeper();
  if (start && !k.isMember(id_, "thread:" + *thread))
    return error(id, ev, "not_subscribed", "subscribe to the thread first");
  // roomkeeper emits typingStarted/typingStopped to the thread's other
  // members, persists the row and arms (or pushes back) the auto-clear.
  const Result r = start ? k.startTyping(id_, *thread) : k.stopTyping(id_, *thread);
  if (!roomkeeper::ok(r)) return resultError(id, ev, r);
  ack(id, ev, {{"threadId", *thread}, {"result", sv(toString(r))}});
}

void Session::onMessageSend(const std::string& ev, const json& id, const json& data) {
  const auto thread = idField(data, "threadId");
  auto text = data.find("text");
  if (!thread || text == data.end() || !text->is_string() ||
      text->get_ref<const std::string&>().size() > 4096)
    return error(id, ev, "bad_request", "data.threadId and data.text (<= 4096 bytes)");
  const std::string room = "thread:" + *thread;
  roomkeeper::SyncKeeper& k = loop_.keeper();
  if (!k.isMember(id_, room))
    return error(id, ev, "not_subscribed", "subscribe to the thread first");
  const json payload = {
      {"threadId", *thread}, {"userId", identity_->userId}, {"text", *text}};
  roomkeeper::BroadcastTargets to;
  to.rooms.push_back(room);
  to.sender = id_;
  const std::size_t n = k.broadcast(to, "messageCreated", dump(payload));
  ack(id, ev, {{"threadId", *thread}, {"delivered", n}});
}

void Session::onJobUpdate(const std::string& ev, const json& id, const json& data) {
  if (identity_->role == "crew")
    return error(id, ev, "forbidden", "job updates are for admins and dispatchers");
  const auto job = idField(data, "jobId");
  const auto status = idField(data, "status");
  if (!job || !status) return error(id, ev, "bad_request", "data.jobId and data.status");
  const json payload = {{"jobId", *job}, {"status", *status}, {"by", identity_->userId}};
  roomkeeper::BroadcastTargets to;
  const std::string room = "job:" + *job;
  to.rooms.push_back(room);
  to.sender = id_;
  const std::size_t n = loop_.keeper().broadcast(to, "jobUpdated", dump(payload));
  ack(id, ev, {{"jobId", *job}, {"delivered", n}});
}

void raiseFileLimit() {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

}  // namespace

int runServer(const ServerOptions& opt) {
#if !DISPATCH_CLUSTER
  if (!opt.redis.empty()) {
    std::fprintf(stderr, "dispatch_server: built without roomkeeper::cluster; --redis "
                         "needs libhiredis-dev\n");
    return 1;
  }
#endif
  raiseFileLimit();
  std::string err;
  std::unique_ptr<TypingStore> store = TypingStore::open(opt.db, &err);
  if (!store) {
    std::fprintf(stderr, "dispatch_server: database %s: %s\n", opt.db.c_str(),
                 err.c_str());
    return 1;
  }
  // Nobody is connected yet, so nobody is typing: rows left by a crash go.
  const std::int64_t stale = store->clearAll();
  if (stale > 0)
    std::printf("dispatch_server: cleared %lld stale typing rows\n",
                static_cast<long long>(stale));

  ServerOptions o = opt;
#if !DISPATCH_CLUSTER
  if (o.threads > 1) {
    std::fprintf(stderr, "dispatch_server: built without roomkeeper::cluster: 1 event loop "
                         "(--threads %d needs it to join the loops' Keepers)\n", o.threads);
    o.threads = 1;
  }
#endif
  auto gw = std::make_unique<Gateway>(o, *store);
  if (!gw->listen(&err)) {
    std::fprintf(stderr, "dispatch_server: %s\n", err.c_str());
    return 1;
  }
  std::printf(
      "dispatch_server: db %s, %zu event loops (a Keeper each), auth timeout %ld ms, "
      "typing timeout %ld ms\n",
      opt.db.c_str(), gw->loopCount(), opt.authTimeoutMs, opt.typingTimeoutMs);
  std::printf("listening on %s:%u\n", opt.host.c_str(), unsigned(gw->port()));
  std::fflush(stdout);
  gw->start();

  gw->run();

  const roomkeeper::MemoryStats st = gw->memoryStats();
  const std::size_t left = gw->sessionCount();
  // Every typing call roomkeeper made, written (a database that keeps
  // failing leaves rows, and the exit status says so).
  if (!store->flush())
    std::printf("dispatch_server: %zu typing calls still not written after 10 s\n",
                store->queued());
  const std::int64_t rows = store->countRows();
  gw.reset();
  std::printf(
      "dispatch_server: shutdown complete: connectedClients=%zu typingTimers=%zu "
      "trackedRooms=%zu rooms=%zu connectionTimers=%zu serverSessions=%zu "
      "typingRows=%lld\n",
      st.connectedClients, st.typingTimers, st.trackedRooms, st.rooms,
      st.connectionTimers, left, static_cast<long long>(rows));
  std::fflush(stdout);
  // serverSessions counts too: a connection still in the map had not
  // finished its close handshake when the grace period ran out.
  const bool clean = st.connectedClients == 0 && st.typingTimers == 0 &&
                     st.trackedRooms == 0 && st.rooms == 0 && st.connectionTimers == 0 &&
                     left == 0 && rows == 0;
  if (!clean) {
    std::printf(
        "dispatch_server: exit status 2: something was left (every count above "
        "should be 0; serverSessions are connections whose close had not finished "
        "within the %ld ms grace)\n",
        opt.shutdownGraceMs);
    std::fflush(stdout);
  }
  return clean ? 0 : 2;
}

}  // namespace dispatch
