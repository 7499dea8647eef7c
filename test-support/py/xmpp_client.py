#!/usr/bin/env python3
"""One logged-in XMPP user for fedrelay's tests, driven over JSON lines.

Started by test-support's `XmppClient` (test-support/src/xmpp_client.rs) with the
interpreter of the virtualenv that `tools/xmpp-tools` makes (slixmpp pinned there).

    xmpp_client.py --jid alice@prosody.test --password secret \
        --host 127.0.0.1 --port 5222 --ca ca.pem

Logs in over STARTTLS (the server's certificate checked against --ca, for the JID's
domain), fetches the roster, sends initial presence, then prints one JSON object a line
on stdout:

    {"event": "ready", "jid": "alice@prosody.test/..."}
    {"event": "stanza", "name": "message", "type": "chat", "from": "...", "id": "...",
     "xml": "<message ...>...</message>"}            every message, presence and iq received
    {"event": "failed", "reason": "..."}              login failed (exit status 1)
    {"event": "disconnected", "reason": "..."}        the stream ended (exit status 0 after
                                                      quit, 2 otherwise)
    {"event": "error", "reason": "..."}               a command on stdin was not understood

and reads commands, one JSON object a line, on stdin:

    {"op": "send", "xml": "<message to='bob@prosody.test' type='chat'>...</message>"}
    {"op": "quit"}                                    closes the stream and exits

Subscriptions are never answered or requested automatically: the tests drive them.
Debug logging (slixmpp's) goes to stderr with --verbose.
"""

import argparse
import asyncio
import json
import logging
import sys
import threading

import slixmpp

STANZAS = ("message", "presence", "iq")


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Client(slixmpp.ClientXMPP):
    def __init__(self, jid, password, ca):
        super().__init__(jid, password)
        # STARTTLS on the c2s port: the default tries direct TLS first, and the stream
        # error that attempt leaves behind kills the STARTTLS attempt (no retry).
        self.enable_direct_tls = False
        self.enable_starttls = True
        self.enable_plaintext = False
        self.ca_certs = ca
        # No automatic answers to subscription requests, no automatic requests back.
        self.auto_authorize = None
        self.auto_subscribe = False
        self.register_plugin("xep_0030")  # answers disco#info queries
        self.register_plugin("xep_0199")  # answers pings
        loop = asyncio.get_event_loop()
        self.outcome = loop.create_future()  # the exit status
        self.ready_future = loop.create_future()
        self.ready = False
        self.quitting = False
        self.add_filter("in", self.on_incoming)
        self.add_event_handler("session_start", self.on_session_start)
        self.add_event_handler("failed_all_auth", self.on_failed_auth)
        self.add_event_handler("connection_failed", self.on_connection_failed)
        self.add_event_handler("ssl_invalid_chain", self.on_invalid_chain)
        self.add_event_handler("stream_error", self.on_stream_error)
        self.add_event_handler("disconnected", self.on_disconnected)

    def on_incoming(self, stanza):
        tag = stanza.xml.tag
        name = tag.split("}", 1)[1] if tag.startswith("{") else tag
        if name in STANZAS:
            emit(
                {
                    "event": "stanza",
                    "name": name,
                    "type": stanza.xml.get("type", ""),
                    "from": stanza.xml.get("from", ""),
                    "id": stanza.xml.get("id", ""),
                    "xml": str(stanza),
                }
            )
        return stanza

    async def on_session_start(self, _event):
        try:
            await self.get_roster()
        except Exception as e:  # noqa: BLE001 - reported, not swallowed
            self.fail(f"roster get failed: {e!r}")
            return
        self.send_presence()
        self.ready = True
        self.ready_future.set_result(True)
        emit({"event": "ready", "jid": str(self.boundjid)})

    def fail(self, reason):
        if self.ready or self.outcome.done():
            return
        emit({"event": "failed", "reason": reason})
        self.outcome.set_result(1)
        self.abort()

    def on_failed_auth(self, _event):
        self.fail("authentication failed (wrong password or unknown user)")

    def on_connection_failed(self, error):
        self.fail(f"connection failed: {error}")

    def on_invalid_chain(self, error):
        self.fail(f"server certificate not trusted: {error}")

    def on_stream_error(self, error):
        if not self.ready:
            self.fail(f"stream error: {error['condition']} {error['text']}".strip())

    def on_disconnected(self, reason):
        if not self.ready:
            self.fail(f"disconnected before ready: {reason}")
            return
        if not self.outcome.done():
            emit({"event": "disconnected", "reason": str(reason)})
            self.outcome.set_result(0 if self.quitting else 2)


def stdin_lines(loop, queue):
    """Feeds stdin's lines to `queue` from a daemon thread (works for any kind of stdin,
    and never keeps the process alive); None at end of file."""
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line)
    loop.call_soon_threadsafe(queue.put_nowait, None)


async def read_commands(client):
    loop = asyncio.get_event_loop()
    queue = asyncio.Queue()
    threading.Thread(target=stdin_lines, args=(loop, queue), daemon=True).start()
    # Commands wait for the session: a stanza sent before it is bound would be refused.
    await asyncio.wait(
        [client.ready_future, client.outcome], return_when=asyncio.FIRST_COMPLETED
    )
    while not client.outcome.done():
        line = await queue.get()
        if line is None:  # stdin closed: the test is gone
            break
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
            op = cmd["op"]
        except (ValueError, KeyError, TypeError) as e:
            emit({"event": "error", "reason": f"bad command {line!r}: {e!r}"})
            continue
        if op == "send" and isinstance(cmd.get("xml"), str):
            client.send_raw(cmd["xml"])
        elif op == "quit":
            break
        else:
            emit({"event": "error", "reason": f"unknown command {line!r}"})
    client.quitting = True
    if client.outcome.done():
        return
    if client.ready:
        await client.disconnect(wait=2.0)
    if not client.outcome.done():
        client.outcome.set_result(0 if client.ready else 1)


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jid", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True, help="PEM CA the server's certificate must chain to")
    p.add_argument("--verbose", action="store_true", help="slixmpp debug log on stderr")
    args = p.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    client = Client(args.jid, args.password, args.ca)
    client.connect(args.host, args.port)
    commands = asyncio.ensure_future(read_commands(client))
    code = await client.outcome
    commands.cancel()
    return code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
