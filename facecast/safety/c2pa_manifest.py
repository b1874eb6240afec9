"""C2PA manifests: signing a finished output with the user's certificate or a local TEST
identity (``load_signing_key``, ``sign_file``), and reading back and validating the manifest
of a file (``read_c2pa``), with c2pa-python; any C2PA tool (c2patool, contentcredentials.org)
reads what is signed here."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facecast import __version__
from facecast.errors import MediaError
from facecast.media._io import read_bytes, read_head
from facecast.media.mark import IPTC_COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA, parse_mark

log = logging.getLogger(__name__)

C2PA_FORMATS = {  # what c2pa-python signs, by the file's content (see media_type)
    "mp4": "video/mp4",
    "mov": "video/quicktime",
    "jpeg": "image/jpeg",
    "png": "image/png",
}
TEST_ORGANIZATION = "facecast TEST key (self-signed, not trusted)"
TEST_SIGNER_NAME = "facecast TEST signer"
_TEST_DIR = "c2pa-test"
_TEST_CERT, _TEST_KEY = "signer-chain.pem", "signer-key.pem"
_TEST_DAYS = 365
# C2PA's signing algorithms for EC keys, by curve (c2pa-python's names).
_ALG_BY_CURVE = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}


def media_type(path: Path) -> str | None:
    """The MIME type c2pa signs ``path`` as, from its content (None: not one c2pa can)."""
    head = read_head(path, 32)
    if head.startswith(b"\xff\xd8\xff"):
        return C2PA_FORMATS["jpeg"]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return C2PA_FORMATS["png"]
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return C2PA_FORMATS["mov"] if brand == b"qt  " else C2PA_FORMATS["mp4"]
    return None


@dataclass(frozen=True)
class SigningKey:
    """A C2PA signing identity: the certificate chain (signer first) and its private key,
    both PEM. ``test``: facecast's local TEST identity, which no validator trusts."""

    chain_pem: bytes
    key_pem: bytes
    alg: str
    test: bool
    where: str = ""  # the files it came from, for messages

    def signer(self) -> Any:
        import c2pa

        info = c2pa.C2paSignerInfo(self.alg, self.chain_pem, self.key_pem, None)
        return c2pa.Signer.from_info(info)


def state_dir() -> Path:
    """facecast's state folder: ``$FACECAST_STATE_DIR``, else the XDG default (the one
    ``facecast serve`` keeps its profiles in)."""
    from facecast.serve.profiles import default_state_dir

    given = os.environ.get("FACECAST_STATE_DIR")
    return Path(given) if given else default_state_dir()


def load_signing_key(cert: Path | None, key: Path | None) -> SigningKey:
    """The identity to sign with: the user's ``cert`` (PEM chain, signer first) and ``key``
    (PEM private key), or, with neither, the local TEST identity. Checked by signing a
    tiny image, so a certificate C2PA refuses fails here, before any work is done."""
    if (cert is None) != (key is None):
        raise MediaError("--c2pa-cert and --c2pa-key go together: give both, or neither")
    if cert is None or key is None:
        signing = local_test_key()
    else:
        chain_pem, key_pem = _read_pem(cert), _read_pem(key)
        alg = _algorithm(key_pem, key)
        signing = SigningKey(chain_pem, key_pem, alg, test=False, where=f"{cert}, {key}")
    try:
        _trial_sign(signing)
    except Exception as exc:
        what = "the TEST key" if signing.test else f"{cert} / {key}"
        raise MediaError(f"C2PA cannot sign with {what}: {_c2pa_reason(exc)}") from exc
    return signing


def _read_pem(path: Path) -> bytes:
    data = read_bytes(path)
    if b"-----BEGIN " not in data:
        raise MediaError(f"{path}: not a PEM file")
    return data


