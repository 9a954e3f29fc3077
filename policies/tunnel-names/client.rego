# Each token may claim only its own tunnel names (backstream client --name NAME
# -H "Authorization: Bearer TOKEN"). A client without --name on a server with
# --domain gets a random name, and asks for it again when it reconnects: both
# are allowed for tokens whose list holds "*", for any name no token lists.
# The server also keeps every name for the credentials that claimed it first.
package auth.client

import rego.v1

names_of_token := {
	"change-me-alice-token": {"alice", "alice-staging"},
	"change-me-bob-token": {"bob"},
	"change-me-ci-token": {"*"},
}

default allow := false

allow if {
	some token, names in names_of_token
	input.header.Authorization == concat(" ", ["Bearer", token])
	claims(names, input.name)
}

claims(names, name) if name in names

claims(names, name) if {
	"*" in names
	not listed(name)
}

listed(name) if {
	some listed_names in names_of_token
	name in listed_names
}
