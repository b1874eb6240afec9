"""`facecast consent add | list | remove`: the consent registry."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from facecast.errors import FacecastError

if TYPE_CHECKING:
    from facecast.safety.consent import ConsentRegistry

from facecast.cli.base import (
    chatty,
    console,
    fail,
    one_line_errors,
    sub_app,
)
from facecast.cli.options import AuditLogFlag, StateDirFlag, StoreFlag
from facecast.cli.serve import _open_store

consent_app = sub_app(
    "consent", "The consent registry: people who agreed to their face being used."
)


def _consent_registry(
    state_dir: Path | None, store: str | None
) -> tuple[ConsentRegistry, Path | None]:
    """(the registry, the state folder it is in; None in a store)."""
    from facecast.safety.consent import ConsentRegistry
    from facecast.serve.profiles import default_state_dir

    if store:
        return ConsentRegistry.in_store(_open_store(store)), None
    folder = state_dir or default_state_dir()
    return ConsentRegistry.in_folder(folder), folder


def _consent_audit(audit_log: Path | None, folder: Path | None, entry: dict[str, object]) -> None:
    """A consent change in the audit log ``serve`` keeps, as the API's changes are."""
    import getpass

    from facecast.safety.audit import AUDIT_FILE, AuditLog

    path = audit_log or (folder / AUDIT_FILE if folder is not None else None)
    if path is None:
        return
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    AuditLog(path).write({**entry, "token": None, "client": f"cli:{user}"})


@consent_app.command("add")
def consent_add(
    photos: Annotated[
        list[Path],
        # hidden: Typer would tag it <list[Path]> in the help; the text below says it
        typer.Argument(metavar="PHOTO", hidden=True, show_default=False),
    ],
    name: Annotated[str, typer.Option("--name", metavar="NAME", help="Who they are, as listed.")],
    state_dir: StateDirFlag = None,
    store: StoreFlag = None,
    audit_log: AuditLogFlag = None,
) -> None:
    """Enrol a person who agreed to their face being used.

    Each PHOTO is a photo of the person (its largest face is used). The registry keeps each
    photo's face descriptor and SHA-256, not the photo. A name already enrolled gets the
    photos added: several photos of a person make a miss less likely.
    """
    from facecast.media.image_io import read_image
    from facecast.safety.audit import image_sha256
    from facecast.safety.consent import check_name

    with one_line_errors():
        check_name(name)
        registry, folder = _consent_registry(state_dir, store)
        images = [(read_image(photo), str(photo)) for photo in photos]
    faces = [{"role": label, "sha256": image_sha256(image)} for image, label in images]
    entry: dict[str, object] = {"change": "consent_add", "person": name, "faces": faces}
    try:
        added = registry.add(name, images)
    except FacecastError as exc:
        _consent_audit(
            audit_log, folder, {**entry, "allowed": False, "outcome": "failed", "reason": str(exc)}
        )
        raise fail(str(exc)) from None
    _consent_audit(
        audit_log, folder, {**entry, "allowed": True, "outcome": "allowed", "reason": None}
    )
    if chatty():
        console.print(
            f"{name}: enrolled, {added['photos']} photo(s) in {registry.where}", highlight=False
        )


@consent_app.command("list")
def consent_list(state_dir: StateDirFlag = None, store: StoreFlag = None) -> None:
    """List the enrolled people: name, photos, when added."""
    with one_line_errors():
        registry, _ = _consent_registry(state_dir, store)
        people = registry.people()
    table = Table("name", "photos", "added", "sha256 of each photo (first 12)")
    for person in people:
        hashes = " ".join(photo["sha256"][:12] for photo in person["photos"])
        table.add_row(person["name"], str(len(person["photos"])), person["added"] or "", hashes)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if chatty():
        console.print(f"{len(people)} person(s) in {registry.where}", highlight=False)


@consent_app.command("remove")
def consent_remove(
    name: Annotated[
        str, typer.Argument(metavar="NAME", hidden=True, show_default=False)  # see add's
    ],
    state_dir: StateDirFlag = None,
    store: StoreFlag = None,
    audit_log: AuditLogFlag = None,
) -> None:
    """Remove a person: their face is refused from then on.

    NAME is the person as listed. Profiles and running streams that already use their face
    are not changed; with --require-consent, serve refuses to start while a profile does.
    """
    entry: dict[str, object] = {"change": "consent_remove", "person": name, "faces": []}
    with one_line_errors():
        registry, folder = _consent_registry(state_dir, store)
        registry.remove(name)
    _consent_audit(
        audit_log, folder, {**entry, "allowed": True, "outcome": "allowed", "reason": None}
    )
    if chatty():
        console.print(f"{name}: removed from {registry.where}", highlight=False)
