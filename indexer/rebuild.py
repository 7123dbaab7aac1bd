"""`fsw-index rebuild`: encode every photo of a gallery again with other settings, while workers serve it.

Why this way: a gallery records the settings its descriptors were made with, and a writer refuses others
(`matcher.writer`), since descriptors made differently cannot be mixed. So the new descriptors go into a
whole second gallery, staged in the gallery's own folder (`rebuild/`, with its own manifest and lock):
a `build` of that folder from the gallery's photo root and its live photo ids (`indexer.pipeline`), so a
rebuild killed at any point resumes where its last commit left off, and the gallery itself is not
touched until the switch. The switch, under the gallery's writer lock: the staged row and index files are
hard-linked into the gallery folder under the next version's names, the forgotten faces are written for
that version, and one manifest rename publishes it (`GalleryWriter.switch`): readers see the old version
or the new one, and workers' hot reload picks the new one up. A kill before the rename leaves the old
version serving (the next writer deletes the unnamed links); after it, running the command again only
clears the staging folder.

Photos added or removed while the staging build ran are not lost: at the switch the gallery's live photos
must be those the staging build started from; if they are not, the staging build runs again for the
difference (prunes what was removed, encodes what was added) and the switch is tried again. Photos whose
file is gone cannot be encoded again: they are left out of the new version and reported.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from indexer.defaults import CHECKPOINT_S
from indexer.encoding import Encoding
from indexer.pipeline import ProgressFn, Summary, index_photos
from matcher import coarse, forgotten, layout, rows
from matcher.encoder import EncoderSettings
from matcher.errors import GalleryError
from matcher.writer import GalleryWriter

STAGING = "rebuild"  # the staging gallery's folder, inside the gallery folder
COMMAND = "fsw-index rebuild"
ROUNDS = 3  # staging builds tried before giving up on a gallery that keeps changing under the rebuild


@dataclass
class Rebuilt:
    """What a rebuild did."""

    gallery: str
    version: int  # the gallery's version now (the old one when nothing was switched)
    switched: bool = False
    interrupted: bool = False
    staged: Summary | None = None  # the last staging build's summary; after the switch, as the gallery's
    missing: list[str] = field(default_factory=list)  # live photo ids whose file is gone: not in the new version
    rounds: int = 0


def staging_folder(gallery: str | os.PathLike[str]) -> Path:
    return Path(gallery) / STAGING


def rebuild(
    gallery: str | os.PathLike[str],
    settings: EncoderSettings,
    *,
    jobs: int | None = None,
    checkpoint_s: float = CHECKPOINT_S,
    on_progress: ProgressFn | None = None,
    encoding: Callable[[], Encoding | None] = lambda: None,
    rounds: int = ROUNDS,
) -> Rebuilt:
    """Encode every live photo of `gallery` again with `settings` and publish them as its next version.

    encoding: makes each staging build's encoding (None: `index_photos`'s default, this machine's cores).
    """
    folder = Path(gallery)
    staging = staging_folder(folder)
    wanted = settings.recorded()
    m = layout.read_manifest(folder)
    if m.settings == wanted:
        _clear_staging(staging, wanted)  # a rebuild killed after its switch left it
        return Rebuilt(str(folder), m.version)
    _check_staging(staging, wanted)
    if not m.photo_root:
        raise GalleryError(f"the gallery at {folder} records no photo root, so its photos cannot be found to encode "
                           "again: build a new gallery from the photos instead")
    root = Path(m.photo_root)
    out = Rebuilt(str(folder), m.version)
    for _ in range(rounds):
        out.rounds += 1
        with GalleryWriter(folder, {}, command=COMMAND) as writer:  # {}: this writer only reads, then switches
            live = _live(writer)
        present = sorted(pid for pid in live if (root / pid).is_file())
        out.missing = sorted(set(live) - set(present))
        if not present:
            raise GalleryError(f"none of the {len(live)} photos of the gallery at {folder} is under its photo root "
                               f"{root} any more: there is nothing to encode again")
        _prune(staging, wanted, set(present))
        out.staged = index_photos(staging, [root / pid for pid in present], settings, photo_root=root, jobs=jobs,
                                  command="rebuild", checkpoint_s=checkpoint_s, on_progress=on_progress,
                                  encoding=encoding())
        if out.staged.interrupted:
            out.interrupted = True
            return out
        with GalleryWriter(folder, {}, command=COMMAND) as writer:
            if _live(writer) != live:
                continue  # an add or remove committed meanwhile: stage the difference, then try again
            out.version = _switch(writer, staging).version
            out.switched = True
        # gallery.h5, the base row file, still holds the old rows (the new version names none of them): the
        # next writer empties it, under the new settings. A reader that read the manifest before the switch
        # and opens it only now fails once, and loads the new version (workers poll the manifest).
        GalleryWriter(folder, {}, command=COMMAND).close()
        out.staged = replace(out.staged, gallery=str(folder), version=out.version)  # the summary, as the gallery's
        layout.atomic_write(folder / layout.SUMMARY_NAME, out.staged.to_json())
        _clear_staging(staging, wanted)
        return out
    raise GalleryError(
        f"the gallery at {folder} changed (photos added or removed) during each of {rounds} staging builds: "
        "run `fsw-index rebuild` again when it changes less often; it resumes"
    )


def _live(writer: GalleryWriter) -> dict[str, str]:
    """The gallery's live photos: id -> sha256 of the content indexed."""
    return {pid: sha for pid, (_, sha) in writer.known.by_id.items()}


