"""The audit chain: sealing, verification of changed, removed, moved and torn lines, redaction."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import gateway_command
from gateway.core.audit import GENESIS, Redactor, last_hash, seal, verify

KEY = b"k" * 32


def write_log(path, n=5, key=None) -> list[bytes]:
    prev, lines = GENESIS, []
    for i in range(n):
        line, prev = seal({"request_id": f"r{i}", "status": 200, "solicitor": {"identifier": f"p{i}"}}, prev, key)
        lines.append(line)
    path.write_bytes(b"".join(lines))
    return lines


def run_verify(path, *args):
    return subprocess.run(gateway_command("audit", "verify", str(path), *args), capture_output=True, text=True,
                          timeout=30, cwd=path.parent)


def test_a_sealed_chain_verifies(tmp_path):
    lines = write_log(tmp_path / "a.jsonl")
    assert verify(lines, None).ok and verify(lines, None).records == 5
    record = json.loads(lines[1])
    assert record["prev"] == json.loads(lines[0])["hash"]
    assert json.loads(lines[0])["prev"] == GENESIS
    proc = run_verify(tmp_path / "a.jsonl")
    assert (proc.returncode, proc.stdout.strip()) == (0, "OK 5 records")


def test_empty_log_verifies():
    assert verify([], None).ok


def test_changed_line_is_named(tmp_path):
    lines = write_log(tmp_path / "a.jsonl")
    lines[2] = lines[2].replace(b'"status":200', b'"status":201')
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines))
    result = verify(lines, None)
    assert (result.ok, result.bad_line) == (False, 3) and "changed" in result.why
    proc = run_verify(tmp_path / "a.jsonl")
    assert proc.returncode == 1 and "line 3" in proc.stderr and "changed" in proc.stderr


def test_removed_line_is_named(tmp_path):
    lines = write_log(tmp_path / "a.jsonl")
    del lines[1]
    result = verify(lines, None)
    assert (result.ok, result.bad_line) == (False, 2) and "removed or moved" in result.why


def test_moved_line_is_named(tmp_path):
    lines = write_log(tmp_path / "a.jsonl")
    lines[1], lines[3] = lines[3], lines[1]
    result = verify(lines, None)
    assert (result.ok, result.bad_line) == (False, 2)


def test_removed_first_line_is_named(tmp_path):
    lines = write_log(tmp_path / "a.jsonl")
    assert verify(lines[1:], None).bad_line == 1


def test_torn_last_line_is_named(tmp_path):
    lines = write_log(tmp_path / "a.jsonl")
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines)[:-20])
    with open(tmp_path / "a.jsonl", "rb") as f:
        result = verify(f, None)
    assert (result.ok, result.bad_line) == (False, 5) and "torn" in result.why
    proc = run_verify(tmp_path / "a.jsonl")
    assert proc.returncode == 1 and "line 5: torn" in proc.stderr


def test_hmac_chain_needs_its_key(tmp_path):
    lines = write_log(tmp_path / "a.jsonl", key=KEY)
    assert verify(lines, KEY).ok
    assert not verify(lines, None).ok
    assert not verify(lines, b"x" * 32).ok
    # An attacker without the key cannot re-seal a changed line.
    record = json.loads(lines[0])
    record["status"] = 500
    forged, _ = seal({k: v for k, v in record.items() if k not in ("prev", "hash")}, GENESIS, None)
    assert verify([forged, *lines[1:]], KEY).bad_line == 1
    (tmp_path / "audit.key").write_bytes(KEY)
    (tmp_path / "c.yaml").write_text(json.dumps({"audit": {"key_file": "audit.key"}}))
    proc = run_verify(tmp_path / "a.jsonl", "-c", str(tmp_path / "c.yaml"))
    assert (proc.returncode, proc.stdout.strip()) == (0, "OK 5 records"), proc.stderr
    proc = run_verify(tmp_path / "a.jsonl")
    assert proc.returncode == 1 and "line 1" in proc.stderr


def test_last_hash_skips_a_torn_tail(tmp_path):
    lines = write_log(tmp_path / "a.jsonl")
    assert last_hash(b"".join(lines) + b'{"torn') == json.loads(lines[-1])["hash"]
    assert last_hash(b"") is None


def test_redaction_is_keyed_and_stable():
    r = Redactor(["solicitor.identifier", "remote", "cert.subject", "missing.field"], b"r" * 32)
    one = r.apply({"solicitor": {"source": "EXTERNAL", "identifier": "198603052385"}, "remote": "10.0.0.1",
                   "cert": None})
    two = r.apply({"solicitor": {"source": "EXTERNAL", "identifier": "198603052385"}, "remote": "10.0.0.2"})
    assert one["solicitor"]["identifier"] == two["solicitor"]["identifier"]
    assert one["solicitor"]["identifier"].startswith("hmac-sha256:")
    assert "198603052385" not in json.dumps(one)
    assert one["remote"] != two["remote"]
    assert one["solicitor"]["source"] == "EXTERNAL" and one["cert"] is None
    other = Redactor(["solicitor.identifier"], b"o" * 32).apply({"solicitor": {"identifier": "198603052385"}})
    assert other["solicitor"]["identifier"] != one["solicitor"]["identifier"]


def test_a_redacted_value_is_replaced_in_the_prose_of_the_line():
    r = Redactor(["solicitor.identifier"], b"r" * 32)
    record = r.apply({"ts": "2026-01-01T00:00:00.000Z", "solicitor": {"source": "INTERNAL", "identifier": "uid=ab"},
                      "reason": "solicitor INTERNAL:uid=ab is not one of client beta's solicitors"})
    pseudonym = record["solicitor"]["identifier"]
    assert "uid=ab" not in json.dumps(record)
    assert record["reason"] == f"solicitor INTERNAL:{pseudonym} is not one of client beta's solicitors"


@pytest.mark.parametrize("identifier", [["jdoe"], {"uid": "jdoe"}, 12345])
def test_a_redacted_value_that_is_not_text_leaves_no_spelling_in_the_prose(identifier):
    r = Redactor(["solicitor.identifier"], b"r" * 32)
    record = r.apply({"solicitor": {"source": "INTERNAL", "identifier": identifier},
                      "reason": f"solicitor INTERNAL:{identifier} is not one of client beta's solicitors"})
    assert "jdoe" not in json.dumps(record) and "12345" not in json.dumps(record)


def test_a_client_cannot_rewrite_the_fixed_fields_through_a_redacted_value():
    r = Redactor(["solicitor.identifier"], b"r" * 32)
    fixed = {"decision": "deny", "operation": "create_order", "client": "crm", "path": "/orders",
             "cert": {"subject": "CN=crm,O=x"}}
    for value in ("deny", "create_order", "crm", "orders", "O"):
        record = r.apply({**json.loads(json.dumps(fixed)), "solicitor": {"identifier": value},
                          "reason": f"solicitor INTERNAL:{value} is not one of client crm's solicitors"})
        assert {k: record[k] for k in fixed} == fixed
        assert f"INTERNAL:{value} " not in record["reason"] and record["solicitor"]["identifier"] in record["reason"]


def test_verify_of_a_missing_file_is_one_line(tmp_path):
    proc = run_verify(tmp_path / "nope.jsonl")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_redaction_key_is_kept_from_the_first_start(tmp_path):
    from gateway.shell.audit_writer import redaction_key

    log = tmp_path / "new-folder" / "audit.jsonl"
    first = redaction_key(log, None)
    assert (tmp_path / "new-folder" / "audit-redact.key").stat().st_mode & 0o077 == 0
    assert redaction_key(log, None) == first
    assert redaction_key(log, b"k" * 32) != first


def test_any_text_seals_and_verifies():
    record = {"reason": "bad name \udcff and \ud800", "solicitor": {"identifier": "Åsa 日本"}}
    line, digest = seal(record, GENESIS, None)
    assert line.isascii() and verify([line], None).ok
    assert json.loads(line)["solicitor"]["identifier"] == "Åsa 日本"


def test_timestamps_are_what_isoformat_gives():
    """audit.timestamp formats a second once and adds the milliseconds: the same text as datetime's."""
    import random
    from datetime import datetime, timezone

    from gateway.core.audit import timestamp

    rng = random.Random(7)
    for ts in [0.0, 0.9995, 1.0005, 1_795_000_000.9999996] + [rng.uniform(0, 4e9) for _ in range(20000)]:
        expected = datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert timestamp(ts) == expected, ts


