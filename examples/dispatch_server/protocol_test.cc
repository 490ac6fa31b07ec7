// SPDX-License-Identifier: MIT
// dispatch_protocol_test: drives a running dispatch_server over loopback
// with good and bad input and checks every answer against docs/protocol.md:
// malformed JSON, unknown events, binary and oversized frames, floods,
// typing before authentication, bad tokens, the auth deadline, typing relay
// and auto-clear, HTTP /stats and /metrics, request latency (a Nagle stall
// would show), and that after all of it the server holds nothing. With
// --server-pid it ends by sending SIGTERM and checking the serverShutdown
// event and the 1001 close.
//
// Expects the server to run with short timeouts, as dispatch_e2e.sh starts
// it: --auth-timeout-ms 800 --typing-timeout-ms 400 --max-outbox 1024 (the
// defaults of --rate-limit 50 and --max-message-bytes 65536).
#include <signal.h>
#include <sys/types.h>

#include <algorithm>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/websocket.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
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

std::string gHost = "127.0.0.1";
unsigned short gPort = 0;
asio::io_context gIoc;

/// Runs the shared io_context until `done()` or `timeout`.
bool runUntil(const std::function<bool()>& done, milliseconds timeout) {
  const auto end = Clock::now() + timeout;
  gIoc.restart();
  while (!done()) {
    const auto now = Clock::now();
    if (now >= end) return false;
    gIoc.run_one_for(end - now);
    gIoc.restart();
  }
  return true;
}

/// A demo token for `who`, good for an hour.
std::string token(const dispatch::Identity& who) {
  return dispatch::makeDemoToken(who, dispatch::unixNow() + 3600);
}

/// One WebSocket client with blocking, deadline-bounded calls.
class Conn {
 public:
  Conn() : ws_(gIoc) {}
  ~Conn() { drop(); }

  /// Connects and makes the WebSocket handshake. A `receiveBuffer` (bytes)
  /// caps the kernel's receive buffer, so that a client that does not read
  /// backs up the server sooner. A `source` address (127.0.0.2: all of
  /// 127/8 is loopback) is the address the server sees the client come from.
  bool open(int receiveBuffer = 0, const std::string& source = "") {
    beast::error_code result = asio::error::would_block;
    bool done = false;
    const tcp::endpoint ep(asio::ip::make_address(gHost), gPort);
    if (receiveBuffer > 0 || !source.empty()) {
      auto& s = beast::get_lowest_layer(ws_).socket();
      beast::error_code ec;
      s.open(ep.protocol(), ec);
      if (!ec && receiveBuffer > 0)
        s.set_option(asio::socket_base::receive_buffer_size(receiveBuffer), ec);
      if (!ec && !source.empty()) s.bind(tcp::endpoint(asio::ip::make_address(source), 0), ec);
      if (ec) return false;
    }
    beast::get_lowest_layer(ws_).expires_after(std::chrono::seconds(5));
    beast::get_lowest_layer(ws_).async_connect(ep, [&](beast::error_code ec) {
      if (ec) {
        result = ec;
        done = true;
        return;
      }
      beast::get_lowest_layer(ws_).expires_never();
      // Like any interactive client: small requests go out at once.
      beast::error_code ignored;
      beast::get_lowest_layer(ws_).socket().set_option(tcp::no_delay(true), ignored);
      ws_.async_handshake(gHost + ":" + std::to_string(gPort), "/",
                          [&](beast::error_code ec2) {
                            result = ec2;
                            done = true;
                          });
    });
    if (!runUntil([&] { return done; }, milliseconds(5000)) || result) return false;
    ws_.read_message_max(1 << 20);
    return true;
  }

  bool sendText(const std::string& text) { return write(text, true); }
  bool sendBinary(const std::string& bytes) { return write(bytes, false); }
  bool send(const json& msg) { return sendText(msg.dump()); }