def _check_staging(staging: Path, wanted: dict[str, object]) -> None:
    """Refuse a staging gallery left by a rebuild to other settings: resuming it would mix them."""
    if not layout.is_gallery(staging):
        return
    have = layout.read_manifest(staging).settings
    if have != wanted:
        said = ", ".join(f"{k}: staged {have.get(k)!r}, asked {wanted.get(k)!r}"
                         for k in sorted(set(have) | set(wanted)) if have.get(k) != wanted.get(k))
        raise GalleryError(f"{staging} holds an unfinished rebuild with other settings ({said}): run that rebuild "
                           f"again to finish it, or delete {staging} to start this one")


def _clear_staging(staging: Path, wanted: dict[str, object]) -> None:
    """Delete a staging gallery of these settings (switched already: the gallery's files are links of its own)."""
    if layout.is_gallery(staging) and layout.read_manifest(staging).settings == wanted:
        shutil.rmtree(staging)


def _prune(staging: Path, wanted: dict[str, object], present: set[str]) -> None:
    """Take out of the staging gallery the photos the gallery no longer holds (removed during the rebuild)."""
    if not layout.is_gallery(staging):
        return
    with GalleryWriter(staging, wanted, command=COMMAND) as writer:
        gone = [pid for pid in writer.known.by_id if pid not in present]
        if gone:
            writer.remove(gone)
            writer.commit(final=False)


def _switch(writer: GalleryWriter, staging: Path) -> layout.Manifest:
    """Publish the staging gallery as the gallery's next version, its forgotten faces carried over."""
    old, staged = writer.manifest, layout.read_manifest(staging)
    # Above both: row files record removals by version, and the staged ones must all count as done.
    version = max(old.version, staged.version) + 1
    segments = []
    for i, f in enumerate(rows.data_files(staged)):
        if f.photos or f.faces or f.removals:
            name = f"gallery-v{version}-{i}.h5"
            _link(staging / f.name, writer.folder / name)
            segments.append({"file": name, "photos": f.photos, "faces": f.faces, "removals": f.removals})
    new = replace(staged, version=version, segments=segments, written_at=time.time(), command=COMMAND,
                  forgotten=None, forgotten_sha256=None, format=layout.FORMAT)
    if staged.index:
        new.index = f"index-v{version}.faiss"
        _link(staging / staged.index, writer.folder / new.index)
    if staged.coarse:
        new.coarse = {**staged.coarse, "file": coarse.file_name(version)}
        _link(staging / staged.coarse["file"], writer.folder / new.coarse["file"])
    entries = forgotten.read(writer.folder, old)
    if entries:
        new.forgotten, new.forgotten_sha256 = forgotten.write(writer.folder, version, entries)
        new.format = layout.FORGOTTEN_FORMAT
    layout.fsync_path(writer.folder)
    return writer.switch(new)


def _link(src: Path, dst: Path) -> None:
    """`dst` names `src`'s file too (no copy: committed files are never modified); a copy where links fail."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        with layout.atomic_replace(dst) as tmp:
            shutil.copyfile(src, tmp)
