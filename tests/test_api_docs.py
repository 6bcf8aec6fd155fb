"""The "Use via API" page documents itself: names, types, ranges and descriptions for every endpoint.

The page and ``gradio_client.Client.view_api`` are rendered from ``/gradio_api/info``; these tests
read that (from the Python object and over HTTP) for every named endpoint rather than a chosen one.
"""

from __future__ import annotations

import re
from typing import Any, get_args

import gradio as gr
import httpx
import pytest
from gradio_client import Client

from app.api import ModeName, one_line_entries, publish
from app.backends.scripted import ScriptedBackend
from app.limits import Limits
from app.modes import Mode
from app.params import TEMPERATURE_MAX, TEMPERATURE_MIN_SAMPLING
from app.ui import build_demo

from .app_support import running_app

PUBLIC = {"/chat", "/ground", "/identify", "/label", "/to_coco", "/annotate"}
# gr.api's default labels ("1st", "2nd", …) and Gradio's fallbacks say nothing about a parameter.
ORDINAL = re.compile(r"^\d+(st|nd|rd|th)$|^(parameter|value)_\d+$")
# Numbers no default limit uses, so a description that shows one read it from this server's Limits.
ODD_LIMITS = Limits(
    max_upload_mb=7,
    max_pixels=5_000_001,
    max_side=4321,
    max_images_per_turn=3,
    max_images_per_request=11,
    max_request_pixels=50_000_003,
    max_history_items=9,
    max_prompt_chars=1234,
    max_new_tokens=777,
    max_boxes=55,
    max_label_chars=66,
    max_label_phrases=5,
)


@pytest.fixture(scope="module")
def odd_info(tmp_path_factory) -> dict[str, Any]:
    demo = build_demo(ScriptedBackend("ok"), image_dir=tmp_path_factory.mktemp("images"), limits=ODD_LIMITS)
    return demo.get_api_info()


def schema_types(schema: Any) -> set[str]:
    """Every JSON-schema ``type`` in ``schema`` (an untyped part counts as ``"any"``)."""
    if not isinstance(schema, dict):
        return set()
    if schema.get("properties", {}).keys() >= {"path", "meta"}:
        return {"file"}
    found = {schema["type"]} if "type" in schema else set()
    if "enum" in schema or "const" in schema:
        found.add("enum")
    for key in ("items", "additionalProperties"):
        found |= schema_types(schema.get(key))
    for part in [*schema.get("oneOf", []), *schema.get("anyOf", []), *schema.get("properties", {}).values()]:
        found |= schema_types(part)
    if not found:
        found.add("any")
    return found


def assert_documented(info: dict[str, Any]) -> None:
    """Every named endpoint: a description, named and typed parameters with one-line descriptions, typed returns."""
    assert set(info["named_endpoints"]) == PUBLIC
    assert info["unnamed_endpoints"] == {}
    for name, endpoint in info["named_endpoints"].items():
        assert endpoint["description"], name
        for where, entries in (("parameter", endpoint["parameters"]), ("return", endpoint["returns"])):
            assert entries, f"{name} lists no {where}s"
            for entry in entries:
                what = f"{name} {where} {entry['label']!r}"
                assert not ORDINAL.match(entry["label"]), what
                python_type = entry["python_type"]["type"]
                assert "Any" not in python_type, f"{what}: {python_type}"
                assert "any" not in schema_types(entry["type"]), f"{what}: {entry['type']}"
                description = entry["python_type"]["description"]
                assert description and "\n" not in description, what
                assert "${" not in description, f"{what}: an unfilled placeholder in {description!r}"
        for parameter in endpoint["parameters"]:
            what = f"{name}({parameter['parameter_name']})"
            assert parameter["label"] == parameter["parameter_name"], what
            description = parameter["python_type"]["description"]
            types = schema_types(parameter["type"])
            if types & {"integer", "number", "string", "array"}:  # counts, lengths or bounds
                assert re.search(r"\d", description), f"{what} has a range but states none: {description!r}"
            if "file" in types:
                assert "/gradio_api/upload" in description and "FileData" in description, what
            if "enum" in types and parameter["type"].get("enum"):
                assert all(f'"{value}"' in description for value in parameter["type"]["enum"]), what


def test_every_endpoint_is_named_typed_and_described(odd_info):
    assert_documented(odd_info)


def test_the_documented_ranges_are_the_servers_limits(odd_info):
    """The numbers on the page come from this server's Limits and app/params.py, not from a copy."""

    def described(endpoint: str, parameter: str) -> str:
        (entry,) = [p for p in odd_info["named_endpoints"][endpoint]["parameters"] if p["parameter_name"] == parameter]
        return entry["python_type"]["description"]

    expected = {
        ("/chat", "message"): ["1,234"],
        ("/chat", "images"): ["0 to 3", "7 MB", "5,000,001 pixels", "4,321 px"],
        ("/chat", "history"): ["at most 9", "1,234 characters", "11 images", "50,000,003 pixels"],
        ("/chat", "mode"): [f'"{m.value}"' for m in Mode],
        ("/chat", "max_new_tokens"): ["from 1 to 777"],
        ("/chat", "temperature"): ["0 ", f"{TEMPERATURE_MIN_SAMPLING:g} to {TEMPERATURE_MAX:g}"],
        ("/ground", "image"): ["7 MB", "4,321 px"],
        ("/ground", "phrase"): ["1,234 characters"],
        ("/ground", "max_new_tokens"): ["from 1 to 777"],
        ("/identify", "x"): ["0 to 4,321"],
        ("/identify", "y"): ["0 to 4,321"],
        ("/label", "images"): ["1 to 11", "7 MB", "50,000,003 pixels"],
        ("/label", "phrases"): ["1 to 5", "66 characters"],
        ("/label", "max_new_tokens"): ["from 1 to 777"],
        ("/to_coco", "document"): ["55", "66 characters", "x1 ≤ x2", "1,000,000"],
        ("/annotate", "boxes"): ["0 to 55", "66 characters", "x1 ≤ x2", "1,000,000"],
    }
    for (endpoint, parameter), pieces in expected.items():
        text = described(endpoint, parameter)
        missing = [piece for piece in pieces if piece not in text]
        assert not missing, f"{endpoint}({parameter}) lacks {missing}: {text!r}"


