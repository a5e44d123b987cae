"""The command table: which arguments of each Redis command are key names, which commands block, and
which are refused because they reach beyond one org's namespace.

A key spec is a tuple:
  (RANGE, first, last, step)  keys at first..last (last < 0 counts from the end), every `step`-th
  (NUMKEYS, at, first)        the count at `at`, that many keys from `first` (EVAL, ZUNION, LMPOP ...)
  (STREAMS,)                  XREAD / XREADGROUP: after STREAMS, the first half of what is left
  (SORT,)                     SORT key [BY pattern] [GET pattern ...] [STORE dest]
  (GEOSTORE,)                 GEORADIUS* key ... [STORE key] [STOREDIST key]
  (SUBKEY,)                   `CMD SUBCOMMAND key ...` (OBJECT, XINFO, XGROUP, MEMORY USAGE)
A command has a list of specs (ZUNIONSTORE: the destination, then numkeys).
Commands are upper-case bytes.
"""

from __future__ import annotations

RANGE, NUMKEYS, STREAMS, SORT, GEOSTORE, SUBKEY = range(6)

KeySpec = tuple[int, ...]

_ONE = [(RANGE, 1, 1, 1)]
_ALL = [(RANGE, 1, -1, 1)]
_TWO = [(RANGE, 1, 2, 1)]
_BUT_LAST = [(RANGE, 1, -2, 1)]  # blocking pops: the timeout is last

_SINGLE = """
GET SET SETNX SETEX PSETEX APPEND STRLEN INCR DECR INCRBY DECRBY INCRBYFLOAT GETSET GETDEL GETEX GETRANGE
SETRANGE SUBSTR GETBIT SETBIT BITCOUNT BITPOS BITFIELD BITFIELD_RO EXPIRE PEXPIRE EXPIREAT PEXPIREAT EXPIRETIME
PEXPIRETIME TTL PTTL PERSIST TYPE DUMP RESTORE MOVE
HSET HSETNX HGET HMSET HMGET HDEL HLEN HSTRLEN HKEYS HVALS HGETALL HEXISTS HINCRBY HINCRBYFLOAT HRANDFIELD HSCAN
LPUSH RPUSH LPUSHX RPUSHX LPOP RPOP LLEN LRANGE LINDEX LSET LREM LTRIM LINSERT LPOS
SADD SREM SCARD SISMEMBER SMISMEMBER SMEMBERS SPOP SRANDMEMBER SSCAN
ZADD ZREM ZCARD ZSCORE ZMSCORE ZINCRBY ZRANK ZREVRANK ZRANGE ZREVRANGE ZRANGEBYSCORE ZREVRANGEBYSCORE ZRANGEBYLEX
ZREVRANGEBYLEX ZCOUNT ZLEXCOUNT ZREMRANGEBYRANK ZREMRANGEBYSCORE ZREMRANGEBYLEX ZPOPMIN ZPOPMAX ZRANDMEMBER ZSCAN
PFADD XADD XLEN XRANGE XREVRANGE XDEL XTRIM XACK XCLAIM XAUTOCLAIM XPENDING XSETID
GEOADD GEOPOS GEODIST GEOHASH GEOSEARCH GEORADIUS_RO GEORADIUSBYMEMBER_RO
"""
_MULTI = "MGET DEL UNLINK EXISTS TOUCH WATCH SINTER SUNION SDIFF PFCOUNT SINTERSTORE SUNIONSTORE SDIFFSTORE PFMERGE"
_PAIR = "RENAME RENAMENX SMOVE LMOVE RPOPLPUSH COPY LCS ZRANGESTORE GEOSEARCHSTORE BLMOVE BRPOPLPUSH"

KEY_SPECS: dict[bytes, list[KeySpec]] = {}
for _n in _SINGLE.split():
    KEY_SPECS[_n.encode()] = _ONE
for _n in _MULTI.split():
    KEY_SPECS[_n.encode()] = _ALL
for _n in _PAIR.split():
    KEY_SPECS[_n.encode()] = _TWO
for _n in ("BLPOP", "BRPOP", "BZPOPMIN", "BZPOPMAX"):
    KEY_SPECS[_n.encode()] = _BUT_LAST
