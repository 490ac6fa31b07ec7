// SPDX-License-Identifier: MIT
#include "roomkeeper/cluster/node.h"

#include "fmt/format.h"

namespace roomkeeper::cluster {

std::string Node::prometheusText() const {
  const ClusterStats s = stats();
  std::string out;
  auto gauge = [&](const char* name, const char* help, auto v) {
    out += fmt::format("# HELP roomkeeper_cluster_{0} {1}\n# TYPE roomkeeper_cluster_{0} gauge\n"
                       "roomkeeper_cluster_{0} {2}\n",
                       name, help, v);
  };
  auto counter = [&](const char* name, const char* help, auto v) {
    out += fmt::format("# HELP roomkeeper_cluster_{0}_total {1}\n"
                       "# TYPE roomkeeper_cluster_{0}_total counter\n"
                       "roomkeeper_cluster_{0}_total {2}\n",
                       name, help, v);
  };
  gauge("connected", "1 while the cluster backend is reachable", s.connected ? 1 : 0);
  gauge("lease_age_seconds", "Seconds since this node's lease was last renewed (-1: none)",
        s.leaseAgeMs < 0 ? -1.0 : static_cast<double>(s.leaseAgeMs) / 1000.0);
  gauge("nodes", "Live nodes known to this node", s.nodes);
  counter("published", "Changes and messages this node sent to the cluster", s.published);
  counter("received", "Messages from other nodes applied here", s.received);
  counter("dropped", "Changes that could not be sent (backend unreachable)", s.dropped);
  counter("nodes_reaped", "Dead nodes whose state this node removed", s.nodesReaped);
  counter("resyncs", "Full resynchronisations after a reconnect", s.resyncs);
  counter("fenced", "Times this node found its lease lost and re-registered", s.fenced);
  return out;
}

std::string Node::statsJson() const {
  const ClusterStats s = stats();
  return fmt::format(
      "{{\"node\":\"{}\",\"connected\":{},\"leaseAgeMs\":{},\"nodes\":{},\"published\":{},"
      "\"received\":{},\"dropped\":{},\"nodesReaped\":{},\"resyncs\":{},\"fenced\":{}}}",
      id(), s.connected ? "true" : "false", s.leaseAgeMs, s.nodes, s.published, s.received,
      s.dropped, s.nodesReaped, s.resyncs, s.fenced);
}

}  // namespace roomkeeper::cluster
