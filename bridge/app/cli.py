"""The `wlbridge` command: serve, send, query, convert, replay, outbox, mapping, db, export,
import."""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path

from bridge import __version__
from bridge.app.settings_checks import load_settings
from bridge.config import add_cli_options, setting_names

NOT_SETTINGS = ("command", "config", "func", "files", "output")


def _settings(args: argparse.Namespace):
    """The settings from --config and the command line, or None after printing why not."""
    known = setting_names()
    overrides = {k: v for k, v in vars(args).items() if k in known and k not in NOT_SETTINGS}
    try:
        return load_settings(args.config, overrides)
    except (OSError, ValueError) as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    from bridge.app.server import serve
    from bridge.ops.translation_log import configure_logging

    configure_logging()  # before serve()'s basicConfig, which then leaves it in place
    settings = _settings(args)
    if settings is None:
        return 2
    return serve(settings)


def _read(files: list[Path]):
    """Every message of the files, or None after printing why not (a file holds none)."""
    from bridge.net.client import read_messages

    try:
        return read_messages(files)
    except (OSError, ValueError) as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return None


def _send(args: argparse.Namespace) -> int:
    from bridge.net.client import MLLPClient, ack_summary

    messages = _read(args.files)
    if messages is None:
        return 2
    failures = 0
    try:
        tls = _client_tls_context(args)
        with MLLPClient(args.host, args.port, timeout=args.timeout, tls_context=tls) as client:
            for path, message in messages:
                ack = client.send(message)
                code, control, detail = ack_summary(ack)
                failures += code != "AA"
                if args.raw:
                    print(ack.decode("utf-8", "replace").replace("\r", "\n"))
                else:
                    print(f"{path.name}: {code} {control}" + (f"  {detail}" if detail else ""))
    except (OSError, ValueError) as exc:
        return _connection_failed(args, exc)
    return 1 if failures else 0


def _replay(args: argparse.Namespace) -> int:
    """Send rejected messages again; those now accepted move to a `replayed` folder beside."""
    from bridge.hl7.pipeline import move_replayed
    from bridge.net.client import MLLPClient, ack_summary

    if args.store or args.config:
        return _replay_shared(args)
    _replay_defaults(args, None)
    if not args.files:
        print("wlbridge: replay: name the files to send (or --store URL)", file=sys.stderr)
        return 2
    failures = 0
    try:
        tls = _client_tls_context(args)
        with MLLPClient(args.host, args.port, timeout=args.timeout, tls_context=tls) as client:
            for path in args.files:
                ack = client.send(path.read_bytes())
                code, control, detail = ack_summary(ack)
                print(f"{path.name}: {code} {control}" + (f"  {detail}" if detail else ""))
                if code == "AA":
                    move_replayed(path)
                else:
                    failures += 1
    except (OSError, ValueError) as exc:
        return _connection_failed(args, exc)
    return 1 if failures else 0


