"""Write EK certificates into a vTPM's NV indices (`vtpm-host install-ek-certs`).

After a CA swap the broker re-issues each vTPM's EK certificates for the
same EKs (`vtpm-broker ca recertify`); the host fetches them
(GET /v1/vms/{uuid}/ek-certificates) and writes them where swtpm_setup put
the originals, through tpm2-tools on the vTPM's swtpm TCTI, with the
platform hierarchy (empty platform auth on swtpm, before any guest firmware
disables it):

    tpm2_nvundefine <index> -C p     (when defined)
    tpm2_nvdefine <index> -C p -s <size> -a "ppwrite|writedefine|ppread|ownerread|authread|no_da|platformcreate"
    tpm2_nvwrite <index> -C p -i -

Nothing is written unless every certificate checks out first: it chains to
the CA bundle the broker sent with it, is valid now, and is for one of the
public keys of this vTPM's persistent EKs (a wrong certificate in NV would
be permanent). Each index is read back after the write.

NV indices (TCG EK Credential Profile 2.0, "low range" and, for P-384,
"high range"; what swtpm_setup 0.7.1 uses, docs/vtpm-ca.md): RSA 2048 EK
certificate 0x01c00002, ECC P-256 0x01c0000a, ECC P-384 0x01c00016, and the
platform certificate of the RSA EK 0x01c08000.
"""

from __future__ import annotations

import base64
import binascii
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from broker.host.errors import HostError

__all__ = ["NV_ATTRIBUTES", "Installed", "Planned", "check", "ek_public_keys", "install", "nv_index"]

NV_ATTRIBUTES = "ppwrite|writedefine|ppread|ownerread|authread|no_da|platformcreate"
_INDEX = {
    ("ek", "rsa", 2048): 0x01C00002,
    ("ek", "ecc", "secp256r1"): 0x01C0000A,
    ("ek", "ecc", "secp384r1"): 0x01C00016,
    ("platform", "rsa", 2048): 0x01C08000,
}
_EK_HANDLES = range(0x81010000, 0x81020000)  # TCG: endorsement keys' persistent handles
_TIMEOUT = 30


@dataclass(frozen=True)
class Planned:
    index: int
    der: bytes
    cert_type: str
    key_type: str
    issuer: str


@dataclass(frozen=True)
class Installed:
    index: int
    cert_type: str
    key_type: str
    size: int
    issuer: str
    changed: bool


def nv_index(cert_type: str, key_type: str, public_key) -> int | None:
    from cryptography.hazmat.primitives.asymmetric import ec

    size = public_key.curve.name if isinstance(public_key, ec.EllipticCurvePublicKey) else public_key.key_size
    return _INDEX.get((cert_type, key_type, size))


def _tool(tcti: str, *args: str, data: bytes | None = None) -> bytes:
    tool = args[0]
    try:
        done = subprocess.run(
            [tool, "-T", tcti, *args[1:]], input=data, capture_output=True, timeout=_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise HostError(f"{tool} not found: install Debian's tpm2-tools package") from None
    except subprocess.TimeoutExpired:
        raise HostError(f"{tool} did not finish within {_TIMEOUT} s; is the vTPM's swtpm busy with a guest?") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
        raise _ToolFailed(f"{' '.join(args)}: {lines[-1] if lines else f'exit status {done.returncode}'}")
    return done.stdout


class _ToolFailed(HostError):
    pass


def ek_public_keys(tcti: str) -> list[bytes]:
    """The SubjectPublicKeyInfo (DER) of every persistent EK in the vTPM."""
    from cryptography.hazmat.primitives import serialization

    listing = _tool(tcti, "tpm2_getcap", "handles-persistent").decode(errors="replace")
    handles = [int(h, 16) for h in re.findall(r"0x[0-9a-fA-F]+", listing)]
    keys = []
    with tempfile.TemporaryDirectory(prefix="vtpm-ek-") as scratch:
        for handle in handles:
            if handle not in _EK_HANDLES:
                continue
            out = Path(scratch) / f"{handle:08x}.pem"
            _tool(tcti, "tpm2_readpublic", "-c", hex(handle), "-f", "pem", "-o", str(out))
            key = serialization.load_pem_public_key(out.read_bytes())
            keys.append(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    return keys


def check(certificates: list[dict], ek_keys: list[bytes], vm_name: str) -> list[Planned]:
    """Each certificate the broker sent, checked (chain, validity, profile,
    one of this vTPM's EKs) and given its NV index. Raises HostError naming
    the first that fails: then nothing is written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from broker.vtpm_ca import EkCaError, verify_ek_certificate

    planned: list[Planned] = []
    for entry in certificates:
        kind = f"{entry.get('type')} {entry.get('key_type')}"
        try:
            der = base64.b64decode(str(entry.get("certificate_der_b64", "")), validate=True)
            info = verify_ek_certificate(der, str(entry.get("ca_pem") or ""))
        except (binascii.Error, ValueError, EkCaError) as exc:
            raise HostError(
                f"the broker's {kind} certificate for VM {vm_name} does not check out ({exc}); nothing was written"
            ) from None
        cert = x509.load_der_x509_certificate(der)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if spki not in ek_keys:
            raise HostError(
                f"the broker's {info.cert_type} {info.key_type} certificate is for a key that is not an EK of VM "
                f"{vm_name}'s vTPM; nothing was written (is the .vmx this VM's?)"
            )
        index = nv_index(info.cert_type, info.key_type, cert.public_key())
        if index is None:
            raise HostError(
                f"no TCG NV index is known for a {info.cert_type} certificate of this {info.key_type} key; "
                "nothing was written"
            )
        planned.append(Planned(index, der, info.cert_type, info.key_type, info.issuer))
    if len({p.index for p in planned}) != len(planned):
        raise HostError("the broker sent two certificates for one NV index; nothing was written")
    return planned


def _defined(tcti: str) -> set[int]:
    listing = _tool(tcti, "tpm2_getcap", "handles-nv-index").decode(errors="replace")
    return {int(h, 16) for h in re.findall(r"0x[0-9a-fA-F]+", listing)}


def install(tcti: str, planned: list[Planned], *, running: bool = False) -> list[Installed]:
    """Write each certificate into its NV index (an index that already holds
    it is left alone) and read it back."""
    done: list[Installed] = []
    try:
        defined = _defined(tcti)
        for item in planned:
            index = hex(item.index)
            if item.index in defined and _tool(tcti, "tpm2_nvread", index) == item.der:
                done.append(Installed(item.index, item.cert_type, item.key_type, len(item.der), item.issuer, False))
                continue
            if item.index in defined:
                _tool(tcti, "tpm2_nvundefine", index, "-C", "p")
            _tool(tcti, "tpm2_nvdefine", index, "-C", "p", "-s", str(len(item.der)), "-a", NV_ATTRIBUTES)
            _tool(tcti, "tpm2_nvwrite", index, "-C", "p", "-i", "-", data=item.der)
            if _tool(tcti, "tpm2_nvread", index) != item.der:
                raise HostError(f"NV index {item.index:#010x} does not read back what was written")
            done.append(Installed(item.index, item.cert_type, item.key_type, len(item.der), item.issuer, True))
    except _ToolFailed as exc:
        hint = (
            "power the VM off ('vtpm-host power-off VMX') and run install-ek-certs again: guest firmware may have "
            "disabled the platform hierarchy"
            if running
            else "check the vTPM with tpm2_getcap"
        )
        raise HostError(f"writing the EK certificates failed ({exc}); {hint}") from None
    return done
