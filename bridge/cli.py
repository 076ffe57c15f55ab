"""The `wlbridge` command: serve, send, query, convert, replay."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bridge import __version__
from bridge.config import add_cli_options, load_settings


def _serve(args: argparse.Namespace) -> int:
    from bridge.server import serve

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    try:
        settings = load_settings(args.config, overrides)
    except (OSError, ValueError) as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


def _send(args: argparse.Namespace) -> int:
    from bridge.client import MLLPClient, ack_summary, read_messages

    messages = read_messages(args.files)
    if not messages:
        print("wlbridge: no HL7 message found in the given files", file=sys.stderr)
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
    except OSError as exc:
        print(f"wlbridge: {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 1 if failures else 0


def _replay(args: argparse.Namespace) -> int:
    """Send rejected messages again; those now accepted move to a `replayed` folder beside."""
    from bridge.client import MLLPClient, ack_summary

    failures = 0
    try:
        tls = _client_tls_context(args)
        with MLLPClient(args.host, args.port, timeout=args.timeout, tls_context=tls) as client:
            for path in args.files:
                ack = client.send(path.read_bytes())
                code, control, detail = ack_summary(ack)
                print(f"{path.name}: {code} {control}" + (f"  {detail}" if detail else ""))
                if code == "AA":
                    done = path.parent / "replayed"
                    done.mkdir(exist_ok=True)
                    path.rename(done / path.name)
                    reason = path.with_suffix(".reason")
                    if reason.exists():
                        reason.rename(done / reason.name)
                else:
                    failures += 1
    except OSError as exc:
        print(f"wlbridge: {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 1 if failures else 0


def _client_tls_context(args: argparse.Namespace):
    """A TLS context for MLLP over TLS (`--tls-ca`, with a client certificate if given)."""
    if not (args.tls_ca or args.tls_cert):
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.tls_ca or None)
    if args.tls_cert:
        context.load_cert_chain(args.tls_cert, args.tls_key or None)
    return context


def _query(args: argparse.Namespace) -> int:
    from bridge.client import QUERY_COLUMNS, answer_rows, find, format_table, worklist_query

    query = worklist_query(
        patient_id=args.patient_id,
        accession=args.accession,
        modality=args.modality,
        station=args.station,
        date=args.date,
        patient_name=args.patient_name,
    )
    try:
        status, answers = find(
            args.host, args.port, query, args.called_aet, args.calling_aet, timeout=args.timeout
        )
    except (OSError, ConnectionError, RuntimeError) as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return 2
    print(format_table([title for _, title in QUERY_COLUMNS], answer_rows(answers)))
    print(f"{len(answers)} item(s), final status 0x{status:04X}")
    return 0 if status == 0 else 1


def _convert(args: argparse.Namespace) -> int:
    from bridge.client import read_messages
    from bridge.convert import convert_message

    overrides = {"worklist_dir": args.output} if args.output else {}
    try:
        settings = load_settings(args.config, overrides)
    except (OSError, ValueError) as exc:
        print(f"wlbridge: {exc}", file=sys.stderr)
        return 2
    failures = 0
    for path, message in read_messages(args.files):
        print(f"=== {path}")
        report = convert_message(message, settings, write=args.output is not None)
        print(report.text)
        failures += report.ack_code != "AA"
    return 1 if failures else 0


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
        p.add_argument("files", nargs="+", type=Path)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=2575)
        p.add_argument("--timeout", type=float, default=30.0)
        p.add_argument("--tls-ca", default="", help="MLLP over TLS: CA (PEM) of the server")
        p.add_argument("--tls-cert", default="", help="client certificate (PEM)")
        p.add_argument("--tls-key", default="", help="client private key (PEM)")
        if name == "send":
            p.add_argument("--raw", action="store_true", help="print the whole ACK")
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
    query.add_argument("--timeout", type=float, default=30.0)
    query.set_defaults(func=_query)

    convert = sub.add_parser("convert", help="map HL7 files to worklist items without a server")
    convert.add_argument("files", nargs="+", type=Path)
    convert.add_argument("-o", "--output", type=Path, help="write the .wl files to this folder")
    convert.add_argument("--config", type=Path, help="TOML config file (mapping settings)")
    convert.set_defaults(func=_convert)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
