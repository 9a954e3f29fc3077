# Visitors of the public URL must send HTTP Basic credentials (curl -u alice:wonderland).
# Passwords are stored as SHA-256 hex digests: printf %s 'wonderland' | sha256sum
# The server answers 403 (not 401) on deny, so browsers do not prompt by themselves.
package auth.server

import rego.v1

users := {"alice": "a71a7c7011f53a1bab3642ec2ce12593f05230ace8de1e3e7645f69efac1443d"}

default allow := false

allow if {
	some user, password in credentials
	crypto.sha256(password) == users[user]
}

# The "user:password" pair of an "Authorization: Basic ..." header.
# The shape is checked first: the embedded engine reports malformed base64 as an
# evaluation error (500) where OPA would just be undefined (403).
credentials := {user: password} if {
	[scheme, encoded] := split(input.header.Authorization, " ")
	lower(scheme) == "basic"
	regex.match(`^[A-Za-z0-9+/]+={0,2}$`, encoded)
	count(encoded) % 4 == 0
	decoded := base64.decode(encoded)
	i := indexof(decoded, ":")
	i > 0
	user := substring(decoded, 0, i)
	password := substring(decoded, i + 1, -1)
}
