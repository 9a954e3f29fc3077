# Tunnel clients must present a fixed bearer token on the WebSocket handshake:
#   backstream client -H "Authorization: Bearer change-me-to-a-long-random-string" ...
# Replace the token (e.g. `openssl rand -hex 32`) before use.
package auth.client

import rego.v1

token := "change-me-to-a-long-random-string"

default allow := false

allow if input.header.Authorization == concat(" ", ["Bearer", token])