  /// The next message; nullopt on timeout or when the connection ended
  /// (then closed() is true).
  std::optional<json> next(milliseconds timeout = milliseconds(3000)) {
    if (closed_) return std::nullopt;
    if (!readPending_) {
      readPending_ = true;
      readDone_ = false;
      ws_.async_read(buffer_, [this](beast::error_code ec, std::size_t) {
        readDone_ = true;
        readEc_ = ec;
      });
    }
    if (!runUntil([this] { return readDone_; }, timeout)) return std::nullopt;
    readPending_ = false;
    if (readEc_) {
      closed_ = true;
      // The close code the server sent, also when the transport failed
      // right after it (a server closing with unread input resets the TCP
      // connection, and our close reply then fails).
      closeCode_ = ws_.reason().code;
      closeReason_.assign(ws_.reason().reason.data(), ws_.reason().reason.size());
      return std::nullopt;
    }
    const std::string text = beast::buffers_to_string(buffer_.data());
    buffer_.consume(buffer_.size());
    json j = json::parse(text, nullptr, false);
    if (j.is_discarded()) j = json{{"event", "(not JSON)"}, {"text", text}};
    return j;
  }
  /// Skips messages until one with this event (and, if given, this id).
  std::optional<json> waitFor(const std::string& event, const json& id = nullptr,
                              milliseconds timeout = milliseconds(3000)) {
    const auto end = Clock::now() + timeout;
    while (Clock::now() < end) {
      auto m = next(std::chrono::duration_cast<milliseconds>(end - Clock::now()));
      if (!m) return std::nullopt;
      if ((*m)["event"] == event &&
          (id.is_null() || (m->contains("id") && (*m)["id"] == id)))
        return m;
    }
    return std::nullopt;
  }
  /// Sends a request with a fresh id and returns its ack or error.
  std::optional<json> request(const std::string& event, json data = json::object()) {
    const int id = ++nextId_;
    if (!send({{"event", event}, {"id", id}, {"data", std::move(data)}}))
      return std::nullopt;
    const auto end = Clock::now() + milliseconds(3000);
    while (Clock::now() < end) {
      auto m = next(std::chrono::duration_cast<milliseconds>(end - Clock::now()));
      if (!m) return std::nullopt;
      if (((*m)["event"] == "ack" || (*m)["event"] == "error") && m->contains("id") &&
          (*m)["id"] == id)
        return m;
    }
    return std::nullopt;
  }
  /// Sends every request at once, then collects their replies (acks or
  /// errors, in arrival order); fewer than asked on a timeout.
  std::vector<json> requestAll(const std::vector<std::pair<std::string, json>>& reqs) {
    std::set<int> waiting;
    for (const auto& [event, data] : reqs) {
      const int id = ++nextId_;
      if (!send({{"event", event}, {"id", id}, {"data", data}})) return {};
      waiting.insert(id);
    }
    std::vector<json> replies;
    const auto end = Clock::now() + milliseconds(3000);
    while (!waiting.empty() && Clock::now() < end) {
      auto m = next(std::chrono::duration_cast<milliseconds>(end - Clock::now()));
      if (!m) break;
      if (((*m)["event"] == "ack" || (*m)["event"] == "error") && m->contains("id") &&
          (*m)["id"].is_number_integer() && waiting.erase((*m)["id"].get<int>()))
        replies.push_back(std::move(*m));
    }
    return replies;
  }
  /// Reads (and discards) until the server closes; the close code, or 0 on
  /// timeout or a transport error without a close frame.
  std::uint16_t waitClosed(milliseconds timeout) {
    const auto end = Clock::now() + timeout;
    while (!closed_ && Clock::now() < end)
      next(std::chrono::duration_cast<milliseconds>(end - Clock::now()));
    return closed_ ? closeCode_ : 0;
  }
  bool authenticate(const dispatch::Identity& who) {
    auto r = request("authenticate", {{"token", token(who)}});
    return r && (*r)["event"] == "ack";
  }
  void closeCleanly() {
    if (closed_) return;
    bool done = false;
    ws_.async_close(websocket::close_code::normal,
                    [&](beast::error_code) { done = true; });
    runUntil([&] { return done; }, milliseconds(3000));
    waitClosed(milliseconds(3000));
  }
  /// Drops the TCP connection with a reset: no close frame.
  void drop() {
    beast::error_code ignored;
    auto& s = beast::get_lowest_layer(ws_).socket();
    if (!s.is_open()) return;
    s.set_option(asio::socket_base::linger(true, 0), ignored);
    s.close(ignored);
    runUntil([this] { return !readPending_ || readDone_; }, milliseconds(1000));
    closed_ = true;
  }
  bool closed() const { return closed_; }
  /// The reason text of the server's close frame (after waitClosed).
  const std::string& closeReason() const { return closeReason_; }
  std::string readError() const { return readEc_.message(); }

 private:
  bool write(const std::string& data, bool text) {
    if (closed_) return false;
    out_ = data;
    bool done = false;
    beast::error_code result;
    ws_.text(text);
    ws_.async_write(asio::buffer(out_), [&](beast::error_code ec, std::size_t) {
      result = ec;
      done = true;
    });
    return runUntil([&] { return done; }, milliseconds(5000)) && !result;
  }

  websocket::stream<beast::tcp_stream> ws_;
  beast::flat_buffer buffer_;
  std::string out_;
  bool readPending_ = false, readDone_ = false, closed_ = false;
  beast::error_code readEc_;
  std::uint16_t closeCode_ = 0;
  std::string closeReason_;
  int nextId_ = 0;
};

// ---- A tiny test harness ------------------------------------------------------

int gPassed = 0, gFailed = 0;
std::string gWhy;

#define EXPECT(cond)                                             \
  do {                                                           \
    if (!(cond)) {                                               \
      gWhy = "line " + std::to_string(__LINE__) + ": " #cond +   \
             (gWhy.empty() ? std::string() : " (" + gWhy + ")"); \
      return false;                                              \
    }                                                            \
  } while (0)

void run(const char* name, bool (*test)()) {
  gWhy.clear();
  const bool ok = test();
  std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", name, ok ? "" : ": ",
              ok ? "" : gWhy.c_str());
  std::fflush(stdout);
  (ok ? gPassed : gFailed)++;
}

std::string codeOf(const std::optional<json>& m) {
  if (!m || !m->contains("data") || !(*m)["data"].contains("code")) return "";
  return (*m)["data"]["code"].get<std::string>();
}

std::optional<json> stats() {
  std::string err;
  auto r = dispatch::httpGet(gHost, gPort, "/stats", &err);
  if (!r || r->status != 200) return std::nullopt;
  json j = json::parse(r->body, nullptr, false);
  if (!j.is_object()) return std::nullopt;
  return j;
}

/// The server's event loops (--threads): limits per user are per loop, and
/// an ack's "delivered" counts the sender's loop only (docs/protocol.md).
int serverLoops() {
  auto s = stats();
  return s && s->contains("loops") ? (*s)["loops"].get<int>() : 1;
}

/// /stats has typingRows == rows and typingTimers == rows, within a second
/// (persistence runs right after the event that reports the change).
bool typingIs(int rows) {
  const auto end = Clock::now() + milliseconds(1000);
  for (;;) {
    auto s = stats();
    if (s && (*s)["typingRows"] == rows && (*s)["typingTimers"] == rows) return true;
    if (Clock::now() > end) {
      gWhy = "stats: " + (s ? s->dump() : std::string("unreachable"));
      return false;
    }
    runUntil([] { return false; }, milliseconds(20));
  }
}

dispatch::Identity user(const std::string& id, const std::string& role,
                        const std::string& crew = "c1") {
  return dispatch::Identity{id, role, role == "admin" ? "" : crew};
}