def _replay_shared(args: argparse.Namespace) -> int:
    """The kept messages of the PostgreSQL store (every bridge's): without names, list them;
    with names, send each to the bridge at --host/--port while holding its replay lock, and
    remove it from the table once accepted (so no one replays it twice)."""
    from bridge.net.client import MLLPClient, ack_summary
    from bridge.storage.postgres import is_postgres_url
    from bridge.storage.postgres.memory import RejectedMessages, ReplayRefused, copy_of
    from bridge.storage.store import StoreError

    settings = None
    if args.config:
        try:
            settings = load_settings(args.config)
        except (OSError, ValueError) as exc:
            print(f"wlbridge: {exc}", file=sys.stderr)
            return 2
    _replay_defaults(args, settings)
    if not is_postgres_url(args.store):
        where = "--store" if args.store else f"{args.config}: store"
        print(
            f"wlbridge: {where} must be a postgresql://user@host/db URL: replay --config and "
            "--store replay the shared table's kept messages (files: name them without either)",
            file=sys.stderr,
        )
        return 2
    shared = RejectedMessages(args.store)
    failures = 0
    try:
        if not args.files:
            for row in shared.entries(10_000):
                print(f"{row.name}  {row.control_id}  {row.reason.strip()}")
            return 0
        tls = _client_tls_context(args)
        with MLLPClient(args.host, args.port, timeout=args.timeout, tls_context=tls) as client:
            for given in args.files:
                name = given.name.removesuffix(".hl7")
                if copy_of(name) is not None:  # a folder's name: not one the table knows
                    print(
                        f"{name}: a rejected folder's file, not a name of the shared table: "
                        "replay the file (without --store or --config), or name the table's "
                        "row as `wlbridge replay --store URL` lists it"
                    )
                    failures += 1
                    continue
                try:
                    claimed = shared.claim(name, 16 * 1024 * 1024)
                except ReplayRefused as exc:
                    print(f"{name}: {exc.message}")
                    failures += 1
                    continue
                accepted = False
                try:
                    code, control, detail = ack_summary(client.send(claimed.data))
                    accepted = code == "AA"
                finally:
                    claimed.finish(accepted)
                print(f"{name}: {code} {control}" + (f"  {detail}" if detail else ""))
                failures += not accepted
    except StoreError as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        return _connection_failed(args, exc)
    finally:
        shared.close()
    return 1 if failures else 0


def _replay_defaults(args: argparse.Namespace, settings) -> None:
    """What replay's command line leaves out, from the bridge's config (`settings`, or None):
    its store, its MLLP address and TLS (verified with its `mllp-tls-ca`, else its own
    certificate, trusted as such); else 127.0.0.1:2575, plain TCP. A bridge that asks
    for client certificates (`mllp-tls-ca`) still needs --tls-cert and --tls-key."""
    if settings is not None:
        args.store = args.store or settings.store
        if args.host is None and settings.host not in ("", "0.0.0.0", "::"):
            args.host = settings.host
        if args.port is None:
            args.port = settings.mllp_port
        if settings.mllp_tls_cert and not args.tls_ca:
            args.tls_ca = settings.mllp_tls_ca or settings.mllp_tls_cert
    args.host = args.host or "127.0.0.1"
    args.port = args.port or 2575


def _connection_failed(args: argparse.Namespace, exc: Exception) -> int:
    """Say why send or replay could not talk to the server: TLS, the connection, or a file."""
    if isinstance(exc, ssl.SSLError):
        print(f"wlbridge: TLS with {args.host}:{args.port} failed: {exc}", file=sys.stderr)
    elif isinstance(exc, ValueError):  # a TLS option's file
        print(f"wlbridge: {exc}", file=sys.stderr)
    else:
        print(f"wlbridge: {args.host}:{args.port}: {exc}", file=sys.stderr)
    return 2


def _client_tls_context(args: argparse.Namespace):
    """A TLS context (`--tls-ca`, with a client certificate if given), or None for plain TCP.
    ValueError naming the option when a file cannot be loaded."""
    if not (args.tls_ca or args.tls_cert):
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.tls_ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--tls-ca {args.tls_ca}: cannot load the CA: {exc}") from None
    # Any certificate of the file is a trust anchor (as Python 3.13 does by default): the
    # server's own certificate, not only a root, may be what verifies it.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if args.tls_cert:
        try:
            context.load_cert_chain(args.tls_cert, args.tls_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key or '(in the certificate)'}: "
                f"cannot load the client certificate and key: {exc}"
            ) from None
    return context


def _query(args: argparse.Namespace) -> int:
    from bridge.net.client import (
        QUERY_COLUMNS,
        answer_rows,
        find,
        format_table,
        merge_answers,
        worklist_query,
    )

    stations = [args.station]
    if args.all_stations:
        try:
            stations = _stations_of(args.config, args.called_aet)
        except (OSError, ValueError) as exc:
            print(f"wlbridge: {exc}", file=sys.stderr)
            return 2
    try:
        tls = _client_tls_context(args)
        results = []
        for station in stations:
            query = worklist_query(
                patient_id=args.patient_id,
                accession=args.accession,
                modality=args.modality,
                station=station,
                date=args.date,
                patient_name=args.patient_name,
            )
            results.append(
                find(
                    args.host,
                    args.port,
                    query,
                    args.called_aet,
                    args.calling_aet,
                    timeout=args.timeout,
                    tls_context=tls,
                )
            )
    except (OSError, ConnectionError, RuntimeError, ValueError) as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return 2
    status = next((s for s, _ in results if s != 0), 0)
    answers = merge_answers([a for _, a in results])
    print(format_table([title for _, title in QUERY_COLUMNS], answer_rows(answers)))
    print(f"{len(answers)} item(s), final status 0x{status:04X}")
    return 0 if status == 0 else 1


