// SPDX-License-Identifier: MIT
// dispatch_load: plays a dispatch day against dispatch_server on loopback
// and shows, in numbers, that nothing is left behind.
//
// N clients connect, one every millisecond (--arrival-rate 1000; at most
// --concurrency 64 at a time; --arrival-rate 0: each the moment another is
// ready). Most log in, subscribe to a thread and a job (admins
// and dispatchers also to an analytics dashboard and post a job update),
// type with restarts, post a message; some stop typing. At the peak (all of
// them connected, plus the ones that never log in) the server's GET /stats
// is read. Then they go: clean closes, unsubscribes, TCP resets and FINs
// without a close frame, and lingerers that stay until the server's typing
// auto-clear has cleared their indicators. The never-logged-in ones wait to
// be closed by the server at the auth deadline (close code 4001). Then
// /stats is polled until the server is back to zero, and a table is printed,
// with the latencies it measured on its one steady clock: login round trip
// (TCP connect to the last join's ack) and typing fan-out (a typing.start
// sent to typingStarted received by another member of the thread).
//
// With --stay N --server-pid PID, N more clients then log in and start
// typing in one thread, dispatch_load sends SIGTERM to the server and checks
// that each of them hears serverShutdown and is closed with 1001. With
// --server-pid it also reads the server's CPU time and RSS from /proc.
//
//   dispatch_load --port 8080 --clients 500
//   dispatch_load --port 8080 --clients 500 --stay 20 --server-pid 4242
//
// Exit status: 0 = PASS (after: connectedClients, typingTimers,
// trackedRooms, rooms, connectionTimers, typingRows, serverSessions all 0,
// no client failed, every stayer told), 1 = FAIL, 2 = bad usage or server
// not reachable.
#include <signal.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/coroutine.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/websocket.hpp>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "demo_http.h"
#include "demo_token.h"

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// ---- The plan: what each client does --------------------------------------

enum class Kind {
  kAbruptRst,     // drops the TCP connection with a reset, no close frame
  kAbruptFin,     // closes the TCP connection (FIN), no close frame
  kClean,         // a WebSocket close handshake
  kUnsubscriber,  // unsubscribes from everything, then a clean close
  kLinger,        // stays until its typing indicator auto-clears, then closes
  kNeverAuth,     // connects, never logs in: the server closes it (4001)
  kStay,          // after the run: stays, typing, until the server shuts down
};

const char* kindName(Kind k) {
  switch (k) {
    case Kind::kAbruptRst:
      return "abrupt (TCP reset)";
    case Kind::kAbruptFin:
      return "abrupt (TCP FIN, no close frame)";
    case Kind::kClean:
      return "clean close";
    case Kind::kUnsubscriber:
      return "unsubscribe all, then clean close";
    case Kind::kLinger:
      return "linger past the typing auto-clear";
    case Kind::kNeverAuth:
      return "never log in (closed by the server)";
    case Kind::kStay:
      return "stay through the server's shutdown";
  }
  return "?";
}

struct Plan {
  Kind kind = Kind::kClean;
  bool stopTyping = false;
  dispatch::Identity who;
  std::string threadId, jobId, analyticsType;
  std::size_t server = 0;  // which of --ports (client i: i % servers)
  bool privileged() const { return who.role != "crew"; }
};

/// Client i's part in the day. Tenths: 0 reset, 1 FIN, 2 clean while still
/// typing, 3 unsubscriber, 4-5 clean after typing.stop, 6-7 clean while
/// typing (7 is a second device of 6's user: one indicator, two sessions),
/// 8 linger, 9 never logs in.
Plan planFor(int i, int n) {
  Plan p;
  const int tenth = i % 10;
  switch (tenth) {
    case 0:
      p.kind = Kind::kAbruptRst;
      break;
    case 1:
      p.kind = Kind::kAbruptFin;
      break;
    case 3:
      p.kind = Kind::kUnsubscriber;
      p.stopTyping = true;
      break;
    case 4:
    case 5:
      p.kind = Kind::kClean;
      p.stopTyping = true;
      break;
    case 8:
      p.kind = Kind::kLinger;
      break;
    case 9:
      p.kind = Kind::kNeverAuth;
      break;
    default:
      p.kind = Kind::kClean;
      break;
  }
  const int user = tenth == 7 ? i - 1 : i;
  const int crews = std::max(1, n / 20), threads = std::max(1, n / 8),
            jobs = std::max(1, n / 5);
  p.who.userId = "u" + std::to_string(user);
  p.who.role = user % 7 == 0 ? "admin" : (user % 7 <= 2 ? "dispatcher" : "crew");
  p.who.crewId = p.who.role == "admin" ? "" : "c" + std::to_string(user % crews);
  p.threadId = "t" + std::to_string(user % threads);
  p.jobId = "j" + std::to_string(i % jobs);
  static const char* kTypes[] = {"revenue", "jobs", "crews"};
  p.analyticsType = kTypes[user % 3];
  return p;
}

// ---- The controller ---------------------------------------------------------

class Client;

struct Options {
  std::string host = "127.0.0.1";
  unsigned short port = 0;
  // --ports a,b,c: several servers of one cluster; client i goes to the
  // (i % n)-th, so the two devices of a user (clients i-1, i) are on two
  // servers, and /stats is the sum over all of them.
  std::vector<unsigned short> ports;
  int clients = 500;
  int concurrency = 64;
  // New clients a second (open loop: one every 1/rate s, each on its own,
  // as users arrive), still at most `concurrency` at a time; 0 = closed
  // loop: a new client the moment one is ready, so the first `concurrency`
  // start in the same instant and their successors follow in waves.
  int arrivalRate = 1000;
  int stay = 0;         // clients kept connected through the server's SIGTERM
  pid_t serverPid = 0;  // for --stay's SIGTERM and /proc readings
};

