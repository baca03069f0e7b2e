"""vtpm-ek-certtool: swtpm_setup's ``create_certs_tool``, getting EK certificates from the broker's EK CA.

swtpm_setup (0.7.1) runs it once per certificate, after creating each EK::

    vtpm-ek-certtool --type ek|platform --ek <EK> --dir <DIR> [--logfile <FILE>] --vmid <ID>
        --tpm-spec-family 2.0 --tpm-spec-level 0 --tpm-spec-revision 164
        --tpm-manufacturer id:00001014 --tpm-model swtpm --tpm-version id:20191023
        --tpm2 [--configfile <FILE>] [--optsfile <FILE>]

``--ek`` is the RSA modulus in hex, or ``x=<hex>,y=<hex>[,id=secp384r1]`` for
an ECC EK (no id means secp256r1). The tool rebuilds the EK public key, gets
the certificate -- from the broker over HTTPS with the host's client
certificate (``mode = "remote"``), or signed here with a CA on disk
(``mode = "local"``, for tests and air-gapped sites) -- checks it, and writes
``ek.cert`` or ``platform.cert`` (DER) into ``--dir``. Exit 0; on any error
one line on stderr and exit 1, which makes swtpm_setup fail. Both modes go
through ``broker.vtpm_ca.handle_ek_certificate_request``: one profile.

``vtpm-host`` does not run this tool: it names a thin one
(``broker/host/ek_tool.py``, standard library only) that hands swtpm_setup's
arguments to the agent's relay (``broker.host.ek_relay``), which does this
tool's work in the agent's process with ``run_for_agent``: same checks, same
``certificate_for``, the broker asked on the agent's kept connection.
This module imports ``cryptography``, ``ssl`` and the CA code only when a
mode needs them.

The configuration file (``--configfile``, swtpm_setup.conf's
``create_certs_tool_config``; default /etc/vtpm-ek-certtool.toml) is TOML,
described in docs/vtpm-ca.md. Relative paths in it are relative to the file.

``vtpm-ek-certtool --init-local-ca DIR`` makes a self-signed EK CA for local
mode (``DIR/ek-ca.pem`` and ``DIR/ek-ca.key``, mode 0600).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import datetime as dt
import json
import os
import socket
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from broker.tpm_fields import TPM_FIELDS
from kmip_core.files import write_atomic

# cryptography, ssl, urllib and broker.vtpm_ca are imported where the remote
# and local modes need them, so that importing this module stays light.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from broker.vtpm_ca import EkCa

__all__ = [
    "CerttoolConfig",
    "CerttoolError",
    "certificate_for",
    "error_text",
    "ek_public_key_pem",
    "main",
    "run_for_agent",
    "write_local_ca",
]

PROG = "vtpm-ek-certtool"
DEFAULT_CONFIG = Path("/etc/vtpm-ek-certtool.toml")
API_PATH = "/v1/vtpm/ek-certificates"
LOCAL_CA_CERT = "ek-ca.pem"
LOCAL_CA_KEY = "ek-ca.key"
OUTPUT_FILES = {"ek": "ek.cert", "platform": "platform.cert"}
MAX_RESPONSE = 64 * 1024
_CURVES = ("secp256r1", "secp384r1")
# swtpm_setup's arguments that make up an EK certificate request; the TPM's
# description has the same names in the broker's request
# (broker.vtpm_ca.REQUEST_FIELDS).
SWTPM_FIELDS = ("type", "ek", "vmid", *TPM_FIELDS)


class CerttoolError(Exception):
    """What went wrong, in one line, with the fix where there is one."""


@contextlib.contextmanager
def _ca_errors() -> Iterator[None]:
    """broker.vtpm_ca's EkCaError as a CerttoolError (one line, exit 1)."""
    from broker.vtpm_ca import EkCaError

    try:
        yield
    except EkCaError as exc:
        raise CerttoolError(str(exc)) from None


# --- Configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class CerttoolConfig:
    mode: str  # "remote" or "local"
    url: str | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_bundle: Path | None = None
    timeout: float = 30.0
    ca_dir: Path | None = None


_SECTIONS = {"remote": {"url", "client_cert", "client_key", "ca_bundle", "timeout"}, "local": {"ca_dir"}}


