"""What a labelling job reads: the images of a folder, a glob or a zip, or the sampled frames of a video.

Every input becomes an :class:`Item` with a ``key`` that names it the same way on every run (a
relative path, a zip member, ``frame-000123``): the journal resumes by key. Items are produced
lazily, in a stable order, and an image is decoded only when its item is loaded, so a job over
thousands of files holds only the current batch's pixels.
"""

from __future__ import annotations

import glob
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from PIL import Image

from model.images import ShapeLimits, ingest_image

from . import video

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"})
# A zip member bigger than this is skipped rather than read into memory (a 64 MP PNG is ~200 MB).
MAX_MEMBER_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Item:
    key: str  # names the input across runs
    name: str  # its file name in the dataset's images/ folder (unique within the job)
    load: Callable[[], Image.Image]  # canonical RGB (EXIF applied); raises on an unreadable file
    path: Path | None = None  # the original file, when it is one
    frame: int | None = None
    time_s: float | None = None


@dataclass
class Source:
    """Items named by ``keys``, in that order; ``items(skip)`` yields those whose key is not in ``skip``."""

    description: str
    keys: tuple[str, ...]
    items: Callable[[frozenset[str]], Iterator[Item]]
    identity: str = ""  # what a resumed job must name again (the files may have grown since)
    video_path: Path | None = None
    video_info: video.VideoInfo | None = None

    @property
    def total(self) -> int:
        return len(self.keys)


def unique_names(keys: Sequence[str]) -> list[str]:
    """A flat file name per key (folders joined with ``__``), unique with its stem unique too: YOLO
    pairs an image with its label file by stem, so ``a.jpg`` and ``a.png`` must not both be ``a``."""
    names: list[str] = []
    stems: set[str] = set()
    for key in keys:
        flat = PurePosixPath(key.replace("\\", "/"))
        stem = "__".join([*flat.parent.parts, flat.stem]) if flat.parent.parts else flat.stem
        candidate, counter = stem, 1
        while candidate.lower() in stems:
            counter += 1
            candidate = f"{stem}-{counter}"
        stems.add(candidate.lower())
        names.append(candidate + flat.suffix.lower())
    return names


def dataset_names(keys: Sequence[str]) -> dict[str, str]:
    return dict(zip(keys, unique_names(keys), strict=True))


def image_loader(source: Path | bytes, limits: ShapeLimits) -> Callable[[], Image.Image]:
    return lambda: ingest_image(source, limits=limits).image


def _file_source(
    description: str, root: Path, files: list[Path], limits: ShapeLimits, keys: list[str] | None = None
) -> Source:
    keys = keys or [file.relative_to(root).as_posix() for file in files]
    names = dataset_names(keys)

    def items(skip: frozenset[str]) -> Iterator[Item]:
        for file, key in zip(files, keys, strict=True):
            if key not in skip:
                yield Item(key, names[key], image_loader(file, limits), path=file)

    return Source(description, tuple(keys), items)


def folder_source(spec: str, limits: ShapeLimits | None = None) -> Source:
    """A folder (its image files, recursively) or a glob pattern (every file it matches)."""
    limits = limits or ShapeLimits()
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image_name(p.name))
        root = path
    elif path.is_file() and path.suffix.lower() == ".zip":
        return zip_source(path, limits)
    elif path.is_file():
        files, root = [path], path.parent
    else:
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([p.parent for p in files])) if files else Path(".")
    if not files:
        raise ValueError(f"no images found at {spec!r}: give a folder, a glob such as 'photos/*.jpg', or a .zip")
    source = _file_source(f"{len(files)} images from {spec}", root, files, limits)
    source.identity = f"images {spec}"
    return source


