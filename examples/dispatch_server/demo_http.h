// SPDX-License-Identifier: MIT
// A blocking HTTP GET with a deadline, for the dispatch example's clients
// (dispatch_load, dispatch_protocol_test) to read GET /stats and /metrics.
#ifndef ROOMKEEPER_EXAMPLES_DISPATCH_DEMO_HTTP_H_
#define ROOMKEEPER_EXAMPLES_DISPATCH_DEMO_HTTP_H_

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <optional>
#include <string>

namespace dispatch {

struct HttpReply {
  unsigned status = 0;
  std::string body;
};

/// GET http://host:port<target> with Connection: close, on a private
/// io_context; nullopt (and *error) on failure or after `timeout`.
inline std::optional<HttpReply> httpGet(
    const std::string& host, unsigned short port, const std::string& target,
    std::string* error,
    std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
  namespace asio = boost::asio;
  namespace beast = boost::beast;
  namespace http = beast::http;
  asio::io_context ioc;
  beast::tcp_stream stream(ioc);
  beast::error_code ec;
  const auto address = asio::ip::make_address(host, ec);
  if (ec) {
    *error = "bad host " + host;
    return std::nullopt;
  }
  http::request<http::empty_body> req{http::verb::get, target, 11};
  req.set(http::field::host, host + ":" + std::to_string(port));
  req.keep_alive(false);
  http::response<http::string_body> res;
  beast::flat_buffer buffer;
  beast::error_code result = asio::error::would_block;
  stream.expires_after(timeout);
  stream.async_connect(asio::ip::tcp::endpoint(address, port), [&](beast::error_code e) {
    if (e) {
      result = e;
      return;
    }
    http::async_write(stream, req, [&](beast::error_code e2, std::size_t) {
      if (e2) {
        result = e2;
        return;
      }
      http::async_read(stream, buffer, res,
                       [&](beast::error_code e3, std::size_t) { result = e3; });
    });
  });
  ioc.run();
  if (result) {
    *error = "GET " + target + ": " + result.message();
    return std::nullopt;
  }
  return HttpReply{res.result_int(), std::move(res.body())};
}

}  // namespace dispatch

#endif  // ROOMKEEPER_EXAMPLES_DISPATCH_DEMO_HTTP_H_
