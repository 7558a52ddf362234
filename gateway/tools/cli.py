"""The `gateway` command and its subcommands.

Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from gateway.tools import certs
from gateway.core.errors import SettingsError, StartError
from gateway.shell.settings import load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="mTLS security gateway for the Automation API")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway (and the embedded reference API)")
    serve.add_argument("-c", "--config", help="config file (default: $GATEWAY_CONFIG or ./config.yaml)")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes sharing the port (more than one needs Redis for rate limits)")
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)

    ref = sub.add_parser("reference-api", help="run only the reference Automation API (plain HTTP)")
    ref.add_argument("-c", "--config", help="config file (default: $GATEWAY_CONFIG or ./config.yaml)")
    ref.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default: reference_api.listen)")
    certs.add_parser(sub)

    check = sub.add_parser("check", help="validate the config and every policy file; exit 1 on any problem")
    check.add_argument("-c", "--config", help="config file (default: $GATEWAY_CONFIG or ./config.yaml)")

    policy = sub.add_parser("policy", help="work with client policies")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    explain = policy_sub.add_parser(
        "explain", help="which client a certificate maps to and the decision on a request, without sending it",
        description="The certificate is first checked as serving checks it (chain to tls.client_ca, validity, "
                    "CRL): a refusal there is the decision. Exit 0 when the request would be allowed, 1 when it "
                    "would be refused, 3 when it would be allowed only if the order's solicitor (looked up at "
                    "request time) is one of the client's, 2 when the input cannot be used.")
    explain.add_argument("-c", "--config", help="config file (default: $GATEWAY_CONFIG or ./config.yaml)")
    explain.add_argument("--cert", required=True, help="the client certificate (PEM; certificates after it are "
                                                       "the intermediates the client presents)")
    explain.add_argument("--method", required=True, help="HTTP method, e.g. POST")
    explain.add_argument("--path", required=True, help="request path, e.g. /orders")
    explain.add_argument("--form", action="append", default=[], metavar="NAME=VALUE",
                         help="a form field of the request (repeatable), e.g. solicitor='{...}'; for order "
                              "operations, solicitor= gives the order's solicitor")

    ptest = policy_sub.add_parser(
        "test", help="run policy test cases (policies/tests/*.yaml by default) against the policies",
        description="Each case names an identity, a request and the expected outcome; every case is decided "
                    "as the running gateway decides it. Prints each failing case, 'N passed, M failed' and "
                    "the policy rules no case exercised. Exit 0 when all pass, 1 on any failure, "
                    "2 when a test file cannot be used.")
    ptest.add_argument("-c", "--config", help="config file (default: $GATEWAY_CONFIG or ./config.yaml)")
    ptest.add_argument("paths", nargs="*", metavar="PATH", help="test files or folders (default: the "
                       "policies folder's tests/)")
    ptest.add_argument("--format", choices=("text", "json"), default="text", help="output (default: text)")

    schema = sub.add_parser(
        "schema", help="print the JSON Schema of config.yaml or of a policy file, for editors",
        description="Print the JSON Schema (draft 2020-12) that config.yaml or a policy file is read with, from "
                    "the same definitions as the loader: give it to yaml-language-server (or any editor that reads "
                    "JSON Schema) to validate and complete the files as you type.")
    schema.add_argument("kind", choices=("config", "policy"), help="which file's schema")

    audit = sub.add_parser("audit", help="work with the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = audit_sub.add_parser(
        "verify", help="check audit logs' hash chains",
        description="Check each audit log's hash chain separately (each instance, and each worker of "
                    "`serve --workers N`, writes its own chain): one line per file, exit 1 when any fails. "
                    "A file started because the log was rotated while the gateway ran begins with a "
                    "`reopened` record naming the last hash of the file before it; give a rotated series "
                    "oldest first (audit.jsonl.1 audit.jsonl) and each line says whether it continues the file before.")
    verify.add_argument("file", nargs="+", help="audit logs (JSON lines), a rotated series oldest first")
    verify.add_argument("-c", "--config", help="config file whose audit.key_file keys the chain "
                        "(default: $GATEWAY_CONFIG or ./config.yaml when present)")
    return p


def _check(args) -> int:
    from gateway.tools.check import check

    problems, warnings = check(args.config)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 1
    print("OK")
    return 0


def _explain(args) -> int:
    from pathlib import Path

    from gateway.tools.explain import explain

    form = []
    for item in args.form:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"gateway: --form {item!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        form.append((name, value))
    try:
        result = explain(args.config, Path(args.cert), args.method, args.path, form)
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    print("\n".join(result.lines))
    return result.exit_code


def _policy_test(args) -> int:
    from pathlib import Path

    from gateway.shell.settings import load_policies
    from gateway.tools.policy_test import load_cases, render, run_cases

    try:
        config = load_config(args.config)
        policies = load_policies(config.policies)
        cases = load_cases([Path(p) for p in args.paths] or [config.policies / "tests"])
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    report = run_cases(policies, cases)
    print(render(report, args.format))
    return 1 if report.failures else 0


def _schema(args) -> int:
    import json

    if args.kind == "config":
        from gateway.shell.settings import config_schema as schema
    else:
        from gateway.core.policy_schema import policy_schema as schema
    print(json.dumps(schema(), indent=2, ensure_ascii=False))
    return 0


def _audit_verify(args) -> int:
    import os
    from pathlib import Path

    from gateway.core.audit import chain_link, verify_file
    from gateway.shell.audit_writer import load_key

    key = None
    config_file = args.config or os.environ.get("GATEWAY_CONFIG") or ("config.yaml" if Path("config.yaml").is_file() else None)
    if config_file:
        try:
            key = load_key(load_config(config_file).audit.key_file)
        except ValueError as exc:
            raise SettingsError(config_file, "audit.key_file", str(exc)) from None
    single = len(args.file) == 1
    failed = False
    before: tuple[str, str | None] | None = None   # the file given just before, and its last hash
    for name in args.file:
        try:
            with open(name, "rb") as f:
                result, first, last = verify_file(f, key)
        except OSError as exc:
            failed = True
            print(f"{name}: {exc.strerror or exc}" if single else f"{name}: cannot read: {exc.strerror or exc}",
                  file=sys.stderr)
            before = None
            continue
        link = chain_link(before, first) if before is not None and result.ok else ""
        before = (name, last)
        if result.ok:
            print(f"OK {result.records} records" if single else f"{name}: OK {result.records} records{link}")
        else:
            failed = True
            print(f"{name}: line {result.bad_line}: {result.why}", file=sys.stderr)
    return 1 if failed else 0


def _serve_workers(args) -> int:
    """The parent of `serve --workers N`: its metrics folder is named before prometheus_client loads."""
    from gateway.runtime.workers import prepare_multiprocess_metrics
    from gateway.shell.oplog import use_for_logging

    config = load_config(args.config)
    try:
        folder = prepare_multiprocess_metrics()
    except StartError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    from gateway.runtime.workers import run_workers

    use_for_logging()
    try:
        run_workers(config, args.workers, folder)
    except StartError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return 0


def quiet_dependency_warnings() -> None:
    """Warnings from dependencies (pyHanko importing DSA under cryptography 51, say) are for their
    developers: on a user's terminal they turn a one-line error into three. `python -W ...` or
    PYTHONWARNINGS still shows them."""
    if not sys.warnoptions:
        warnings.filterwarnings("ignore", module=r"(?!gateway(\.|$))")   # every module but the gateway's own


def main(argv: list[str] | None = None) -> int:
    quiet_dependency_warnings()
    args = _parser().parse_args(argv)
    try:
        if args.command == "reference-api":
            from gateway.reference.server import run as run_reference
            from gateway.runtime.embedded import die_with_parent

            die_with_parent()  # when started by `gateway serve`: never outlive it

            run_reference(load_config(args.config), args.listen)
            return 0
        if args.command == "check":
            return _check(args)
        if args.command == "policy":
            return _policy_test(args) if args.policy_command == "test" else _explain(args)
        if args.command == "audit":
            return _audit_verify(args)
        if args.command == "schema":
            return _schema(args)
        if args.command == "certs":
            return certs.cli_main(args)
        if args.command == "serve":
            if args.workers != 1 and args.worker_index is None:
                return _serve_workers(args)
            from gateway.runtime.lifecycle import serve, serve_worker

            try:
                if args.worker_index is not None:
                    serve_worker(load_config(args.config), args.worker_index)
                else:
                    serve(load_config(args.config), args.workers)
            except StartError as exc:
                print(f"gateway: {exc}", file=sys.stderr)
                return 1
            return 0
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"gateway: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