KEY_SPECS.update({
    b"MSET": [(RANGE, 1, -1, 2)],
    b"MSETNX": [(RANGE, 1, -1, 2)],
    b"BITOP": [(RANGE, 2, -1, 1)],
    b"EVAL": [(NUMKEYS, 2, 3)], b"EVALSHA": [(NUMKEYS, 2, 3)],
    b"EVAL_RO": [(NUMKEYS, 2, 3)], b"EVALSHA_RO": [(NUMKEYS, 2, 3)],
    b"FCALL": [(NUMKEYS, 2, 3)], b"FCALL_RO": [(NUMKEYS, 2, 3)],
    b"ZUNIONSTORE": [(RANGE, 1, 1, 1), (NUMKEYS, 2, 3)],
    b"ZINTERSTORE": [(RANGE, 1, 1, 1), (NUMKEYS, 2, 3)],
    b"ZDIFFSTORE": [(RANGE, 1, 1, 1), (NUMKEYS, 2, 3)],
    b"ZUNION": [(NUMKEYS, 1, 2)], b"ZINTER": [(NUMKEYS, 1, 2)], b"ZDIFF": [(NUMKEYS, 1, 2)],
    b"ZINTERCARD": [(NUMKEYS, 1, 2)], b"SINTERCARD": [(NUMKEYS, 1, 2)],
    b"LMPOP": [(NUMKEYS, 1, 2)], b"ZMPOP": [(NUMKEYS, 1, 2)],
    b"BLMPOP": [(NUMKEYS, 2, 3)], b"BZMPOP": [(NUMKEYS, 2, 3)],
    b"XREAD": [(STREAMS,)], b"XREADGROUP": [(STREAMS,)],
    b"SORT": [(SORT,)], b"SORT_RO": [(SORT,)],
    b"GEORADIUS": [(GEOSTORE,)], b"GEORADIUSBYMEMBER": [(GEOSTORE,)],
    b"OBJECT": [(SUBKEY,)], b"XINFO": [(SUBKEY,)], b"XGROUP": [(SUBKEY,)],
})

# Commands without keys that are safe on a shared server.
KEYLESS = frozenset(b"PING ECHO TIME MULTI EXEC DISCARD UNWATCH WAIT LOLWUT COMMAND LASTSAVE".split())

# Blocking commands: the backend connection is the client's until the reply comes (XREAD/XREADGROUP
# block only with BLOCK; WAIT blocks for replicas).
BLOCKING = frozenset(b"BLPOP BRPOP BRPOPLPUSH BLMOVE BZPOPMIN BZPOPMAX BLMPOP BZMPOP WAIT".split())

# Pub/Sub: every argument is a channel (or a pattern, for PSUBSCRIBE/PUNSUBSCRIBE).
SUBSCRIBE = frozenset(b"SUBSCRIBE SSUBSCRIBE PSUBSCRIBE".split())
UNSUBSCRIBE = frozenset(b"UNSUBSCRIBE SUNSUBSCRIBE PUNSUBSCRIBE".split())
PATTERN_SUBS = frozenset((b"PSUBSCRIBE", b"PUNSUBSCRIBE"))
PUBLISH = frozenset((b"PUBLISH", b"SPUBLISH"))

# Refused outright: each reaches beyond one org's namespace (the server, other orgs, other databases).
REFUSED = {
    b"FLUSHALL": "it would delete every org's keys (FLUSHDB deletes yours)",
    b"CONFIG": "the server's configuration is shared by every org",
    b"DEBUG": "it acts on the whole server",
    b"MONITOR": "it would show every org's commands",
    b"SELECT": "each org has one database (SELECT 0 is accepted)",
    b"SWAPDB": "each org has one database",
    b"MIGRATE": "it moves keys to another server",
    b"MODULE": "modules are loaded for the whole server",
    b"SHUTDOWN": "it stops the shared server",
    b"ACL": "users and permissions are the platform's",
    b"REPLICAOF": "replication is the platform's", b"SLAVEOF": "replication is the platform's",
    b"SYNC": "replication is the platform's", b"PSYNC": "replication is the platform's",
    b"FAILOVER": "replication is the platform's", b"CLUSTER": "the server's topology is the platform's",
    b"SAVE": "persistence is the platform's", b"BGSAVE": "persistence is the platform's",
    b"BGREWRITEAOF": "persistence is the platform's",
    b"SLOWLOG": "it would show every org's commands", b"LATENCY": "it describes the whole server",
    b"FUNCTION": "functions are shared by every org on the server",
    b"READONLY": "cluster mode is not offered", b"READWRITE": "cluster mode is not offered",
    b"ASKING": "cluster mode is not offered", b"RESTORE-ASKING": "cluster mode is not offered",
    b"PFDEBUG": "it acts on the server's internals", b"PFSELFTEST": "it acts on the server's internals",
}
# Subcommands refused of commands otherwise allowed.
REFUSED_SUB = {
    (b"SCRIPT", b"FLUSH"): "it would empty every org's script cache",
    (b"SCRIPT", b"KILL"): "it would stop another org's script",
    (b"SCRIPT", b"DEBUG"): "script debugging is not offered",
    (b"PUBSUB", b"NUMPAT"): "it counts every org's pattern subscriptions",
}
SCRIPT_ALLOWED = frozenset((b"LOAD", b"EXISTS"))
MEMORY_ALLOWED = frozenset((b"USAGE",))