/// The server's CPU time (user + system, ms) and resident set (KiB) from
/// /proc; false if they cannot be read (not Linux, another user's process).
struct ProcSample {
  double cpuMs = 0;
  long rssKb = 0;
};
bool readProc(pid_t pid, ProcSample* out) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  // Fields after the command name, which is in parentheses and may hold
  // spaces: state is field 3, utime and stime are fields 14 and 15.
  const std::size_t close = line.rfind(')');
  if (close == std::string::npos) return false;
  std::istringstream rest(line.substr(close + 2));
  std::string field;
  unsigned long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && rest >> field; ++i) {
    if (i == 14) utime = std::strtoull(field.c_str(), nullptr, 10);
    if (i == 15) stime = std::strtoull(field.c_str(), nullptr, 10);
  }
  const long ticks = sysconf(_SC_CLK_TCK);
  if (ticks <= 0) return false;
  out->cpuMs = 1000.0 * double(utime + stime) / double(ticks);
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  while (std::getline(status, line))
    if (line.rfind("VmRSS:", 0) == 0) {
      out->rssKb = std::strtol(line.c_str() + 6, nullptr, 10);
      return true;
    }
  return false;
}

/// p50, p99 and max of `v` (nearest rank), in its units; sorts `v`.
struct Quantiles {
  std::size_t n = 0;
  double p50 = 0, p99 = 0, max = 0;
};
Quantiles quantiles(std::vector<double>& v) {
  Quantiles q;
  q.n = v.size();
  if (v.empty()) return q;
  std::sort(v.begin(), v.end());
  auto rank = [&v](double f) {
    const std::size_t r = static_cast<std::size_t>(f * double(v.size()) + 0.999999);
    return v[std::min(v.size() - 1, r == 0 ? 0 : r - 1)];
  };
  q.p50 = rank(0.50);
  q.p99 = rank(0.99);
  q.max = v.back();
  return q;
}

class Load {
 public:
  Load(asio::io_context& ioc, Options opt);
  int run();

  // Called by clients, on the io thread.
  void onConnected(Client& c);
  void onReady(Client& c);
  void onLingering(Client& c);
  void onFinished(Client& c, bool ok, const std::string& why);
  void onEvent(const std::string& event, const json& data);
  /// A client's last join was acknowledged, `ms` after its TCP connect began.
  void onLoggedIn(double ms) { loginMs_.push_back(ms); }
  /// A client is about to send the typing.start that starts its indicator.
  void onTypingStart(const Plan& p);
  void onStayReady();
  void onUnexpectedError(const std::string& text);
  void onRestart() { ++restarts_; }
  /// Every WebSocket message a client sends or receives.
  void countMessage() { ++messages_; }

  const tcp::endpoint& endpoint(std::size_t server) const { return endpoints_[server]; }
  std::string hostHeader(std::size_t server = 0) const {
    return opt_.host + ":" + std::to_string(opt_.ports[server]);
  }

 private:
  std::optional<json> stats();
  void launchActive();
  void activeProgress();
  void takePeak();
  void maybeStartLinger();
  void pollLinger();
  void pollSettle();
  void progress(bool final);
  void schedule(milliseconds d, std::function<void()> fn);
  void printTable();
  void printTimes();
  bool afterIsClean() const;
  static bool serverClean(const json& s);
  void startStay();
  void maybeSignal();
  void finishStay();

  asio::io_context& ioc_;
  Options opt_;
  std::vector<tcp::endpoint> endpoints_;  // one per server (--ports)
  asio::steady_timer progressTimer_;
  Clock::time_point started_ = Clock::now();
  Clock::time_point deadline_{};
  Clock::time_point pollUntil_{};
  std::string phase_ = "login";
  long authTimeoutMs_ = 0, typingTimeoutMs_ = 0;

  std::vector<std::shared_ptr<Client>> active_, neverAuth_, lingerers_, stayers_;
  std::size_t nextActive_ = 0;
  asio::steady_timer arrivalTimer_;   // paces launchActive (--arrival-rate)
  bool arrivalArmed_ = false;
  Clock::time_point nextArrival_{};   // the earliest start of the next client
  int connected_ = 0, open_ = 0, ready_ = 0, activeFailed_ = 0;
  int naConnected_ = 0, naFailed_ = 0, naFinished_ = 0;
  Clock::time_point lastNeverAuthConnect_{};
  int stayReady_ = 0, stayFinished_ = 0, stayOk_ = 0, stayEarly_ = 0;
  bool staySignalled_ = false;
  json stayStats_;

  // Latencies (ms) and when each (thread, user) indicator's start was sent.
  std::vector<double> loginMs_, fanoutMs_;
  std::map<std::string, Clock::time_point> typingSentAt_;
  Clock::time_point loginStarted_{}, loginEnded_{};
  std::uint64_t messages_ = 0, messagesAtLoginStart_ = 0, messagesAtLoginEnd_ = 0;
  ProcSample procStart_, procPeak_;
  bool procOk_ = false;
  int lingering_ = 0, lingerGone_ = 0, finishedNonLinger_ = 0, finished_ = 0, failed_ = 0;
  bool peakTaken_ = false, lingerStarted_ = false;
  int unexpectedErrors_ = 0, restarts_ = 0;
  std::map<Kind, int> okByKind_;
  std::map<std::string, int> events_;
  std::vector<std::string> failures_;
  bool timedOut_ = false;

  json before_, peak_, lingerStats_, after_;
  bool lingerOk_ = false;
};

// ---- A client: a stackless coroutine (asio::coroutine) ----------------------

class Client : public std::enable_shared_from_this<Client>, private asio::coroutine {
 public:
  Client(asio::io_context& ioc, Load& load, Plan plan)
      : load_(load), plan_(std::move(plan)), ws_(ioc), timer_(ioc) {}

