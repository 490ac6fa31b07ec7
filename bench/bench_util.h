// SPDX-License-Identifier: MIT
// File: bench/bench_util.h
//
// Small helpers shared by every workload of roomkeeper-bench: the benchmark
// configuration, the workload's ids and room names (see
// shared/bench/WORKLOAD.md), a steady-clock stopwatch, the allocator's
// bytes-in-use counter, a one-line JSON builder and a volatile sink that
// keeps the optimizer from deleting measured work.
#ifndef ROOMKEEPER_BENCH_BENCH_UTIL_H_
#define ROOMKEEPER_BENCH_BENCH_UTIL_H_

#include <malloc.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

// Sizes of the three workloads. The defaults are the WORKLOAD.md sizes;
// --quick shrinks them (sessions 2000, timers 20000, dispatch 2000).
struct BenchConfig {
  std::size_t sessions = 200000;         // W1 rooms: S
  std::size_t dispatchSessions = 20000;  // W3 dispatch: S
  std::size_t timers = 1000000;          // W2 timers: T
  std::size_t restarts = 10;             // W2 and W3: K
  bool quick = false;
};

// ---------------------------------------------------------------------------
// Memory

// Bytes the program holds from glibc malloc right now: the allocator's own
// accounting, never RSS. uordblks is what is in use in the arenas; chunks at
// or above the mmap threshold (128 KiB at start, e.g. the bucket array of a
// hash map with a few hundred thousand entries) are served by mmap and
// counted in hblkhd instead, so both are added.
inline std::size_t bytesInUse() {
  struct mallinfo2 info = mallinfo2();
  return info.uordblks + info.hblkhd;
}

// (after - before) / count as a double; negative when memory went down.
inline double bytesPer(std::size_t before, std::size_t after,
                       std::size_t count) {
  if (count == 0) return 0.0;
  return (static_cast<double>(after) - static_cast<double>(before)) /
         static_cast<double>(count);
}

// ---------------------------------------------------------------------------
// Time

// Measures elapsed steady-clock time in nanoseconds from construction or
// the last restart().
class Stopwatch {
 public:
  using Clock = std::chrono::steady_clock;

  Stopwatch() : start_(Clock::now()) {}

  void restart() { start_ = Clock::now(); }

  std::uint64_t elapsedNs() const {
    auto d = Clock::now() - start_;
    return static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
  }

 private:
  Clock::time_point start_;
};

// ns / ops as a double (0 when there were no ops).
inline double perOp(std::uint64_t ns, std::uint64_t ops) {
  if (ops == 0) return 0.0;
  return static_cast<double>(ns) / static_cast<double>(ops);
}

// ---------------------------------------------------------------------------
// Keeping the optimizer honest

// Everything a measured loop computes (member counts, sizes, return values)
// is folded into this volatile, so the compiler cannot drop the loop.
inline volatile std::uint64_t gBenchSink = 0;

inline void benchSink(std::uint64_t value) {
  gBenchSink = gBenchSink + value;
}

// ---------------------------------------------------------------------------
// JSON lines

// Builds one JSON object with keys in insertion order, e.g.
//
//   JsonLine line;
//   line.addString("workload", "rooms").addCount("sessions", 200000)
//       .addNumber("join_ns_per_op", 41.237);
//   line.print();   // {"workload":"rooms","sessions":200000,"join_ns_per_op":41.24}
//
// Nested objects (the "peak" and "left" stats) are JsonLines themselves,
// added with addObject().
class JsonLine {
 public:
  JsonLine& addString(const char* key, const std::string& value) {
    addKey(key);
    appendQuoted(value);
    return *this;
  }

  // A measured value, printed with `decimals` digits after the point (the
  // benchmark uses 2 for times and sizes). NaN and infinities print as null.
  JsonLine& addNumber(const char* key, double value, int decimals = 2) {
    addKey(key);
    if (!std::isfinite(value)) {
      body_ += "null";
      return *this;
    }
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f", decimals, value);
    body_ += buf;
    return *this;
  }

