# Only visitors from these networks reach the local app (IPv4 and IPv6 CIDRs).
# OPA backend only (BACKSTREAM_AUTH=opa): net.cidr_contains is not a builtin of
# the embedded engine, which refuses this file at start-up; see ../ip-allowlist
# for a version that works with both backends.
# input.remote is the caller's address. Behind nginx or a cloud load balancer the
# TCP peer is the proxy: start the server with --trust-forwarded <proxy CIDR> (and
# --forwarded-header forwarded if it writes Forwarded), or this list admits everyone.
package auth.server

import rego.v1

networks := ["127.0.0.0/8", "10.0.0.0/8", "192.168.0.0/16", "::1/128"]

default allow := false

allow if {
	some network in networks
	net.cidr_contains(network, input.remote)
}
