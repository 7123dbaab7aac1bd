"""`fsw-index`: build, extend, inspect and search a face gallery from the command line.

Each command is a thin face on a library call (`indexer.pipeline`, `matcher`); library errors become
one clear line and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
from redis.exceptions import RedisError

from indexer.defaults import CHECKPOINT_S
from indexer.pipeline import Summary, index_photos
from indexer.progress import ProgressBar
from indexer.rebuild import rebuild as rebuild_gallery
from indexer.rebuild import staging_folder
from matcher import detectors, layout
from matcher.defaults import DEFAULT_GALLERY, FORGET_THRESHOLD
from matcher.encoder import MIN_FACE, Encoder, EncoderSettings, default_detector
from matcher.errors import FswError
from matcher.gallery import Gallery
from matcher.query import search_selfie
from matcher.search import DEFAULT_THRESHOLD
from matcher.writer import GalleryWriter
from schemas import dump_result


def _gallery_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--gallery",
        "-g",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="FSW_GALLERY",
        default=DEFAULT_GALLERY,
        show_default=True,
        help="Gallery folder (env FSW_GALLERY).",
    )(f)


def _encoder_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--detector", type=click.Choice(list(detectors.ENGINES)),
                     help="Face detector [default: yunet; a gallery's own when it exists]."),
        click.option("--max-side", type=click.IntRange(80, 20000),
                     help="Long side scaled to for detection [default: 3072 for yunet, 1600 for hog and cnn]."),
        click.option("--upsample", type=click.IntRange(0, 3),
                     help="HOG/CNN upsampling for small faces [default: 1]."),
        click.option("--min-face", type=click.IntRange(0, 10000),
                     help=f"Faces narrower (px) are not indexed, only counted [default: {MIN_FACE}]."),
        click.option("--jitters", type=click.IntRange(1, 100), help="Re-samplings averaged per face [default: 1]."),
        click.option("--encoder", "engine", type=click.Choice(["onnx", "dlib"]), default="onnx", show_default=True,
                     help="Descriptor engine; both give the same descriptors."),
        click.option("--jobs", "-j", type=click.IntRange(1, 256), help="Encoder processes [default: every core]."),
        click.option("--checkpoint-s", type=click.FloatRange(0), default=CHECKPOINT_S, hidden=True,
                     help="Seconds between commits of finished photos."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _fleet_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--fleet", is_flag=True,
        help="Encode on every fsw-worker attached to Redis (queue fsw-encode) instead of this machine's cores; "
             "Redis as for fsw-worker (REDIS_URL, .env). See docs/fleet.md.",
    )(f)


def _errors(f: Callable[..., Any]) -> Callable[..., Any]:
    """Library errors, and the system's (a full disk, a file that cannot be read), become one line on stderr
    and exit 1."""

    @wraps(f)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except FswError as e:
            raise click.ClickException(str(e)) from None
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        except OSError as e:
            said = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
            raise click.ClickException(said) from None

    return run


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fsw")
def main() -> None:
    """Build and search the face gallery that fsw-worker answers jobs from."""


@main.command()
@click.argument("photos_dir", type=click.Path(path_type=Path))
@_gallery_option
@_encoder_options
@_fleet_option
@_errors
def build(photos_dir: Path, gallery: Path, jobs: int | None, checkpoint_s: float, fleet: bool, **encoder: Any) -> None:
    """Index every photo under PHOTOS_DIR (jpg, jpeg, png, webp) into a new gallery.

    Photo ids are paths relative to PHOTOS_DIR. Run the same command again after Ctrl-C or a crash
    to resume: finished photos are not encoded again.

    \b
        fsw-index build /srv/convocation/photos --gallery /srv/fsw/gallery
        fsw-index build /srv/convocation/photos --gallery /srv/fsw/gallery --fleet
    """
    if not photos_dir.is_dir():
        raise FswError(f"{photos_dir} is not a folder of photos")
    settings = _settings(encoder, recorded=_recorded_if_gallery(gallery))
    _index(gallery, [photos_dir], settings, jobs, checkpoint_s, "build", photo_root=photos_dir, fleet=fleet)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_gallery_option
@_encoder_options
@_fleet_option
@_errors
def add(paths: tuple[Path, ...], gallery: Path, jobs: int | None, checkpoint_s: float, fleet: bool,
        **encoder: Any) -> None:
    """Index new photos or folders (below the gallery's photo root), e.g. a new event's stage.

    Photos already indexed are skipped; the cost is that of the new photos only. Encoder settings
    default to the gallery's; different ones are refused.

    \b
        fsw-index add /srv/convocation/photos/Day-3 --gallery /srv/fsw/gallery
    """
    settings = _settings(encoder, recorded=layout.read_manifest(gallery).settings)
    _index(gallery, list(paths), settings, jobs, checkpoint_s, "add", fleet=fleet)


@main.command()
@_gallery_option
@_encoder_options
@_fleet_option
@_errors
def rebuild(gallery: Path, jobs: int | None, checkpoint_s: float, fleet: bool, **encoder: Any) -> None:
    """Encode every photo of the gallery again with other settings, as its next version.

    For a gallery built with another detector (e.g. HOG): its photos are encoded again from its photo
    root into GALLERY/rebuild/ while workers keep serving the current version; then one manifest rename
    publishes the new one, which workers pick up by themselves. Settings not given take a new build's
    defaults. Run the same command again after Ctrl-C or a crash to resume. Photos added or removed
    meanwhile are taken into account, forgotten faces stay forgotten, photos whose file is gone are left
    out and listed.

    \b
        fsw-index rebuild --gallery /srv/fsw/gallery --detector yunet
    """
    settings = _settings(encoder, recorded=None)
    line = ProgressBar()
    try:
        done = rebuild_gallery(gallery, settings, jobs=jobs, checkpoint_s=checkpoint_s, on_progress=line,
                           encoding=_fleet_encoding if fleet else lambda: None)
    finally:
        line.close()
    if done.staged is not None:
        _print_summary(done.staged)
    for pid in done.missing:
        click.echo(f"  left out {pid}: its file is gone from the photo root")
    if done.interrupted:
        click.echo("interrupted: the gallery serves its current version; run the same command again to resume",
                   err=True)
        sys.exit(130)
    if done.switched:
        click.echo(f"rebuild: gallery version {done.version} holds the new settings ({settings.detector}); "
                   "workers pick it up by themselves")
    else:
        click.echo(f"rebuild: the gallery at {gallery} already has these settings (version {done.version})")


@main.command()
@click.argument("targets", nargs=-1, required=True)
@_gallery_option
@_errors
def remove(targets: tuple[str, ...], gallery: Path) -> None:
    """Take photos (by id) or whole stages (folders) out of the gallery.

    \b
        fsw-index remove Day-1/Morning/IMG_0042.jpg Day-2/Evening
    """
    recorded = layout.read_manifest(gallery).settings
    with GalleryWriter(gallery, recorded, command="fsw-index remove") as writer:
        removed = writer.remove(list(targets))
        if not removed:
            raise FswError(f"nothing in the gallery matches {', '.join(targets)}")
        manifest = writer.commit()
    click.echo(f"removed {len(removed)} photos; gallery version {manifest.version}")


@main.command()
@click.argument("selfie", required=False, type=click.Path(exists=True, path_type=Path))
@_gallery_option
@click.option("--threshold", type=float, default=FORGET_THRESHOLD, show_default=True,
              help="Faces more similar than this to the selfie are hidden (similarity = 1 - distance).")
@click.option("--list", "list_", is_flag=True, help="List the forgotten entries (the gallery's and the portal's).")
@click.option("--undo", multiple=True, metavar="ID", help="Forget no more: delete entry ID (repeat for more).")
@click.option("--from-redis", is_flag=True,
              help="Take the portal's forget-face requests from Redis into the gallery (Redis as for fsw-worker).")
@click.option("--encoder", "engine", type=click.Choice(["onnx", "dlib"]), default="onnx", show_default=True)
@_errors
def forget(selfie: Path | None, gallery: Path, threshold: float, list_: bool, undo: tuple[str, ...],
           from_redis: bool, engine: str) -> None:
    """Hide a person's faces from every search: SELFIE is their photo, or a folder of face images.

    Each face in the gallery like the selfie's is hidden, face by face: a group photo still comes back
    for the others in it. Photos added later are covered too: the selfie's descriptor is kept in the
    gallery (never the selfie). A folder (the old worker's exclude_faces/) gives one entry per image.

    \b
        fsw-index forget graduate.jpg
        fsw-index forget /srv/old-worker/exclude_faces
        fsw-index forget --list
        fsw-index forget --undo 3f9c2a1b7e04
        fsw-index forget --from-redis
    """
    from indexer import forget as forgetting

    if sum((selfie is not None, list_, bool(undo), from_redis)) != 1:
        raise click.UsageError("give one of SELFIE (or a folder), --list, --undo ID or --from-redis")
    if selfie is not None:
        done = forgetting.forget_images(gallery, selfie, threshold, engine, _cache_dir())
        for entry, path, hidden in done.made:
            click.echo(f"forgotten {entry.id}: {path}, {hidden} face{'' if hidden == 1 else 's'} hidden now")
        for path, reason in done.skipped:
            click.echo(f"  skipped {path}: {reason}", err=True)
        click.echo(f"gallery version {done.version}; undo with `fsw-index forget --undo ID`")
        if done.skipped:
            sys.exit(1)
        return
    portal, shown = forgetting.portal_redis()
    try:
        portal.ping()
    except (RedisError, OSError) as e:
        if from_redis:
            raise FswError(f"Redis at {shown} does not answer ({e}): set REDIS_URL as for fsw-worker") from None
        click.echo(f"Redis at {shown} does not answer: the portal's forgets are left out", err=True)
        portal = None
    if list_:
        entries = forgetting.listing(gallery, portal)
        click.echo("\n".join(forgetting.describe(x) for x in entries) or "nothing forgotten")
    elif undo:
        ids, version = forgetting.undo(gallery, list(undo), portal)
        click.echo(f"undone {', '.join(ids)}; gallery version {version}")
    else:
        assert portal is not None
        taken, version, left = forgetting.fold(gallery, portal)
        click.echo(f"{len(taken)} forgotten entr{'y' if len(taken) == 1 else 'ies'} taken from Redis; "
                   f"gallery version {version}")
        if left:
            click.echo(f"{len(left)} stay in Redis until every worker serves version {version}: "
                       "run this again later", err=True)


@main.command()
@_gallery_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def info(gallery: Path, as_json: bool) -> None:
    """Counts by stage, faces, forgotten people, encoder settings, version and size on disk."""
    g = Gallery.open(gallery)
    stats = g.stats()
    size = sum(p.stat().st_size for p in gallery.iterdir() if p.is_file())
    out = {
        "gallery": str(gallery),
        "version": stats.version,
        "photos": stats.photos,
        "faces": stats.faces,
        "photos_without_faces": stats.photos_without_faces,
        "photo_root": g.manifest.photo_root,
        "settings": g.settings,
        "bytes_on_disk": size,
        "stages": dict(sorted(stats.stages.items())),
        "forgotten": len(g.forgotten),
        "faces_hidden": int((g.face_hidden & g.face_live).sum()),
    }
    staging = staging_folder(gallery)
    if layout.is_gallery(staging):  # a rebuild under way, or stopped: how far it got
        staged = layout.read_manifest(staging)
        out["rebuild"] = {"folder": str(staging), "version": staged.version, "photos": staged.photos,
                          "settings": staged.settings}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"gallery {gallery}: version {stats.version}, {stats.photos} photos, {stats.faces} faces, "
               f"{stats.photos_without_faces} photos without a face, {size / 1e6:.1f} MB on disk")
    click.echo(f"photo root: {g.manifest.photo_root}")
    if g.forgotten:
        click.echo(f"forgotten: {out['forgotten']} (`fsw-index forget --list`), hiding {out['faces_hidden']} faces")
    click.echo("settings: " + ", ".join(f"{k}={v}" for k, v in sorted(g.settings.items())))
    if "rebuild" in out:
        click.echo(f"rebuild staged in {staging}: {out['rebuild']['photos']} photos encoded with "
                   f"detector={out['rebuild']['settings'].get('detector')}; `fsw-index rebuild` with its settings "
                   "resumes it")
    click.echo("stages:")
    for stage, n in sorted(stats.stages.items()):
        click.echo(f"  {stage or '(root)'}: {n} photos")


@main.command()
@click.argument("selfie", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_gallery_option
@click.option("--stage", default="", help="Only photos under this folder, e.g. Day-1/Morning.")
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
              help="Similarity a match must exceed (similarity = 1 - distance).")
@click.option("--limit", type=click.IntRange(1), help="At most this many photos.")
@click.option("--encoder", "engine", type=click.Choice(["onnx", "dlib"]), default="onnx", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result array a worker job returns.")
@_errors
def search(selfie: Path, gallery: Path, stage: str, threshold: float, limit: int | None, engine: str,
           as_json: bool) -> None:
    """Photos of the person in SELFIE: the answer a worker job gives, without a queue.

    \b
        fsw-index search me.jpg --stage Day-1/Morning --json
    """
    g = Gallery.open(gallery)
    encoder = Encoder(EncoderSettings.from_recorded(g.settings, engine=engine, cache_dir=_cache_dir()))
    matches = search_selfie(g, encoder, selfie, stage, threshold, limit)
    if as_json:
        click.echo(json.dumps(dump_result(matches)))
        return
    if not matches:
        click.echo("no photos found")
    for m in matches:
        click.echo(f"{m.similarity:.4f}  {m.id}  box={list(m.box)}")


def _settings(options: dict[str, Any], recorded: dict[str, Any] | None) -> EncoderSettings:
    """Settings from flags; for an existing gallery, the gallery's values where a flag is not given."""
    given = {"cache_dir": _cache_dir(), **{k: v for k, v in options.items() if v is not None}}
    base = EncoderSettings.from_recorded(recorded).as_dict() if recorded else {"detector": default_detector()}
    return EncoderSettings(**{**base, **given})


def _cache_dir() -> str | None:
    """Where converted ONNX models are cached: FSW_CACHE_DIR, read here at the edge (None: the default)."""
    return os.environ.get("FSW_CACHE_DIR") or None


def _recorded_if_gallery(gallery: Path) -> dict[str, Any] | None:
    return layout.read_manifest(gallery).settings if layout.is_gallery(gallery) else None


def _index(gallery: Path, paths: list[Path], settings: EncoderSettings, jobs: int | None, checkpoint_s: float,
           command: str, photo_root: Path | None = None, fleet: bool = False) -> None:
    encoding = _fleet_encoding() if fleet else None
    line = ProgressBar()
    try:
        summary = index_photos(gallery, paths, settings, photo_root=photo_root, jobs=jobs, command=command,
                               checkpoint_s=checkpoint_s, on_progress=line, encoding=encoding)
    finally:
        line.close()
    _print_summary(summary)
    if summary.interrupted:
        click.echo("interrupted: finished photos are committed; run the same command again to resume", err=True)
        sys.exit(130)


def _fleet_encoding() -> Any:
    """The fleet's encoding, with Redis read as fsw-worker reads it (the environment, then ./.env)."""
    from dotenv import load_dotenv

    from indexer.fleet import FleetEncoding, FleetSettings

    load_dotenv(Path.cwd() / ".env", override=False)
    fleet = FleetSettings.from_env()
    click.echo(f"encoding on the fleet: queue {fleet.queue!r} at {fleet.redis_display}", err=True)
    return FleetEncoding(fleet)


def _print_summary(s: Summary) -> None:
    click.echo(
        f"{s.command}: {s.photos_found} photos found, {s.photos_indexed} indexed, {s.photos_already_indexed} "
        f"already indexed, {s.faces} faces ({s.faces_too_small} more too small to index), "
        f"{s.photos_without_faces} photos without a face, "
        f"{len(s.skipped)} skipped, {s.elapsed_s:.1f} s; gallery version {s.version}"
    )
    for item in s.skipped:
        click.echo(f"  skipped {item['path']}: {item['reason']}")
    if s.workers:
        click.echo(f"encoded by {len(s.workers)} fsw-worker{'s' if len(s.workers) > 1 else ''}: {', '.join(s.workers)}")
    click.echo(f"summary written to {Path(s.gallery) / layout.SUMMARY_NAME}")


@main.command()
@_gallery_option
def verify(gallery: Path) -> None:
    """Check the gallery's integrity: one line per problem and exit 1, or a one-line OK summary.

    Checks the manifest, that every file it names is there, the FAISS index's checksum and vectors,
    and the row counts and references of the row files. Reads only; safe while fsw-index or workers run.

    \b
        fsw-index verify --gallery /srv/fsw/gallery
    """
    from matcher.verify import check_gallery

    verdict = check_gallery(gallery)
    for problem in verdict.problems:
        click.echo(problem, err=True)
    if verdict.problems:
        sys.exit(1)
    click.echo(verdict.summary())


@main.command("eval")
@click.argument("labels", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--gallery", "-g", type=click.Path(file_okay=False, path_type=Path),
              help="Reuse this gallery, or build the labelled photos into it and keep it [default: a temporary one].")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default="fsw-eval", show_default=True,
              help="Folder for eval.json and eval.png.")
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
              help="The threshold marked as the default (0.30 to 0.70 in steps of 0.05 are always measured).")