// ---- The tests ------------------------------------------------------------------

bool malformedJson() {
  Conn c;
  EXPECT(c.open());
  EXPECT(c.sendText("{\"event\": \"ping\", "));  // cut short
  auto m = c.waitFor("error");
  EXPECT(codeOf(m) == "bad_json");
  EXPECT((*m)["data"]["for"] == "" && !m->contains("id"));
  EXPECT(c.sendText("not json at all"));
  EXPECT(codeOf(c.waitFor("error")) == "bad_json");
  auto pong = c.request("ping");  // the connection still works
  EXPECT(pong && (*pong)["event"] == "ack" && (*pong)["data"]["pong"] == true);
  return true;
}

bool wrongShapes() {
  Conn c;
  EXPECT(c.open());
  // The message, and the error's "for" and "id": "" and no id where the
  // event (or the id, which is read first) could not be read.
  struct Case {
    const char* text;
    const char* forEvent;
    json id;
  };
  const Case cases[] = {
      {"[1,2,3]", "", nullptr},
      {"42", "", nullptr},
      {"\"ping\"", "", nullptr},
      {"{\"data\":{},\"id\":3}", "", 3},
      {"{\"event\":5,\"id\":\"x\"}", "", "x"},
      {"{\"event\":\"ping\",\"data\":[1],\"id\":4}", "ping", 4},
      {"{\"event\":\"ping\",\"id\":{\"x\":1}}", "", nullptr},
  };
  for (const Case& k : cases) {
    EXPECT(c.sendText(k.text));
    auto m = c.waitFor("error");
    gWhy = k.text;
    EXPECT(codeOf(m) == "bad_request");
    EXPECT((*m)["data"]["for"] == k.forEvent);
    EXPECT(k.id.is_null() ? !m->contains("id") : (*m)["id"] == k.id);
  }
  gWhy.clear();
  // An event name over 64 characters is not echoed.
  EXPECT(c.sendText(json{{"event", std::string(65, 'e')}, {"id", 5}}.dump()));
  auto m = c.waitFor("error");
  EXPECT(codeOf(m) == "unknown_event" && (*m)["data"]["for"] == "" && (*m)["id"] == 5);
  auto r = c.request("ping");
  EXPECT(r && (*r)["event"] == "ack");
  return true;
}

bool unknownEvent() {
  Conn c;
  EXPECT(c.open());
  auto r = c.request("launchRockets", {{"at", "now"}});
  EXPECT(r && (*r)["event"] == "error" && codeOf(r) == "unknown_event");
  EXPECT((*r)["data"]["for"] == "launchRockets");
  EXPECT(c.authenticate(user("u-unknown", "dispatcher")));
  r = c.request("thread.delete", {{"threadId", "1"}});
  EXPECT(codeOf(r) == "unknown_event");
  EXPECT(c.request("ping"));
  return true;
}

bool binaryFrame() {
  Conn c;
  EXPECT(c.open());
  EXPECT(c.sendBinary(std::string("\x00\x01\x02", 3)));
  EXPECT(codeOf(c.waitFor("error")) == "bad_frame");
  EXPECT(c.request("ping"));
  return true;
}

bool typingBeforeAuth() {
  Conn c;
  EXPECT(c.open());
  for (const char* ev :
       {"typing.start", "typing.stop", "thread.subscribe", "subscribeToJob",
        "subscribeToAnalytics", "message.send", "job.update"}) {
    auto r = c.request(ev, {{"threadId", "1"}, {"jobId", "1"}, {"type", "jobs"}});
    EXPECT(codeOf(r) == "not_authenticated");
  }
  EXPECT(c.authenticate(user("u-late", "crew")));  // and then it works
  auto r = c.request("thread.subscribe", {{"threadId", "1"}});
  EXPECT(r && (*r)["event"] == "ack");
  r = c.request("typing.start", {{"threadId", "1"}});
  EXPECT(r && (*r)["event"] == "ack" && (*r)["data"]["result"] == "ok");
  return true;
}

bool badToken() {
  Conn c;
  EXPECT(c.open());
  std::string forged = token(user("u1", "admin"));
  forged.back() = forged.back() == '0' ? '1' : '0';
  auto r = c.request("authenticate", {{"token", forged}});
  EXPECT(codeOf(r) == "auth_failed");
  EXPECT(c.waitClosed(milliseconds(3000)) == 4003);

  // Missing or not a string: bad_request, and the connection stays open
  // and unauthenticated.
  Conn d;
  EXPECT(d.open());
  r = d.request("authenticate", {{"token", 12345}});
  EXPECT(codeOf(r) == "bad_request");
  r = d.request("authenticate", json::object());
  EXPECT(codeOf(r) == "bad_request");
  EXPECT(d.request("ping"));
  EXPECT(codeOf(d.request("thread.subscribe", {{"threadId", "1"}})) ==
         "not_authenticated");
  EXPECT(d.authenticate(user("u-after-bad", "crew")));

  // A token without exp (the old format), correctly signed: invalid.
  const std::string claims = "u1:admin:";
  Conn e;
  EXPECT(e.open());
  r = e.request("authenticate",
                {{"token", claims + ":" + dispatch::demoSignature(claims)}});
  EXPECT(codeOf(r) == "auth_failed");
  EXPECT(e.waitClosed(milliseconds(3000)) == 4003);
  return true;
}

