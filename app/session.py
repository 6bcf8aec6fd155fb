"""One user's conversation: images (canonical, at ingest), turns, raw replies and boxes.

Coordinate contract: every box keeps the model's 0–999 values and pixel ``xyxy`` on the image it
belongs to, as that image was canonicalised at upload (EXIF transposed, RGB). A grounded reply
refers to the most recent image of the conversation at that turn (the model localises in the last
image it was shown), so that is the image its boxes are drawn on.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field, replace
from typing import Literal

from PIL import Image

from model.grounding import Box, GroundingResult, Rejected, StreamingGroundingParser, parse_grounding
from model.processing import Message

from .modes import Mode
from .render import ColorBook, for_display

MAX_PINS = 32
MAX_EDITS = 100  # box edits Undo can take back (the session is pickled to the GPU process on each request)


@dataclass
class SessionImage:
    key: str
    name: str
    image: Image.Image
    turn: int
    source: str | None = None  # the file it was read from (a file sent again shares this image)
    served_path: str | None = None  # its browser-sized copy, once written for the page (app/served.py)

    _display: Image.Image | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def display(self) -> Image.Image:
        """The browser-sized copy, made once (a 12 MP downscale costs more than drawing 20 boxes)."""
        if self._display is None:
            self._display = for_display(self.image)
        return self._display


@dataclass
class Turn:
    user_text: str  # what the user typed
    prompt: str  # what the model was sent (mode applied)
    mode: Mode
    image_keys: list[str]
    reply: str = ""  # the model's raw text
    target_image: str | None = None  # which image the reply's boxes refer to
    boxes: list[Box] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    stopped: bool = False
    error: str | None = None
    kind: str = "chat"  # "chat", or "click" for click-to-ground results (kept out of the model's history)


@dataclass
class BoxEdit:
    """A rename or delete made in the box panel, kept so that Undo can take it back.

    The turn is held by reference, not by index: dropping the oldest turn shifts every index (and
    the controller puts a list of turns back when a message does not fit), so a stored index would
    come to name another turn's box. Pickling the session keeps these references shared with
    ``Session.turns``, since both are in the one pickle.
    """

    kind: Literal["rename", "delete"]
    turn: Turn  # the turn whose box was edited
    box_index: int  # where the box was in ``turn.boxes``
    box: Box  # the box as it was before the edit
    after: Turn | None  # the last turn when the edit was made: a turn added later is undone first
    label: str | None = None  # a rename's new label


@dataclass
class Session:
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    images: dict[str, SessionImage] = field(default_factory=dict)
    turns: list[Turn] = field(default_factory=list)
    pending_images: list[str] = field(default_factory=list)  # uploaded, not yet sent
    active_image: str | None = None
    colors: ColorBook = field(default_factory=ColorBook)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    notices: list[str] = field(default_factory=list)
    images_added: int = 0  # keys are never reused, even after old turns are dropped
    pins: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    click_cache: dict[str, list[Box]] = field(default_factory=dict)  # every box seen per image, for clicks
    hidden_labels: set[str] = field(default_factory=set)
    selected: tuple[int, int] | None = None  # (turn index, box index) highlighted in image and chat
    closed: bool = False  # ended (tab closed, expired, cleared): nothing more is shown or written
    replying: bool = False  # a reply is streaming into the last turn (in this process)
    edits: list[BoxEdit] = field(default_factory=list)  # box renames and deletes, oldest first, for Undo

    def __getstate__(self) -> dict:
        """Picklable (ZeroGPU sends state to and from a forked process): the cancel event and the
        reply in progress belong to the process they are in."""
        state = self.__dict__.copy()
        state.pop("cancel_event", None)
        state.pop("replying", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.cancel_event = threading.Event()
        self.replying = False

    # -- images ------------------------------------------------------------------------------
    def add_image(self, image: Image.Image, name: str, *, source: str | None = None) -> SessionImage:
        self.images_added += 1
        key = f"img{self.images_added}"
        entry = SessionImage(key=key, name=name, image=image, turn=len(self.turns), source=source)
        self.images[key] = entry
        self.pending_images.append(key)
        self.active_image = key
        return entry

    def image_from(self, source: str) -> Image.Image | None:
        """The decoded image of a file this conversation already holds, if any."""
        return next((e.image for e in self.images.values() if e.source == source), None)

    def pixels_held(self) -> int:
        """Decoded pixels this conversation keeps in memory (a shared image counted once)."""
        unique = {id(e.image): e.image for e in self.images.values()}
        return sum(image.width * image.height for image in unique.values())

    def image_count_after_send(self) -> int:
        return sum(len(t.image_keys) for t in self.turns) + len(self.pending_images)

    def latest_image_key(self) -> str | None:
        for turn in reversed(self.turns):
            if turn.image_keys:
                return turn.image_keys[-1]
        return None

    # -- turns -------------------------------------------------------------------------------
    def start_turn(self, user_text: str, prompt: str, mode: Mode) -> Turn:
        turn = Turn(user_text=user_text, prompt=prompt, mode=mode, image_keys=list(self.pending_images))
        self.pending_images = []
        self.turns.append(turn)
        turn.target_image = self.latest_image_key()
        if turn.target_image:
            self.active_image = turn.target_image
        self.cancel_event = threading.Event()
        return turn

    def messages(self) -> list[Message]:
        """The conversation for the model: user turns with their images, then finished replies.

        The last turn is the one being answered. Earlier turns that produced no text (an error,
        an immediate stop) are left out rather than shown to the model as empty answers.
        """
        out: list[Message] = []
        last = len(self.turns) - 1
        for index, turn in enumerate(self.turns):
            if turn.kind == "click" or (index < last and not turn.reply):
                continue
            out.append(Message("user", turn.prompt, [self.images[k].image for k in turn.image_keys]))
            if index < last:
                out.append(Message("assistant", turn.reply))
        return out

    def update_reply(self, turn: Turn, reply: str, *, final: bool) -> GroundingResult | None:
        """Set a whole reply at once (history, tests); streamed replies use :meth:`reply_parser`."""
        turn.reply = reply
        if turn.target_image is None:
            return None
        result = parse_grounding(reply, *self.images[turn.target_image].size, final=final)
        self.record_grounding(turn, result, final=final)
        return result

    def reply_parser(self, turn: Turn) -> StreamingGroundingParser | None:
        """An incremental parser for ``turn``'s reply (None when the turn has no image to draw on)."""
        if turn.target_image is None:
            return None
        return StreamingGroundingParser(*self.images[turn.target_image].size)

    def record_grounding(self, turn: Turn, result: GroundingResult, *, final: bool) -> None:
        turn.boxes, turn.rejected = result.boxes, result.rejected
        for box in turn.boxes:
            self.colors.color(box.label)
        if final:
            self.remember_boxes(turn.target_image, turn.boxes)

    def boxes_on(self, image_key: str, *, visible_only: bool = False) -> list[tuple[int, Box]]:
        """All boxes drawn on one image, with the turn they came from."""
        return [
            (i, box)
            for i, t in enumerate(self.turns)
            if t.target_image == image_key
            for box in t.boxes
            if not (visible_only and (box.label or "object") in self.hidden_labels)
        ]

    def numbered_boxes(self) -> list[tuple[int, int, int, Box]]:
        """Every box of the conversation as ``(number, turn index, box index, box)``; numbers start at 1."""
        rows = []
        for turn_index, turn in enumerate(self.turns):
            for box_index, box in enumerate(turn.boxes):
                rows.append((len(rows) + 1, turn_index, box_index, box))
        return rows

    def label_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _n, _t, _b, box in self.numbered_boxes():
            counts[box.label or "object"] = counts.get(box.label or "object", 0) + 1
        return counts

    def select_number(self, number: int) -> bool:
        for n, turn_index, box_index, _box in self.numbered_boxes():
            if n == number:
                self.selected = (turn_index, box_index)
                self.active_image = self.turns[turn_index].target_image or self.active_image
                return True
        return False

    def selected_box(self) -> Box | None:
        if self.selected is None:
            return None
        turn_index, box_index = self.selected
        if turn_index < len(self.turns) and box_index < len(self.turns[turn_index].boxes):
            return self.turns[turn_index].boxes[box_index]
        self.selected = None
        return None

    def rename_selected(self, label: str) -> Box | None:
        box = self.selected_box()
        label = label.strip()
        if box is None or not label:
            return None
        turn_index, box_index = self.selected
        self.colors.color(label)
        if label == box.label:
            return box  # nothing changed, so nothing for Undo to spend a click on
        renamed = replace(box, label=label)
        self.turns[turn_index].boxes[box_index] = renamed
        self.record_edit(BoxEdit("rename", self.turns[turn_index], box_index, box, self.turns[-1], label))
        return renamed

    def delete_selected(self) -> Box | None:
        box = self.selected_box()
        if box is None:
            return None
        turn_index, box_index = self.selected
        del self.turns[turn_index].boxes[box_index]
        self.selected = None
        self.record_edit(BoxEdit("delete", self.turns[turn_index], box_index, box, self.turns[-1]))
        return box

    def record_edit(self, edit: BoxEdit) -> None:
        self.edits.append(edit)
        del self.edits[:-MAX_EDITS]

    def index_of(self, turn: Turn | None) -> int | None:
        """Where ``turn`` is in the conversation now (by identity: equal turns may repeat)."""
        return next((i for i, t in enumerate(self.turns) if t is turn), None)

    def edit_applies(self, edit: BoxEdit, turn_index: int) -> bool:
        """Whether the boxes still look as ``edit`` left them; a reply re-parsed while it streams
        replaces its turn's boxes, and reverting onto those would change a box the edit never touched."""
        boxes = self.turns[turn_index].boxes
        if edit.kind == "rename":
            return edit.box_index < len(boxes) and boxes[edit.box_index] == replace(edit.box, label=edit.label)
        # A box's span makes it unique within its turn, so finding it there means it came back another way.
        return edit.box_index <= len(boxes) and edit.box not in boxes

    def revert_edit(self, edit: BoxEdit, turn_index: int) -> None:
        boxes = self.turns[turn_index].boxes
        if edit.kind == "rename":
            boxes[edit.box_index] = edit.box
        else:
            boxes.insert(edit.box_index, edit.box)
        self.colors.color(edit.box.label)  # the colour it had: a ColorBook never forgets a label
        # Selected, so the user sees what came back (and on which image).
        self.selected = (turn_index, edit.box_index)
        self.active_image = self.turns[turn_index].target_image or self.active_image

    def remember_boxes(self, image_key: str, boxes: list[Box]) -> None:
        cache = self.click_cache.setdefault(image_key, [])
        cache.extend(b for b in boxes if b not in cache)

    def add_click_turn(self, image_key: str, point: tuple[float, float], label: str, box: Box, raw: str) -> Turn:
        x1, y1, x2, y2 = box.norm999
        turn = Turn(
            user_text=f"Clicked ({point[0]:.0f}, {point[1]:.0f}) on {self.images[image_key].name}: what is this?",
            prompt=f"<|ref|>{label}<|/ref|>.",
            mode=Mode.FIND,
            image_keys=[],
            reply=f"<|ref|>{label}<|/ref|><|det|>[[{x1}, {y1}, {x2}, {y2}]]<|/det|>",
            target_image=image_key,
            boxes=[replace(box, label=label, ref_index=0)],
            kind="click",
        )
        self.turns.append(turn)
        self.add_pin(image_key, point)
        self.active_image = image_key
        self.colors.color(label)
        self.selected = (len(self.turns) - 1, 0)
        return turn

    def add_pin(self, image_key: str, point: tuple[float, float]) -> None:
        """Mark a click; an image keeps its latest :data:`MAX_PINS` (each is drawn on every view)."""
        pins = self.pins.setdefault(image_key, [])
        pins.append(point)
        del pins[:-MAX_PINS]

    def drop_oldest_turn(self) -> Turn:
        """Forget the oldest turn (and images only it used) to fit the context."""
        turn = self.turns.pop(0)
        self.selected = None
        # Later edits hold their turn by reference, so the shift in indices does not misdirect them.
        self.edits = [e for e in self.edits if e.turn is not turn]
        for key in turn.image_keys:
            self.images.pop(key, None)
        if self.active_image not in self.images:
            self.active_image = self.latest_image_key() or next(iter(self.images), None)
        return turn

    def keep_only(self, image_key: str) -> None:
        """Start over with one image (the ≥3-image notice offers this)."""
        entry = self.images[image_key]
        self.images = {image_key: entry}
        self.turns = []
        self.edits = []  # every edit was of a turn that is gone
        self.pending_images = [image_key]
        self.active_image = image_key

    def undo_turn(self) -> Turn | None:
        """Take back the last turn (Retry re-asks it), whatever box edits came after it."""
        if not self.turns:
            return None
        turn = self.turns.pop()
        self.selected = None
        # Its images become pending again so the user can re-ask with them.
        self.pending_images = [*turn.image_keys, *self.pending_images]
        # Edits of its boxes have nothing left to revert; edits made after it to older boxes still
        # stand, and now come after the new last turn (so a turn asked again is undone before them).
        self.edits = [e for e in self.edits if e.turn is not turn]
        last = self.turns[-1] if self.turns else None
        for edit in self.edits:
            if edit.after is turn:
                edit.after = last
        return turn

    def undo(self) -> BoxEdit | Turn | None:
        """Take back the latest action: a box edit made since the last turn (the box comes back,
        selected), else the last turn as :meth:`undo_turn` does; None when there is nothing to undo."""
        while self.edits:
            edit = self.edits[-1]
            turn_index = self.index_of(edit.turn)
            if turn_index is None or not self.edit_applies(edit, turn_index):
                self.edits.pop()  # stale: nothing it could safely put back
                continue
            if edit.after is not self.turns[-1] and self.index_of(edit.after) is not None:
                break  # a turn was added after this edit, and is undone first
            self.edits.pop()
            self.revert_edit(edit, turn_index)
            return edit
        return self.undo_turn()