def test_types_are_the_endpoints_json_shapes(odd_info):
    endpoints = odd_info["named_endpoints"]

    def parameter(endpoint: str, name: str) -> dict[str, Any]:
        return next(p for p in endpoints[endpoint]["parameters"] if p["parameter_name"] == name)

    # The Literal on the page is the app's Mode: a new mode cannot be left off the API's type.
    assert list(get_args(ModeName)) == [m.value for m in Mode]
    assert parameter("/chat", "mode")["type"]["enum"] == [m.value for m in Mode]
    assert parameter("/chat", "images")["python_type"]["type"] == "None | list[filepath]"
    assert parameter("/ground", "image")["python_type"]["type"] == "filepath"
    assert parameter("/chat", "max_new_tokens")["type"]["type"] == "integer"
    assert parameter("/identify", "x")["type"]["type"] == "number"
    history = parameter("/chat", "history")["python_type"]["type"]
    assert "role: Literal['user', 'assistant']" in history and "images: list[filepath]" in history
    (update,) = endpoints["/chat"]["returns"]  # the type of each streamed item, not the generator's
    assert set(update["type"]["properties"]) == {"text", "raw", "boxes", "rejected", "done", "error"}
    (ground,) = endpoints["/ground"]["returns"]
    assert set(ground["type"]["properties"]) == {"boxes", "raw_text", "document"}
    box = ground["type"]["properties"]["boxes"]["items"]["properties"]
    assert set(box) == {"id", "label", "image_index", "xyxy", "norm999"}
    (dataset,) = endpoints["/label"]["returns"]
    assert set(dataset["type"]["properties"]) == {"coco", "records"}
    assert parameter("/label", "phrases")["python_type"]["type"] == "list[str]"
    (png,) = endpoints["/annotate"]["returns"]
    assert png["python_type"]["type"] == "filepath"
    (coco,) = endpoints["/to_coco"]["returns"]
    assert set(coco["type"]["properties"]) == {"info", "images", "annotations", "categories"}


def test_private_ui_handlers_are_not_listed(tmp_path):
    demo = build_demo(ScriptedBackend("ok"), image_dir=tmp_path / "images")
    by_visibility: dict[str, set[str]] = {}
    for fn in demo.fns.values():
        by_visibility.setdefault(fn.api_visibility, set()).add(f"/{fn.api_name}")
    assert by_visibility["public"] == PUBLIC
    assert by_visibility["private"], "the page's own handlers are registered too"
    listed = set(demo.get_api_info()["named_endpoints"])
    assert listed == PUBLIC
    # Not even the "all endpoints" listing (gr.load's) shows the page's private handlers.
    assert not by_visibility["private"] & set(demo.get_api_info(all_endpoints=True)["named_endpoints"])


def test_the_served_info_route_and_client_show_the_documentation(tmp_path):
    with running_app(ScriptedBackend("ok"), tmp_path) as url:
        info = httpx.get(url.rstrip("/") + "/gradio_api/info", timeout=30).json()
        usage = Client(url, verbose=False).view_api(print_info=False, return_format="str")
    assert_documented(info)
    limits = Limits()
    assert f"from 1 to {limits.max_new_tokens:,}" in usage
    assert 'predict(image, x, y, api_name="/identify") -> result' in usage
    assert "1st" not in usage and "Any" not in usage


def test_an_endpoint_without_full_documentation_is_refused():
    def half_documented(image: gr.FileData, scale: float) -> str:
        """Something.

        Parameters:
            image: the picture.
        Returns:
            text: what it shows.
        """
        return ""

    def undocumented_return(scale: float) -> str:
        """Something.

        Parameters:
            scale: from ${low} to 2.
        """
        return ""

    with gr.Blocks():
        with pytest.raises(KeyError, match="low"):  # an unfilled placeholder fails at start-up, not on the page
            publish(undocumented_return, "no_value", {}, model=False)
        with pytest.raises(ValueError, match="return value"):
            publish(undocumented_return, "no_return", {"low": "1"}, model=False)
        with pytest.raises(ValueError, match="scale"):
            publish(half_documented, "half", {}, model=False)


def test_wrapped_entries_are_read_as_one_line():
    doc = """Summary line.

    Parameters:
        first: starts here
            and goes on: with a colon.
        second: short.
    Returns:
        out: a result
            over two lines.
    """
    assert one_line_entries(doc).splitlines() == [
        "Summary line.",
        "",
        "Parameters:",
        "    first: starts here and goes on: with a colon.",
        "    second: short.",
        "Returns:",
        "    out: a result over two lines.",
    ]