/// exp is checked after the signature: an expired token gets token_expired
/// and the connection stays open for a fresh one; an exp changed without
/// re-signing is a forgery (auth_failed, 4003).
bool tokenExpiry() {
  const auto who = user("u-exp", "dispatcher");
  const std::int64_t now = dispatch::unixNow();
  Conn c;
  EXPECT(c.open());
  auto r = c.request("authenticate", {{"token", dispatch::makeDemoToken(who, now - 1)}});
  EXPECT(codeOf(r) == "token_expired");
  EXPECT(c.request("ping"));
  EXPECT(codeOf(c.request("thread.subscribe", {{"threadId", "1"}})) ==
         "not_authenticated");
  r = c.request("authenticate", {{"token", dispatch::makeDemoToken(who, now + 60)}});
  EXPECT(r && (*r)["event"] == "ack" && (*r)["data"]["userId"] == "u-exp");

  // Push an expired token's exp into the future, keep its signature.
  std::string stale = dispatch::makeDemoToken(who, now - 1);
  const std::string oldExp = std::to_string(now - 1), newExp = std::to_string(now + 3600);
  stale.replace(stale.find(":" + oldExp + ":") + 1, oldExp.size(), newExp);
  Conn d;
  EXPECT(d.open());
  r = d.request("authenticate", {{"token", stale}});
  EXPECT(codeOf(r) == "auth_failed");
  EXPECT(d.waitClosed(milliseconds(3000)) == 4003);
  return true;
}

/// roomkeeper's limit of 128 rooms a session, the login rooms included: a
/// crew member (role:, user:, crew:) can join 125 more. The server's rate
/// limit (burst 100, then 50 a second) is respected by pausing.
bool roomLimit() {
  Conn c;
  EXPECT(c.open());
  EXPECT(c.authenticate(user("u-rooms", "crew", "c9")));
  for (int i = 0; i < 125; ++i) {
    if (i == 90) runUntil([] { return false; }, milliseconds(1000));
    auto r = c.request("subscribeToJob", {{"jobId", "lim" + std::to_string(i)}});
    gWhy = "job " + std::to_string(i);
    EXPECT(r && (*r)["event"] == "ack");
  }
  gWhy.clear();
  auto r = c.request("thread.subscribe", {{"threadId", "one-too-many"}});
  EXPECT(codeOf(r) == "too_many_rooms");
  EXPECT((*r)["data"]["for"] == "thread.subscribe");
  r = c.request("subscribeToJob", {{"jobId", "lim0"}});  // a repeat changes nothing
  EXPECT(r && (*r)["data"]["result"] == "already_done");
  return true;
}

/// 64 sessions a user on each event loop (sockets go to the loops in
/// turn): the next one gets too_many_sessions and stays open and
/// unauthenticated, so its auth deadline still closes it (4001).
bool sessionLimit() {
  std::vector<std::unique_ptr<Conn>> tabs;
  const int loops = serverLoops();
  for (int i = 0; i < 64 * loops; ++i) {
    tabs.push_back(std::make_unique<Conn>());
    EXPECT(tabs.back()->open());
    EXPECT(tabs.back()->authenticate(user("u-tabs", "dispatcher")));
  }
  Conn extra;
  EXPECT(extra.open());
  auto r =
      extra.request("authenticate", {{"token", token(user("u-tabs", "dispatcher"))}});
  EXPECT(codeOf(r) == "too_many_sessions");
  EXPECT(extra.request("ping"));
  EXPECT(codeOf(extra.request("thread.subscribe", {{"threadId", "1"}})) ==
         "not_authenticated");
  EXPECT(extra.waitClosed(milliseconds(3000)) == 4001);
  for (auto& t : tabs) t->closeCleanly();
  return true;
}

/// A frame over --max-message-bytes gets close 1009, also when it is many
/// times the limit and the client is still writing it: the server has to
/// read and discard the rest before it closes the TCP connection, or the
/// client gets a reset (1006) instead of the close frame.
bool oversizedFrame() {
  for (const std::size_t size :
       {std::size_t(70000), std::size_t(5) << 20, std::size_t(20) << 20}) {
    for (int attempt = 0; attempt < 3; ++attempt) {
      Conn c;
      EXPECT(c.open());
      EXPECT(c.authenticate(user("u-big", "dispatcher")));
      const std::string big =
          R"({"event":"message.send","data":{"threadId":"1","text":")" +
          std::string(size, 'x') + "\"}}";
      const bool sent = c.sendText(big);
      const std::uint16_t code = c.waitClosed(milliseconds(5000));
      gWhy = std::to_string(size) + " bytes, attempt " + std::to_string(attempt) +
             ": write " + (sent ? "completed" : "failed") + ", close code " +
             std::to_string(code) + ", " + c.readError();
      EXPECT(code == 1009);
    }
  }
  return true;
}

bool flood() {
  Conn c;
  EXPECT(c.open());
  int sent = 0;
  for (; sent < 1000; ++sent)
    if (!c.send({{"event", "ping"}})) break;
  EXPECT(c.waitClosed(milliseconds(5000)) == 1008);
  return true;
}

/// Limits per client address (dispatch_e2e.sh starts the server with
/// --max-per-ip 100, counted in each event loop): clients from 127.0.0.2
/// fill their address's share and the next one is closed with 1008
/// rate_limit, while a client from 127.0.0.3 is served; one of 127.0.0.2's
/// floods messages and is closed with 1008, and 127.0.0.3's requests are
/// still answered. Once 127.0.0.2's sockets are closed it may connect again.
bool perAddressLimits() {
  const int share = 100 * serverLoops();
  std::vector<std::unique_ptr<Conn>> a;
  for (int i = 0; i < share; ++i) {
    a.push_back(std::make_unique<Conn>());
    EXPECT(a.back()->open(0, "127.0.0.2"));
  }
  for (auto& c : a) EXPECT(c->request("ping"));  // every one is served
  Conn over;
  EXPECT(over.open(0, "127.0.0.2"));
  EXPECT(over.waitClosed(milliseconds(3000)) == 1008);
  EXPECT(over.closeReason() == "rate_limit");
  Conn b;
  EXPECT(b.open(0, "127.0.0.3"));
  EXPECT(b.authenticate(user("u-other-address", "dispatcher")));
  Conn& flooder = *a.front();
  for (int i = 0; i < 1000; ++i)
    if (!flooder.send({{"event", "ping"}})) break;
  EXPECT(flooder.waitClosed(milliseconds(5000)) == 1008);
  EXPECT(flooder.closeReason() == "rate_limit");
  auto sub = b.request("thread.subscribe", {{"threadId", "addr-1"}});
  EXPECT(sub && (*sub)["event"] == "ack");
  EXPECT(b.request("ping"));
  for (auto& c : a) c->closeCleanly();
  // The server forgets each socket when its close arrives: within a moment
  // the address may connect again.
  bool again = false;
  for (int attempt = 0; attempt < 20 && !again; ++attempt) {
    Conn c;
    EXPECT(c.open(0, "127.0.0.2"));
    again = c.request("ping").has_value() && !c.closed();
    c.closeCleanly();
    if (!again) std::this_thread::sleep_for(milliseconds(100));
  }
  EXPECT(again);
  b.closeCleanly();
  return true;
}

