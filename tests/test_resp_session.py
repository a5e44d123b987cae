"""The sans-IO client state: what works before AUTH, connection commands answered by O7s, and when a
client needs a dedicated backend connection (MULTI, WATCH, Pub/Sub)."""

from __future__ import annotations

from o7s_cluster.resp.namespace import T_KEYS, Answer, Namespace
from o7s_cluster.resp.session import (
    EXPECT_CONFIRMATIONS,
    F_EXEC,
    F_EXECABORT,
    NOAUTH,
    Close,
    Login,
    RespSession,
    Send,
)

P = b"o7s:org:"


def logged_in(proto: int = 2) -> RespSession:
    s = RespSession(7)
    step = s.handle([b"HELLO", b"%d" % proto, b"AUTH", b"acme", b"pw"])
    assert isinstance(step, Login) and step.user == b"acme" and step.proto == proto
    s.logged_in(step, "acme", Namespace(P))
    return s


def test_before_auth_only_hello_auth_ping_quit() -> None:
    s = RespSession(1)
    for cmd in ([b"GET", b"k"], [b"KEYS", b"*"], [b"CLIENT", b"SETNAME", b"x"], [b"SELECT", b"0"], [b"EVAL", b"1", b"0"]):
        assert s.handle(cmd) == Answer(NOAUTH)
    assert s.handle([b"PING"]) == Answer(b"+PONG\r\n")
    assert isinstance(s.handle([b"AUTH", b"acme", b"pw"]), Login)
    assert s.handle([b"HELLO", b"3"]).reply.startswith(b"-NOAUTH")
    assert s.proto == 2
    assert s.handle([b"HELLO", b"4"]).reply.startswith(b"-NOPROTO")
    assert isinstance(s.handle([b"QUIT"]), Close)
    assert s.handle([b"AUTH", b"pw"]).reply.startswith(b"-WRONGPASS")


def test_hello3_reply_is_a_map() -> None:
    s = RespSession(9)
    step = s.handle([b"HELLO", b"3", b"AUTH", b"acme", b"pw", b"SETNAME", b"app"])
    reply = s.logged_in(step, "acme", Namespace(P))
    assert reply.startswith(b"%7\r\n") and b":3\r\n" in reply and s.name == b"app" and s.proto == 3
    assert s.logged_in(Login(b"other", b"pw"), "other", Namespace(b"x:")).startswith(b"-ERR O7s: a connection stays")


def test_connection_commands_are_local() -> None:
    s = logged_in()
    assert s.handle([b"CLIENT", b"SETNAME", b"worker-1"]) == Answer(b"+OK\r\n")
    assert s.handle([b"client", b"getname"]) == Answer(b"$8\r\nworker-1\r\n")
    assert s.handle([b"CLIENT", b"ID"]) == Answer(b":7\r\n")
    assert s.handle([b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-py"]) == Answer(b"+OK\r\n")
    assert s.handle([b"SELECT", b"0"]) == Answer(b"+OK\r\n")
    for cmd in ([b"CLIENT", b"KILL", b"ID", b"3"], [b"CLIENT", b"LIST"], [b"CLIENT", b"TRACKING", b"ON"], [b"SELECT", b"2"]):
        a = s.handle(cmd)
        assert isinstance(a, Answer) and a.refused, cmd
    assert b"loading:0" in s.handle([b"INFO"]).reply
    assert s.handle([b"PING", b"hi"]) == Answer(b"$2\r\nhi\r\n")


def test_multi_pins_and_exec_carries_the_queued_transforms() -> None:
    s = logged_in()
    assert not s.pinned
    assert isinstance(s.handle([b"MULTI"]), Send) and s.pinned and s.in_multi
    s.handle([b"SET", b"a", b"1"])
    s.handle([b"KEYS", b"*"])
    ping = s.handle([b"PING"])
    assert isinstance(ping, Send)  # queued on the backend inside MULTI
    ex = s.handle([b"EXEC"])
    assert isinstance(ex, Send) and ex.finish == F_EXEC and ex.queued == [0, T_KEYS, 0]
    assert not s.pinned


def test_refusal_inside_multi_aborts_exec() -> None:
    s = logged_in()
    s.handle([b"MULTI"])
    assert s.handle([b"FLUSHALL"]).refused
    ex = s.handle([b"EXEC"])
    assert ex.args == [b"DISCARD"] and ex.finish == F_EXECABORT


def test_watch_pins_until_exec_or_unwatch() -> None:
    s = logged_in()
    assert s.handle([b"WATCH", b"k"]).args == [b"WATCH", P + b"k"]
    assert s.pinned
    s.handle([b"UNWATCH"])
    assert not s.pinned


def test_subscriptions_counted_like_redis() -> None:
    s = logged_in()
    sub = s.handle([b"SUBSCRIBE", b"a", b"b"])
    assert sub.expect == EXPECT_CONFIRMATIONS and sub.confirmations == 2 and s.subscribed and s.pinned
    refused = s.handle([b"GET", b"k"])
    assert refused.reply.startswith(b"-ERR Can't execute 'get'")
    assert isinstance(s.handle([b"PING"]), Send)  # in subscribed RESP2, PING answers ["pong", ""] from Redis
    un = s.handle([b"UNSUBSCRIBE"])
    assert un.confirmations == 2 and not s.subscribed
    un = s.handle([b"UNSUBSCRIBE"])
    assert un.confirmations == 1  # Redis confirms once with a null channel
    assert s.pinned  # the connection stays dedicated until RESET or the end
    assert s.handle([b"RESET"]) == Answer(b"+RESET\r\n") and not s.pinned and s.proto == 2


def test_resp3_subscribed_allows_commands() -> None:
    s = logged_in(3)
    s.handle([b"SUBSCRIBE", b"a"])
    assert isinstance(s.handle([b"GET", b"k"]), Send)
    assert s.handle([b"HELLO", b"2"]).reply.startswith(b"-ERR O7s: HELLO cannot change")


def test_scripts_refused_without_acl_user() -> None:
    s = logged_in()
    s.scripts = False
    a = s.handle([b"EVAL", b"return 1", b"0"])
    assert a.refused and b"ACL" in a.reply