def _algorithm(key_pem: bytes, where: Path) -> str:
    """The C2PA signing algorithm for a private key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise MediaError(f"{where}: not an unencrypted PEM private key ({exc})") from exc
    if isinstance(private, ec.EllipticCurvePrivateKey):
        alg = _ALG_BY_CURVE.get(private.curve.name)
        if alg is None:
            raise MediaError(f"{where}: curve {private.curve.name}: C2PA takes P-256/384/521")
        return alg
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(private, rsa.RSAPrivateKey):
        return "ps256"
    raise MediaError(f"{where}: {type(private).__name__}: C2PA takes EC, Ed25519 or RSA keys")


def local_test_key(folder: Path | None = None) -> SigningKey:
    """The local TEST identity: a P-256 signer certificate issued by a self-made root, both
    named "facecast TEST". Kept in ``<state dir>/c2pa-test`` (key file mode 0600) so that a
    machine's outputs share one signer, which a reader can tell apart from another's; made
    afresh when missing or about to expire. A folder that cannot be written gets a key for
    this run only (said in the log)."""
    folder = (folder or state_dir()) / _TEST_DIR
    cert_path, key_path = folder / _TEST_CERT, folder / _TEST_KEY
    with contextlib.suppress(OSError, ValueError):
        chain, key = cert_path.read_bytes(), key_path.read_bytes()
        if _still_valid(chain):
            return SigningKey(chain, key, "es256", test=True, where=str(folder))
    chain, key = _make_test_identity()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_private(key_path, key, 0o600)
        _write_private(cert_path, chain, 0o644)
    except OSError as exc:
        log.info("cannot keep the C2PA TEST key in %s (%s): using one for this run", folder, exc)
        return SigningKey(chain, key, "es256", test=True, where="this run only")
    log.info("made a C2PA TEST key in %s", folder)
    return SigningKey(chain, key, "es256", test=True, where=str(folder))


def _still_valid(chain_pem: bytes) -> bool:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(chain_pem)
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left > datetime.timedelta(days=7)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically, created with ``mode`` (never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _make_test_identity() -> tuple[bytes, bytes]:
    """(chain PEM: signer then root, signer key PEM). C2PA refuses a self-signed signer
    certificate, so a root signs it; both say TEST in their names. The signer has what the
    C2PA certificate profile asks: digitalSignature, an allowed EKU (emailProtection), not a
    CA, key identifiers."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    begin = now - datetime.timedelta(minutes=5)

    def name(common: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, TEST_ORGANIZATION),
            ]
        )

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=sign,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=not sign,
            crl_sign=not sign,
            encipher_only=False,
            decipher_only=False,
        )

    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = name("facecast TEST root")
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(begin)
        .not_valid_after(now + datetime.timedelta(days=_TEST_DAYS + 1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    signer = (
        x509.CertificateBuilder()
        .subject_name(name(TEST_SIGNER_NAME))
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(begin)
        .not_valid_after(now + datetime.timedelta(days=_TEST_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    chain = signer.public_bytes(pem) + root.public_bytes(pem)
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key_pem


def manifest_definition(title: str, media: str, payload: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest facecast signs: one ``c2pa.created`` action with IPTC's
    ``compositeWithTrainedAlgorithmicMedia`` (why that term: see facecast.media.mark), and
    facecast's own mark as an ``org.facecast.mark`` assertion. No ingredients: they would
    carry a thumbnail of the source face and of the target into every output."""
    agent = {"name": "facecast", "version": __version__}
    action = {
        "action": "c2pa.created",
        "digitalSourceType": IPTC_COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
        "softwareAgent": agent,
        "description": "Faces replaced by a trained face-swap model (AI-generated).",
    }
    assertions: list[dict[str, Any]] = [
        {"label": "c2pa.actions.v2", "data": {"actions": [action]}},
    ]
    if payload:
        assertions.append({"label": "org.facecast.mark", "data": payload})
    return {
        "claim_generator_info": [agent],
        "title": title,
        "format": media,
        "assertions": assertions,
    }


def _trial_sign(signing: SigningKey) -> None:
    """Sign a 1x1 PNG in memory: proves the chain, the key and C2PA's certificate rules."""
    import zlib

    import c2pa

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", b"\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00")
        + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
        + chunk(b"IEND", b"")
    )
    definition = manifest_definition("check.png", "image/png", None)
    with (
        c2pa.Builder.from_json(json.dumps(definition)) as builder,
        signing.signer() as signer,
    ):
        builder.sign(signer, "image/png", io.BytesIO(png), io.BytesIO())


def sign_file(path: Path, signing: SigningKey) -> bool:
    """Embed a signed C2PA manifest in the finished output ``path``, atomically: the signed
    copy is written beside it under a temporary name (as the sinks write outputs) and
    renamed over it, so ``path`` is always a whole file, signed or not yet. The manifest
    carries the file's own facecast mark. False when c2pa cannot sign this format
    (Matroska, ...): the file stays as it was, and the caller says so once."""
    import c2pa

    media = media_type(path)
    if media is None:
        return False
    from facecast.media.mark import read_mark

    payload = parse_mark(read_mark(path))
    definition = manifest_definition(path.name, media, payload)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}{path.suffix}")
    try:
        with (
            c2pa.Builder.from_json(json.dumps(definition)) as builder,
            signing.signer() as signer,
            path.open("rb") as source,
            tmp.open("w+b") as dest,
        ):
            builder.sign(signer, media, source, dest)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        tmp.replace(path)
    except c2pa.C2paError as exc:
        tmp.unlink(missing_ok=True)
        raise MediaError(
            f"{path}: C2PA signing failed ({_c2pa_reason(exc)}); the file is written "
            "without a manifest"
        ) from exc
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MediaError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _c2pa_reason(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


@dataclass
class C2paReport:
    """The active C2PA manifest of a file, as c2pa-python's Reader gives it."""

    found: bool = False
    supported: bool = True  # False: a format C2PA does not cover (Matroska, MPEG-TS...)
    signer: str | None = None  # the signing certificate's common name
    issuer: str | None = None  # its organisation
    validation: str | None = None  # Valid, Trusted or Invalid
    problems: list[str] = field(default_factory=list)  # validation failure codes
    digital_source_types: list[str] = field(default_factory=list)
    generator: str | None = None
    error: str | None = None  # a manifest that could not be read

    @property
    def test_key(self) -> bool:
        return self.issuer == TEST_ORGANIZATION


def read_c2pa(path: Path) -> C2paReport:
    """The C2PA manifest in ``path``, read and validated by c2pa-python."""
    import c2pa

    report = C2paReport()
    media = media_type(path)
    if media is None:
        report.supported = False
        return report
    try:
        with path.open("rb") as fh, c2pa.Reader(media, fh) as reader:
            store = json.loads(reader.json())
            report.validation = reader.get_validation_state()
    except c2pa.C2paError.ManifestNotFound:
        return report
    except c2pa.C2paError as exc:
        report.found, report.error = True, _c2pa_reason(exc)
        return report
    manifest = store.get("manifests", {}).get(store.get("active_manifest") or "", {})
    report.found = bool(manifest)
    info = manifest.get("signature_info", {})
    report.signer, report.issuer = info.get("common_name"), info.get("issuer")
    report.problems = [s.get("code", "") for s in store.get("validation_status", [])]
    generators = manifest.get("claim_generator_info") or []
    if generators:
        first = generators[0]
        report.generator = " ".join(str(first.get(k, "")) for k in ("name", "version")).strip()
    for assertion in manifest.get("assertions", []):
        if not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        for action in assertion.get("data", {}).get("actions", []):
            kind = action.get("digitalSourceType")
            if kind and kind not in report.digital_source_types:
                report.digital_source_types.append(kind)
    return report


__all__ = [
    "C2PA_FORMATS",
    "TEST_ORGANIZATION",
    "TEST_SIGNER_NAME",
    "C2paReport",
    "SigningKey",
    "load_signing_key",
    "local_test_key",
    "manifest_definition",
    "media_type",
    "read_c2pa",
    "sign_file",
    "state_dir",
]
