"""One org's namespace on a shared Redis: key names and channels prefixed on the way in, the prefix
taken off replies that name keys or channels, commands that reach beyond the namespace refused, and
FLUSHDB / DBSIZE / RANDOMKEY emulated within it. Sans-IO: commands in, commands and reply rewrites out.

Isolation does not rest on this module alone for scripts: the shell runs the client's scripts (EVAL,
EVALSHA, FCALL) on backend connections logged in as a per-org Redis ACL user limited to the prefix (keys
and channels, no KEYS/SCAN), which covers what a prefix cannot: key names a script builds at run time.
Everything else is rewritten here and runs with the registered URL's own credentials.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from o7s_cluster.resp import codec
from o7s_cluster.resp.codec import Reply
from o7s_cluster.resp.commands import (
    BLOCKING,
    GEOSTORE,
    KEY_SPECS,
    KEYLESS,
    MEMORY_ALLOWED,
    NUMKEYS,
    PATTERN_SUBS,
    PUBLISH,
    RANGE,
    REFUSED,
    REFUSED_SUB,
    SCRIPT_ALLOWED,
    SORT,
    STREAMS,
    SUBKEY,
    SUBSCRIBE,
    UNSUBSCRIBE,
)

# How a reply that names keys or channels is rewritten (Forward.transform).
T_NONE, T_KEYS, T_SCAN, T_FIRST, T_XREAD, T_CHANNELS, T_NUMSUB = range(7)

# Redis's strict integer syntax (string2ll): what it accepts as numkeys, we accept, nothing else.
_STRICT_INT = re.compile(rb"-?(0|[1-9][0-9]{0,17})\Z")
_GLOB = re.compile(rb"([*?\[\]\\])")
SCRIPTS = frozenset(b"EVAL EVALSHA EVAL_RO EVALSHA_RO FCALL FCALL_RO".split())
_KEYSPACE = b"__keyspace@"
_KEYEVENT = b"__keyevent@"
_PUBSUB_CHANNEL_KINDS = frozenset((b"subscribe", b"unsubscribe", b"ssubscribe", b"sunsubscribe", b"message",
                                   b"smessage"))
_PUBSUB_PATTERN_KINDS = frozenset((b"psubscribe", b"punsubscribe"))
# At most this many pattern subscriptions per client (each is remembered to give its text back).
MAX_PATTERNS = 10_000

# Emulations, run on the backend as one script (one round trip, atomic): SCAN over the prefix only.
FLUSHDB_LUA = b"""local c = '0'
repeat
  local r = redis.call('SCAN', c, 'MATCH', ARGV[1], 'COUNT', 1000)
  c = r[1]
  if #r[2] > 0 then redis.call('UNLINK', unpack(r[2])) end
until c == '0'
return redis.status_reply('OK')"""
DBSIZE_LUA = b"""local c, n = '0', 0
repeat
  local r = redis.call('SCAN', c, 'MATCH', ARGV[1], 'COUNT', 1000)
  c = r[1]
  n = n + #r[2]
until c == '0'
return n"""
RANDOMKEY_LUA = b"""local c = '0'
repeat
  local r = redis.call('SCAN', c, 'MATCH', ARGV[1], 'COUNT', 1000)
  c = r[1]
  if #r[2] > 0 then return string.sub(r[2][math.random(#r[2])], tonumber(ARGV[2]) + 1) end
