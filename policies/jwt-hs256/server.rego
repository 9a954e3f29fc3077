# Visitors must send "Authorization: Bearer <JWT>" signed with HS256 and this
# secret, not expired (exp) and already valid (nbf). Works with both backends.
# Replace the secret before use; keep it out of version control.
package auth.server

import rego.v1

secret := "change-me-to-a-long-random-secret"

default allow := false

allow if {
	io.jwt.verify_hs256(token, secret)
	[header, claims, _] := io.jwt.decode(token)
	header.alg == "HS256"
	now := time.now_ns() / 1000000000
	object.get(claims, "exp", now + 1) > now
	object.get(claims, "nbf", now) <= now
}

# The bearer token, if it has the shape of a JWT. The embedded engine raises an
# evaluation error (500) on some malformed tokens (a segment of 4n+1 characters)
# where OPA would just be undefined (403), so the shape is checked first.
token := t if {
	[scheme, t] := split(input.header.Authorization, " ")
	lower(scheme) == "bearer"
	regex.match(`^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$`, t)
	every part in split(t, ".") {
		count(part) % 4 != 1
	}
}