  void start() { step(); }
  /// Resumes a client parked at a barrier (the peak, the end of lingering).
  void release() {
    asio::post(timer_.get_executor(),
               [self = shared_from_this()] { self->resume(kPark); });
  }
  const Plan& plan() const { return plan_; }
  bool reachedReady() const { return reachedReady_; }
  bool reachedLinger() const { return reachedLinger_; }
  bool reachedConnected() const { return reachedConnected_; }

 private:
  enum Wait { kNone, kOp, kReply, kPark };

  void step();
  void resume(Wait w) {
    if (wait_ != w || done_) return;
    wait_ = kNone;
    step();
  }
  void fail(const std::string& what) { finish(false, what); }
  void finish(bool ok, const std::string& why) {
    if (done_) return;
    done_ = true;
    wait_ = kNone;
    timer_.cancel();
    load_.onFinished(*this, ok, why);
  }

  // Suspending operations: each sets wait_ and resumes the coroutine once.
  void opConnect() {
    wait_ = kOp;
    beast::get_lowest_layer(ws_).expires_after(std::chrono::seconds(10));
    beast::get_lowest_layer(ws_).async_connect(
        load_.endpoint(plan_.server), [self = shared_from_this()](beast::error_code ec) {
          self->opEc_ = ec;
          self->resume(kOp);
        });
  }
  void opHandshake() {
    wait_ = kOp;
    ws_.async_handshake(load_.hostHeader(plan_.server), "/",
                        [self = shared_from_this()](beast::error_code ec) {
                          self->opEc_ = ec;
                          self->resume(kOp);
                        });
  }
  void opSleep(milliseconds d) {
    wait_ = kOp;
    timer_.expires_after(d);
    timer_.async_wait([self = shared_from_this()](beast::error_code) {
      self->opEc_ = {};
      self->resume(kOp);
    });
  }
  void opClose() {
    wait_ = kOp;
    ws_.async_close(websocket::close_code::normal,
                    [self = shared_from_this()](beast::error_code ec) {
                      self->opEc_ = ec;
                      self->resume(kOp);
                    });
  }
  void park() { wait_ = kPark; }
  /// Sends {"event","id","data"} and resumes when the ack or error with that
  /// id has arrived (and the write has completed).
  void request(const char* event, json data) {
    wait_ = kReply;
    waitId_ = ++nextId_;
    writeDone_ = replyArrived_ = replyOk_ = false;
    opEc_ = {};
    lastEvent_ = event;
    out_ = json{{"event", event}, {"id", waitId_}, {"data", std::move(data)}}.dump();
    load_.countMessage();
    ws_.async_write(asio::buffer(out_),
                    [self = shared_from_this()](beast::error_code ec, std::size_t) {
                      self->writeDone_ = true;
                      self->opEc_ = ec;
                      if (ec || self->replyArrived_) self->resume(kReply);
                    });
  }
  /// After a request: true if it was acknowledged; otherwise fails the
  /// client and returns false.
  bool replied() {
    const std::string ev = lastEvent_;
    if (opEc_) {
      fail(ev + ": write: " + opEc_.message());
    } else if (!replyArrived_) {
      fail(ev + ": no reply, read ended: " + readEc_.message());
    } else if (!replyOk_) {
      fail(ev + ": " + replyData_.dump());
    } else {
      return true;
    }
    return false;
  }

  void startReading() {
    ws_.async_read(rbuf_, [self = shared_from_this()](beast::error_code ec, std::size_t) {
      self->onRead(ec);
    });
  }
  void onRead(beast::error_code ec) {
    if (ec) {
      readDone_ = true;
      readEc_ = ec;
      closeCode_ = ws_.reason().code;  // the server's close code, if it sent one
      resume(kReply);
      resume(kPark);
      return;
    }
    const std::string text = beast::buffers_to_string(rbuf_.data());
    rbuf_.consume(rbuf_.size());
    load_.countMessage();
    const json m = json::parse(text, nullptr, false);
    const std::string event =
        m.is_object() && m.contains("event") && m["event"].is_string()
            ? m["event"].get<std::string>()
            : "";
    const bool isReply = (event == "ack" || event == "error") && m.contains("id") &&
                         m["id"].is_number_integer() && m["id"].get<int>() == waitId_;
    if (isReply) {
      replyArrived_ = true;
      replyOk_ = event == "ack";
      replyData_ = m.value("data", json::object());
      if (replyOk_ && replyData_.value("result", "") == "already_done" &&
          std::string(lastEvent_) == "typing.start")
        load_.onRestart();
      if (writeDone_) resume(kReply);
    } else if (event == "error") {
      load_.onUnexpectedError(text);
    } else {
      if (event == "serverShutdown") heardShutdown_ = true;
      load_.onEvent(event.empty() ? "(not JSON)" : event,
                    m.is_object() ? m.value("data", json::object()) : json::object());
    }
    startReading();
  }

  void dropTcp(bool reset) {
    beast::error_code ignored;
    auto& sock = beast::get_lowest_layer(ws_).socket();
    if (reset) {
      sock.set_option(asio::socket_base::linger(true, 0), ignored);
    } else {
      sock.shutdown(tcp::socket::shutdown_both, ignored);
    }
    sock.close(ignored);
  }

  Load& load_;
  Plan plan_;
  websocket::stream<beast::tcp_stream> ws_;
  asio::steady_timer timer_;
  beast::flat_buffer rbuf_;
  std::string out_;
  Wait wait_ = kNone;
  bool done_ = false;
  beast::error_code opEc_, readEc_;
  bool readDone_ = false;
  std::uint16_t closeCode_ = 0;
  int nextId_ = 0, waitId_ = 0;
  bool writeDone_ = false, replyArrived_ = false, replyOk_ = false;
  json replyData_;
  const char* lastEvent_ = "";
  bool reachedReady_ = false, reachedLinger_ = false, reachedConnected_ = false;
  bool heardShutdown_ = false;
  Clock::time_point connectStarted_{};
};