@click.option("--selfie-jitters", type=click.IntRange(1, 100), help="Jittered copies averaged per selfie [default: 1].")
@click.option("--mirror/--no-mirror", default=None, help="Average in the selfie's mirror view [default: on].")
@click.option("--expansion/--no-expansion", default=None, help="Query expansion [default: on].")
@_encoder_options
@_errors
def eval_(labels: Path, gallery: Path | None, out: Path, threshold: float, selfie_jitters: int | None,
          mirror: bool | None, expansion: bool | None, jobs: int | None, checkpoint_s: float, **encoder: Any) -> None:
    """Measure recall and wrong photos on a labelled set (CSV: file,identity,split) at each threshold.

    Indexes the labelled gallery photos in place (or uses --gallery), runs every query as a worker job
    would, prints a table and writes eval.json and eval.png to --out. See docs/accuracy.md.

    \b
        fsw-index eval tests/data/faces/labels.csv --out eval-results
    """
    from indexer.evaluate import evaluate

    per_process = {"selfie_jitters": selfie_jitters, "selfie_mirror": mirror, "selfie_expansion": expansion}
    settings = _settings({**encoder, **per_process}, recorded=_recorded_if_gallery(gallery) if gallery else None)
    line = ProgressBar()
    try:
        report = evaluate(labels, gallery, settings, default_threshold=threshold, jobs=jobs, on_progress=line)
    finally:
        line.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(report.to_json())
    click.echo(report.summary())
    try:
        report.plot(out / "eval.png")
    except ImportError:
        click.echo("matplotlib is not installed: no eval.png (pip install matplotlib)", err=True)
    else:
        click.echo(f"written: {out / 'eval.json'}, {out / 'eval.png'}")