/// A client that stops reading while events pile up for it: once its send
/// queue is full (--max-outbox, 1024 in dispatch_e2e.sh) the server closes
/// it with 1008 "send_queue_full". Forty senders, each in a thread of its
/// own that only the reader also joined, post 90 messages of 4000 bytes
/// each (14 MB, far more than the kernel buffers and the queue hold). Then
/// the reader reads again: the close frame must come after what was in
/// flight, with its code and reason, not a bare reset.
bool sendQueueFull() {
  constexpr int kSenders = 40, kMessages = 90;
  Conn reader;
  EXPECT(reader.open(16 * 1024));
  EXPECT(reader.authenticate(user("u-slow", "dispatcher")));
  for (int i = 0; i < kSenders; ++i)
    EXPECT(reader.request("thread.subscribe", {{"threadId", "sq" + std::to_string(i)}}));
  std::vector<std::unique_ptr<Conn>> senders;
  const std::string text(4000, 'm');
  for (int i = 0; i < kSenders; ++i) {
    senders.push_back(std::make_unique<Conn>());
    Conn& s = *senders.back();
    EXPECT(s.open());
    EXPECT(s.authenticate(user("u-sq" + std::to_string(i), "dispatcher")));
    EXPECT(s.request("thread.subscribe", {{"threadId", "sq" + std::to_string(i)}}));
    for (int k = 0; k < kMessages; ++k)
      EXPECT(
          s.send({{"event", "message.send"},
                  {"data", {{"threadId", "sq" + std::to_string(i)}, {"text", text}}}}));
  }
  // Every sender hears its acks: the server has handled every message.
  for (auto& s : senders) {
    int acks = 0;
    while (acks < kMessages && s->waitFor("ack")) ++acks;
    EXPECT(acks == kMessages);
  }
  int received = 0;
  while (reader.next(milliseconds(3000))) ++received;
  gWhy = "after " + std::to_string(received) + " messages: close code " +
         std::to_string(reader.waitClosed(milliseconds(0))) + " reason \"" +
         reader.closeReason() + "\", " + reader.readError();
  EXPECT(reader.closed());
  EXPECT(received < kSenders * kMessages);  // it was cut off, not served
  EXPECT(reader.waitClosed(milliseconds(0)) == 1008);
  EXPECT(reader.closeReason() == "send_queue_full");
  for (auto& s : senders) s->closeCleanly();
  return true;
}

bool authDeadline() {
  Conn c;
  EXPECT(c.open());
  const auto t0 = Clock::now();
  EXPECT(c.waitClosed(milliseconds(5000)) == 4001);
  EXPECT(Clock::now() - t0 < std::chrono::seconds(4));
  return true;
}

bool authAndRooms() {
  Conn c;
  EXPECT(c.open());
  auto r = c.request("authenticate", {{"token", token(user("u7", "crew", "c3"))}});
  EXPECT(r && (*r)["event"] == "ack");
  EXPECT((*r)["data"]["rooms"] == json({"role:crew", "user:u7", "crew:c3"}));
  r = c.request("authenticate", {{"token", token(user("u7", "crew", "c3"))}});
  EXPECT(codeOf(r) == "already_authenticated");
  r = c.request("subscribeToAnalytics", {{"type", "revenue"}});
  EXPECT(codeOf(r) == "forbidden");
  r = c.request("job.update", {{"jobId", "9"}, {"status", "done"}});
  EXPECT(codeOf(r) == "forbidden");
  r = c.request("subscribeToJob", {{"jobId", "has space"}});
  EXPECT(codeOf(r) == "bad_request");
  r = c.request("subscribeToJob", {{"jobId", 9}});
  EXPECT(r && (*r)["data"]["room"] == "job:9" && (*r)["data"]["result"] == "ok");
  r = c.request("subscribeToJob", {{"jobId", "9"}});
  EXPECT(r && (*r)["data"]["result"] == "already_done");
  r = c.request("unsubscribeFromJob", {{"jobId", "9"}});
  EXPECT(r && (*r)["data"]["result"] == "ok");
  r = c.request("unsubscribeFromJob", {{"jobId", "9"}});
  EXPECT(r && (*r)["data"]["result"] == "already_done");

  Conn d;
  EXPECT(d.open());
  EXPECT(d.authenticate(user("u8", "dispatcher", "c3")));
  r = d.request("subscribeToAnalytics", {{"type", "revenue"}});
  EXPECT(r && (*r)["event"] == "ack" && (*r)["data"]["room"] == "analytics:revenue");

  // An admin has no crew: crewId "" and no crew: room.
  Conn a;
  EXPECT(a.open());
  r = a.request("authenticate", {{"token", token(user("u9", "admin"))}});
  EXPECT(r && (*r)["event"] == "ack" && (*r)["data"]["crewId"] == "");
  EXPECT((*r)["data"]["rooms"] == json({"role:admin", "user:u9"}));
  r = d.request("unsubscribeFromAnalytics", {{"type", "revenue"}});
  EXPECT(r && (*r)["event"] == "ack");
  return true;
}