#include <boost/asio/yield.hpp>

void Client::step() {
  if (done_) return;
  reenter(this) {
    connectStarted_ = Clock::now();
    yield opConnect();
    if (opEc_) return fail("connect: " + opEc_.message());
    {
      // Requests are small and each waits for its reply: no Nagle delay.
      beast::error_code ignored;
      beast::get_lowest_layer(ws_).socket().set_option(tcp::no_delay(true), ignored);
    }
    beast::get_lowest_layer(ws_).expires_never();
    ws_.set_option(websocket::stream_base::timeout::suggested(beast::role_type::client));
    yield opHandshake();
    if (opEc_) return fail("handshake: " + opEc_.message());
    reachedConnected_ = true;
    load_.onConnected(*this);
    startReading();

    if (plan_.kind == Kind::kNeverAuth) {
      // The server must close us at its auth deadline, with 4001.
      yield park();
      if (closeCode_ == 4001) return finish(true, "");
      return fail("expected close 4001 (auth_timeout), got " + readEc_.message() +
                  " code " + std::to_string(closeCode_));
    }

    yield request(
        "authenticate",
        {{"token", dispatch::makeDemoToken(plan_.who, dispatch::unixNow() + 3600)}});
    if (!replied()) return;
    yield request("thread.subscribe", {{"threadId", plan_.threadId}});
    if (!replied()) return;

    if (plan_.kind == Kind::kStay) {
      yield request("typing.start", {{"threadId", plan_.threadId}});
      if (!replied()) return;
      reachedReady_ = true;
      load_.onStayReady();
      yield park();  // until the server closes us
      if (heardShutdown_ && closeCode_ == 1001) return finish(true, "");
      return fail(std::string("at shutdown: ") +
                  (heardShutdown_ ? "heard serverShutdown" : "no serverShutdown") +
                  ", close code " + std::to_string(closeCode_));
    }

    yield request("subscribeToJob", {{"jobId", plan_.jobId}});
    if (!replied()) return;
    if (plan_.privileged()) {
      yield request("subscribeToAnalytics", {{"type", plan_.analyticsType}});
      if (!replied()) return;
    }
    load_.onLoggedIn(
        std::chrono::duration<double, std::milli>(Clock::now() - connectStarted_)
            .count());
    if (plan_.privileged()) {
      yield request("job.update", {{"jobId", plan_.jobId}, {"status", "en_route"}});
      if (!replied()) return;
    }
    // Typing, with restarts: the second and third start only push the
    // auto-clear back (result "already_done").
    load_.onTypingStart(plan_);
    yield request("typing.start", {{"threadId", plan_.threadId}});
    if (!replied()) return;
    yield opSleep(milliseconds(20));
    yield request("typing.start", {{"threadId", plan_.threadId}});
    if (!replied()) return;
    yield opSleep(milliseconds(20));
    yield request("typing.start", {{"threadId", plan_.threadId}});
    if (!replied()) return;
    yield request("message.send", {{"threadId", plan_.threadId}, {"text", "on my way"}});
    if (!replied()) return;
    if (plan_.stopTyping) {
      yield request("typing.stop", {{"threadId", plan_.threadId}});
      if (!replied()) return;
    }

    reachedReady_ = true;
    load_.onReady(*this);
    yield park();  // until the peak has been measured
    if (readDone_) return fail("closed by the server at the peak: " + readEc_.message());

    if (plan_.kind == Kind::kLinger) {
      reachedLinger_ = true;
      load_.onLingering(*this);
      yield park();  // until the auto-clear has been checked
      if (readDone_) return fail("closed by the server while lingering");
    }
    if (plan_.kind == Kind::kUnsubscriber) {
      yield request("unsubscribeFromJob", {{"jobId", plan_.jobId}});
      if (!replied()) return;
      yield request("thread.unsubscribe", {{"threadId", plan_.threadId}});
      if (!replied()) return;
      if (plan_.privileged()) {
        yield request("unsubscribeFromAnalytics", {{"type", plan_.analyticsType}});
        if (!replied()) return;
      }
    }
    if (plan_.kind == Kind::kAbruptRst || plan_.kind == Kind::kAbruptFin) {
      dropTcp(plan_.kind == Kind::kAbruptRst);
      return finish(true, "");
    }
    yield opClose();
    if (opEc_) return fail("close: " + opEc_.message());
    if (!readDone_) {
      yield park();  // the read ends when the close completes
    }
    finish(true, "");
  }
}

#include <boost/asio/unyield.hpp>

// ---- Load ----------------------------------------------------------------------

Load::Load(asio::io_context& ioc, Options opt)
    : ioc_(ioc), opt_(std::move(opt)), progressTimer_(ioc), arrivalTimer_(ioc) {
  for (unsigned short port : opt_.ports)
    endpoints_.emplace_back(asio::ip::make_address(opt_.host), port);
  for (int i = 0; i < opt_.clients; ++i) {
    Plan p = planFor(i, opt_.clients);
    p.server = static_cast<std::size_t>(i) % endpoints_.size();
    const Kind k = p.kind;
    auto c = std::make_shared<Client>(ioc_, *this, std::move(p));
    (k == Kind::kNeverAuth ? neverAuth_ : active_).push_back(c);
    if (k == Kind::kLinger) lingerers_.push_back(c);
  }
  // The stayers: users of their own, all in one thread, so that the
  // shutdown has typing indicators (and rows) to end.
  for (int i = 0; i < opt_.stay; ++i) {
    Plan p;
    p.kind = Kind::kStay;
    p.who = {"stay" + std::to_string(i), "dispatcher", "c-stay"};
    p.threadId = "t-stay";
    stayers_.push_back(std::make_shared<Client>(ioc_, *this, std::move(p)));
  }
}