  // A count, printed as an integer.
  JsonLine& addCount(const char* key, std::uint64_t value) {
    addKey(key);
    body_ += std::to_string(value);
    return *this;
  }

  JsonLine& addBool(const char* key, bool value) {
    addKey(key);
    body_ += value ? "true" : "false";
    return *this;
  }

  JsonLine& addObject(const char* key, const JsonLine& object) {
    addKey(key);
    body_ += object.text();
    return *this;
  }

  std::string text() const { return "{" + body_ + "}"; }

  // Writes the object and a newline to stdout and flushes, so lines appear
  // as each workload finishes.
  void print() const {
    std::string line = text();
    line += '\n';
    std::fwrite(line.data(), 1, line.size(), stdout);
    std::fflush(stdout);
  }

 private:
  void addKey(const char* key) {
    if (!body_.empty()) body_ += ',';
    appendQuoted(key);
    body_ += ':';
  }

  void appendQuoted(const std::string& s) {
    body_ += '"';
    for (char c : s) {
      switch (c) {
        case '"': body_ += "\\\""; break;
        case '\\': body_ += "\\\\"; break;
        case '\n': body_ += "\\n"; break;
        case '\t': body_ += "\\t"; break;
        default:
          if (static_cast<unsigned char>(c) < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x",
                          static_cast<unsigned>(static_cast<unsigned char>(c)));
            body_ += buf;
          } else {
            body_ += c;
          }
      }
    }
    body_ += '"';
  }

  std::string body_;
};

// ---------------------------------------------------------------------------
// Workload ids and room names (WORKLOAD.md). Products are 64-bit.

constexpr std::size_t kRoomsPerSession = 7;  // W1: rooms joined per session
constexpr std::uint64_t kCrews = 1000;       // crew:0 ... crew:999
constexpr std::uint64_t kTypingTimeoutMs = 5000;
constexpr std::uint64_t kConnectionTimeoutMs = 30000;

// "sock-<s>"
inline std::string sessionIdOf(std::uint64_t s) {
  return "sock-" + std::to_string(s);
}

// The three job ids of session s (W1 rooms #3..#5, W3 job subscriptions).
inline std::array<std::uint64_t, 3> jobsOf(std::uint64_t s) {
  return {(s * 7919) % 50000, (s * 104729 + 1) % 50000,
          (s * 15485863 + 2) % 50000};
}

// The thread id of session s (W1 room #6, W3 typing thread).
inline std::uint64_t threadOf(std::uint64_t s) { return (s * 31337) % 100000; }

inline std::uint64_t crewOf(std::uint64_t s) { return s % kCrews; }

// W1: the 7 rooms of session s, in join order.
inline std::array<std::string, kRoomsPerSession> roomsOf(std::uint64_t s) {
  std::array<std::uint64_t, 3> jobs = jobsOf(s);
  return {"user:" + std::to_string(s),
          "role:" + std::to_string(s % 3),
          "crew:" + std::to_string(crewOf(s)),
          "job:" + std::to_string(jobs[0]),
          "job:" + std::to_string(jobs[1]),
          "job:" + std::to_string(jobs[2]),
          "thread:" + std::to_string(threadOf(s))};
}

// "crew:<c>"
inline std::string crewRoomOf(std::uint64_t c) {
  return "crew:" + std::to_string(c);
}

// W3: "user-<s % (S/2)>" (two devices per user).
inline std::string dispatchUserOf(std::uint64_t s, std::uint64_t sessions) {
  std::uint64_t users = sessions / 2 > 0 ? sessions / 2 : 1;
  return "user-" + std::to_string(s % users);
}

// W3: admin | dispatcher | crew by s % 3.
inline const char* dispatchRoleOf(std::uint64_t s) {
  static const char* const kRoles[3] = {"admin", "dispatcher", "crew"};
  return kRoles[s % 3];
}

#endif  // ROOMKEEPER_BENCH_BENCH_UTIL_H_
