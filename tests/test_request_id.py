"""Request ids: random version 4 UUIDs, spelled as uuid.UUID spells them."""

from __future__ import annotations

import uuid

from gateway.runtime.pipeline import request_id


def test_request_ids_are_random_version_4_uuids():
    ids = [request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, value)
    assert {value[19] for value in ids} == set("89ab")  # every variant nibble occurs: the bits are random