std::optional<json> Load::stats() {
  // One server: its /stats. Several: the numbers summed (the rest from the
  // first), so every "back to zero" check covers the whole cluster.
  std::optional<json> sum;
  for (unsigned short port : opt_.ports) {
    std::string err;
    auto r = dispatch::httpGet(opt_.host, port, "/stats", &err);
    if (!r || r->status != 200) {
      std::fprintf(stderr, "dispatch_load: %s:%u %s\n", opt_.host.c_str(), port,
                   r ? "GET /stats: bad status" : err.c_str());
      return std::nullopt;
    }
    json j = json::parse(r->body, nullptr, false);
    if (!j.is_object()) return std::nullopt;
    if (!sum) {
      sum = std::move(j);
      continue;
    }
    for (auto& [k, v] : j.items())
      if (v.is_number_integer() && (*sum)[k].is_number_integer() && k != "authTimeoutMs" &&
          k != "typingTimeoutMs")
        (*sum)[k] = (*sum)[k].get<long long>() + v.get<long long>();
  }
  return sum;
}

void Load::schedule(milliseconds d, std::function<void()> fn) {
  auto t = std::make_shared<asio::steady_timer>(ioc_, d);
  t->async_wait([t, fn = std::move(fn)](beast::error_code) { fn(); });
}

int Load::run() {
  auto b = stats();
  if (!b) {
    std::fprintf(stderr, "dispatch_load: server at %s not reachable\n",
                 hostHeader().c_str());
    return 2;
  }
  before_ = *b;
  if (opt_.serverPid > 0) procOk_ = readProc(opt_.serverPid, &procStart_);
  authTimeoutMs_ = before_.value("authTimeoutMs", 30000L);
  typingTimeoutMs_ = before_.value("typingTimeoutMs", 5000L);
  std::printf(
      "dispatch_load: %d clients against %s (server: auth timeout %ld ms, "
      "typing auto-clear %ld ms)\n",
      opt_.clients, hostHeader().c_str(), authTimeoutMs_, typingTimeoutMs_);
  std::fflush(stdout);
  // Plus the time the arrivals take at --arrival-rate.
  const long arrivalsMs =
      opt_.arrivalRate > 0 ? long(active_.size()) * 1000 / opt_.arrivalRate : 0;
  deadline_ = started_ + milliseconds(60000 + 2 * (authTimeoutMs_ + typingTimeoutMs_) +
                                      arrivalsMs);
  progress(false);
  if (opt_.clients == 0) {
    pollSettle();
  } else {
    launchActive();
  }
  ioc_.run();
  progress(true);
  printTable();
  return afterIsClean() ? 0 : 1;
}

void Load::launchActive() {
  if (nextActive_ == 0) {
    loginStarted_ = Clock::now();
    messagesAtLoginStart_ = messages_;
  }
  const int inFlight = int(nextActive_) - ready_ - activeFailed_;
  if (opt_.arrivalRate == 0) {
    for (int k = inFlight; k < opt_.concurrency && nextActive_ < active_.size(); ++k)
      active_[nextActive_++]->start();
    return;
  }
  // Paced: client k starts at k/rate. A timer that fires a little late
  // does not lower the rate (the next start keeps its slot); a start more
  // than one interval late (the concurrency cap, a busy loop) does not bring
  // a burst to catch up: the schedule starts again from it.
  if (arrivalArmed_ || inFlight >= opt_.concurrency || nextActive_ >= active_.size())
    return;
  const Clock::time_point now = Clock::now();
  const auto interval = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(1.0 / opt_.arrivalRate));
  if (now >= nextArrival_) {
    active_[nextActive_++]->start();
    nextArrival_ = (now - nextArrival_ < interval ? nextArrival_ : now) + interval;
    if (inFlight + 1 >= opt_.concurrency || nextActive_ >= active_.size()) return;
  }
  arrivalArmed_ = true;
  arrivalTimer_.expires_at(nextArrival_);
  arrivalTimer_.async_wait([this](beast::error_code ec) {
    arrivalArmed_ = false;
    if (!ec) launchActive();
  });
}

void Load::onConnected(Client& c) {
  ++connected_;
  ++open_;
  if (c.plan().kind != Kind::kNeverAuth) return;
  lastNeverAuthConnect_ = Clock::now();
  if (++naConnected_ + naFailed_ == int(neverAuth_.size())) takePeak();
}

void Load::onEvent(const std::string& event, const json& data) {
  ++events_[event];
  if (event != "typingStarted" && event != "typingStopped") return;
  const std::string key =
      data.value("threadId", std::string()) + "/" + data.value("userId", std::string());
  const auto it = typingSentAt_.find(key);
  if (it == typingSentAt_.end()) return;
  if (event == "typingStopped") {
    typingSentAt_.erase(it);  // the next start is a new indicator
    return;
  }
  fanoutMs_.push_back(
      std::chrono::duration<double, std::milli>(Clock::now() - it->second).count());
}

void Load::onTypingStart(const Plan& p) {
  // Only the first start of an indicator is relayed; a second device of
  // the same user, or a restart, finds the entry there and keeps it.
  typingSentAt_.emplace(p.threadId + "/" + p.who.userId, Clock::now());
}

void Load::onReady(Client&) {
  ++ready_;
  activeProgress();
}

void Load::activeProgress() {
  launchActive();
  if (phase_ == "login" && ready_ + activeFailed_ == int(active_.size())) {
    loginEnded_ = Clock::now();
    messagesAtLoginEnd_ = messages_;
    // Last: the ones that never log in, so that they are all still there
    // (inside the auth deadline) when the peak is measured.
    phase_ = "never-auth";
    if (neverAuth_.empty()) return takePeak();
    for (auto& c : neverAuth_) c->start();
  }
}

