// SPDX-License-Identifier: MIT
// File: tests/cluster/redis_support.h -- a real redis-server for a test:
// started on a free loopback port in a temporary directory, without
// persistence, and stopped (SIGKILL) when the object goes; plus a blocking
// hiredis client to look at what is stored.
#ifndef ROOMKEEPER_TESTS_CLUSTER_REDIS_SUPPORT_H_
#define ROOMKEEPER_TESTS_CLUSTER_REDIS_SUPPORT_H_

#include <arpa/inet.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace rkt {

inline std::uint16_t freePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

class RedisProcess {
 public:
  RedisProcess() : port_(freePort()) {
    char tmpl[] = "/tmp/rk-redis-XXXXXX";
    if (!::mkdtemp(tmpl)) throw std::runtime_error("mkdtemp");
    dir_ = tmpl;
    start();
  }
  ~RedisProcess() {
    stop();
    std::system(("rm -rf " + dir_).c_str());
  }
  std::uint16_t port() const { return port_; }
  void start() {
    pid_ = ::fork();
    if (pid_ == 0) {
      // Its log (to stdout without a logfile) goes to the test's directory.
      const std::string log = dir_ + "/redis.log";
      if (std::FILE* f = std::fopen(log.c_str(), "a")) {
        ::dup2(fileno(f), 1);
        ::dup2(fileno(f), 2);
      }
      const std::string port = std::to_string(port_);
      ::execlp("redis-server", "redis-server", "--port", port.c_str(), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--dir", dir_.c_str(), "--loglevel",
               "warning", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    for (int i = 0; i < 200; ++i) {
      if (redisContext* c = redisConnect("127.0.0.1", port_)) {
        const bool ok = c->err == 0;
        redisFree(c);
        if (ok) return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    throw std::runtime_error("redis-server did not start");
  }
  void stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  std::uint16_t port_;
  std::string dir_;
  pid_t pid_ = -1;
};

/// A blocking client for looking (never used by the code under test).
class RedisPeek {
 public:
  explicit RedisPeek(std::uint16_t port) : c_(redisConnect("127.0.0.1", port)) {
    if (!c_ || c_->err) throw std::runtime_error("redisConnect");
  }
  ~RedisPeek() { redisFree(c_); }
  long long integer(const std::vector<std::string>& args) {
    redisReply* r = run(args);
    const long long v = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
    if (r) freeReplyObject(r);
    return v;
  }
  std::vector<std::string> strings(const std::vector<std::string>& args) {
    redisReply* r = run(args);
    std::vector<std::string> v;
    if (r && r->type == REDIS_REPLY_ARRAY)
      for (std::size_t i = 0; i < r->elements; ++i)
        v.emplace_back(r->element[i]->str, r->element[i]->len);
    if (r) freeReplyObject(r);
    return v;
  }
  /// A string (bulk or status) reply; "" for anything else.
  std::string text(const std::vector<std::string>& args) {
    redisReply* r = run(args);
    std::string v;
    if (r && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS))
      v.assign(r->str, r->len);
    if (r) freeReplyObject(r);
    return v;
  }
  /// True if the reply is nil (a missing key or member).
  bool nil(const std::vector<std::string>& args) {
    redisReply* r = run(args);
    const bool v = r && r->type == REDIS_REPLY_NIL;
    if (r) freeReplyObject(r);
    return v;
  }
  /// Keys of the namespace other than the node registry itself.
  std::size_t stateKeys(const std::string& prefix) {
    std::size_t n = 0;
    for (auto& k : strings({"KEYS", prefix + ":*"}))
      if (k != prefix + ":nodes") ++n;
    return n;
  }
  std::size_t keys(const std::string& prefix) { return strings({"KEYS", prefix + ":*"}).size(); }

 private:
  redisReply* run(const std::vector<std::string>& args) {
    std::vector<const char*> argv;
    std::vector<std::size_t> lens;
    for (auto& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    return static_cast<redisReply*>(
        redisCommandArgv(c_, static_cast<int>(args.size()), argv.data(), lens.data()));
  }
  redisContext* c_;
};

}  // namespace rkt

#endif  // ROOMKEEPER_TESTS_CLUSTER_REDIS_SUPPORT_H_