def _stations_of(config: Path | None, called_aet: str) -> list[str]:
    """Every station AE title a config names: station rules, the bridge's own AE title (the
    station of orders no rule matches), allowed calling AE titles; and "" (the caller's own)."""
    settings = load_settings(config)
    titles = [t for rule in settings.station_rules for t in rule.ae_titles]
    titles += [settings.ae_title, called_aet, *settings.allowed_calling_aets]
    return ["", *dict.fromkeys(t for t in titles if t)]


def _convert(args: argparse.Namespace) -> int:
    from bridge.app.convert import Converter

    settings = _settings(args)
    if settings is None:
        return 2
    messages = _read(args.files)
    if messages is None:
        return 2
    failures = 0
    try:
        converter = Converter(settings, args.output)
    except OSError as exc:
        print(f"wlbridge: cannot use the output folder {args.output}: {exc}", file=sys.stderr)
        return 2
    with converter:
        for path, message in messages:
            print(f"=== {path}")
            report = converter.convert(message)
            print(report.text)
            failures += report.ack_code != "AA"
    return 1 if failures else 0


def _outbox(args: argparse.Namespace) -> int:
    """List, retry or drop the order status messages waiting in the outbox (the folder, or the
    PostgreSQL store of --store or the config's `store`)."""
    from bridge.net.outbox import OutboxError, OutboxFolder, PostgresQueue
    from bridge.storage.postgres import is_postgres_url
    from bridge.storage.store import StoreError

    overrides = {"outbox_dir": args.outbox_dir} if args.outbox_dir else {}
    if args.store:
        overrides["store"] = args.store
    try:
        settings = load_settings(args.config, overrides)
    except (OSError, ValueError) as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return 2
    if args.store and not is_postgres_url(args.store):
        print("wlbridge: --store must be a postgresql://user@host/db URL", file=sys.stderr)
        return 2
    on_postgres = is_postgres_url(settings.store)  # else the folder (`outbox-dir`)
    queue = PostgresQueue(settings.store, "wlbridge-outbox-command") if on_postgres else None
    folder = OutboxFolder(settings.outbox_dir)
    try:
        if args.action == "list":
            entries = queue.entries() if queue else folder.entries()
            for e in entries:
                line = f"{e.id}  {e.state:<7}  {e.control_id}  ORC-5={e.order_status or '?'}"
                line += f"  accession={e.accession or '-'}  age={e.age:.0f}s"
                line += f"  attempts={e.attempts}"
                print(line + (f"  {e.reason}" if e.reason else ""))
            parked = sum(e.state == "parked" for e in entries)
            print(f"{len(entries)} message(s), {parked} parked")
            return 0
        if not args.name:
            print(f"wlbridge: outbox {args.action} needs the NAME of a message", file=sys.stderr)
            return 2
        for name in args.name:
            if queue is None:
                done = folder.retry(name) if args.action == "retry" else folder.drop(name)
            else:  # a bridge's next poll sends it (a waiting one: its backoff ends now)
                done = queue.retry(name)[0] if args.action == "retry" else queue.drop(name)
            print(f"{done}: {'queued again' if args.action == 'retry' else 'dropped'}")
    except OutboxError as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return 2
    finally:
        if queue is not None:
            queue.close()
    return 0