void Load::takePeak() {
  if (peakTaken_) return;
  peakTaken_ = true;
  if (auto s = stats()) peak_ = *s;
  if (procOk_) procOk_ = readProc(opt_.serverPid, &procPeak_);
  phase_ = "leave";
  for (auto& c : active_) c->release();
  maybeStartLinger();
}

void Load::onLingering(Client&) {
  ++lingering_;
  maybeStartLinger();
}

void Load::maybeStartLinger() {
  const int others = int(active_.size() - lingerers_.size());
  if (lingerStarted_ || lingerers_.empty() || phase_ != "leave" ||
      lingering_ + lingerGone_ < int(lingerers_.size()) || finishedNonLinger_ < others)
    return;
  lingerStarted_ = true;
  phase_ = "linger";
  // Everyone else is gone; the lingerers are still connected and have not
  // typed since before the peak. Wait for the server's auto-clear.
  pollUntil_ = Clock::now() + milliseconds(typingTimeoutMs_ + 3000);
  schedule(milliseconds(typingTimeoutMs_), [this] { pollLinger(); });
}

void Load::pollLinger() {
  auto s = stats();
  const bool cleared = s && (*s)["typingTimers"] == 0 && (*s)["typingRows"] == 0;
  if (!cleared && Clock::now() < pollUntil_)
    return schedule(milliseconds(100), [this] { pollLinger(); });
  if (s) lingerStats_ = *s;
  lingerOk_ = cleared && (*s)["connectedClients"].get<long>() >= long(lingerers_.size());
  phase_ = "leave";
  for (auto& c : lingerers_) c->release();
}

void Load::onFinished(Client& c, bool ok, const std::string& why) {
  const Kind k = c.plan().kind;
  if (c.reachedConnected()) --open_;
  if (!ok && failures_.size() < 10) failures_.push_back(c.plan().who.userId + ": " + why);
  if (k == Kind::kStay) {
    ++stayFinished_;
    if (ok) ++stayOk_;
    if (!c.reachedReady()) ++stayEarly_;
    maybeSignal();
    if (stayFinished_ == int(stayers_.size())) finishStay();
    return;
  }
  ++finished_;
  if (ok) {
    ++okByKind_[k];
  } else {
    ++failed_;
  }
  if (k == Kind::kNeverAuth) {
    ++naFinished_;
    if (!ok && !peakTaken_ && ++naFailed_ + naConnected_ == int(neverAuth_.size()))
      takePeak();
  } else if (!c.reachedReady()) {
    ++activeFailed_;  // failed before the peak: do not wait for it
    activeProgress();
  }
  if (k == Kind::kLinger && !c.reachedLinger()) {
    ++lingerGone_;
    maybeStartLinger();
  } else if (k != Kind::kLinger && k != Kind::kNeverAuth) {
    ++finishedNonLinger_;
    maybeStartLinger();
  }
  if (finished_ == opt_.clients) pollSettle();
}

void Load::onUnexpectedError(const std::string& text) {
  if (++unexpectedErrors_ <= 5)
    std::fprintf(stderr, "dispatch_load: error event: %s\n", text.c_str());
}

bool Load::serverClean(const json& s) {
  if (!s.is_object()) return false;
  for (const char* k : {"connectedClients", "typingTimers", "trackedRooms", "rooms",
                        "connectionTimers", "typingRows", "serverSessions"})
    if (!s.contains(k) || s[k] != 0) return false;
  return true;
}

bool Load::afterIsClean() const {
  return serverClean(after_) && failed_ == 0 && unexpectedErrors_ == 0 && !timedOut_ &&
         (lingerers_.empty() || lingerOk_) && stayOk_ == int(stayers_.size());
}

void Load::startStay() {
  phase_ = "stay";
  for (auto& c : stayers_) c->start();
}

void Load::onStayReady() {
  ++stayReady_;
  maybeSignal();
}

void Load::maybeSignal() {
  if (staySignalled_ || stayReady_ + stayEarly_ < int(stayers_.size())) return;
  staySignalled_ = true;
  if (auto s = stats()) stayStats_ = *s;
  std::printf(
      "\n%sstay: %d clients logged in and typing in one thread; SIGTERM to the server "
      "(pid %ld)\n",
      isatty(fileno(stdout)) ? "\n" : "", stayReady_, long(opt_.serverPid));
  std::fflush(stdout);
  if (kill(opt_.serverPid, SIGTERM) != 0) {
    std::fprintf(stderr, "dispatch_load: kill %ld: %s\n", long(opt_.serverPid),
                 std::strerror(errno));
  }
  phase_ = "shutdown";
}

void Load::finishStay() {
  phase_ = "done";
  progressTimer_.cancel();
  ioc_.stop();
}

void Load::pollSettle() {
  // Dropped sockets and never-logged-in ones are cleaned on the server's
  // side asynchronously: poll, bounded, until it is back to zero.
  if (phase_ != "settle") {
    phase_ = "settle";
    pollUntil_ = Clock::now() + milliseconds(authTimeoutMs_ + 5000);
  }
  auto s = stats();
  if (s) after_ = *s;
  const bool zero = s && serverClean(*s);
  if (!zero && Clock::now() < pollUntil_ && Clock::now() < deadline_)
    return schedule(milliseconds(100), [this] { pollSettle(); });
  if (!stayers_.empty()) return startStay();
  phase_ = "done";
  progressTimer_.cancel();
  ioc_.stop();
}

