# Everything is public except /admin and /internal, however the path is spelled.
# A deny-list must read input.path_normalized: "//admin", "/%61dmin",
# "/x/../admin" and "/;/admin" all reach some app's /admin, while input.path
# keeps them as sent. Matching is case-insensitive (some apps route that way).
# It must also refuse what it cannot know how the app resolves: dot segments in
# the path as sent ("/admin/../x" is /x here, but /admin/... to an app that
# resolves nothing), and encoded slashes and backslashes (some apps decode them
# into "/").
package auth.server

import rego.v1

denied_prefixes := ["/admin", "/internal"]

default allow := false

allow if not denied

denied if {
	path := lower(input.path_normalized)
	some prefix in denied_prefixes
	under(path, prefix)
}

denied if {
	some separator in ["%2f", "%5c", `\`]
	contains(lower(input.path_normalized), separator)
}

denied if dot_segment(input.path)

# under("/admin/x", "/admin"), under("/admin", "/admin"), under("/admin.json", "/admin").
under(path, prefix) if path == prefix

under(path, prefix) if {
	some next in ["/", "."]
	startswith(path, concat("", [prefix, next]))
}

# A "." or ".." segment, with "%2e" for a dot and maybe ";params" after it:
# "/a/../b", "/a/%2E%2e/b", "/a/.;/b", "/a/..".
dot_segment(path) if {
	some segment in split(lower(path), "/")
	replace(split(segment, ";")[0], "%2e", ".") in {".", ".."}
}

# Note: guards used under `not` must not call builtins that can fail: a failing
# builtin is undefined in OPA's default mode, and `not undefined` is true.