def load_config(path: str | os.PathLike[str]) -> CerttoolConfig:
    """Read and check the TOML configuration once; CerttoolError names the key at fault."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CerttoolError(
            f"configuration file {path} does not exist; set create_certs_tool_config in swtpm_setup.conf"
        ) from None
    except OSError as exc:
        raise CerttoolError(f"cannot read configuration file {path} ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CerttoolError(f"{path} is not valid TOML ({exc})") from None
    unknown = sorted(set(data) - {"mode", *_SECTIONS})
    if unknown:
        raise CerttoolError(f"{path}: unknown key {unknown[0]!r}; see docs/vtpm-ca.md")
    mode = data.get("mode")
    if mode not in _SECTIONS:
        raise CerttoolError(f'{path}: mode must be "remote" or "local", not {mode!r}')
    for section, keys in _SECTIONS.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise CerttoolError(f"{path}: [{section}] must be a table")
        extra = sorted(set(table) - keys)
        if extra:
            raise CerttoolError(f"{path}: unknown key {section}.{extra[0]}; see docs/vtpm-ca.md")
    section = data.get(mode, {})
    base = path.parent

    def file_key(name: str) -> Path:
        value = section.get(name)
        if not isinstance(value, str) or not value:
            raise CerttoolError(f"{path}: {mode}.{name} is required (a file path)")
        return base / value

    if mode == "local":
        return CerttoolConfig(mode="local", ca_dir=file_key("ca_dir"))
    url = section.get("url")
    if not isinstance(url, str) or not url.startswith("https://"):
        raise CerttoolError(f"{path}: remote.url must be the broker's https:// URL")
    timeout = section.get("timeout", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
        raise CerttoolError(f"{path}: remote.timeout must be a number of seconds from 0 to 600")
    return CerttoolConfig(
        mode="remote",
        url=url.rstrip("/"),
        client_cert=file_key("client_cert"),
        client_key=file_key("client_key"),
        ca_bundle=file_key("ca_bundle"),
        timeout=float(timeout),
    )


# --- The EK from swtpm_setup's --ek --------------------------------------------------------


def ek_public_key_pem(ek: str) -> tuple[bytes, str]:
    """``(PEM SubjectPublicKeyInfo, "rsa"|"ecc")`` from swtpm_setup's --ek value.

    RSA: the modulus as hex; the exponent is the TPM default, 65537.
    ECC: ``x=<hex>,y=<hex>[,id=<curve>]``, curve secp256r1 unless named.
    """
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    ek = ek.strip()
    if "=" in ek:
        fields: dict[str, str] = {}
        for part in ek.split(","):
            name, sep, value = part.partition("=")
            if not sep or name in fields or name not in ("x", "y", "id"):
                raise CerttoolError(f"--ek {ek[:40]!r}: expected x=<hex>,y=<hex>[,id=<curve>]")
            fields[name] = value
        if "x" not in fields or "y" not in fields:
            raise CerttoolError("--ek: an ECC EK needs both x= and y=")
        curve_name = fields.get("id", "secp256r1")
        if curve_name not in _CURVES:
            raise CerttoolError(f"--ek: curve {curve_name!r} is not supported; use secp256r1 or secp384r1")
        try:
            curve = ec.SECP256R1() if curve_name == "secp256r1" else ec.SECP384R1()
            numbers = ec.EllipticCurvePublicNumbers(_hex(fields["x"]), _hex(fields["y"]), curve)
            key = numbers.public_key()
        except ValueError:
            raise CerttoolError(f"--ek: the point is not on {curve_name}") from None
        return _spki(key), "ecc"
    modulus = _hex(ek)
    try:
        rsa_key = rsa.RSAPublicNumbers(65537, modulus).public_key()
    except ValueError as exc:
        raise CerttoolError(f"--ek: not a usable RSA modulus ({exc})") from None
    return _spki(rsa_key), "rsa"


def _hex(value: str) -> int:
    if not value or len(value) > 2048:
        raise CerttoolError("--ek: empty or oversized hex value")
    try:
        return int.from_bytes(binascii.unhexlify(value if len(value) % 2 == 0 else "0" + value), "big")
    except binascii.Error:
        raise CerttoolError(f"--ek: {value[:20]!r}... is not hex") from None


def _spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- The two ways to a certificate ----------------------------------------------------------


def _issue_local(config: CerttoolConfig, request: dict) -> dict:
    from broker.vtpm_ca import EkCa, EkRequestError, handle_ek_certificate_request

    assert config.ca_dir is not None
    cert_path, key_path = config.ca_dir / LOCAL_CA_CERT, config.ca_dir / LOCAL_CA_KEY
    try:
        cert_pem = cert_path.read_bytes()
        mode = key_path.stat().st_mode
        if mode & 0o077:
            raise CerttoolError(f"{key_path} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
        key_pem = key_path.read_bytes()
    except FileNotFoundError as exc:
        raise CerttoolError(
            f"{exc.filename} does not exist; make the local CA with '{PROG} --init-local-ca {config.ca_dir}'"
        ) from None
    except OSError as exc:
        raise CerttoolError(f"cannot read the local EK CA in {config.ca_dir} ({exc.strerror})") from None
    with _ca_errors():
        ca = EkCa.import_ca(cert_pem, key_pem)
    try:
        return handle_ek_certificate_request(ca, request, f"local:{socket.gethostname()}")
    except EkRequestError as exc:
        raise CerttoolError(f"the local EK CA refused the request ({exc.status}): {exc.message}") from None


def _issue_remote(config: CerttoolConfig, request: dict) -> dict:
    import ssl
    import urllib.error
    import urllib.request

    assert config.url and config.client_cert and config.client_key and config.ca_bundle
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(config.ca_bundle))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(config.client_cert), str(config.client_key))
    except FileNotFoundError as exc:
        raise CerttoolError(f"{exc.filename or 'a TLS file'} does not exist; check [remote] in the config") from None
    except (ssl.SSLError, OSError) as exc:
        raise CerttoolError(f"cannot load the host certificate, key or CA bundle ({exc}); check [remote]") from None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    url = config.url + API_PATH
    http_request = urllib.request.Request(
        url,
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    try:
        with opener.open(http_request, timeout=config.timeout) as response:
            status, body = response.status, response.read(MAX_RESPONSE + 1)
    except urllib.error.HTTPError as exc:
        detail = error_text(exc.read(MAX_RESPONSE + 1))
        raise CerttoolError(f"the broker refused the certificate (HTTP {exc.code}): {detail}") from None
    except urllib.error.URLError as exc:
        raise CerttoolError(f"cannot reach the broker at {config.url}: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise CerttoolError(f"no answer from the broker at {config.url}: {exc}") from None
    if status not in (200, 201) or len(body) > MAX_RESPONSE:
        raise CerttoolError(f"unexpected answer from the broker (HTTP {status}, {len(body)} bytes)")
    try:
        answer = json.loads(body)
    except ValueError:
        raise CerttoolError("the broker's answer is not JSON") from None
    if not isinstance(answer, dict):
        raise CerttoolError("the broker's answer is not a JSON object")
    return answer


def error_text(body: bytes) -> str:
    """The broker's one-line error from an HTTP error body (its JSON
    "error", or the start of the body), for messages."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    text = error if isinstance(error, str) else body[:200].decode("utf-8", "replace")
    return " ".join(text.split()) or "(no detail)"