void Load::progress(bool final) {
  static const bool tty = isatty(fileno(stdout));
  const Clock::time_point now = Clock::now();
  const double t = std::chrono::duration<double>(now - started_).count();
  // "connected" is now (clients with an open connection, as they see it);
  // "ever" counts every handshake so far.
  std::printf(
      "%s[%5.1fs] %-10s connected %4d (ever %4d)  logged-in+ready %4d  lingering %3d  "
      "finished %4d/%d  failed %d",
      tty ? "\r" : "", t, phase_.c_str(), open_, connected_, ready_, lingering_,
      finished_, opt_.clients, failed_);
  // Only the never-logged-in clients left: they go when the server's auth
  // deadline closes them, which can be most of a run with the default 30 s.
  const int naLeft = naConnected_ - naFinished_;
  if (!final && naLeft > 0 && finished_ + naLeft == opt_.clients) {
    const double left =
        double(authTimeoutMs_) / 1000 -
        std::chrono::duration<double>(now - lastNeverAuthConnect_).count();
    std::printf(
        "  waiting for the server's %.0f s auth deadline to close %d "
        "never-logged-in clients (~%.0f s)",
        double(authTimeoutMs_) / 1000, naLeft, std::max(0.0, left));
  }
  std::printf(tty ? "\033[K" : "");  // clear what a longer line left
  std::printf(tty && !final ? "" : "\n");
  std::fflush(stdout);
  if (final) return;
  if (Clock::now() > deadline_) {
    timedOut_ = true;
    std::fprintf(stderr, "\ndispatch_load: timed out in phase %s\n", phase_.c_str());
    if (auto s = stats()) after_ = *s;
    ioc_.stop();
    return;
  }
  progressTimer_.expires_after(milliseconds(tty ? 250 : 1000));
  progressTimer_.async_wait([this](beast::error_code ec) {
    if (!ec) progress(false);
  });
}

void Load::printTable() {
  struct Row {
    const char* key;
    const char* label;
  };
  static const Row kRows[] = {
      {"connectedClients", "connectedClients"},
      {"authenticated", "authenticated"},
      {"userSockets", "userSockets (users online)"},
      {"connectionTimers", "connectionTimers (auth deadlines)"},
      {"typingTimers", "typingTimers"},
      {"trackedRooms", "trackedRooms (memberships)"},
      {"rooms", "rooms"},
      {"typingRows", "typingRows (SQLite)"},
      {"serverSessions", "serverSessions (gateway map)"},
      {"pendingPersistence", "pendingPersistence"},
      {"timersPending", "timersPending"},
      {"bytes", "bytes held by roomkeeper"},
      {"persistDelivered", "persistDelivered (total)"},
      {"authTimeouts", "authTimeouts (total)"},
      {"forcedCleanups", "forcedCleanups (total)"},
      {"callbackErrors", "callbackErrors (total)"},
  };
  auto cell = [](const json& j, const char* key) -> std::string {
    if (!j.is_object() || !j.contains(key)) return "-";
    return j[key].dump();
  };
  std::printf("\n%-34s %10s %10s %10s %10s\n", "server /stats", "before", "peak",
              "lingering", "after");
  for (const Row& r : kRows)
    std::printf("%-34s %10s %10s %10s %10s\n", r.label, cell(before_, r.key).c_str(),
                cell(peak_, r.key).c_str(), cell(lingerStats_, r.key).c_str(),
                cell(after_, r.key).c_str());
  std::printf("\nclients: %d\n", opt_.clients);
  std::map<Kind, int> planned;
  for (auto* list : {&active_, &neverAuth_})
    for (auto& c : *list) ++planned[c->plan().kind];
  for (const auto& [k, n] : planned)
    std::printf("  %-40s %4d  (as expected: %d)\n", kindName(k), n, okByKind_[k]);
  std::printf(
      "events received: typingStarted %d, typingStopped %d, messageCreated %d, "
      "jobUpdated %d; typing restarts acknowledged %d; unexpected errors %d\n",
      events_["typingStarted"], events_["typingStopped"], events_["messageCreated"],
      events_["jobUpdated"], restarts_, unexpectedErrors_);
  if (!lingerers_.empty())
    std::printf(
        "typing auto-clear: %s (typingTimers and typingRows 0 while %zu "
        "lingerers were still connected)\n",
        lingerOk_ ? "ok" : "FAILED", lingerers_.size());
  for (const std::string& f : failures_) std::printf("  failed: %s\n", f.c_str());
  printTimes();
  if (!stayers_.empty())
    std::printf(
        "\nshutdown: %d clients stayed connected (server before SIGTERM: "
        "connectedClients %s, typingRows %s); %d of them heard serverShutdown and "
        "were closed with 1001\n",
        int(stayers_.size()), stayStats_.value("connectedClients", json()).dump().c_str(),
        stayStats_.value("typingRows", json()).dump().c_str(), stayOk_);
  if (afterIsClean()) {
    std::printf(
        "\nPASS: %d clients came and went (clean, abrupt, never logged in); "
        "nothing is left: no room, no timer, no map entry, no database row.%s\n",
        opt_.clients,
        stayers_.empty() ? "" : " Every client still connected at SIGTERM was told.");
  } else {
    std::printf("\nFAIL:%s%s%s%s%s\n", timedOut_ ? " timed out;" : "",
                failed_ ? " some clients failed;" : "",
                unexpectedErrors_ ? " unexpected error events;" : "",
                stayOk_ < int(stayers_.size()) ? " not every stayer was told;" : "",
                " see the table (after must be all 0)");
  }
}