until c == '0'
return nil"""


def glob_escape(s: bytes) -> bytes:
    """`s` as a glob pattern that matches only itself (Redis's stringmatch syntax)."""
    return _GLOB.sub(rb"\\\1", s)


def strict_int(b: bytes) -> int | None:
    return int(b) if _STRICT_INT.match(b) else None


@dataclass(slots=True)
class Forward:
    """Send `args` to the backend; rewrite its reply with `transform`."""

    args: list[bytes]
    transform: int = T_NONE
    blocking: bool = False
    script: bool = False  # the client's own script: runs as the org's ACL user, confined to the prefix


@dataclass(slots=True)
class Answer:
    """Answer the client from the proxy (a refusal is an error Answer); nothing goes to the backend."""

    reply: bytes
    refused: bool = False


def refuse(name: bytes, why: str) -> Answer:
    cmd = name.decode("utf-8", "replace")[:64]
    return Answer(codec.error(f"ERR O7s refuses '{cmd}': {why}"), refused=True)


class Namespace:
    """One client's view of its org's namespace. `prefix` is the org's key prefix (no glob characters),
    `db` the backend's database number (keyspace notification channels name it)."""

    def __init__(self, prefix: bytes, db: int = 0) -> None:
        self.prefix = prefix
        self.pattern_prefix = glob_escape(prefix)
        self.db = db
        self.keyspace = b"__keyspace@%d__:" % db
        self.patterns: dict[bytes, bytes] = {}  # pattern sent to the backend -> the client's own text

    # --- names ---------------------------------------------------------------------------------

    def key(self, k: bytes) -> bytes:
        return self.prefix + k

    def strip(self, k: bytes) -> bytes | None:
        """A backend key name as the client knows it; None for a name outside the namespace."""
        return k[len(self.prefix):] if k.startswith(self.prefix) else None

    def channel(self, ch: bytes, pattern: bool = False) -> bytes | None:
        """A channel (or pattern) as the backend knows it; None when it names something outside the
        namespace (another database's keyspace events, keyevent channels that carry every org's keys)."""
        pre = self.pattern_prefix if pattern else self.prefix
        if ch.startswith(_KEYSPACE):
            end = ch.find(b"__:", len(_KEYSPACE))
            db = ch[len(_KEYSPACE):end] if end >= 0 else b""
            if end < 0 or not (db == b"0" or (pattern and db == b"*")):
                return None
            return self.keyspace + pre + ch[end + 3:]
        if ch.startswith(_KEYEVENT):
            return None
        return pre + ch

    def unchannel(self, ch: bytes) -> bytes | None:
        ks = self.keyspace + self.prefix
        if ch.startswith(ks):
            return b"__keyspace@0__:" + ch[len(ks):]
        return self.strip(ch)

    # --- commands ------------------------------------------------------------------------------

    def rewrite(self, args: list[bytes]) -> Forward | Answer:
        """The command as the backend must run it, or the proxy's own answer."""
        name = args[0].upper()
        specs = KEY_SPECS.get(name)
        if specs is not None:
            out = list(args)
            out[0] = name
            for spec in specs:
                bad = self._apply_spec(spec, name, out)
                if bad is not None:
                    return bad
            transform = T_FIRST if name in (b"BLPOP", b"BRPOP", b"BZPOPMIN", b"BZPOPMAX", b"LMPOP", b"ZMPOP",
                                            b"BLMPOP", b"BZMPOP") else T_NONE
            blocking = name in BLOCKING
            if name in (b"XREAD", b"XREADGROUP"):
                transform = T_XREAD
                blocking = any(a.upper() == b"BLOCK" for a in args[1:out.index(b"STREAMS")])
            return Forward(out, transform, blocking, script=name in SCRIPTS)
        if name in KEYLESS:
            return Forward([name] + args[1:], blocking=name in BLOCKING)
        if name in REFUSED:
            return refuse(name, REFUSED[name])
        sub = args[1].upper() if len(args) > 1 else b""
        if (name, sub) in REFUSED_SUB:
            return refuse(name + b" " + sub, REFUSED_SUB[(name, sub)])
        if name == b"KEYS":
            if len(args) != 2:
                return Answer(codec.error("ERR wrong number of arguments for 'keys' command"))
            return Forward([name, self.pattern_prefix + args[1]], T_KEYS)
        if name == b"SCAN":
            return self._scan(args)
        if name == b"FLUSHDB":
            if len(args) > 2 or (len(args) == 2 and sub not in (b"ASYNC", b"SYNC")):
                return Answer(codec.error("ERR syntax error"))
            return Forward([b"EVAL", FLUSHDB_LUA, b"0", self.pattern_prefix + b"*"])
        if name == b"DBSIZE":
            return Forward([b"EVAL", DBSIZE_LUA, b"0", self.pattern_prefix + b"*"])
        if name == b"RANDOMKEY":
            return Forward([b"EVAL", RANDOMKEY_LUA, b"0", self.pattern_prefix + b"*", b"%d" % len(self.prefix)])
        if name in SUBSCRIBE or name in UNSUBSCRIBE:
            return self._subscribe(name, args)
        if name in PUBLISH:
            if len(args) != 3:
                return Answer(codec.error(f"ERR wrong number of arguments for '{name.decode().lower()}' command"))
            return Forward([name, self.prefix + args[1], args[2]])
        if name == b"PUBSUB":
            return self._pubsub(sub, args)
        if name == b"SCRIPT" and sub in SCRIPT_ALLOWED:
            return Forward([name] + args[1:])
        if name == b"MEMORY" and sub in MEMORY_ALLOWED:
            if len(args) < 3:
                return Answer(codec.error("ERR wrong number of arguments for 'memory|usage' command"))
            return Forward([name, sub, self.key(args[2])] + args[3:])
        if name in (b"SCRIPT", b"MEMORY"):
            return refuse(name + (b" " + sub if sub else b""), "only " + (
                "SCRIPT LOAD and SCRIPT EXISTS" if name == b"SCRIPT" else "MEMORY USAGE") + " are offered")
        return refuse(name, "unknown command, or one O7s does not offer")

    def _apply_spec(self, spec: tuple[int, ...], name: bytes, out: list[bytes]) -> Answer | None:
        kind = spec[0]
        n = len(out)
        if kind == RANGE:
            first, last, step = spec[1], spec[2], spec[3]
            last = n + last if last < 0 else min(last, n - 1)
            for i in range(first, last + 1, step):
                out[i] = self.prefix + out[i]
        elif kind == NUMKEYS:
            at, first = spec[1], spec[2]
            if n <= at:
                return None  # the backend answers the arity error; no key is named
            count = strict_int(out[at])
            if count is None or count < 0:
                return Answer(codec.error("ERR numkeys must be a non-negative integer"))
            if first + count > n:
                return Answer(codec.error("ERR Number of keys can't be greater than number of args"))
            for i in range(first, first + count):
                out[i] = self.prefix + out[i]
        elif kind == STREAMS:
            return self._streams(name, out)
        elif kind == SORT:
            return self._sort(name, out)
        elif kind == GEOSTORE:
            if n > 1:
                out[1] = self.prefix + out[1]
            i = 6 if name == b"GEORADIUS" else 5
            while i < n:
                opt = out[i].upper()
                if opt in (b"STORE", b"STOREDIST") and i + 1 < n:
                    out[i + 1] = self.prefix + out[i + 1]
                    i += 2
                elif opt == b"COUNT":
                    i += 2
                else:
                    i += 1
        elif kind == SUBKEY:
            if n >= 3:
                out[2] = self.prefix + out[2]
        return None

    def _streams(self, name: bytes, out: list[bytes]) -> Answer | None:
        """XREAD [COUNT n] [BLOCK ms] STREAMS key ... id ...; XREADGROUP GROUP g c [COUNT] [BLOCK] [NOACK]
        STREAMS ...: options parsed in Redis's order, so a group named STREAMS is not taken for the token."""
        i, n = 1, len(out)
        while i < n:
            opt = out[i].upper()
            if opt in (b"COUNT", b"BLOCK"):
                i += 2
            elif opt == b"GROUP" and name == b"XREADGROUP":
                i += 3
            elif opt == b"NOACK" and name == b"XREADGROUP":
                i += 1
            elif opt == b"STREAMS":
                out[i] = b"STREAMS"
                rest = n - i - 1
                if rest <= 0 or rest % 2:
                    return Answer(codec.error("ERR Unbalanced 'xread' list of streams: for each stream key an ID or "
                                              "'$' must be specified."))
                for j in range(i + 1, i + 1 + rest // 2):
                    out[j] = self.prefix + out[j]
                return None
            else:
                return Answer(codec.error("ERR syntax error"))
        return Answer(codec.error("ERR syntax error"))

    def _sort(self, name: bytes, out: list[bytes]) -> Answer | None:
        """SORT key [BY pattern] [LIMIT offset count] [GET pattern ...] [ASC|DESC] [ALPHA] [STORE dest]: the
        BY and GET patterns name keys (GET # is the element itself)."""
        n = len(out)
        if n < 2:
            return None
        out[1] = self.prefix + out[1]
        i = 2
        while i < n:
            opt = out[i].upper()
            if opt in (b"ASC", b"DESC", b"ALPHA"):
                i += 1
            elif opt == b"LIMIT" and i + 2 < n:
                i += 3
            elif opt in (b"BY", b"STORE") and i + 1 < n:
                out[i + 1] = self.prefix + out[i + 1]
                i += 2
            elif opt == b"GET" and i + 1 < n:
                if out[i + 1] != b"#":
                    out[i + 1] = self.prefix + out[i + 1]
                i += 2
            else:
                return Answer(codec.error("ERR syntax error"))
        return None

    def _scan(self, args: list[bytes]) -> Forward | Answer:
        """SCAN cursor [MATCH pattern] [COUNT n] [TYPE t]: MATCH always starts with the org's prefix. The
        cursor is the backend's; any cursor only ever reaches this org's keys through that MATCH."""
        if len(args) < 2:
            return Answer(codec.error("ERR wrong number of arguments for 'scan' command"))
        out = [b"SCAN", args[1]]
        matched = False
        i, n = 2, len(args)
        while i < n:
            opt = args[i].upper()
            if i + 1 >= n or opt not in (b"MATCH", b"COUNT", b"TYPE"):
                return Answer(codec.error("ERR syntax error"))
            if opt == b"MATCH":
                out += [b"MATCH", self.pattern_prefix + args[i + 1]]
                matched = True
            else:
                out += [opt, args[i + 1]]
            i += 2
        if not matched:
            out += [b"MATCH", self.pattern_prefix + b"*"]
        return Forward(out, T_SCAN)

    def _subscribe(self, name: bytes, args: list[bytes]) -> Forward | Answer:
        pattern = name in PATTERN_SUBS
        out = [name]
        for ch in args[1:]:
            mapped = self.channel(ch, pattern)
            if mapped is None:
                return refuse(name, f"channel {ch[:64].decode('utf-8', 'replace')!r} is outside your namespace"
                              " (keyspace notifications: __keyspace@0__:KEY; keyevent channels are not offered)")
            if pattern and name in SUBSCRIBE:
                if len(self.patterns) >= MAX_PATTERNS and mapped not in self.patterns:
                    return Answer(codec.error(f"ERR O7s: at most {MAX_PATTERNS} pattern subscriptions per client"))
                self.patterns[mapped] = ch
            out.append(mapped)
        if len(out) == 1 and name in SUBSCRIBE:
            return Answer(codec.error(f"ERR wrong number of arguments for '{name.decode().lower()}' command"))
        return Forward(out)

    def _pubsub(self, sub: bytes, args: list[bytes]) -> Forward | Answer:
        if sub in (b"CHANNELS", b"SHARDCHANNELS"):
            if len(args) > 3:
                return Answer(codec.error("ERR wrong number of arguments for 'pubsub' command"))
            pat = args[2] if len(args) == 3 else b"*"
            return Forward([b"PUBSUB", sub, self.pattern_prefix + pat], T_CHANNELS)
        if sub in (b"NUMSUB", b"SHARDNUMSUB"):
            out = [b"PUBSUB", sub]
            for ch in args[2:]:
                mapped = self.channel(ch)
                if mapped is None:
                    return refuse(b"PUBSUB " + sub, "a channel outside your namespace")
                out.append(mapped)
            return Forward(out, T_NUMSUB)
        return refuse(b"PUBSUB " + sub if sub else b"PUBSUB", "unknown PUBSUB subcommand")

    # --- replies -------------------------------------------------------------------------------

    def apply(self, transform: int, r: Reply) -> Reply:
        """The reply as the client must see it (errors and nulls pass unchanged)."""
        if r.is_error() or not isinstance(r.data, list):
            return r
        items = r.data
        if transform == T_KEYS or transform == T_CHANNELS:
            strip = self.strip if transform == T_KEYS else self.unchannel
            out = [Reply(x.kind, s) for x in items if isinstance(x.data, bytes) and (s := strip(x.data)) is not None]
            return Reply(r.kind, out)
        if transform == T_SCAN and len(items) == 2 and isinstance(items[1].data, list):
            keys = [Reply(x.kind, s) for x in items[1].data
                    if isinstance(x.data, bytes) and (s := self.strip(x.data)) is not None]
            return Reply(r.kind, [items[0], Reply(items[1].kind, keys)])
        if transform == T_FIRST and items and isinstance(items[0].data, bytes):
            return Reply(r.kind, [Reply(items[0].kind, self.strip(items[0].data) or b"")] + items[1:])
        if transform == T_XREAD:
            if r.kind == "%":
                out = list(items)
                for i in range(0, len(out), 2):
                    if isinstance(out[i].data, bytes):
                        out[i] = Reply(out[i].kind, self.strip(out[i].data) or b"")
                return Reply(r.kind, out)
            return Reply(r.kind, [self.apply(T_FIRST, x) for x in items])
        if transform == T_NUMSUB:
            out = list(items)
            for i in range(0, len(out), 2):
                if isinstance(out[i].data, bytes):
                    out[i] = Reply(out[i].kind, self.unchannel(out[i].data) or b"")
            return Reply(r.kind, out)
        return r

    def error_text(self, line: bytes) -> bytes:
        """A backend error without the prefix (e.g. XGROUP's "No such key 'PREFIXk'")."""
        return line.replace(self.keyspace + self.prefix, b"__keyspace@0__:").replace(self.prefix, b"")

    def pubsub(self, r: Reply) -> Reply | None:
        """A Pub/Sub message or (un)subscribe confirmation with channel names as the client knows them;
        None for a message about a channel outside the namespace (never expected: dropped)."""
        items = r.data
        if r.kind not in "*>" or not isinstance(items, list) or len(items) < 2 or not isinstance(items[0].data, bytes):
            return r
        kind = items[0].data.lower()
        out = list(items)
        if kind in _PUBSUB_CHANNEL_KINDS:
            if isinstance(out[1].data, bytes):
                name = self.unchannel(out[1].data)
                if name is None:
                    return None
                out[1] = Reply(out[1].kind, name)
        elif kind in _PUBSUB_PATTERN_KINDS or kind == b"pmessage":
            if isinstance(out[1].data, bytes):
                pat = self.patterns.get(out[1].data)
                if pat is None:
                    return None
                out[1] = Reply(out[1].kind, pat)
                if kind == b"punsubscribe":
                    self.patterns.pop(items[1].data, None)
            if kind == b"pmessage" and len(out) > 2 and isinstance(out[2].data, bytes):
                name = self.unchannel(out[2].data)
                if name is None:
                    return None
                out[2] = Reply(out[2].kind, name)
        else:
            return r
        return Reply(r.kind, out)


def is_pubsub_reply(r: Reply) -> bool:
    """Whether a reply is a Pub/Sub message or confirmation (RESP2 arrays in subscribed mode, RESP3 pushes)."""
    items = r.data
    if r.kind not in "*>" or not isinstance(items, list) or not items or not isinstance(items[0].data, bytes):
        return False
    kind = items[0].data.lower()
    return kind in _PUBSUB_CHANNEL_KINDS or kind in _PUBSUB_PATTERN_KINDS or kind == b"pmessage"
