"""A small stateful MongoDB wire-protocol (OP_MSG) test server on top of mockupdb.

No MongoDB server can be installed on these machines, so the MongoDB sink is tested against this: real
pymongo, real sockets, real OP_MSG. It records every command pymongo sends and keeps inserted documents
by `_id` per collection, answering duplicate `_id`s with the server's own error (code 11000), so
idempotency is exercised as MongoDB would. Answers: hello/isMaster (mockupdb), ping, insert,
createIndexes, listIndexes, find (filter on equal fields only), count, endSessions; anything else ok.
`fail_next(code)` makes the next insert fail with a write error of that code.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from mockupdb import Matcher, MockupDB


class FakeMongo:
    def __init__(self, port: int | None = None) -> None:
        self.lock = threading.Lock()
        self.collections: dict[str, OrderedDict[Any, dict]] = {}
        self.indexes: dict[str, list[dict]] = {}
        self.commands: list[dict] = []
        self._fail_code: int | None = None
        self.port = port
        self.server: MockupDB | None = None

    # -- lifecycle: stop() then start() again on the same port keeps the data (a restarted server)
    def start(self) -> "FakeMongo":
        self.server = MockupDB(port=self.port or 0, auto_ismaster={"maxWireVersion": 21, "minWireVersion": 0},
                               verbose=False)
        self.server.autoresponds(Matcher(), self._handle)
        self.port = self.server.run()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/o7s_test"

    def fail_next(self, code: int) -> None:
        self._fail_code = code

    def docs(self, collection: str = "usageHistory") -> list[dict]:
        with self.lock:
            return list(self.collections.get(collection, {}).values())

    def commands_named(self, name: str) -> list[dict]:
        with self.lock:
            return [c for c in self.commands if next(iter(c)) == name]

    # -- the server side
    def _handle(self, req: Any) -> bool:
        doc = dict(req.doc)
        name = next(iter(doc))
        with self.lock:
            self.commands.append(doc)
        if name in ("isMaster", "ismaster", "hello"):
            return False  # mockupdb's auto_ismaster answers
        handler = getattr(self, "_cmd_" + name, None)
        reply = handler(doc) if handler else {}
        req.reply({"ok": 1, **reply} if "ok" not in reply else reply)
        return True

    def _cmd_insert(self, doc: dict) -> dict:
        coll = self.collections.setdefault(doc["insert"], OrderedDict())
        errors, n = [], 0
        fail, self._fail_code = self._fail_code, None
        ordered = doc.get("ordered", True)
        with self.lock:
            for i, d in enumerate(doc.get("documents", [])):
                if fail is not None:
                    errors.append({"index": i, "code": fail, "errmsg": f"simulated error {fail}"})
                elif d["_id"] in coll:
                    errors.append({"index": i, "code": 11000,
                                   "errmsg": f"E11000 duplicate key error collection: {doc['$db']}.{doc['insert']}"
                                             f" index: _id_ dup key: {{ _id: \"{d['_id']}\" }}"})
                else:
                    coll[d["_id"]] = dict(d)
                    n += 1
                if errors and ordered:
                    break
        out: dict[str, Any] = {"n": n}
        if errors:
            out["writeErrors"] = errors
        return out

    def _cmd_createIndexes(self, doc: dict) -> dict:
        with self.lock:
            have = self.indexes.setdefault(doc["createIndexes"], [{"key": {"_id": 1}, "name": "_id_"}])
            before = len(have)
            for ix in doc["indexes"]:
                if all(h["name"] != ix["name"] for h in have):
                    have.append({"key": dict(ix["key"]), "name": ix["name"]})
            return {"numIndexesBefore": before, "numIndexesAfter": len(have),
                    "createdCollectionAutomatically": before == 1}

    def _cmd_listIndexes(self, doc: dict) -> dict:
        with self.lock:
            batch = [dict(ix, v=2) for ix in self.indexes.get(doc["listIndexes"], [])]
        return {"cursor": {"id": 0, "ns": f"{doc['$db']}.{doc['listIndexes']}", "firstBatch": batch}}

    def _cmd_find(self, doc: dict) -> dict:
        flt = doc.get("filter", {})
        with self.lock:
            batch = [d for d in self.collections.get(doc["find"], {}).values()
                     if all(d.get(k) == v for k, v in flt.items())]
        return {"cursor": {"id": 0, "ns": f"{doc['$db']}.{doc['find']}", "firstBatch": batch}}

    def _cmd_ping(self, doc: dict) -> dict:
        return {}

    def _cmd_endSessions(self, doc: dict) -> dict:
        return {}