@main.command("eval-detection")
@click.argument("boxes", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--detector", "configs", multiple=True, metavar="NAME[:KEY=VALUE,...]",
              help="A detector and its settings (max_side, upsample, score), e.g. hog:upsample=2 or "
                   "yunet:score=0.7; repeat to compare [default: yunet and hog].")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="ONNX Runtime threads for YuNet (HOG uses one core).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Also write detection.json to this folder.")
@_errors
def eval_detection(boxes: Path, configs: tuple[str, ...], threads: int, out: Path | None) -> None:
    """Measure face detection on annotated photos: recall by face width, false faces, ms a photo.

    BOXES is a CSV of face boxes (file,left,top,width,height,...,invalid, as WIDER FACE annotations
    convert to), its images in images/ beside it; they are read in place. Prints a
    Markdown table; see docs/accuracy.md, "Face detection".

    \b
        fsw-index eval-detection /data/events/boxes.csv --detector yunet --detector hog:upsample=2
    """
    from indexer.detection_eval import evaluate_detection, parse_config

    parsed = [parse_config(c) for c in configs or ("yunet", "hog")]
    report = evaluate_detection(boxes, parsed, threads=threads,
                                on_photo=lambda done, total: click.echo(f"  {done}/{total} photos", err=True))
    click.echo(f"{report.boxes}: {report.photos} photos, a face is found at IoU >= {report.min_iou}; "
               f"{threads} thread(s)")
    click.echo(report.table())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "detection.json").write_text(report.to_json())
        click.echo(f"written: {out / 'detection.json'}")


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