def _mapping(args: argparse.Namespace) -> int:
    """Print the field map in effect for a config: built-in rows, the site's rows and tables."""
    from bridge.hl7.mapping import format_toml
    from bridge.hl7.order import field_rows

    try:
        settings = load_settings(args.config)
    except (OSError, ValueError) as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return 2
    source = f"{args.config}" if args.config else "the built-in rows (no --config)"
    print(f"# The field map in effect for {source}. A row: DICOM keyword = HL7 location, or a")
    print("# list (first non-empty wins); ORM covers OMG^O19. See docs/mapping.md.")
    print(format_toml(field_rows(settings)), end="")
    return 0


def _status(args: argparse.Namespace) -> int:
    """A one-screen summary from the HTTP API (GET /api/status)."""
    from bridge.http.status import fetch_status, format_status

    try:
        settings = load_settings(args.config) if args.config else None
        summary = fetch_status(args.url, args.token_file, settings, args.tls_ca, args.timeout)
    except (OSError, ValueError) as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return 2
    print(format_status(summary))
    return 0


def _store_url(args: argparse.Namespace) -> str | None:
    """The PostgreSQL URL of --store, or None after printing why not."""
    from bridge.storage.postgres import is_postgres_url

    if not args.store or not is_postgres_url(args.store):
        print("wlbridge: --store must be a postgresql://user@host/db URL", file=sys.stderr)
        return None
    return args.store


