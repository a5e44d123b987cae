"""The sans-IO brain of one Redis client connection: authentication gating, connection commands the
proxy answers itself (HELLO, AUTH, CLIENT, SELECT 0, QUIT, RESET, INFO), the transaction and Pub/Sub
state that decides when the client needs a dedicated backend connection, and what each reply needs.

`handle(args)` turns one client command into one `Step`:
  Answer   the proxy's own reply (refusals included)
  Login    verify ORG/PASSWORD, then call `logged_in` (or `login_failed`) for the reply
  Send     forward `args` to the backend and expect `expect` there (a reply, or N subscribe confirmations)
  Close    send `reply`, then close (QUIT)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from o7s_cluster.resp import codec
from o7s_cluster.resp.commands import SUBSCRIBE, UNSUBSCRIBE
from o7s_cluster.resp.namespace import SCRIPTS, T_NONE, Answer, Forward, Namespace, refuse

PREAUTH_COMMANDS = frozenset((b"AUTH", b"HELLO", b"PING", b"QUIT"))
_SUB_KIND = {b"SUBSCRIBE": "c", b"UNSUBSCRIBE": "c", b"PSUBSCRIBE": "p", b"PUNSUBSCRIBE": "p",
             b"SSUBSCRIBE": "s", b"SUNSUBSCRIBE": "s"}
# What RESP2 allows while subscribed (Redis's own rule).
_SUBSCRIBED_OK = frozenset(SUBSCRIBE | UNSUBSCRIBE | {b"PING", b"QUIT", b"RESET"})
MAX_CLIENT_NAME = 256
SERVER_VERSION = b"7.0.0"

# Expected on the backend for a Send:
EXPECT_REPLY, EXPECT_CONFIRMATIONS = 0, 1
# How the reply of a Send is finished (beyond the namespace's rewrite):
F_NONE, F_EXEC, F_EXECABORT = 0, 1, 2

WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
NOAUTH = b"-NOAUTH Authentication required.\r\n"
EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"


@dataclass(slots=True)
class Login:
    user: bytes
    password: bytes
    proto: int | None = None  # HELLO's protocol version, to switch to on success
    setname: bytes | None = None
    hello: bool = False


@dataclass(slots=True)
class Send:
    args: list[bytes]
    transform: int = T_NONE
    expect: int = EXPECT_REPLY
    confirmations: int = 1
    finish: int = F_NONE
    queued: list[int] = field(default_factory=list)  # EXEC: the transforms of the queued commands
    blocking: bool = False
    script: bool = False


@dataclass(slots=True)
class Close:
    reply: bytes


Step = Answer | Login | Send | Close


class RespSession:
    """One client's protocol state. The shell owns sockets, the backend and the clock."""

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id
        self.proto = 2
        self.name: bytes | None = None
        self.org: str | None = None  # the org logged in as
        self.ns: Namespace | None = None
        self.in_multi = False
        self.multi_failed = False  # a command was refused inside MULTI: EXEC must abort, as Redis does
        self.queued: list[int] = []
        self.watching = False
        self.subs: dict[str, set[bytes]] = {"c": set(), "p": set(), "s": set()}
        self.ever_subscribed = False
        self.scripts = True  # set False by the shell when the backend has no per-org ACL user

    @property
    def authed(self) -> bool:
        return self.ns is not None

    @property
    def subscribed(self) -> bool:
        return any(self.subs.values())

    @property
    def pinned(self) -> bool:
        """Whether the client needs one backend connection of its own (MULTI, WATCH, Pub/Sub)."""
        return self.in_multi or self.watching or self.ever_subscribed

    # --- commands ------------------------------------------------------------------------------

    def handle(self, args: list[bytes]) -> Step:
        name = args[0].upper()
        if not self.authed:
            if name not in PREAUTH_COMMANDS:
                return Answer(NOAUTH)
        elif self.proto == 2 and self.subscribed and name not in _SUBSCRIBED_OK:
            cmd = args[0].decode("utf-8", "replace")[:64].lower()
            return Answer(codec.error(f"ERR Can't execute '{cmd}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING"
                                      " / QUIT / RESET are allowed in this context"))
        if name == b"AUTH":
            return self._auth(args)
        if name == b"HELLO":
            return self._hello(args)
        if name == b"QUIT":
            return Close(b"+OK\r\n")
        if name == b"PING" and not (self.in_multi or self.subscribed):
            if len(args) > 2:
                return Answer(codec.error("ERR wrong number of arguments for 'ping' command"))
            return Answer(codec.bulk(args[1]) if len(args) == 2 else b"+PONG\r\n")
        assert self.ns is not None or name == b"PING"
        if name == b"RESET":
            return self._reset()
        if name == b"SELECT":
            if len(args) == 2 and args[1] == b"0":
                return Answer(b"+OK\r\n")
        if name == b"CLIENT":
            return self._client(args)
        if name == b"INFO":
            return Answer(codec.bulk(self._info()))
        if name in SCRIPTS and not self.scripts:
            return self._refused_in_multi(refuse(name, "scripts need the per-org ACL user, which this Redis"
                                                        " backend could not create"))
        if name in SCRIPTS and self.pinned:
            return self._refused_in_multi(refuse(name, "scripts run on the org's confined backend connections,"
                                                        " not inside MULTI/WATCH or after subscribing (RESET first,"
                                                        " or use another connection)"))
        assert self.ns is not None
        step = self.ns.rewrite(args)
        if isinstance(step, Answer):
            return self._refused_in_multi(step) if step.refused else step
        return self._send(name, step)

    def _refused_in_multi(self, a: Answer) -> Answer:
        if self.in_multi:
            self.multi_failed = True
        return a

    def _send(self, name: bytes, fwd: Forward) -> Send:
        send = Send(fwd.args, fwd.transform, blocking=fwd.blocking, script=fwd.script)
        if name in SUBSCRIBE or name in UNSUBSCRIBE:
            kind = _SUB_KIND[name]
            subs = self.subs[kind]
            targets = fwd.args[1:]
            if name in SUBSCRIBE:
                self.ever_subscribed = True
                subs.update(targets)
                n = len(targets)
            elif targets:
                subs.difference_update(targets)
                n = len(targets)
            else:
                n = max(1, len(subs))
                subs.clear()
            if self.in_multi:  # queued like any command, answered in EXEC's reply
                self.queued.append(T_NONE)
                return send
            send.expect, send.confirmations = EXPECT_CONFIRMATIONS, n
            return send
        if name == b"MULTI":
            if not self.in_multi:
                self.in_multi, self.multi_failed, self.queued = True, False, []
            return send
        if name in (b"EXEC", b"DISCARD"):
            if self.in_multi and name == b"EXEC":
                if self.multi_failed:
                    send = Send([b"DISCARD"], finish=F_EXECABORT)
                else:
                    send.finish, send.queued = F_EXEC, self.queued
            self.in_multi = self.multi_failed = False
            self.queued = []
            self.watching = False
            return send
        if self.in_multi:
            if name != b"WATCH":
                self.queued.append(fwd.transform)
            return send
        if name == b"WATCH":
            self.watching = True
        elif name == b"UNWATCH":
            self.watching = False
        return send

    # --- connection commands the proxy answers -----------------------------------------------

    def _auth(self, args: list[bytes]) -> Step:
        if len(args) == 2:
            return Answer(codec.error("WRONGPASS O7s needs AUTH ORG PASSWORD (or AUTH NAME.ORG PASSWORD)"))
        if len(args) != 3:
            return Answer(codec.error("ERR wrong number of arguments for 'auth' command"))
        return Login(args[1], args[2])

    def _hello(self, args: list[bytes]) -> Step:
        proto: int | None = None
        user = password = setname = None
        i = 1
        if len(args) > 1:
            v = args[1]
            proto = int(v) if v.isdigit() and len(v) < 4 else -1
            if proto not in (2, 3):
                return Answer(b"-NOPROTO unsupported protocol version\r\n")
            i = 2
        while i < len(args):
            opt = args[i].upper()
            if opt == b"AUTH" and i + 2 < len(args):
                user, password = args[i + 1], args[i + 2]
                i += 3
            elif opt == b"SETNAME" and i + 1 < len(args):
                setname = args[i + 1]
                i += 2
            else:
                return Answer(codec.error(f"ERR Syntax error in HELLO option '{opt.decode('utf-8', 'replace')[:32]}'"))
        if proto is not None and proto != self.proto and (self.pinned and self.authed):
            return Answer(codec.error("ERR O7s: HELLO cannot change the protocol inside MULTI/WATCH or after"
                                      " subscribing on this connection (RESET first)"))
        if setname is not None and not _valid_name(setname):
            return Answer(codec.error("ERR Client names cannot contain spaces, newlines or special characters."))
        if user is not None and password is not None:
            return Login(user, password, proto, setname, hello=True)
        if not self.authed:
            return Answer(b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the "
                          b"HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
                          b"select the RESP protocol version at the same time\r\n")
        return Answer(self._hello_ok(proto, setname))

    def _hello_ok(self, proto: int | None, setname: bytes | None) -> bytes:
        if proto is not None:
            self.proto = proto
        if setname is not None:
            self.name = setname
        resp3 = self.proto == 3
        pairs = [
            (codec.bulk(b"server"), codec.bulk(b"redis")),
            (codec.bulk(b"version"), codec.bulk(SERVER_VERSION)),
            (codec.bulk(b"proto"), codec.integer(self.proto)),
            (codec.bulk(b"id"), codec.integer(self.client_id)),
            (codec.bulk(b"mode"), codec.bulk(b"standalone")),
            (codec.bulk(b"role"), codec.bulk(b"master")),
            (codec.bulk(b"modules"), codec.array([])),
        ]
        return codec.map_(pairs, resp3)

    def logged_in(self, login: Login, org: str, ns: Namespace) -> bytes:
        """The login was good: the reply (OK, or HELLO's map). A second AUTH must name the same org."""
        if self.ns is not None and self.org != org:
            return codec.error("ERR O7s: a connection stays with the org it first authenticated as; open a new one")
        if self.ns is None:
            self.ns, self.org = ns, org
        if login.hello:
            return self._hello_ok(login.proto, login.setname)
        return b"+OK\r\n"

    def _reset(self) -> Answer:
        """RESET: back to a fresh connection of the same login (RESP2, no name, no transaction, no
        subscriptions); the shell drops the dedicated backend connection, if any."""
        self.proto = 2
        self.name = None
        self.in_multi = self.multi_failed = self.watching = self.ever_subscribed = False
        self.queued = []
        for s in self.subs.values():
            s.clear()
        if self.ns is not None:
            self.ns.patterns.clear()
        return Answer(b"+RESET\r\n")

    def _client(self, args: list[bytes]) -> Answer:
        sub = args[1].upper() if len(args) > 1 else b""
        if sub == b"SETNAME" and len(args) == 3:
            if not _valid_name(args[2]):
                return Answer(codec.error("ERR Client names cannot contain spaces, newlines or special characters."))
            self.name = args[2] or None
            return Answer(b"+OK\r\n")
        if sub == b"GETNAME" and len(args) == 2:
            return Answer(codec.bulk(self.name) if self.name else codec.null(self.proto == 3))
        if sub == b"ID" and len(args) == 2:
            return Answer(codec.integer(self.client_id))
        if sub == b"SETINFO" and len(args) == 4:
            return Answer(b"+OK\r\n")
        if sub in (b"NO-EVICT", b"NO-TOUCH") and len(args) == 3:
            return Answer(b"+OK\r\n")
        if sub == b"INFO" and len(args) == 2:
            return Answer(codec.bulk(b"id=%d name=%s db=0 resp=%d\n" % (self.client_id, self.name or b"", self.proto)))
        if sub in (b"TRACKING", b"CACHING", b"TRACKINGINFO", b"GETREDIR"):
            return refuse(b"CLIENT " + sub, "client-side caching is not offered")
        if sub == b"REPLY":
            return refuse(b"CLIENT REPLY", "every command gets its reply through O7s")
        return refuse(b"CLIENT " + sub if sub else b"CLIENT", "it reaches other clients of the shared server")

    def _info(self) -> bytes:
        """A minimal INFO (the server's own would describe every org): what client libraries check."""
        return (b"# Server\r\nredis_version:" + SERVER_VERSION + b"\r\nredis_mode:standalone\r\n"
                b"# Persistence\r\nloading:0\r\n# Replication\r\nrole:master\r\n")


def _valid_name(name: bytes) -> bool:
    return len(name) <= MAX_CLIENT_NAME and all(0x21 <= c <= 0x7E for c in name)
