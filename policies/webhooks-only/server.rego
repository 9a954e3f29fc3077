# Only /webhooks/... is public (for example for a payment provider's callbacks);
# everything else behind the tunnel stays private.
# input.path is the raw path exactly as it is forwarded, so paths that a local
# app could resolve elsewhere ("/webhooks/../admin", "%2e%2e", "%2f") are refused.
package auth.server

import rego.v1

default allow := false

allow if {
	input.method in {"POST", "GET", "HEAD"}
	startswith(input.path, "/webhooks/")
	not ambiguous(input.path)
}

ambiguous(path) if contains(path, "/..")

ambiguous(path) if contains(path, "//")

ambiguous(path) if contains(path, `\`)

ambiguous(path) if {
	some encoded in ["%2e", "%2f", "%5c"]
	contains(lower(path), encoded)
}

# Note: guards used under `not` must not call builtins that can fail: a failing
# builtin is undefined in OPA's default mode, and `not undefined` is true.
