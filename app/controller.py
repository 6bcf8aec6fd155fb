"""The app's behaviour, independent of Gradio: ingest, ask, stream, stop, retry, undo, trim.

``ui.py`` wires these functions to components; tests call them directly with a scripted backend.
Each failure is reported as a message and leaves the session as it was (nothing the user uploaded
or was answered is lost).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model.generation import GenerationSettings
from model.images import ImageError, ingest_image, probe_image
from model.tokenizer import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN

from . import served
from .backends.base import Backend, BackendError
from .click import ClickResult, identify
from .errors import SessionEnded, UserError
from .exports import coco_from_document, session_document, write_annotated_png, write_json
from .limits import Limits
from .modes import Mode, build_prompt
from .session import Session, SessionImage, Turn
from .storage import PrivateStorage
from .streaming import coalesced
from .uploads import UploadGuard

log = logging.getLogger("vl2-studio")
TILING_OFF_NOTICE = (
    "This conversation now has 3 or more images, so the model sees each one as a single 384×384 view "
    "(no high-resolution tiling). For fine detail, keep only the active image."
)


@dataclass
class Update:
    """One step of a reply, for the UI to show."""

    turn: Turn
    boxes_changed: bool
    done: bool
    notices: tuple[str, ...] = ()


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)  # image keys now in the session
    problems: list[str] = field(default_factory=list)  # refused files, with the reason
    notes: list[str] = field(default_factory=list)  # accepted, but worth saying (e.g. animated GIF)


# Tokens that frame the conversation: typed into a message they would forge turns or images. The
# grounding tags (<|ref|>, <|det|>, <|grounding|>) stay: typing them is how users ask for boxes.
RESERVED_TOKENS = (IMAGE_TOKEN, "<|User|>", "<|Assistant|>", BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


def refuse_reserved_tokens(text: str, where: str = "the message") -> None:
    found = [token for token in RESERVED_TOKENS if token in text]
    if found:
        raise UserError(
            f"“{found[0]}” is reserved: the app places images and conversation turns in the prompt itself. "
            f"Remove it from {where}."
        )


class Controller:
    def __init__(
        self,
        backend: Backend,
        *,
        image_dir: str | os.PathLike[str] | None = None,
        limits: Limits | None = None,
        uploads: UploadGuard | None = None,
    ) -> None:
        """``image_dir``: where the private folder is made (default: the system's temp dir);
        ``uploads``: when set, only files it allows are read (the served app sets it)."""
        self.backend = backend
        self.limits = limits or Limits()
        self.storage = PrivateStorage(image_dir)
        self.uploads = uploads
        # Every conversation holding decoded images, for the server-wide budget; a session that ends
        # (or, for a one-call API session, is simply dropped) leaves it.
        self._holders: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()

    # -- images ------------------------------------------------------------------------------
    def ingest(self, session: Session, sources: Sequence[str | os.PathLike[str]]) -> IngestReport:
        """Canonicalise uploads (EXIF, RGB) once; refused files are reported, not added.

        The whole message is budgeted before any pixel is decoded: the images and pixels the
        conversation would then hold (a file sent again is decoded once and shared).
        """
        if len(sources) > self.limits.max_images_per_turn:
            raise UserError(
                f"{len(sources)} images in one message; the limit is {self.limits.max_images_per_turn}. "
                "Send fewer at a time."
            )
        paths = [self.uploads.local_path(s) if self.uploads else os.fspath(s) for s in sources]
        self.check_budget(session, paths)
        self._holders[session.session_id] = session
        report = IngestReport()
        for path in paths:
            name = Path(path).name
            shared = session.image_from(path)
            if shared is not None:
                report.added.append(session.add_image(shared, name, source=path).key)
                continue
            try:
                ingested = ingest_image(path, limits=self.limits.shape)
            except ImageError as exc:
                report.problems.append(f"{name}: {exc}")
                continue
            report.added.append(session.add_image(ingested.image, name, source=path).key)
            report.notes += [f"{name}: {note}" for note in ingested.notes]
        return report

    def check_budget(self, session: Session, paths: Sequence[str]) -> None:
        """Refuse (from the headers alone) a message that would make the conversation too big."""
        images = len(session.images) + len(paths)
        if images > self.limits.max_images_per_request:
            raise UserError(
                f"The conversation would hold {images} images (its history included); the limit is "
                f"{self.limits.max_images_per_request}. Send fewer images, or start a new conversation."
            )
        pixels = session.pixels_held()
        for path in dict.fromkeys(paths):  # each file once
            if session.image_from(path) is not None:
                continue
            try:
                width, height = probe_image(path, self.limits.shape)
            except ImageError:
                continue  # reported by name when it is opened
            pixels += width * height
        if pixels > self.limits.max_request_pixels:
            raise UserError(
                f"The images of this conversation would add up to {pixels / 1e6:.0f} MP; the limit is "
                f"{self.limits.max_request_pixels / 1e6:.0f} MP. Send fewer or smaller images, "
                "or clear the conversation."
            )
        others = sum(held.pixels_held() for held in list(self._holders.values()) if held is not session)
        if others + pixels > self.limits.max_server_pixels:
            raise UserError(
                "The server is holding as many images as it can for other conversations right now. "
                "Try again in a few minutes, or with fewer or smaller images."
            )

    def rollback(self, session: Session, keys: Sequence[str]) -> None:
        """Forget images added by a request that was then refused (the session is as before)."""
        for key in keys:
            session.images.pop(key, None)
            if key in session.pending_images:
                session.pending_images.remove(key)
        if session.active_image not in session.images:
            session.active_image = session.latest_image_key() or next(reversed(session.images), None)

    def session_dir(self, session: Session) -> Path:
        """The session's folder; an ended session's is gone for good (a reply still streaming may ask)."""
        if session.closed:
            raise SessionEnded("This conversation has ended; start a new one.")
        return self.storage.session_dir(session.session_id)

    def view_url(self, session: Session, entry: SessionImage) -> str:
        """Where the page fetches ``entry``'s browser-sized copy (written once; boxes are drawn by the browser)."""
        return served.file_url(self.view_paths(session, [entry])[entry.key])

    def view_paths(self, session: Session, entries: Sequence[SessionImage] | None = None) -> dict[str, str]:
        """Browser-sized copies (of all the session's images by default), for the chat's thumbnails."""
        if session.closed:
            raise SessionEnded("This conversation has ended; start a new one.")
        folder = served.views_folder(session.session_id)
        chosen = session.images.values() if entries is None else entries
        return {entry.key: served.view_file(entry, folder) for entry in chosen}

    def forget(self, session: Session) -> None:
        """The session ended (tab closed, expired, cleared): stop its reply, delete its files, free its images.

        A reply still streaming sees ``session.closed`` and ends without writing anything back.
        """
        session.closed = True
        self._holders.pop(session.session_id, None)
        session.cancel_event.set()
        self.storage.discard_session(session.session_id)
        served.discard_views(session.session_id)
        session.images.clear()
        session.pending_images.clear()

    # -- asking ------------------------------------------------------------------------------
    def check_turns(self, session: Session) -> None:
        """Every turn is drawn and listed on each update: a conversation has a length limit."""
        if len(session.turns) >= self.limits.max_turns:
            raise UserError(
                f"This conversation has {len(session.turns)} turns, the most it may have. "
                "Export what you need, then Clear to start a new one."
            )

    def begin(self, session: Session, text: str, mode: Mode | str) -> Turn:
        """Validate and open a new turn (raises :class:`UserError` with the session untouched)."""
        self.check_turns(session)
        text = (text or "").strip()
        if not text:
            raise UserError("Type a question (or, in Find mode, what to look for).")
        if len(text) > self.limits.max_prompt_chars:
            raise UserError(
                f"The message is {len(text):,} characters; please keep it under {self.limits.max_prompt_chars:,}."
            )
        refuse_reserved_tokens(text)
        if len(session.pending_images) > self.limits.max_images_per_turn:
            raise UserError(
                f"{len(session.pending_images)} images in one turn; the limit is {self.limits.max_images_per_turn}."
            )
        mode = Mode(mode)
        if mode is not Mode.ASK and session.image_count_after_send() == 0:
            raise UserError("Grounding needs an image: upload one first.")
        return session.start_turn(text, build_prompt(mode, text), mode)

    def accept(
        self, session: Session, text: str, sources: Sequence[str | os.PathLike[str]], mode: Mode | str
    ) -> tuple[Turn, list[str]]:
        """Take a message with its images as one unit: all of it, or nothing (and a clear reason).

        Returns the new turn and notes worth showing (e.g. "animated image: first frame").
        """
        report = self.ingest(session, sources)
        if report.problems:
            self.rollback(session, report.added)
            raise UserError("Could not use " + "; ".join(report.problems))
        try:
            return self.begin(session, text, mode), report.notes
        except UserError:
            self.rollback(session, report.added)
            raise

    def fit_context(self, session: Session, settings: GenerationSettings) -> list[str]:
        """Drop the oldest turns until prompt + reply fit the context; returns notices.

        When even the new turn alone does not fit, nothing is dropped: the conversation is put back
        as it was and the new turn, with the images it brought, is taken out.
        """
        budget = self.backend.info.context_length - settings.max_new_tokens
        before = (list(session.turns), dict(session.images), session.active_image, session.selected)
        dropped = 0
        while self.backend.count_tokens(session.messages()) > budget and len(session.turns) > 1:
            session.drop_oldest_turn()
            dropped += 1
        if self.backend.count_tokens(session.messages()) > budget:
            session.turns, session.images, session.active_image, session.selected = before
            turn = session.turns.pop()
            self.rollback(session, turn.image_keys)
            raise UserError(
                "This message and its images do not fit the model's context. "
                "Use fewer images, a shorter message, or lower 'max new tokens'."
            )
        if dropped:
            return ["The conversation was longer than the model's 4,096-token context; the oldest turn was dropped."]
        return []

    def run_turn(
        self, session: Session, turn: Turn, settings: GenerationSettings, *, pace: tuple[float, float] | None = None
    ) -> Iterator[Update]:
        """Stream the reply for ``turn``; boxes are parsed as each ``<|/det|>`` arrives.

        ``pace``: (seconds between updates, between updates that close a box) — text arriving
        sooner is joined into the next update (``streaming.coalesced``); None: one per delta.
        """
        settings = settings.with_max(self.limits.clamp_new_tokens(settings.max_new_tokens))
        try:
            notices = tuple(self.fit_context(session, settings))
            handle = self.backend.stream(session.messages(), settings, cancel_event=session.cancel_event)
        except BackendError as exc:  # e.g. the model failed to load: say so, keep the session
            turn.error = str(exc)
            yield Update(turn, boxes_changed=False, done=True)
            return
        if session.image_count_after_send() >= 3 and TILING_OFF_NOTICE not in session.notices:
            session.notices.append(TILING_OFF_NOTICE)
            notices += (TILING_OFF_NOTICE,)
        text = ""
        seen_boxes = 0
        # Incremental: each token costs the new text only, not a re-parse of the whole reply.
        parser = session.reply_parser(turn)
        session.replying = True
        deltas = handle if pace is None else coalesced(handle, interval=pace[0], box_interval=pace[1])
        try:
            yield Update(turn, boxes_changed=False, done=False, notices=notices)
            for delta in deltas:
                text += delta
                turn.reply = text
                if parser is not None:
                    parser.feed(delta)
                    session.record_grounding(turn, parser.result, final=False)
                changed = len(turn.boxes) != seen_boxes
                seen_boxes = len(turn.boxes)
                yield Update(turn, boxes_changed=changed, done=False)
        except BackendError as exc:
            turn.error = str(exc)
        except Exception:  # a backend bug must not take the server down; its details are for the log
            log.exception("the model backend failed")
            turn.error = "The model backend failed on this request (details are in the server's log)."
        finally:
            # Only the user's Stop sets this event while the reply runs; closing the handle (below)
            # ends a generation that is still going, e.g. when the browser went away.
            turn.stopped = session.cancel_event.is_set() and not turn.error
            if deltas is handle:
                handle.close()
            else:  # cancels a reply still running; the reading thread closes the handle
                deltas.close()
            session.replying = False
        turn.reply = text
        if parser is not None:
            session.record_grounding(turn, parser.finish(), final=True)
        yield Update(turn, boxes_changed=True, done=True)

    def stop(self, session: Session) -> None:
        session.cancel_event.set()

    def retry_turn(self, session: Session) -> Turn | None:
        """Re-open the last turn with the same words, images and mode."""
        last = session.undo_turn()
        if last is None:
            return None
        return session.start_turn(last.user_text, last.prompt, last.mode)

    # -- click-to-ground -----------------------------------------------------------------------
    def place_pin(self, session: Session, key: str, point: tuple[float, float]) -> None:
        session.add_pin(key, point)
        session.active_image = key

    def identify_click(self, session: Session, key: str, point: tuple[float, float]) -> ClickResult:
        """Name and box for the object under ``point`` (original pixels); adds a turn and the box."""
        cached = session.click_cache.get(key, [])
        result = identify(self.backend, session.images[key].image, point[0], point[1], cached)
        session.remember_boxes(key, list(result.found))
        pins = session.pins.get(key, [])
        if point in pins:
            pins.remove(point)  # add_click_turn records the pin with its turn
        last = session.turns[-1] if session.turns else None
        again = last is not None and last.kind == "click" and last.boxes and last.boxes[0].xyxy == result.box.xyxy
        if result.from_cache and again:
            session.selected = (len(session.turns) - 1, 0)  # the same object again: no new turn
            return result
        self.check_turns(session)
        session.add_click_turn(key, point, result.label, result.box, result.raw_text)
        return result

    # -- exports -------------------------------------------------------------------------------
    def export_dir(self, session: Session) -> Path:
        return self.session_dir(session) / "exports"

    def export_json(self, session: Session) -> str:
        return write_json(session_document(session, self.backend.info), self.export_dir(session) / "grounding.json")

    def export_coco(self, session: Session) -> str:
        coco = coco_from_document(session_document(session, self.backend.info))
        return write_json(coco, self.export_dir(session) / "grounding_coco.json")

    def export_png(self, session: Session) -> str:
        key = session.active_image
        if key is None:
            raise UserError("Upload an image first.")
        stem = Path(session.images[key].name).stem or key
        return write_annotated_png(session, key, self.export_dir(session) / f"{stem}_annotated.png")
