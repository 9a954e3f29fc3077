# Only /webhooks/... is public (for example for a payment provider's callbacks);
# everything else behind the tunnel stays private.
# input.path_normalized is the path decoded and resolved ("/webhooks/../admin"
# is "/admin", "//" is "/"), so it is what the prefix is checked on; encoded
# slashes and backslashes, which an app may still decode into "/", are refused.
package auth.server

import rego.v1

default allow := false

allow if {
	input.method in {"POST", "GET", "HEAD"}
	startswith(input.path_normalized, "/webhooks/")
	not ambiguous(input.path_normalized)
	not contains(input.path, "//") # no provider sends one; some URL joiners misread it
}

ambiguous(path) if contains(path, `\`)

ambiguous(path) if {
	some encoded in ["%2f", "%5c"]
	contains(lower(path), encoded)
}

# Note: guards used under `not` must not call builtins that can fail: a failing
# builtin is undefined in OPA's default mode, and `not undefined` is true.