void Load::printTimes() {
  const Quantiles login = quantiles(loginMs_), fanout = quantiles(fanoutMs_);
  std::printf("\n%-52s %8s %8s %8s %8s\n", "latency (ms, this process's steady clock)",
              "samples", "p50", "p99", "max");
  const auto row = [](const char* label, const Quantiles& q) {
    std::printf("%-52s %8zu %8.2f %8.2f %8.2f\n", label, q.n, q.p50, q.p99, q.max);
  };
  row("login round trip (TCP connect .. last join acked)", login);
  row("typing fan-out (typing.start .. typingStarted)", fanout);
  const double loginS =
      std::chrono::duration<double>(loginEnded_ - loginStarted_).count();
  if (loginEnded_ > loginStarted_ && ready_ > 0)
    std::printf(
        "login phase: %d clients connected, logged in, joined, typed and posted in "
        "%.2f s: %.0f a second, %d at a time, %s\n",
        ready_, loginS, double(ready_) / loginS, opt_.concurrency,
        opt_.arrivalRate > 0
            ? ("arriving at most " + std::to_string(opt_.arrivalRate) + " a second").c_str()
            : "each starting when another is ready (closed loop)");
  if (loginEnded_ > loginStarted_)
    std::printf("messages in the login phase (sent and received by the clients): %llu, "
                "%.0f a second\n",
                static_cast<unsigned long long>(messagesAtLoginEnd_ - messagesAtLoginStart_),
                double(messagesAtLoginEnd_ - messagesAtLoginStart_) / loginS);
  rusage self{};
  if (getrusage(RUSAGE_SELF, &self) == 0) {
    const auto ms = [](const timeval& tv) {
      return 1000.0 * double(tv.tv_sec) + double(tv.tv_usec) / 1000;
    };
    std::printf("dispatch_load itself (one thread): CPU %.0f ms in %.1f s\n",
                ms(self.ru_utime) + ms(self.ru_stime),
                std::chrono::duration<double>(Clock::now() - started_).count());
  }
  if (procOk_ && ready_ > 0) {
    const double cpuMs = procPeak_.cpuMs - procStart_.cpuMs;
    const long peakClients = peak_.value("connectedClients", 0L);
    std::printf(
        "server (pid %ld, /proc): CPU %.0f ms from start to peak, %.0f us per client "
        "logged in (its whole login phase); RSS %ld -> %ld KiB, %.1f KiB per "
        "connected client at the peak (%ld)\n",
        long(opt_.serverPid), cpuMs, 1000.0 * cpuMs / double(ready_), procStart_.rssKb,
        procPeak_.rssKb,
        peakClients > 0 ? double(procPeak_.rssKb - procStart_.rssKb) / double(peakClients)
                        : 0.0,
        peakClients);
  }
}

void raiseFileLimit() {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::puts(
          "usage: dispatch_load --port N [--host 127.0.0.1] [--clients 500] "
          "[--concurrency 64] [--arrival-rate 1000] [--server-pid PID [--stay N]]\n"
          "       dispatch_load --ports N1,N2,... [...]   (a cluster: client i on\n"
          "                    server i %% n, a user's two devices on two servers,\n"
          "                    /stats summed)\n"
          "  --arrival-rate R  new clients a second, one every 1/R s, at most\n"
          "                    --concurrency at a time (1000); 0: each starts the\n"
          "                    moment another is ready, the first --concurrency\n"
          "                    all at once (closed loop: the login phase's\n"
          "                    throughput, with the latency of those bursts)\n"
          "  --server-pid PID  the server's process: its CPU time and RSS are read\n"
          "                    from /proc\n"
          "  --stay N          after the run, N more clients log in and type; then\n"
          "                    SIGTERM to PID, and each must hear serverShutdown\n"
          "                    and be closed with 1001");
      return 0;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "dispatch_load: %s needs a value\n", flag.c_str());
      return 2;
    }
    const std::string value = argv[++i];
    const long n = std::strtol(value.c_str(), nullptr, 10);
    if (flag == "--host") {
      opt.host = value;
    } else if (flag == "--port" && n > 0 && n < 65536) {
      opt.port = static_cast<unsigned short>(n);
    } else if (flag == "--ports") {
      std::size_t at = 0;
      while (at <= value.size()) {
        const std::size_t comma = std::min(value.find(',', at), value.size());
        const long p = std::strtol(value.substr(at, comma - at).c_str(), nullptr, 10);
        if (p <= 0 || p >= 65536) {
          std::fprintf(stderr, "dispatch_load: bad --ports %s\n", value.c_str());
          return 2;
        }
        opt.ports.push_back(static_cast<unsigned short>(p));
        at = comma + 1;
      }
    } else if (flag == "--clients" && n >= 0 && n <= 100000) {
      opt.clients = static_cast<int>(n);
    } else if (flag == "--concurrency" && n > 0 && n <= 10000) {
      opt.concurrency = static_cast<int>(n);
    } else if (flag == "--arrival-rate" && n >= 0 && n <= 1000000 && !value.empty() &&
               value.find_first_not_of("0123456789") == std::string::npos) {
      opt.arrivalRate = static_cast<int>(n);
    } else if (flag == "--stay" && n >= 0 && n <= 1000) {
      opt.stay = static_cast<int>(n);
    } else if (flag == "--server-pid" && n > 0) {
      opt.serverPid = static_cast<pid_t>(n);
    } else {
      std::fprintf(stderr, "dispatch_load: bad flag %s %s\n", flag.c_str(),
                   value.c_str());
      return 2;
    }
  }
  if (opt.port != 0) opt.ports.insert(opt.ports.begin(), opt.port);
  if (opt.ports.empty()) {
    std::fprintf(stderr, "dispatch_load: --port (or --ports) is required\n");
    return 2;
  }
  if (opt.stay > 0 && opt.serverPid == 0) {
    std::fprintf(stderr, "dispatch_load: --stay needs --server-pid\n");
    return 2;
  }
  raiseFileLimit();
  asio::io_context ioc(1);
  beast::error_code ec;
  asio::ip::make_address(opt.host, ec);
  if (ec) {
    std::fprintf(stderr, "dispatch_load: bad --host %s\n", opt.host.c_str());
    return 2;
  }
  Load load(ioc, opt);
  return load.run();
}
