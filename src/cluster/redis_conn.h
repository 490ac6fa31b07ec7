// SPDX-License-Identifier: MIT
// File: src/cluster/redis_conn.h -- one Redis connection on an Asio
// io_context: hiredis formats the commands (redisFormatCommandArgv) and
// parses the replies (redisReader); the socket, the timeouts and the
// reconnects are ours, so hiredis never owns (or closes) a descriptor.
//
// Commands are pipelined: each is appended to the write buffer and its
// callback to a FIFO; replies complete callbacks in order. A connection
// that is down fails every command at once (an error reply "DOWN"); one
// whose oldest command has waited longer than the request timeout while
// nothing at all came back for as long is closed (hiredis 0.14 has no
// timeouts; a server busy with a pipelined burst still answers steadily). Subscribed, every push message
// goes to onPush instead. Never blocks; every call and handler on its strand.
#ifndef ROOMKEEPER_SRC_CLUSTER_REDIS_CONN_H_
#define ROOMKEEPER_SRC_CLUSTER_REDIS_CONN_H_

// Before Asio: Boost 1.74's asio/awaitable.hpp uses std::exchange without
// including <utility> (a C++20 build fails without this).
#include <utility>
#include <boost/asio.hpp>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

struct redisReader;

namespace roomkeeper::cluster::detail {

struct Reply {
  enum class Type : std::uint8_t { kString, kArray, kInteger, kNil, kStatus, kError };
  Type type = Type::kNil;
  std::string str;
  long long integer = 0;
  std::vector<Reply> elements;
  bool error() const noexcept { return type == Type::kError; }
};

/// Every handler of a connection runs on this strand (its node's).
using Strand = boost::asio::strand<boost::asio::io_context::executor_type>;

class RedisConn : public std::enable_shared_from_this<RedisConn> {
 public:
  using Callback = std::function<void(Reply&&)>;
  struct Options {
    std::string host = "127.0.0.1";
    std::uint16_t port = 6379;
    std::chrono::milliseconds connectTimeout{1000};
    std::chrono::milliseconds requestTimeout{2000};
    std::size_t maxPending = 500000;  // commands in flight; more fail at once
    std::string name;                 // CLIENT SETNAME, for the logs and CLIENT KILL
  };
  RedisConn(Strand strand, Options opt);
  ~RedisConn();

  /// Connects (again); `done(true)` once connected, false on failure.
  void connect(std::function<void(bool)> done);
  /// Closes; every pending command fails. onDown is not called.
  void close();
  bool connected() const noexcept { return state_ == State::kUp; }
  bool connecting() const noexcept { return state_ == State::kConnecting; }
  /// Queues one command. With the connection down (or too many pending),
  /// `cb` gets an error reply at once (posted, never inline).
  void command(std::vector<std::string> args, Callback cb);
  /// Pushes on a subscribed connection (messages, subscribe confirmations).
  std::function<void(Reply&&)> onPush;
  /// The connection was lost (read/write error, timeout, server closed).
  std::function<void()> onDown;
  std::size_t pending() const noexcept { return callbacks_.size(); }
  void setSubscribed(bool s) noexcept { subscribed_ = s; }

 private:
  enum class State : std::uint8_t { kDown, kConnecting, kUp };
  void fail(const char* why);
  void failAll(const char* why);
  void startRead();
  void startWrite();
  void checkTimeout();
  bool parse();

  Strand io_;
  Options opt_;
  boost::asio::ip::tcp::socket sock_;
  boost::asio::steady_timer timer_;
  State state_ = State::kDown;
  redisReader* reader_ = nullptr;
  std::string out_, writing_;
  bool writeActive_ = false;
  std::vector<char> in_;
  struct Pending {
    Callback cb;
    std::chrono::steady_clock::time_point sent;
  };
  std::deque<Pending> callbacks_;
  bool subscribed_ = false;
  std::chrono::steady_clock::time_point lastRead_{};
  std::uint64_t epoch_ = 0;  // bumps at each (re)connect: stale handlers see it
};

}  // namespace roomkeeper::cluster::detail

#endif  // ROOMKEEPER_SRC_CLUSTER_REDIS_CONN_H_