# --- Files ------------------------------------------------------------------------------------


def write_local_ca(ca: EkCa, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``ca`` for local mode: DIR/ek-ca.pem (certificate and chain) and DIR/ek-ca.key (PKCS#8, 0600).

    Refuses to replace an existing CA: certificates it issued would lose their issuer.
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / LOCAL_CA_CERT, directory / LOCAL_CA_KEY
    if cert_path.exists() or key_path.exists():
        raise CerttoolError(f"{directory} already holds an EK CA; choose another directory")
    from cryptography.hazmat.primitives import serialization

    key_pem = ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(key_path, key_pem, 0o600)
    write_atomic(cert_path, ca.ca_pem, 0o644)
    return cert_path, key_path


class _Log:
    """Lines to swtpm_setup's --logfile when it gives one; never fails the run."""

    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, message: str) -> None:
        if not self.path:
            return
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            with open(self.path, "a") as fh:
                fh.write(f"{stamp} {PROG}: {message}\n")
        except OSError:
            pass


# --- Command line -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CerttoolError(f"{message}; see '{PROG} --help'")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="swtpm_setup create_certs_tool: EK certificates from the vTPM broker's CA.")
    p.add_argument("--type", choices=sorted(OUTPUT_FILES), help="certificate to create")
    p.add_argument("--ek", help="RSA modulus (hex) or x=<hex>,y=<hex>[,id=<curve>]")
    p.add_argument("--dir", help="directory for ek.cert / platform.cert")
    p.add_argument("--vmid", help="the VM's UUID")
    p.add_argument("--logfile", help="swtpm_setup's log file: the tool's lines are appended to it")
    p.add_argument("--configfile", default=str(DEFAULT_CONFIG), help=f"the tool's configuration (default {DEFAULT_CONFIG})")
    p.add_argument("--optsfile", help="accepted and ignored (swtpm_localca's options file)")
    p.add_argument("--tpm-spec-family", help="TPM specification family, from swtpm_setup (e.g. 2.0)")
    p.add_argument("--tpm-spec-level", type=int, help="TPM specification level, from swtpm_setup")
    p.add_argument("--tpm-spec-revision", type=int, help="TPM specification revision, from swtpm_setup")
    p.add_argument("--tpm-manufacturer", help="TPM manufacturer, from swtpm_setup")
    p.add_argument("--tpm-model", help="TPM model, from swtpm_setup")
    p.add_argument("--tpm-version", help="TPM firmware version, from swtpm_setup")
    p.add_argument("--tpm2", action="store_true", help="the vTPM is a TPM 2.0 (swtpm_setup passes it)")
    # Later swtpm versions may pass these; the broker certifies standard (decrypt-only) EKs.
    p.add_argument("--allow-signing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--decryption", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--init-local-ca", metavar="DIR", help="make a self-signed EK CA for local mode in DIR and exit")
    p.add_argument(
        "--ca-key-type", default="ecc-p384", choices=("ecc-p384", "rsa-3072"), help="key of the CA --init-local-ca makes"
    )
    return p


def _run(argv: Sequence[str] | None) -> str:
    args, unknown = _parser().parse_known_args(argv)
    log = _Log(args.logfile)
    if args.init_local_ca:
        from broker.vtpm_ca import EkCa

        with _ca_errors():
            ca = EkCa.create(key_type=args.ca_key_type)
        cert_path, _ = write_local_ca(ca, args.init_local_ca)
        return f"made a local EK CA in {args.init_local_ca}; its certificate is {cert_path}"
    fields, out_dir = _swtpm_request(args, unknown, log)
    config = load_config(args.configfile)
    if config.mode == "local":
        der, description = certificate_for(fields, lambda request: _issue_local(config, request))
    else:
        der, description = certificate_for(fields, lambda request: _issue_remote(config, request))
    return _write_certificate(out_dir, fields, der, description, f"{config.mode} mode", log)


def run_for_agent(argv: Sequence[str], issue: Callable[[dict], dict], vm_uuid: str) -> str:
    """The tool's work for swtpm_setup's arguments `argv`, done inside
    vtpm-host by its relay (broker/host/ek_relay.py) on behalf of the thin
    tool (broker/host/ek_tool.py): the same checks, `certificate_for` with
    the agent's `issue`, the same file and log line. Only VM `vm_uuid`.
    Returns the message; raises CerttoolError."""
    if any(flag in argv for flag in ("-h", "--help", "--init-local-ca")):
        raise CerttoolError("the host agent serves certificate requests only")
    args, unknown = _parser().parse_known_args(argv)
    log = _Log(args.logfile)
    fields, out_dir = _swtpm_request(args, unknown, log)
    if fields["vmid"] != vm_uuid:
        raise CerttoolError(f"this host agent is manufacturing VM {vm_uuid}, not {fields['vmid']}")
    der, description = certificate_for(fields, issue)
    return _write_certificate(out_dir, fields, der, description, "the host agent", log)


def _swtpm_request(args: argparse.Namespace, unknown: list[str], log: _Log) -> tuple[dict, Path]:
    """swtpm_setup's arguments, checked: (SWTPM_FIELDS with the VM
    UUID normalized, the output directory)."""
    if unknown:
        log(f"ignoring arguments this version does not know: {' '.join(unknown)}")
    missing = [
        flag
        for flag, value in (
            ("--type", args.type),
            ("--ek", args.ek),
            ("--dir", args.dir),
            ("--vmid", args.vmid),
            ("--tpm-spec-family", args.tpm_spec_family),
            ("--tpm-spec-level", args.tpm_spec_level),
            ("--tpm-spec-revision", args.tpm_spec_revision),
            ("--tpm-manufacturer", args.tpm_manufacturer),
            ("--tpm-model", args.tpm_model),
            ("--tpm-version", args.tpm_version),
        )
        if value is None
    ]
    if missing:
        hint = "; run swtpm_setup with --vmid <VM UUID>" if missing[0] == "--vmid" else ""
        raise CerttoolError(f"{missing[0]} is required{hint}")
    try:
        vm_uuid = str(uuid.UUID(args.vmid))
    except ValueError:
        raise CerttoolError(f"--vmid {args.vmid!r} is not a UUID; run swtpm_setup with --vmid <VM UUID>") from None
    if not args.tpm2:
        raise CerttoolError("only TPM 2.0 is supported; run swtpm_setup with --tpm2")
    out_dir = Path(args.dir)
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise CerttoolError(f"--dir {out_dir} is not a directory")
    fields = {name: getattr(args, name) for name in SWTPM_FIELDS}
    fields["vmid"] = vm_uuid
    return fields, out_dir


def _write_certificate(out_dir: Path, fields: dict, der: bytes, description: str, via: str, log: _Log) -> str:
    target = out_dir / OUTPUT_FILES[fields["type"]]
    write_atomic(target, der, 0o644)
    message = f"wrote {target} ({description}) for VM {fields['vmid']} via {via}"
    log(message)
    return message


def certificate_for(fields: dict, issue: Callable[[dict], dict]) -> tuple[bytes, str]:
    """The checked EK certificate for swtpm_setup's arguments: ``fields``
    holds SWTPM_FIELDS (``ek`` as swtpm_setup gives it); ``issue``
    sends the API request to a CA and returns its answer. Returns the DER
    certificate and a one-line description; raises CerttoolError.

    The certificate is checked before it goes into the TPM's NV for good:
    issued by the returned CA chain, valid now, for this EK, of the type
    asked for. The remote and local modes and the host agent's relay
    (run_for_agent) all come through here."""
    from broker.vtpm_ca import verify_ek_certificate

    cert_type = fields.get("type")
    if cert_type not in OUTPUT_FILES:
        raise CerttoolError(f"--type must be one of {', '.join(sorted(OUTPUT_FILES))}")
    try:
        vm_uuid = str(uuid.UUID(str(fields.get("vmid"))))
    except ValueError:
        raise CerttoolError(f"--vmid {fields.get('vmid')!r} is not a UUID") from None
    if not isinstance(fields.get("ek"), str):
        raise CerttoolError("--ek is required")
    public_key_pem, key_type = ek_public_key_pem(fields["ek"])
    request = {
        "vm_uuid": vm_uuid,
        "type": cert_type,
        "key_type": key_type,
        "public_key_pem": public_key_pem.decode("ascii"),
        **{name: fields.get(name) for name in TPM_FIELDS},
    }
    answer = issue(request)
    try:
        der = base64.b64decode(answer["certificate_der_b64"], validate=True)
        ca_pem = answer["ca_pem"]
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise CerttoolError("the answer lacks a base64 certificate_der_b64 or ca_pem") from None
    with _ca_errors():
        info = verify_ek_certificate(der, ca_pem, public_key_pem=public_key_pem)
    if info.cert_type != cert_type:
        raise CerttoolError(f"asked for a {cert_type} certificate, got a {info.cert_type} certificate")
    description = (
        f"{cert_type}, {key_type.upper()} EK, {len(der)} bytes, serial {info.serial_number:x}, issuer {info.issuer}"
    )
    return der, description


def main(argv: Sequence[str] | None = None) -> int:
    log = _Log(None)
    try:
        args, _ = _parser().parse_known_args(argv)
        log = _Log(args.logfile)
    except CerttoolError:
        pass
    try:
        message = _run(argv)
    except CerttoolError as exc:
        line = " ".join(str(exc).split())
        log(f"error: {line}")
        print(f"{PROG}: {line}", file=sys.stderr)
        return 1
    except Exception as exc:  # swtpm_setup shows our stderr: one line, never a traceback
        line = f"internal error ({type(exc).__name__}: {' '.join(str(exc).split())})"
        log(f"error: {line}")
        print(f"{PROG}: {line}", file=sys.stderr)
        return 1
    print(message)  # swtpm_setup shows it prefixed with the tool's name
    return 0


if __name__ == "__main__":
    sys.exit(main())