def test_a_sealed_line_verifies_and_reads_as_its_record():
    from gateway.core.audit import GENESIS, seal, verify

    line, digest = seal({"b": 1, "a": "x\u00e9"}, GENESIS, b"k" * 16)
    assert json.loads(line) == {"a": "x\u00e9", "b": 1, "prev": GENESIS, "hash": digest}
    assert verify([line], b"k" * 16).ok and line.isascii()


def test_the_hash_of_a_sealed_line_is_read_off_its_end():
    """The writer learns the last hash on disk from the line itself, whatever the record held."""
    from gateway.core.audit import GENESIS, seal, sealed_hash

    for record, key in [({"b": 1}, None), ({"reason": 'a "hash":"x" inside', "hash": "forged"}, b"k" * 16)]:
        line, digest = seal(record, GENESIS, key)
        assert sealed_hash(line) == digest == json.loads(line)["hash"]


def run_verify_many(paths, *args):
    return subprocess.run(gateway_command("audit", "verify", *map(str, paths), *args), capture_output=True,
                          text=True, timeout=30, cwd=paths[0].parent)


def test_verify_checks_each_file_of_several(tmp_path):
    files = [tmp_path / "audit.jsonl.w0", tmp_path / "audit.jsonl.w1"]
    write_log(files[0], n=3)
    write_log(files[1], n=4)
    proc = run_verify_many(files)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{files[0]}: OK 3 records", f"{files[1]}: OK 4 records"]


