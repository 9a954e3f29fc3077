# Only visitors from these networks reach the local app; works with both backends.
# The embedded engine has no net.cidr_contains, so IPv4 CIDRs are matched with
# integer arithmetic here; IPv6 addresses are matched exactly (list them in
# `addresses`). With OPA, ../ip-allowlist-opa is simpler and covers IPv6 ranges.
# input.remote is the caller's address. Behind nginx or a cloud load balancer the
# TCP peer is the proxy: start the server with --trust-forwarded <proxy CIDR> (and
# --forwarded-header forwarded if it writes Forwarded), or this list admits everyone.
package auth.server

import rego.v1

networks := ["127.0.0.0/8", "10.0.0.0/8", "192.168.0.0/16"]

addresses := {"::1"}

default allow := false

allow if input.remote in addresses

allow if {
	some network in networks
	in_network(input.remote, network)
}

# in_network("10.1.2.3", "10.0.0.0/8") is true.
in_network(ip, network) if {
	[base, prefix] := split(network, "/")
	regex.match(`^([0-9]|[12][0-9]|3[0-2])$`, prefix)
	size := bits.lsh(1, 32 - to_number(prefix))
	address := ipv4(ip)
	address - (address % size) == ipv4(base) - (ipv4(base) % size)
}

# The 32-bit integer of a dotted IPv4 address; undefined for anything else.
ipv4(ip) := n if {
	regex.match(`^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$`, ip)
	octets := [to_number(part) | some part in split(ip, ".")]
	every octet in octets {
		octet <= 255
	}
	n := ((octets[0] * 256 + octets[1]) * 256 + octets[2]) * 256 + octets[3]
}