def zip_source(path: Path, limits: ShapeLimits | None = None, prefix: str = "") -> Source:
    """The image members of a zip, read one at a time (never extracted to disk)."""
    limits = limits or ShapeLimits()
    try:
        with zipfile.ZipFile(path) as archive:
            members = sorted(
                (m for m in archive.infolist() if not m.is_dir() and _is_image_name(m.filename)),
                key=lambda m: m.filename,
            )
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path.name} is not a readable zip file") from exc
    if not members:
        raise ValueError(f"{path.name} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    keys = [prefix + m.filename for m in members]
    names = dataset_names(keys)

    def items(skip: frozenset[str]) -> Iterator[Item]:
        with zipfile.ZipFile(path) as archive:
            for key, member in zip(keys, members, strict=True):
                if key not in skip:
                    yield Item(key, names[key], _member_loader(archive, member, limits))

    return Source(f"{len(members)} images from {path.name}", tuple(keys), items, identity=f"zip {path}")


def _member_loader(archive: zipfile.ZipFile, member: zipfile.ZipInfo, limits: ShapeLimits) -> Callable[[], Image.Image]:
    """The member's bytes are read now: a job gathers a batch of items before it loads them, and the
    archive is closed once the listing has gone past its last member."""
    try:
        if member.file_size > MAX_MEMBER_BYTES:
            size, limit = member.file_size / 2**20, MAX_MEMBER_BYTES // 2**20
            raise ValueError(f"{size:.0f} MB unpacked; the limit is {limit} MB")
        data = archive.read(member)
    except (ValueError, OSError, RuntimeError, zipfile.BadZipFile) as exc:  # recorded as skipped when loaded
        problem = exc

        def fail() -> Image.Image:
            raise problem

        return fail
    return image_loader(data, limits)


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def frame_key(index: int) -> str:
    return f"frame-{index:06d}"


def video_source(path: Path, every_s: float) -> Source:
    """One frame every ``every_s`` seconds (the first frame included), decoded in order as the job asks."""
    info = video.probe_video(path)
    indices = tuple(video.sample_times(info, every_s))

    def items(skip: frozenset[str]) -> Iterator[Item]:
        wanted = [i for i in indices if frame_key(i) not in skip]
        for index, frame in video.read_frames(path, wanted):
            key = frame_key(index)
            yield Item(key, key + ".png", lambda frame=frame: frame, frame=index, time_s=round(index / info.fps, 3))

    description = f"{len(indices)} frames of {path.name} (one every {every_s:g} s of {info.seconds:.1f} s)"
    identity = f"video {path} every {every_s:g} s"
    keys = tuple(frame_key(i) for i in indices)
    return Source(description, keys, items, identity, video_path=path, video_info=info)


def uploads_source(paths: Sequence[str], limits: ShapeLimits | None = None) -> Source:
    """Files sent to the page: images and the image members of zips, in the order sent."""
    limits = limits or ShapeLimits()
    names = unique_names([Path(path).name for path in paths])  # two uploads may share a name
    parts: list[Source] = []
    for name, path in zip(names, paths, strict=True):
        if Path(path).suffix.lower() == ".zip":
            parts.append(zip_source(Path(path), limits, prefix=Path(name).stem + "/"))
        else:
            parts.append(_file_source(name, Path(path).parent, [Path(path)], limits, keys=[name]))

    # Names unique across all the files and zips sent (a file and a zip member may flatten alike).
    keys = tuple(key for part in parts for key in part.keys)
    names = dataset_names(keys)

    def items(skip: frozenset[str]) -> Iterator[Item]:
        for part in parts:
            for item in part.items(skip):
                yield replace(item, name=names[item.key])

    return Source(f"{len(keys)} images sent to the page", keys, items)


def open_source(
    images: str | None, video_path: str | None, every_s: float, limits: ShapeLimits | None = None
) -> Source:
    if video_path:
        return video_source(Path(video_path), every_s)
    if images:
        return folder_source(images, limits)
    raise ValueError("say what to label: --images FOLDER_OR_GLOB (or a .zip) or --video FILE")
