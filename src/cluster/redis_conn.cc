// SPDX-License-Identifier: MIT
#include "redis_conn.h"

#include <hiredis/hiredis.h>

#include <utility>

namespace roomkeeper::cluster::detail {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace {

Reply convert(const redisReply* r) {
  Reply out;
  switch (r->type) {
    case REDIS_REPLY_STRING:
      out.type = Reply::Type::kString;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_STATUS:
      out.type = Reply::Type::kStatus;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_ERROR:
      out.type = Reply::Type::kError;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_INTEGER:
      out.type = Reply::Type::kInteger;
      out.integer = r->integer;
      break;
    case REDIS_REPLY_ARRAY:
      out.type = Reply::Type::kArray;
      out.elements.reserve(r->elements);
      for (std::size_t i = 0; i < r->elements; ++i) out.elements.push_back(convert(r->element[i]));
      break;
    default:
      out.type = Reply::Type::kNil;
  }
  return out;
}

Reply errorReply(const char* why) {
  Reply r;
  r.type = Reply::Type::kError;
  r.str = why;
  return r;
}

}  // namespace

RedisConn::RedisConn(Strand strand, Options opt)
    : io_(strand), opt_(std::move(opt)), sock_(strand), timer_(strand), in_(16384) {}

RedisConn::~RedisConn() {
  if (reader_) redisReaderFree(reader_);
}

void RedisConn::connect(std::function<void(bool)> done) {
  close();
  state_ = State::kConnecting;
  const std::uint64_t epoch = ++epoch_;
  reader_ = redisReaderCreate();
  boost::system::error_code ec;
  const auto addr = asio::ip::make_address(opt_.host, ec);
  if (ec || !reader_) {
    state_ = State::kDown;
    asio::post(io_, [done]() { done(false); });
    return;
  }
  auto self = shared_from_this();
  timer_.expires_after(opt_.connectTimeout);
  timer_.async_wait([this, self, epoch](boost::system::error_code e) {
    if (!e && epoch == epoch_ && state_ == State::kConnecting) sock_.close();
  });
  sock_.async_connect(tcp::endpoint(addr, opt_.port),
                      [this, self, epoch, done](boost::system::error_code e) {
                        if (epoch != epoch_) return;
                        timer_.cancel();
                        if (e) {
                          state_ = State::kDown;
                          sock_.close();
                          done(false);
                          return;
                        }
                        sock_.set_option(tcp::no_delay(true));
                        state_ = State::kUp;
                        lastRead_ = std::chrono::steady_clock::now();
                        startRead();
                        checkTimeout();
                        if (!opt_.name.empty())
                          command({"CLIENT", "SETNAME", opt_.name}, [](Reply&&) {});
                        done(true);
                      });
}

void RedisConn::close() {
  ++epoch_;
  boost::system::error_code ec;
  timer_.cancel();
  sock_.close(ec);
  state_ = State::kDown;
  out_.clear();
  writing_.clear();
  writeActive_ = false;
  subscribed_ = false;
  if (reader_) {
    redisReaderFree(reader_);
    reader_ = nullptr;
  }
  failAll("DOWN connection closed");
}

void RedisConn::failAll(const char* why) {
  std::deque<Pending> cbs;
  cbs.swap(callbacks_);
  for (auto& p : cbs) {
    // Posted: a callback may issue commands, and the caller may be inside
    // one of ours.
    asio::post(io_, [cb = std::move(p.cb), why]() { cb(errorReply(why)); });
  }
}

void RedisConn::fail(const char* why) {
  if (state_ == State::kDown) return;
  close();
  (void)why;
  if (onDown) asio::post(io_, [self = shared_from_this()]() {
      if (self->onDown) self->onDown();
    });
}

void RedisConn::command(std::vector<std::string> args, Callback cb) {
  if (state_ != State::kUp || callbacks_.size() >= opt_.maxPending) {
    const char* why = state_ != State::kUp ? "DOWN not connected" : "DOWN too many pending";
    asio::post(io_, [cb = std::move(cb), why]() { cb(errorReply(why)); });
    return;
  }
  std::vector<const char*> argv;
  std::vector<std::size_t> lens;
  argv.reserve(args.size());
  lens.reserve(args.size());
  for (auto& a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  char* buf = nullptr;
  const int n = redisFormatCommandArgv(&buf, static_cast<int>(argv.size()), argv.data(),
                                       lens.data());
  if (n < 0 || !buf) {
    asio::post(io_, [cb = std::move(cb)]() { cb(errorReply("ERR format")); });
    return;
  }
  out_.append(buf, static_cast<std::size_t>(n));
  redisFreeCommand(buf);
  callbacks_.push_back({std::move(cb), std::chrono::steady_clock::now()});
  startWrite();
}

void RedisConn::startWrite() {
  if (writeActive_ || out_.empty() || state_ != State::kUp) return;
  writing_.swap(out_);
  out_.clear();
  writeActive_ = true;
  auto self = shared_from_this();
  const std::uint64_t epoch = epoch_;
  asio::async_write(sock_, asio::buffer(writing_),
                    [this, self, epoch](boost::system::error_code e, std::size_t) {
                      if (epoch != epoch_) return;
                      writeActive_ = false;
                      writing_.clear();
                      if (e) return fail("write");
                      startWrite();
                    });
}

void RedisConn::startRead() {
  auto self = shared_from_this();
  const std::uint64_t epoch = epoch_;
  sock_.async_read_some(asio::buffer(in_), [this, self, epoch](boost::system::error_code e,
                                                                std::size_t n) {
    if (epoch != epoch_) return;
    if (e) return fail("read");
    lastRead_ = std::chrono::steady_clock::now();
    if (redisReaderFeed(reader_, in_.data(), n) != REDIS_OK) return fail("protocol");
    if (!parse()) return;
    if (epoch == epoch_) startRead();
  });
}

bool RedisConn::parse() {
  const std::uint64_t epoch = epoch_;
  for (;;) {
    void* raw = nullptr;
    if (redisReaderGetReply(reader_, &raw) != REDIS_OK) {
      fail("protocol");
      return false;
    }
    if (!raw) return true;
    Reply r = convert(static_cast<redisReply*>(raw));
    freeReplyObject(raw);
    // Subscribed: pushes are arrays whose first element is a kind name;
    // replies to our own commands (none but SUBSCRIBE's) come as pushes too.
    if (subscribed_ && onPush && r.type == Reply::Type::kArray) {
      if (!callbacks_.empty() && !r.elements.empty() && r.elements[0].str != "message") {
        Pending p = std::move(callbacks_.front());
        callbacks_.pop_front();
        p.cb(std::move(r));
      } else {
        onPush(std::move(r));
      }
    } else if (!callbacks_.empty()) {
      Pending p = std::move(callbacks_.front());
      callbacks_.pop_front();
      p.cb(std::move(r));
    }
    if (epoch != epoch_) return false;  // a callback closed or reconnected us
  }
}

void RedisConn::checkTimeout() {
  auto self = shared_from_this();
  const std::uint64_t epoch = epoch_;
  timer_.expires_after(std::chrono::milliseconds(100));
  timer_.async_wait([this, self, epoch](boost::system::error_code e) {
    if (e || epoch != epoch_ || state_ != State::kUp) return;
    // Dead, not merely busy: the oldest command has waited longer than the
    // timeout and nothing at all has come back for as long (a server
    // working through a burst of pipelined commands answers steadily).
    const auto now = std::chrono::steady_clock::now();
    if (!callbacks_.empty() && now - callbacks_.front().sent > opt_.requestTimeout &&
        now - lastRead_ > opt_.requestTimeout)
      return fail("timeout");
    checkTimeout();
  });
}

}  // namespace roomkeeper::cluster::detail