bool typingRelay() {
  Conn a, b;
  EXPECT(a.open() && b.open());
  EXPECT(a.authenticate(user("ua", "dispatcher")));
  EXPECT(b.authenticate(user("ub", "crew")));
  auto r = a.request("typing.start", {{"threadId", "tp"}});
  EXPECT(codeOf(r) == "not_subscribed");
  EXPECT(a.request("thread.subscribe", {{"threadId", "tp"}}));
  EXPECT(b.request("thread.subscribe", {{"threadId", "tp"}}));

  r = a.request("typing.start", {{"threadId", "tp"}});
  EXPECT(r && (*r)["data"]["result"] == "ok");
  auto ev = b.waitFor("typingStarted");
  EXPECT(ev && (*ev)["data"]["threadId"] == "tp" && (*ev)["data"]["userId"] == "ua");
  EXPECT(typingIs(1));
  r = a.request("typing.start", {{"threadId", "tp"}});  // a keystroke: a restart
  EXPECT(r && (*r)["data"]["result"] == "already_done");
  r = a.request("typing.stop", {{"threadId", "tp"}});
  EXPECT(r && (*r)["data"]["result"] == "ok");
  ev = b.waitFor("typingStopped");
  EXPECT(ev && (*ev)["data"]["userId"] == "ua");
  EXPECT(typingIs(0));

  // The auto-clear (the server runs with --typing-timeout-ms 400): never
  // before 400 ms after the request was sent.
  const auto t0 = Clock::now();
  EXPECT(a.request("typing.start", {{"threadId", "tp"}}));
  EXPECT(b.waitFor("typingStarted"));
  ev = b.waitFor("typingStopped", nullptr, milliseconds(3000));
  EXPECT(ev && (*ev)["data"]["userId"] == "ua");
  EXPECT(Clock::now() - t0 >= milliseconds(400));
  EXPECT(typingIs(0));

  // A message reaches the other member, not the sender ("delivered" counts
  // the members on the sender's loop: 1, or 0 when b's loop is not a's).
  r = b.request("message.send", {{"threadId", "tp"}, {"text", "10 minutes out"}});
  EXPECT(r && (*r)["data"]["delivered"].is_number_integer());
  const int delivered = (*r)["data"]["delivered"].get<int>();
  if (serverLoops() == 1)
    EXPECT(delivered == 1);
  else
    EXPECT(delivered == 0 || delivered == 1);
  ev = a.waitFor("messageCreated");
  EXPECT(ev && (*ev)["data"]["text"] == "10 minutes out" &&
         (*ev)["data"]["userId"] == "ub");

  // Typing, then the TCP connection dies: the others hear typingStopped.
  EXPECT(a.request("typing.start", {{"threadId", "tp"}}));
  EXPECT(b.waitFor("typingStarted"));
  a.drop();
  ev = b.waitFor("typingStopped");
  EXPECT(ev && (*ev)["data"]["userId"] == "ua");
  EXPECT(typingIs(0));
  return true;
}

bool httpEndpoints() {
  std::string err;
  auto r = dispatch::httpGet(gHost, gPort, "/stats", &err);
  EXPECT(r && r->status == 200);
  json s = json::parse(r->body, nullptr, false);
  for (const char* k : {"connectedClients", "typingTimers", "trackedRooms", "rooms",
                        "connectionTimers", "typingRows", "serverSessions"})
    EXPECT(s.contains(k));
  r = dispatch::httpGet(gHost, gPort, "/metrics", &err);
  EXPECT(r && r->status == 200);
  EXPECT(r->body.find("roomkeeper_connected_clients ") != std::string::npos);
  EXPECT(r->body.find("dispatch_typing_rows ") != std::string::npos);
  r = dispatch::httpGet(gHost, gPort, "/nope", &err);
  EXPECT(r && r->status == 404);
  return true;
}

/// What came back for a hand-written HTTP request: the status, the header
/// block and every byte after it, read until the server closed.
struct RawReply {
  int status = 0;
  std::string headers, body;
};

/// Sends `request` as it is and reads until EOF; nullopt (and gWhy) if the
/// connection failed, was reset, or did not close within 3 s.
std::optional<RawReply> rawHttp(const std::string& request) {
  tcp::socket s(gIoc);
  beast::error_code ec = asio::error::would_block;
  s.async_connect(tcp::endpoint(asio::ip::make_address(gHost), gPort),
                  [&](beast::error_code e) { ec = e; });
  if (!runUntil([&] { return ec != asio::error::would_block; }, milliseconds(3000)) || ec)
    return gWhy = "connect: " + ec.message(), std::nullopt;
  // Write and read at once: a server that answers before it has read a
  // large body must still get its answer through.
  bool wrote = false, eof = false;
  beast::error_code readEc;
  std::string in;
  char chunk[4096];
  asio::async_write(s, asio::buffer(request),
                    [&](beast::error_code, std::size_t) { wrote = true; });
  std::function<void()> readMore = [&] {
    s.async_read_some(asio::buffer(chunk), [&](beast::error_code e, std::size_t n) {
      in.append(chunk, n);
      if (e) {
        readEc = e;
        eof = true;
        return;
      }
      readMore();
    });
  };
  readMore();
  const bool done = runUntil([&] { return eof && wrote; }, milliseconds(3000));
  beast::error_code ignored;
  s.close(ignored);
  runUntil([&] { return eof && wrote; }, milliseconds(1000));
  if (!done) return gWhy = "no EOF within 3 s, read " + in, std::nullopt;
  if (readEc != asio::error::eof)
    return gWhy = "read: " + readEc.message() + " after " + in, std::nullopt;
  const auto split = in.find("\r\n\r\n");
  if (in.rfind("HTTP/1.1 ", 0) != 0 || split == std::string::npos)
    return gWhy = "not an HTTP response: " + in, std::nullopt;
  return RawReply{std::atoi(in.c_str() + 9), in.substr(0, split + 2),
                  in.substr(split + 4)};
}

