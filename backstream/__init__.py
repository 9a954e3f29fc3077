"""backstream: a self-hosted reverse tunnel.

A public server (``backstream serve``) accepts a WebSocket from a client
(``backstream client``) that runs beside a local app. Every public HTTP request
is relayed as a stream over that WebSocket, the client sends it to the local
app with libcurl, and the response streams back the same way.

Modules, in import order (each only imports those above it)::

    errors.py      the exception tree and HTTP statuses
    protocol.py    the wire format and flow control, no I/O
    relay.py       pure proxy rules: hop-by-hop headers, targets, masking
    config.py      typed settings
    logs.py        text/JSON logging with secrets masked
    har.py         HAR 1.2 files on the client
    auth/          policy engines behind one async decision
    server/        Tornado: tunnel handler, public handler, streams
    client/        Tornado + pycurl: tunnel connection, upstream transfers
    cli.py         flags, environment variables and config files
"""

__version__ = "0.1.0"