def test_verify_names_the_bad_file_among_good_ones(tmp_path):
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"]
    for f in files:
        write_log(f)
    lines = files[1].read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"status":200', b'"status":201')
    files[1].write_bytes(b"".join(lines))
    proc = run_verify_many(files)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [f"{files[0]}: OK 5 records", f"{files[2]}: OK 5 records"]
    assert proc.stderr.splitlines() == [f"{files[1]}: line 3: the line was changed (its hash does not match)"]


def test_verify_reports_a_missing_file_and_checks_the_others(tmp_path):
    good, missing = tmp_path / "a.jsonl", tmp_path / "nope.jsonl"
    write_log(good)
    proc = run_verify_many([missing, good])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stdout.splitlines() == [f"{good}: OK 5 records"]
    assert proc.stderr.splitlines() == [f"{missing}: cannot read: No such file or directory"]


def test_a_rotated_series_is_linked_by_its_reopened_record(tmp_path):
    """A file the writer starts after a rotation begins its own chain (GENESIS) with a `reopened` record."""
    old, new = tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl"
    lines = write_log(old, n=3)
    last = json.loads(lines[-1])["hash"]
    first, prev = seal({"event": "reopened", "previous_hash": last}, GENESIS, None)
    second, _ = seal({"request_id": "r9", "status": 200}, prev, None)
    new.write_bytes(first + second)
    proc = run_verify_many([old, new])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{old}: OK 3 records", f"{new}: OK 2 records (continues {old})"]
    # given the other way round, or with a file missing in between, each still verifies but is not linked
    proc = run_verify_many([new, old])
    assert proc.returncode == 0 and "continues" not in proc.stdout
    other = tmp_path / "other.jsonl"
    write_log(other, n=2)
    proc = run_verify_many([other, new])
    assert proc.returncode == 0 and f"{new}: OK 2 records (its reopened record follows a hash" in proc.stdout
