# Only /webhooks/... is public (for example for a payment provider's callbacks);
# everything else behind the tunnel stays private.
# The prefix is checked on both forms of the path: input.path_normalized (decoded
# and resolved: "/webhooks/../admin" and "/webhooks/..;/admin" are "/admin") for
# an app that resolves the path, input.path (as sent) for one that does not.
# Dot segments, "//", encoded slashes and backslashes, which apps read in
# different ways, are refused: no provider sends them.
package auth.server

import rego.v1

default allow := false

allow if {
	input.method in {"POST", "GET", "HEAD"}
	startswith(input.path_normalized, "/webhooks/")
	startswith(input.path, "/webhooks/")
	not ambiguous(input.path_normalized)
	not dot_segment(input.path)
	not contains(input.path, "//") # some URL joiners misread it
}

ambiguous(path) if contains(path, `\`)

ambiguous(path) if {
	some encoded in ["%2f", "%5c"]
	contains(lower(path), encoded)
}

# A "." or ".." segment, with "%2e" for a dot and maybe ";params" after it.
dot_segment(path) if {
	some segment in split(lower(path), "/")
	replace(split(segment, ";")[0], "%2e", ".") in {".", ".."}
}

# Note: guards used under `not` must not call builtins that can fail: a failing
# builtin is undefined in OPA's default mode, and `not undefined` is true.