std::string rawRequest(const std::string& method, const std::string& target,
                       const std::string& body = "") {
  std::string r =
      method + " " + target + " HTTP/1.1\r\nHost: " + gHost + "\r\nConnection: close\r\n";
  if (!body.empty() || method == "POST" || method == "PUT")
    r += "Content-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n";
  return r + "\r\n" + body;
}

bool hasHeader(const RawReply& r, const std::string& line) {
  return r.headers.find("\r\n" + line + "\r\n") != std::string::npos;
}

bool httpMethodsAndQueries() {
  // A body on a method that is not allowed: 405, not a dropped connection.
  for (const char* method : {"POST", "PUT", "DELETE", "PATCH"}) {
    auto r = rawHttp(rawRequest(method, "/stats", "{}"));
    EXPECT(r);
    gWhy = method;
    EXPECT(r->status == 405);
    EXPECT(hasHeader(*r, "Allow: GET, HEAD"));
  }
  // GET with a body: the body is ignored.
  auto r = rawHttp(rawRequest("GET", "/stats", R"({"ignored":true})"));
  EXPECT(r && r->status == 200);
  EXPECT(json::parse(r->body, nullptr, false).contains("connectedClients"));
  // HEAD: the headers a GET would get, no body at all.
  r = rawHttp(rawRequest("HEAD", "/healthz"));
  EXPECT(r && r->status == 200);
  EXPECT(hasHeader(*r, "Content-Length: 3"));
  EXPECT(r->body.empty());
  r = rawHttp(rawRequest("HEAD", "/nope"));
  EXPECT(r && r->status == 404 && r->body.empty());
  // The query string does not change the route.
  r = rawHttp(rawRequest("GET", "/stats?x=1"));
  EXPECT(r && r->status == 200);
  EXPECT(json::parse(r->body, nullptr, false).contains("serverSessions"));
  r = rawHttp(rawRequest("GET", "/healthz?probe=1"));
  EXPECT(r && r->status == 200 && r->body == "ok\n");
  r = rawHttp(rawRequest("GET", "/metrics?name[]=x"));
  EXPECT(r && r->status == 200);
  EXPECT(r->body.find("dispatch_typing_rows ") != std::string::npos);
  r = rawHttp(rawRequest("GET", "/nope?x=/stats"));
  EXPECT(r && r->status == 404);
  // A body over the limit (16 KiB): 413, and the answer survives the rest
  // of the body still arriving.
  r = rawHttp(rawRequest("POST", "/stats", std::string(1 << 20, 'x')));
  EXPECT(r && r->status == 413);
  // Not HTTP: 400.
  r = rawHttp("HELLO THERE\r\n\r\n");
  EXPECT(r && r->status == 400);
  return true;
}

bool nothingLeft() {
  // Every connection above is closed (or dropped); the server must be back
  // to zero once it has noticed.
  std::optional<json> s;
  const auto end = Clock::now() + milliseconds(5000);
  for (;;) {
    s = stats();
    bool zero = s.has_value();
    if (zero)
      for (const char* k : {"connectedClients", "typingTimers", "trackedRooms", "rooms",
                            "connectionTimers", "typingRows", "serverSessions"})
        zero = zero && (*s)[k] == 0;
    if (zero) break;
    if (Clock::now() > end) {
      gWhy = "stats not back to zero: " + (s ? s->dump() : std::string("unreachable"));
      return false;
    }
    runUntil([] { return false; }, milliseconds(100));
  }
  EXPECT((*s)["callbackErrors"] == 0);
  return true;
}

/// The q-quantile (0..1) of `v` by nearest rank; sorts `v`.
double quantile(std::vector<double>& v, double q) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return 0;
  const std::size_t rank = static_cast<std::size_t>(std::ceil(q * double(v.size())));
  return v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)];
}

double msSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

/// "N samples: p50 .. ms, p99 .. ms, max .. ms"; sorts `v`.
std::string summary(std::vector<double>& v) {
  const double p50 = quantile(v, 0.50), p99 = quantile(v, 0.99);
  char line[128];
  std::snprintf(line, sizeof line, "%zu samples: p50 %.2f ms, p99 %.2f ms, max %.2f ms",
                v.size(), p50, p99, v.empty() ? 0.0 : v.back());
  return line;
}

// The latency limit. Under AddressSanitizer (scripts/checks.sh runs these
// tests in an -O1 ASan build) everything is several times slower; 20 ms
// still sits well below the ~40 ms of a Nagle stall.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr double kLatencyLimitMs = 20.0;
#else
constexpr double kLatencyLimitMs = 5.0;
#endif