def _db(args: argparse.Namespace) -> int:
    """`db upgrade`: create or migrate the bridge's tables."""
    from bridge.storage.postgres.schema import upgrade
    from bridge.storage.store import StoreError

    url = _store_url(args)
    if url is None:
        return 2
    try:
        applied = upgrade(url)
    except StoreError as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return 1
    for migration in applied:
        print(f"applied migration {migration.version}: {migration.name}")
    if not applied:
        print("the schema is up to date")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    """`export --to DIR` (database -> .wl files) and `import DIR` (.wl files -> database)."""
    from bridge.storage.postgres.transfer import export_folder, import_folder
    from bridge.storage.postgres.worklist import PostgresWorklist
    from bridge.storage.store import StoreError

    url = _store_url(args)
    if url is None:
        return 2
    store = PostgresWorklist(url)
    try:
        store.prepare()
        if args.command == "export":
            report = export_folder(store, args.to, prune=args.prune)
            print(f"{report.written} item(s) written to {args.to}, {report.removed} removed")
        else:
            report = import_folder(store, args.folder)
            print(f"{report.written} item(s) imported from {args.folder}")
    except (StoreError, OSError) as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    for line in report.skipped:
        print(f"skipped {line}", file=sys.stderr)
    return 1 if report.skipped else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wlbridge", description="HL7 v2 orders to a DICOM Modality Worklist."
    )
    parser.add_argument("--version", action="version", version=f"wlbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the MLLP listener and the C-FIND SCP")
    add_cli_options(serve)
    serve.set_defaults(func=_serve)

    for name, func, helptext in (
        ("send", _send, "send HL7 files over MLLP and print each ACK"),
        ("replay", _replay, "send rejected messages again (from the rejected folder)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("files", nargs="*" if name == "replay" else "+", type=Path)
        replay = name == "replay"  # whose defaults may come from --config
        p.add_argument("--host", default=None if replay else "127.0.0.1")
        p.add_argument("--port", type=int, default=None if replay else 2575)
        p.add_argument("--timeout", type=float, default=30.0)
        p.add_argument("--tls-ca", default="", help="MLLP over TLS: CA (PEM) of the server")
        p.add_argument("--tls-cert", default="", help="client certificate (PEM)")
        p.add_argument("--tls-key", default="", help="client private key (PEM)")
        if name == "send":
            p.add_argument("--raw", action="store_true", help="print the whole ACK")
        else:  # the shared table of the PostgreSQL store: names as /api/rejected lists them
            p.add_argument(
                "--store",
                default="",
                help="replay the PostgreSQL store's kept messages by name (none: list them)",
            )
            p.add_argument(
                "--config",
                type=Path,
                help="the bridge's config: its store, MLLP host, port and TLS where not given",
            )
        p.set_defaults(func=func)

    query = sub.add_parser("query", help="C-FIND the worklist and print the answers")
    query.add_argument("--host", default="127.0.0.1")
    query.add_argument("--port", type=int, default=11112)
    query.add_argument("--called-aet", default="WLBRIDGE")
    query.add_argument("--calling-aet", default="WLBRIDGE-SCU")
    query.add_argument("--patient-id", default="")
    query.add_argument("--patient-name", default="")
    query.add_argument("--accession", default="")
    query.add_argument("--modality", default="")
    query.add_argument("--station", default="", help="scheduled station AE title")
    query.add_argument("--date", default="", help="YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    query.add_argument(
        "--all-stations",
        action="store_true",
        help="one query per station AE title the config names, merged (for own-items-only)",
    )
    query.add_argument("--config", type=Path, help="the bridge's config, for --all-stations")
    query.add_argument("--timeout", type=float, default=30.0)
    query.add_argument("--tls-ca", default="", help="DICOM over TLS: CA (PEM) of the server")
    query.add_argument("--tls-cert", default="", help="client certificate (PEM)")
    query.add_argument("--tls-key", default="", help="client private key (PEM)")
    query.set_defaults(func=_query)

    convert = sub.add_parser(
        "convert",
        help="run HL7 files through the bridge's own pipeline, without a server",
        description="Applies each message as `serve` would, with the same settings "
        "(--config and the options of serve), and prints the items, the translation-log line "
        "and the ACK.",
    )
    convert.add_argument("files", nargs="+", type=Path)
    convert.add_argument(
        "-o",
        "--output",
        type=Path,
        help="write the .wl files to this folder (else: a temporary one)",
    )
    add_cli_options(convert)
    convert.set_defaults(func=_convert)

    outbox = sub.add_parser("outbox", help="list, retry or drop order status messages to send")
    outbox.add_argument("action", choices=("list", "retry", "drop"))
    outbox.add_argument("name", nargs="*", help="message id (receiver/sequence) or control ID")
    outbox.add_argument("--config", type=Path, help="TOML config file (outbox-dir, store)")
    outbox.add_argument("--outbox-dir", type=Path, help="the outbox folder (default ./outbox)")
    outbox.add_argument(
        "--store", help="the PostgreSQL store (postgresql://user@host/db); default: the config's"
    )
    outbox.set_defaults(func=_outbox)
    mapping = sub.add_parser("mapping", help="print the HL7 -> DICOM field map in effect")
    mapping.add_argument("--config", type=Path, help="TOML config file ([mapping], [code-tables])")
    mapping.set_defaults(func=_mapping)
    status = sub.add_parser("status", help="a one-screen summary from the HTTP API")
    status.add_argument(
        "--url",
        default="",
        help="the bridge's HTTP address (default: from --config, else http://127.0.0.1:8080)",
    )
    status.add_argument(
        "--token-file",
        default="",
        help="bearer token file (default: the config's reader, else admin token)",
    )
    status.add_argument("--config", type=Path, help="the bridge's TOML config file")
    status.add_argument("--tls-ca", default="", help="CA (PEM) of an HTTPS listener")
    status.add_argument("--timeout", type=float, default=10.0)
    status.set_defaults(func=_status)

    store_help = "the PostgreSQL store: postgresql://user@host/db"
    db = sub.add_parser("db", help="create or migrate the PostgreSQL tables")
    db.add_argument("action", choices=("upgrade",))
    db.add_argument("--store", required=True, help=store_help)
    db.set_defaults(func=_db)
    export = sub.add_parser("export", help="write the PostgreSQL worklist as .wl files")
    export.add_argument("--to", type=Path, required=True, help="the folder to write")
    export.add_argument("--store", required=True, help=store_help)
    export.add_argument(
        "--prune", action="store_true", help="remove the folder's .wl files the store lacks"
    )
    export.set_defaults(func=_transfer)
    import_ = sub.add_parser("import", help="put a folder of .wl files into PostgreSQL")
    import_.add_argument("folder", type=Path)
    import_.add_argument("--store", required=True, help=store_help)
    import_.set_defaults(func=_transfer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `wlbridge convert ... | head`: the reader has seen enough
        sys.stderr.close()
        return 0
