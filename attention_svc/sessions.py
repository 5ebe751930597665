"""Conversation sessions in Redis: one JSON record per session, `herd:session:<id>`, with a
version that every turn's commit compares and bumps, so two concurrent turns never lose one.

A turn reads the session (tokens, messages, version), generates, then commits its answer
only if the stored version is still the one it read (a Lua script: read, compare, write in
one atomic step). The loser of a race is told to retry; nothing is silently overwritten,
restarted empty or dropped. Unlike KV entries, sessions are state, not cache: every Redis
failure is raised to the caller.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import redis

log = logging.getLogger("herd.sessions")
ABSENT = -1  # the expected version of a session that must not exist yet

# KEYS[1]: the session; ARGV: expected version (ABSENT: must not exist), new record, TTL seconds.
# Returns {1, stored version} when it wrote, or {0, stored version (ABSENT if none)}.
_COMMIT = """
local raw = redis.call('GET', KEYS[1])
local current = -1
if raw then
  local ok, record = pcall(cjson.decode, raw)
  current = 0
  if ok and type(record) == 'table' and type(record['version']) == 'number' then current = record['version'] end
end
if current ~= tonumber(ARGV[1]) then return {0, current} end
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
return {1, current}
"""


class SessionError(Exception):
    """A turn that cannot read or commit its session; `status` names the gRPC status it answers."""
    status = "INTERNAL"


class SessionUnavailable(SessionError):
    """Redis failed: the session's history (or its commit) is out of reach. Retryable."""
    status = "UNAVAILABLE"


class SessionNotFound(SessionError):
    """No such session (never started, or expired / evicted): start one with new_session."""
    status = "NOT_FOUND"


class SessionExists(SessionError):
    """new_session asked for an id that is already taken."""
    status = "ALREADY_EXISTS"


class SessionConflict(SessionError):
    """Another turn committed to the session after this turn read it. Retryable."""
    status = "ABORTED"


class SessionMismatch(SessionError):
    """The record belongs to another model, or is not a herd session record."""
    status = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class Session:
    """A session as one turn read it; version is ABSENT for a session this turn starts."""
    id: str
    tokens: list[int]
    messages: list[dict] | None
    version: int


class SessionStore:
    def __init__(self, client: redis.Redis, fingerprint: str, ttl_s: int = 3600):
        self.redis, self.fingerprint, self.ttl = client, fingerprint, ttl_s
        self._commit = client.register_script(_COMMIT)

    @staticmethod
    def key(session_id: str) -> str:
        return f"herd:session:{session_id}"

    def read(self, session_id: str, new: bool = False) -> Session:
        """The session's history; with new=True an empty session that must not exist yet."""
        try:
            raw = self.redis.get(self.key(session_id))
        except redis.RedisError as exc:
            log.warning("session store unavailable reading %r: %s", session_id, exc)
            raise SessionUnavailable(f"session store unavailable: {exc}") from None
        if new:
            if raw is not None:
                raise SessionExists(f"session {session_id!r} already exists; continue it without new_session "
                                    "or start another id")
            return Session(session_id, [], None, ABSENT)
        if raw is None:
            raise SessionNotFound(f"session {session_id!r} not found (never started, or expired); "
                                  "start it with new_session")
        try:
            record = json.loads(raw)
            fingerprint, tokens = record["fingerprint"], [int(t) for t in record["tokens"]]
            messages, version = record.get("messages"), int(record.get("version", 0))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise SessionMismatch(f"session {session_id!r} is not a herd session record") from None
        if fingerprint != self.fingerprint:
            raise SessionMismatch(f"session {session_id!r} was written by another model (fingerprint "
                                  f"{str(fingerprint)[:12]}..., this model {self.fingerprint[:12]}...)")
        return Session(session_id, tokens, messages, version)

    def commit(self, session: Session, tokens: list[int], messages: list[dict] | None) -> int:
        """Store the conversation after this turn if no other turn committed since `session` was
        read; the new version, or SessionConflict / SessionExists / SessionUnavailable."""
        version = session.version + 1 if session.version != ABSENT else 1
        record = json.dumps({"fingerprint": self.fingerprint, "version": version, "tokens": tokens,
                             "messages": messages})
        try:
            ok, stored = self._commit(keys=[self.key(session.id)], args=[session.version, record, self.ttl])
        except redis.RedisError as exc:
            log.warning("session store unavailable committing %r: %s", session.id, exc)
            raise SessionUnavailable(f"session {session.id!r} not saved, session store unavailable: {exc}") from None
        if ok:
            return version
        if session.version == ABSENT:
            raise SessionExists(f"session {session.id!r} was started by another turn meanwhile; "
                                "this answer was not saved; continue it without new_session")
        if stored == ABSENT:
            raise SessionConflict(f"session {session.id!r} changed during this turn (it expired); "
                                  "this answer was not saved; retry (or start it again with new_session)")
        raise SessionConflict(f"session {session.id!r} changed during this turn (version {session.version} -> "
                              f"{stored}); this answer was not saved; retry the turn")