/// Latency on loopback, 100 connections one after the other: TCP connect,
/// login and four joins, each reply awaited before the next request; then
/// the four leaves sent at once. The second reply of a burst is written
/// while the first is still unacknowledged: without TCP_NODELAY on the
/// server's socket, Nagle's algorithm holds it until the client's delayed
/// ACK (~40 ms on Linux), in every round. A shared two-core machine can
/// stall any one round for a few ms, so the best of three rounds counts.
bool requestRoundTrips() {
  const std::vector<std::pair<std::string, json>> joins = {
      {"thread.subscribe", {{"threadId", "rtt"}}},
      {"subscribeToJob", {{"jobId", "rtt"}}},
      {"subscribeToAnalytics", {{"type", "rtt"}}},
      {"thread.subscribe", {{"threadId", "rtt2"}}},
  };
  const std::vector<std::pair<std::string, json>> leaves = {
      {"thread.unsubscribe", {{"threadId", "rtt"}}},
      {"unsubscribeFromJob", {{"jobId", "rtt"}}},
      {"unsubscribeFromAnalytics", {{"type", "rtt"}}},
      {"thread.unsubscribe", {{"threadId", "rtt2"}}},
  };
  gWhy.clear();
  for (int round = 0; round < 3; ++round) {
    std::vector<double> login, burst;
    for (int i = 0; i < 100; ++i) {
      Conn c;
      const auto t0 = Clock::now();
      EXPECT(c.open());
      EXPECT(c.authenticate(user("u-rtt" + std::to_string(i), "dispatcher")));
      for (const auto& [event, data] : joins) {
        auto r = c.request(event, data);
        EXPECT(r && (*r)["event"] == "ack");
      }
      login.push_back(msSince(t0));
      const auto t1 = Clock::now();
      auto replies = c.requestAll(leaves);
      EXPECT(replies.size() == leaves.size());
      for (const json& r : replies) EXPECT(r["event"] == "ack");
      burst.push_back(msSince(t1));
      c.closeCleanly();
    }
    const std::string a = summary(login), b = summary(burst);
    std::printf("     round %d: connect + login + 4 joins: %s\n", round + 1, a.c_str());
    std::printf("     round %d: 4 leaves at once:          %s\n", round + 1, b.c_str());
    if (quantile(login, 0.99) < kLatencyLimitMs &&
        quantile(burst, 0.99) < kLatencyLimitMs)
      return true;
    gWhy += (gWhy.empty() ? "" : "; ") + ("login " + a + ", burst " + b);
  }
  EXPECT(!"p99 under the limit in one of three rounds");
  return true;
}

pid_t gServerPid = 0;

bool serverShutdown() {
  Conn c, peer;
  EXPECT(c.open() && peer.open());
  EXPECT(c.authenticate(user("u-last", "admin")));
  EXPECT(peer.authenticate(user("u-peer", "dispatcher")));
  EXPECT(c.request("thread.subscribe", {{"threadId", "bye"}}));
  EXPECT(peer.request("thread.subscribe", {{"threadId", "bye"}}));
  EXPECT(c.request("typing.start", {{"threadId", "bye"}}));
  EXPECT(peer.waitFor("typingStarted"));
  Conn idle;  // never authenticates: it hears it too
  EXPECT(idle.open());
  EXPECT(kill(gServerPid, SIGTERM) == 0);
  auto ev = c.waitFor("serverShutdown");
  EXPECT(ev && (*ev)["data"]["message"] == "Server is shutting down");
  EXPECT(c.waitClosed(milliseconds(5000)) == 1001);
  // The typing indicator ends with the server, but no typingStopped is
  // sent: every connection is closing by then.
  std::vector<std::string> events;
  while (auto m = peer.next(milliseconds(5000))) events.push_back((*m)["event"]);
  gWhy = "peer heard:";
  for (const std::string& e : events) gWhy += " " + e;
  EXPECT(events == std::vector<std::string>{"serverShutdown"});
  EXPECT(peer.waitClosed(milliseconds(0)) == 1001);
  EXPECT(idle.waitFor("serverShutdown"));
  EXPECT(idle.waitClosed(milliseconds(5000)) == 1001);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--port")
      gPort = static_cast<unsigned short>(std::atoi(argv[i + 1]));
    else if (flag == "--host")
      gHost = argv[i + 1];
    else if (flag == "--server-pid")
      gServerPid = static_cast<pid_t>(std::atoi(argv[i + 1]));
  }
  if (gPort == 0) {
    std::fprintf(stderr,
                 "usage: dispatch_protocol_test --port N [--host H] [--server-pid P]\n");
    return 2;
  }
  run("malformed JSON: error bad_json, connection still works", malformedJson);
  run("wrong message shapes: error bad_request", wrongShapes);
  run("unknown event: error unknown_event", unknownEvent);
  run("binary frame: error bad_frame", binaryFrame);
  run("typing and subscribing before auth: error not_authenticated", typingBeforeAuth);
  run("bad token: error auth_failed, close 4003; no token: bad_request, open", badToken);
  run("expired token: token_expired, open; exp changed: auth_failed", tokenExpiry);
  run("oversized frames (68 KiB, 5 MB, 20 MB; 3 each): close 1009", oversizedFrame);
  run("flood: close 1008", flood);
  run("per address: 127.0.0.2 over --max-per-ip and flooding gets 1008, 127.0.0.3 served",
      perAddressLimits);
  run("a client that stops reading: close 1008 send_queue_full", sendQueueFull);
  run("no authenticate: close 4001 at the deadline", authDeadline);
  run("authenticate, rooms, roles, subscribe results", authAndRooms);
  run("128 rooms a session: too_many_rooms", roomLimit);
  run("64 sessions a user: too_many_sessions, open, then 4001", sessionLimit);
  run("typing relay, restart, stop, auto-clear, drop; messages", typingRelay);
  run("GET /stats, /metrics, 404", httpEndpoints);
  run("HTTP: 405 (also with a body), GET with a body, HEAD, queries, 413, 400",
      httpMethodsAndQueries);
  run("latency: login + 4 joins, and a burst of 4, p99 < 5 ms (20 under ASan)",
      requestRoundTrips);
  run("after all of it: /stats back to zero, no typing row", nothingLeft);
  if (gServerPid > 0)
    run("SIGTERM: serverShutdown to everyone, close 1001, no typingStopped",
        serverShutdown);
  std::printf("%d passed, %d failed\n", gPassed, gFailed);
  return gFailed == 0 ? 0 : 1;
}
