# Everything is public except /admin and /internal, however the path is spelled.
# A deny-list must read input.path_normalized: "//admin", "/%61dmin" and
# "/x/../admin" all reach an app's /admin, while input.path keeps them as sent.
# Matching is case-insensitive (some apps route that way), and encoded slashes,
# backslashes and "..;" are refused (some apps decode them into "/", and Tomcat
# and Spring read "/x/..;/admin" as "/admin").
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
	some separator in ["%2f", "%5c", `\`, "..;"]
	contains(lower(input.path_normalized), separator)
}

# under("/admin/x", "/admin"), under("/admin", "/admin"), under("/admin;v=1", "/admin").
under(path, prefix) if path == prefix

under(path, prefix) if {
	some next in ["/", ";", "."]
	startswith(path, concat("", [prefix, next]))
}
