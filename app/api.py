"""Typed, UI-less endpoints (``gr.api``): one call in, JSON out. Listed on the "Use via API" page.

The page documents itself from each endpoint's signature and docstring: types come from the type
hints (the TypedDicts below), and every parameter's one-line description, with its range, from the
docstring's ``Parameters:`` section. Ranges are written as ``${name}`` placeholders filled from the
server's :class:`~app.limits.Limits` at start-up, so the page states the limits this server enforces.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from string import Template
from typing import Any, Literal, NotRequired, TypedDict, TypeVar, cast

import gradio as gr
from gradio.components.api_component import Api
from gradio.context import get_blocks_context
from gradio.processing_utils import save_bytes_to_cache
from gradio.utils import get_function_description, get_upload_folder

from model.generation import GenerationSettings
from model.grounding import strip_grounding_tags

from . import params
from .click import box_from_pixels
from .controller import Controller, refuse_reserved_tokens
from .errors import UserError
from .exports import annotated_png, box_records, coco_from_document, session_document
from .label.formats import coco as coco_dataset
from .label.job import label_all, plain_phrase
from .label.sources import Item, image_loader, unique_names
from .limits import Limits
from .modes import Mode
from .session import Session
from .zerogpu import gpu

GROUNDING_SETTINGS = GenerationSettings(temperature=0.0, repetition_penalty=1.0)
F = TypeVar("F", bound=Callable)

# The page's JSON shapes. Only the type hints reach the API page, so these spell out every field;
# they live at module level because Gradio resolves the (string) annotations in this module's globals.
ModeName = Literal["Ask", "Find", "Grounded answer"]  # Mode's values (tests/test_api_docs.py keeps them equal)


class HistoryTurn(TypedDict):
    role: Literal["user", "assistant"]
    content: str
    images: NotRequired[list[gr.FileData]]  # user turns only


class LabelledBox(TypedDict):
    label: NotRequired[str]
    xyxy: list[float]  # [x1, y1, x2, y2] in pixels


class BoxRecord(TypedDict):
    id: int
    label: str
    image_index: int | None
    xyxy: list[float]  # pixels on the image as seen (after EXIF orientation)
    norm999: list[int]  # the model's 0–999 grid


class RejectedSpan(TypedDict):
    text: str
    reason: str
    span: list[int]


class ChatUpdate(TypedDict):
    text: str
    raw: str
    boxes: list[BoxRecord]
    rejected: list[RejectedSpan]
    done: bool
    error: str | None


class ModelInfo(TypedDict):
    id: str
    precision: str
    device: str


class DocumentImage(TypedDict):
    index: int
    name: str
    width: int
    height: int


class DocumentTurn(TypedDict):
    index: int
    kind: str
    mode: str
    prompt: str
    user_text: str
    raw_text: str
    image_index: int | None
    boxes: list[BoxRecord]
    rejected: list[RejectedSpan]


class StudioDocument(TypedDict):
    schema: str
    model: ModelInfo
    images: list[DocumentImage]
    turns: list[DocumentTurn]


class DocumentImageIn(TypedDict):
    name: str
    width: int
    height: int


class DocumentBoxIn(TypedDict):
    label: str
    image_index: int | None
    xyxy: list[float]


class DocumentTurnIn(TypedDict):
    boxes: list[DocumentBoxIn]


class DocumentIn(TypedDict):
    """What /to_coco reads of a studio document (/ground's ``document`` has these fields and more)."""

    images: list[DocumentImageIn]
    turns: list[DocumentTurnIn]


class GroundResult(TypedDict):
    boxes: list[BoxRecord]
    raw_text: str
    document: StudioDocument


class ClickBox(TypedDict):
    xyxy: list[float]
    norm999: list[int]


class IdentifyResult(TypedDict):
    label: str
    box: ClickBox
    contains_point: bool
    notice: str | None
    raw_text: str


class CocoInfo(TypedDict):
    description: str
    version: str


class CocoImage(TypedDict):
    id: int
    file_name: str
    width: int
    height: int


class CocoAnnotation(TypedDict):
    id: int
    image_id: int
    category_id: int
    bbox: list[float]  # [x, y, width, height] in pixels
    area: float
    iscrowd: int


class CocoCategory(TypedDict):
    id: int
    name: str
    supercategory: str


class CocoDetections(TypedDict):
    info: CocoInfo
    images: list[CocoImage]
    annotations: list[CocoAnnotation]
    categories: list[CocoCategory]


class LabelBoxRecord(TypedDict):
    label: str  # the phrase
    xyxy: list[float]  # pixels of the image as seen (EXIF applied)
    norm999: list[int]


class PhraseRecord(TypedDict):
    phrase: str
    raw_text: str
    boxes: list[LabelBoxRecord]


class LabelRecord(TypedDict):
    key: str
    name: str
    status: Literal["done", "skipped"]
    width: NotRequired[int]
    height: NotRequired[int]
    reason: NotRequired[str]
    results: list[PhraseRecord]


class LabelResult(TypedDict):
    coco: CocoDetections
    records: list[LabelRecord]


def user_errors(fn: F) -> F:
    """A :class:`UserError` raised by ``fn`` (or while its stream runs) reaches the caller as ``gr.Error``."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserError as exc:
                raise gr.Error(str(exc)) from exc

        return streaming  # type: ignore[return-value]

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise gr.Error(str(exc)) from exc

    return plain  # type: ignore[return-value]


def doc_values(limits: Limits) -> dict[str, str]:
    """What the docstrings' ``${name}`` placeholders stand for: every limit, and app/params.py's fixed ranges."""
    values = {f.name: f"{getattr(limits, f.name):,}" for f in dataclasses.fields(limits)}
    return values | {
        "temperature_min": f"{params.TEMPERATURE_MIN_SAMPLING:g}",
        "temperature_max": f"{params.TEMPERATURE_MAX:g}",
        "pixel_limit": f"{params.PIXEL_LIMIT:,.0f}",
        "modes": ", ".join(f'"{m.value}"' for m in Mode),
        "an_image": (
            "an image file uploaded to /gradio_api/upload, sent as FileData (handle_file() in gradio_client); "
            f"at most {limits.max_upload_mb:,} MB, {limits.max_pixels:,} pixels and {limits.max_side:,} px a side, "
            f"no more elongated than 1:{limits.max_aspect:,}"
        ),
    }


SECTIONS = ("Parameters:", "Args:", "Arguments:", "Returns:")


def one_line_entries(doc: str) -> str:
    """``doc`` (Google style) with each ``name: text`` entry's continuation lines joined onto it.

    Gradio reads a parameter's description from its first line only; the source keeps the lines short.
    """
    out: list[str] = []
    in_section, entry_indent = False, None
    for line in inspect.cleandoc(doc).splitlines():
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if stripped.startswith(SECTIONS):
            in_section, entry_indent = True, None
        elif in_section and stripped:
            if entry_indent is None:
                entry_indent = indent  # the section's first entry sets the entries' indentation
            elif indent > entry_indent:
                out[-1] += " " + stripped
                continue
        out.append(line)
    return "\n".join(out)


def typed_signature(fn: Callable) -> inspect.Signature:
    """``fn``'s signature with its annotations resolved, and a generator's return as the type it yields.

    ``gr.api`` reads the return annotation as written, which under ``from __future__ import
    annotations`` is a string it cannot type, and it does not look inside ``Iterator[...]`` for the
    type of a stream's items: either way the page would say ``Any``.
    """
    hints = typing.get_type_hints(fn)
    signature = inspect.signature(fn)
    returns = hints.get("return", inspect.Signature.empty)
    if typing.get_origin(returns) in (collections.abc.Iterator, collections.abc.Generator):
        returns = typing.get_args(returns)[0]
    return signature.replace(
        parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()],
        return_annotation=returns,
    )


def describe_components(dependency: Any, parameters: dict[str, str], returns: str) -> None:
    """Name and describe the ``gr.Api`` components that ``gr.api`` made for an endpoint.

    ``gr.api`` labels them "1st", "2nd", … and leaves their descriptions empty; the API page shows a
    parameter's label and ``additional_description`` (where Gradio's own components put theirs) and a
    return value's label and ``description``. ``description`` also goes on the parameters, for readers
    of the plain JSON schema (the OpenAPI route drops ``additional_description``).
    """
    context = get_blocks_context()
    if context is None:
        raise RuntimeError("describe_components must run inside the gr.Blocks that holds the endpoint")
    block_fn = context.fns[dependency["id"]]

    def describe(component: Any, name: str, text: str, schema_key: str) -> None:
        if not isinstance(component, Api):
            raise TypeError(f"expected gr.api's Api component, got {component!r}")
        component.label = name
        component._api_info = {**component._api_info, "description": text, schema_key: text}

    for component, (name, text) in zip(block_fn.inputs, parameters.items(), strict=True):
        describe(component, name, text, "additional_description")
    return_name, _, return_text = returns.partition(": ")
    for component in block_fn.outputs:
        describe(component, return_name, return_text, "description")


def publish(fn: Callable, api_name: str, values: dict[str, str], *, model: bool) -> None:
    """Register ``fn`` as ``/api_name``, its docstring filled in from ``values`` and checked complete.

    ``model``: the endpoint runs the model, so it shares the UI's single model lane (and gets a GPU
    on ZeroGPU).
    """
    fn.__doc__ = Template(one_line_entries(fn.__doc__ or "")).substitute(values)
    _, parameters, return_lines = get_function_description(fn)
    returns = " ".join(return_lines)
    undescribed = [name for name, text in parameters.items() if not text]
    if undescribed or ": " not in returns:
        # The page would show an empty description: refuse to start rather than publish it.
        raise ValueError(f"/{api_name}'s docstring must describe {undescribed or 'its return value (name: text)'}")
    handler = user_errors(fn)
    if model:
        handler = gpu(handler)
    handler.__signature__ = typed_signature(fn)  # type: ignore[attr-defined]
    lane: dict[str, Any] = {"concurrency_id": "model", "concurrency_limit": 1} if model else {}
    dependency = gr.api(handler, api_name=api_name, **lane)
    describe_components(dependency, parameters, returns)


def register_api(controller: Controller) -> None:
    """Call inside a ``gr.Blocks`` context."""
    limits = controller.limits
    uploads = controller.uploads
    if uploads is None:
        raise ValueError("the API needs an upload guard (Controller(uploads=...))")

    def new_tokens(value: Any) -> int:
        return params.integer("max_new_tokens", value, 1, limits.max_new_tokens)

    # Docstrings: the first paragraph describes the endpoint; then one line per parameter (its range
    # included) and one "name: text" for the return value. ${...} are filled in by publish().

    def chat(
        message: str,
        images: list[gr.FileData] | None = None,
        history: list[HistoryTurn] | None = None,
        mode: ModeName = "Ask",
        max_new_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Iterator[ChatUpdate]:
        """Stream a reply about images, with boxes as they arrive.

        Parameters:
            message: the question (Find mode: what to look for); not blank, at most ${max_prompt_chars} characters.
            images: this turn's images, 0 to ${max_images_per_turn}; each ${an_image}.
            history: earlier turns, oldest first, at most ${max_history_items}; role "user" or "assistant", content
                up to ${max_prompt_chars} characters, images (user turns only) up to ${max_images_per_turn} FileData
                from /gradio_api/upload as for images; with this turn's, at most ${max_images_per_request} images
                and ${max_request_pixels} pixels per request.
            mode: one of ${modes}.
            max_new_tokens: the reply's length cap in tokens, a whole number from 1 to ${max_new_tokens}.
            temperature: 0 for greedy decoding, else from ${temperature_min} to ${temperature_max} (sampling).
        Returns:
            update: the reply so far, streamed (the last has done=true); text without grounding tags, raw as the
                model wrote it, boxes with xyxy in pixels of the image as seen (EXIF orientation applied) and norm999 on
                the model's 0–999 grid; error is set if the reply failed.
        """
        # Everything is checked before anything is decoded: types, ranges, the request's size.
        text = params.text("message", message, limits.max_prompt_chars)
        chosen_mode = params.mode(mode)
        settings = GenerationSettings(
            max_new_tokens=new_tokens(max_new_tokens), temperature=params.temperature(temperature)
        )
        earlier = params.history(
            history,
            max_items=limits.max_history_items,
            max_chars=limits.max_prompt_chars,
            max_images=limits.max_images_per_turn,
        )
        files = params.items("images", images, limits.max_images_per_turn)
        paths = [[uploads.api_file(f) for f in item.images] for item in earlier]
        current = [uploads.api_file(f) for f in files]
        session = Session()
        controller.check_budget(session, [p for item_paths in paths for p in item_paths] + current)
        for index, (item, item_paths) in enumerate(zip(earlier, paths, strict=True)):
            try:
                if item.role == "user":
                    controller.accept(session, item.content, item_paths, Mode.ASK)
                else:
                    refuse_reserved_tokens(item.content, "the reply")
                    if session.turns:
                        session.update_reply(session.turns[-1], item.content, final=True)
            except UserError as exc:
                raise UserError(f"history[{index}]: {exc}") from exc
        turn, _notes = controller.accept(session, text, current, chosen_mode)
        first_id = 1 + sum(len(t.boxes) for t in session.turns[:-1])  # ids continue the history's
        for update in controller.run_turn(session, turn, settings):
            yield {
                "text": strip_grounding_tags(update.turn.reply),
                "raw": update.turn.reply,
                "boxes": box_records(session, update.turn, first_id),
                "rejected": [r.to_dict() for r in update.turn.rejected],
                "done": update.done,
                "error": update.turn.error,
            }

    def _one_image(image: Any) -> Session:
        session = Session()
        report = controller.ingest(session, [uploads.api_file(image)])
        if report.problems:
            raise UserError("Could not use " + "; ".join(report.problems))
        return session

    def ground(image: gr.FileData, phrase: str, max_new_tokens: int = 512) -> GroundResult:
        """Boxes for a phrase on one image (greedy decoding).

        Parameters:
            image: ${an_image}; EXIF orientation is applied, and coordinates refer to the image as seen.
            phrase: what to find, e.g. "the red car" or "find all apples"; at most ${max_prompt_chars} characters.
            max_new_tokens: the reply's length cap in tokens, a whole number from 1 to ${max_new_tokens}.
        Returns:
            result: the boxes (xyxy in pixels of the image as seen, x1 ≤ x2 and y1 ≤ y2; norm999 on the model's
                0–999 grid), the model's raw_text, and the studio JSON document (input to /to_coco).
        """
        phrase = params.text("phrase", phrase, limits.max_prompt_chars)
        settings = GROUNDING_SETTINGS.with_max(new_tokens(max_new_tokens))
        session = _one_image(image)
        turn = controller.begin(session, phrase, Mode.FIND)
        for _update in controller.run_turn(session, turn, settings):
            pass
        if turn.error:
            raise UserError(turn.error)
        document = session_document(session, controller.backend.info)
        return {
            "boxes": document["turns"][0]["boxes"],
            "raw_text": turn.reply,
            "document": cast(StudioDocument, document),
        }

    def identify(image: gr.FileData, x: float, y: float) -> IdentifyResult:
        """Name and box of the object at pixel (x, y) — the API twin of clicking the image.

        Parameters:
            image: ${an_image}; coordinates refer to it after EXIF orientation is applied.
            x: pixel column from the left edge, 0 to ${max_side}.
            y: pixel row from the top edge, 0 to ${max_side}.
        Returns:
            result: the object's label and box (xyxy in pixels, norm999 on the model's 0–999 grid), whether the box
                contains the point, a notice when it does not (else null), and the model's raw_text.
        """
        point = (params.number("x", x, 0, limits.max_side), params.number("y", y, 0, limits.max_side))
        session = _one_image(image)
        result = controller.identify_click(session, "img1", point)
        return {
            "label": result.label,
            "box": {"xyxy": [round(v, 2) for v in result.box.xyxy], "norm999": list(result.box.norm999)},
            "contains_point": result.contains_point,
            "notice": result.notice,
            "raw_text": result.raw_text,
        }

    def to_coco(document: DocumentIn) -> CocoDetections:
        """Convert a studio JSON document (from /ground or the JSON export) to COCO detections.

        Parameters:
            document: /ground's document or the page's JSON export; at most ${max_boxes} images, turns and boxes,
                labels up to ${max_label_chars} characters, xyxy in pixels with x1 ≤ x2 and y1 ≤ y2 (each within
                ±${pixel_limit}).
        Returns:
            coco: COCO detection results: images, annotations (bbox is [x, y, width, height] in pixels) and
                categories (one per label); ids start at 1.
        """
        coco = coco_from_document(
            params.studio_document(document, max_boxes=limits.max_boxes, max_label_chars=limits.max_label_chars)
        )
        return cast(CocoDetections, coco)

    def annotate(image: gr.FileData, boxes: list[LabelledBox]) -> gr.FileData:
        """The image at full resolution with boxes drawn, as PNG.

        Parameters:
            image: ${an_image}; coordinates refer to it after EXIF orientation is applied.
            boxes: 0 to ${max_boxes} boxes (e.g. /ground's boxes); labels up to ${max_label_chars} characters, xyxy
                in pixels with x1 ≤ x2 and y1 ≤ y2 (each within ±${pixel_limit}).
        Returns:
            png: the annotated image, a PNG file (FileData) served from this server's cache.
        """
        wanted = params.labelled_boxes(boxes, max_boxes=limits.max_boxes, max_label_chars=limits.max_label_chars)
        session = _one_image(image)
        turn = session.start_turn("annotate", "annotate", Mode.FIND)
        width, height = session.images["img1"].size
        turn.boxes = [box_from_pixels(label, xyxy, width, height) for label, xyxy in wanted]
        # Straight into Gradio's upload cache, where it is served from and aged out (delete_cache):
        # the server keeps no file of its own for the call.
        path = save_bytes_to_cache(annotated_png(session, "img1", last_use=True), "annotated.png", get_upload_folder())
        return gr.FileData(path=path, mime_type="image/png")

    def label(images: list[gr.FileData], phrases: list[str], max_new_tokens: int = 512) -> LabelResult:
        """Box every phrase on every image (greedy; one Find per image and phrase, batched): a small dataset.

        Parameters:
            images: 1 to ${max_images_per_request} images, each ${an_image}; ${max_request_pixels} pixels in all.
            phrases: 1 to ${max_label_phrases} things to find (the categories, in this order), each up to
                ${max_label_chars} characters.
            max_new_tokens: each reply's length cap in tokens, a whole number from 1 to ${max_new_tokens}.
        Returns:
            dataset: coco is the COCO document of `python -m app.label --format coco` (one image per readable input,
                one category per phrase); records are its JSONL lines (one per input: status "done" with each phrase's
                raw_text and boxes, or "skipped" with the reason).
        """
        files = params.items("images", images, limits.max_images_per_request)
        wanted = params.items("phrases", phrases, limits.max_label_phrases)
        if not files or not wanted:
            raise UserError("Send at least one image and one phrase.")
        chosen = [params.text(f"phrases[{i}]", p, limits.max_label_chars).strip() for i, p in enumerate(wanted)]
        if not all(chosen):
            raise UserError('A phrase is blank: say what to find, e.g. "person".')
        try:
            chosen = [plain_phrase(p) for p in chosen]
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        settings = GROUNDING_SETTINGS.with_max(new_tokens(max_new_tokens))
        paths = [uploads.api_file(f) for f in files]
        controller.check_budget(Session(), paths)
        names = unique_names([Path(path).name for path in paths])  # two uploads may share a name
        items = [Item(name, name, image_loader(path, limits.shape)) for name, path in zip(names, paths, strict=True)]
        phrases_in_order = tuple(dict.fromkeys(chosen))
        records = label_all(controller.backend, items, phrases_in_order, settings) or []
        return {
            "coco": cast(CocoDetections, coco_dataset(records, phrases_in_order)),
            "records": [cast(LabelRecord, record.to_dict()) for record in records],
        }

    values = doc_values(limits)
    publish(chat, "chat", values, model=True)
    publish(ground, "ground", values, model=True)
    publish(identify, "identify", values, model=True)
    publish(label, "label", values, model=True)
    publish(to_coco, "to_coco", values, model=False)
    publish(annotate, "annotate", values, model=False)
