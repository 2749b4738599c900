"""The run form a marketer fills in Prefect's UI to start `generate_images`.

Prefect draws the form from the flow's JSON schema: a `$ref` to an object is a section, an
`enum` of strings a select, a null choice a tab that reads *Property is type "None"*, and every
default in the schema is pre-filled and sent back. The fast tests hold the schema to what
reads well; the scenario deploys `deployments/prefect.yaml` to a real server and reads each
deployment's form as headless Chromium renders it (and takes its screenshot:
`UPDATE_SCREENSHOTS=1` writes the product-shots one to `docs/run-form.png`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar, cast

import httpx
import pytest
import websockets
import yaml
from test_end_to_end import CHROMIUM_FLAGS, chromium, prefect

from prefect_gpt_image import ImageOptions
from prefect_gpt_image.flows.generate_images import generate_images
from prefect_gpt_image.testing import prefect_server
from prefect_gpt_image.testing.local_prefect import stop_process

__all__ = ["chromium"]  # the fixture, shared with the end-to-end test

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = REPO / "deployments" / "prefect.yaml"
DEPLOYED = yaml.safe_load(DEPLOYMENTS.read_text())
SCREENSHOT = REPO / "docs" / "run-form.png"
MAX_FIELDS = 15
"""More top-level fields than this and the form is a wall; the rest belong in a group."""

GROUPS = {
    "image": "ImageOptions",
    "edit": "EditOptions",
    "batch": "BatchOptions",
    "review": "ReviewOptions",
    "limits": "ApiLimits",
    "cache": "CacheOptions",
    "links": "LinkOptions",
}
CHOICES = {
    "image": ["quality", "output_format", "background", "moderation", "complexity"],
    "edit": ["input_fidelity"],
}
BROWSER_FLAGS = [*CHROMIUM_FLAGS, "--virtual-time-budget=20000", "--window-size=1400,3000"]
"""Chromium keeps a switch's last value: a taller window, and time for the form to load."""


def form_schema() -> dict[str, Any]:
    """The flow's parameter schema as JSON, the way a deployment sends it to the server."""
    schema: dict[str, Any] = json.loads(json.dumps(generate_images.parameters.model_dump()))
    return schema


SCHEMA = form_schema()

NAMED_BY_THE_DEPLOYMENT = {"max_cost_usd", "credentials"}
"""Top-level fields None by default in Python (no cap; the `RAPIDAPI_KEY` route) whose form
has no None: a run from the UI names its budget and its route, as every deployment in
`deployments/` does. Prefect writes their Python default, null, into the schema."""


def form_fields() -> list[str]:
    """Every top-level field and every field of a group, as `name` or `group.name`."""
    names = list(SCHEMA["properties"])
    for group, model in GROUPS.items():
        names += [f"{group}.{name}" for name in SCHEMA["definitions"][model]["properties"]]
    return names


def test_every_deployment_names_a_budget_and_a_route() -> None:
    for deployment in DEPLOYED["deployments"]:
        parameters = deployment["parameters"]
        assert parameters.keys() >= NAMED_BY_THE_DEPLOYMENT, deployment["name"]
        assert parameters["max_cost_usd"] is not None and parameters["credentials"]


def test_the_form_has_at_most_fifteen_fields_and_a_section_per_group() -> None:
    properties = SCHEMA["properties"]
    assert len(properties) <= MAX_FIELDS, list(properties)
    for group, model in GROUPS.items():
        assert properties[group]["$ref"] == f"#/definitions/{model}"
        assert SCHEMA["definitions"][model]["type"] == "object"
        assert SCHEMA["definitions"][model]["properties"]


@pytest.mark.parametrize(("group", "name"), [(g, n) for g, ns in CHOICES.items() for n in ns])
def test_a_choice_is_a_select(group: str, name: str) -> None:
    choice = SCHEMA["definitions"][GROUPS[group]]["properties"][name]
    assert choice["type"] == "string"
    assert choice["enum"] and all(isinstance(value, str) for value in choice["enum"])
    assert "anyOf" not in choice
    assert choice.get("default", choice["enum"][0]) in choice["enum"]  # no None pre-filled


@pytest.mark.parametrize("name", form_fields())
def test_a_field_reads_in_the_form(name: str) -> None:
    """No None tab, no None pre-filled, a description; and in a group, the default is shown
    (in the group's pre-filled values, or the field's own) or the description says what
    empty means."""
    group, _, field_name = name.rpartition(".")
    if group:
        model = SCHEMA["definitions"][GROUPS[group]]
        prop = model["properties"][field_name]
        shown = field_name in SCHEMA["properties"][group].get("default", {}) or "default" in prop
        assert shown or "Empty:" in prop.get("description", ""), prop
    else:
        prop = SCHEMA["properties"][name]
    assert {"type": "null"} not in prop.get("anyOf", []), prop
    assert None not in prop.get("enum", []), prop
    if name not in NAMED_BY_THE_DEPLOYMENT:
        assert "default" not in prop or prop["default"] is not None, prop
    assert prop.get("description"), prop


# The rendered form, in a real browser.


@dataclass
class Select:
    options: list[str] = field(default_factory=list)
    selected: str | None = None


@dataclass
class Property:
    """One field of the rendered form: its label, the fields of its section, its select."""

    label: str = ""
    fields: list[Property] = field(default_factory=list)
    select: Select | None = None

    @property
    def name(self) -> str:
        return self.label.removesuffix(" (Optional)")

    def field(self, name: str) -> Property:
        return next(found for found in self.fields if found.name == name)


class RunForm(HTMLParser):
    """Reads Chromium's dumped DOM of a run page: the form's fields, nested as rendered, and
    its selects."""

    VOID: ClassVar = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"}

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.fields: list[Property] = []
        self._select: Select | None = None
        self._open: list[Property | None] = []  # per open element: the field it starts
        self._label: Property | None = None
        self.feed(dom)

    def _enclosing(self) -> Property | None:
        return next((found for found in reversed(self._open) if found), None)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag == "select" and (enclosing := self._enclosing()):
            # The first is the control; Prefect's select draws an empty one after it.
            self._select = enclosing.select = enclosing.select or Select()
        if tag == "option" and self._select:
            value = dict(attrs).get("value") or ""
            self._select.options.append(value)
            if "selected" in dict(attrs):
                self._select.selected = value
        if tag == "span" and "schema-form-property__label" in classes:
            self._label = self._enclosing()
        if tag in self.VOID:
            return
        started = None
        if tag == "div" and "schema-form-property" in classes:
            started = Property()
            parent = self._enclosing()
            (parent.fields if parent else self.fields).append(started)
        self._open.append(started)

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.VOID and self._open:
            self._open.pop()
        if tag == "span":
            self._label = None
        if tag == "select":
            self._select = None

    def handle_data(self, data: str) -> None:
        if self._label is not None:
            self._label.label += data.strip()

    def field(self, name: str) -> Property:
        return Property(fields=self.fields).field(name)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """`deployments/prefect.yaml` deployed, as its header says, to a real server."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as env:
        prefect(["work-pool", "create", "creatives", "--type", "process"], env)
        prefect(["--no-prompt", "deploy", "--prefect-file", str(DEPLOYMENTS), "--all"], env)
        yield env["PREFECT_API_URL"], env


def browse(chromium: str, tmp_path: Path, *args: str) -> str:
    return subprocess.run(
        [chromium, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'chrome'}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout


@pytest.mark.scenario
@pytest.mark.parametrize("deployment", [entry["name"] for entry in DEPLOYED["deployments"]])
def test_the_run_form_in_a_browser(
    deployment: str,
    deployed: tuple[str, dict[str, str]],
    chromium: str,
    tmp_path: Path,
) -> None:
    api_url, _ = deployed
    stored = httpx.get(f"{api_url}/deployments/name/generate-images/{deployment}").json()
    assert stored["parameter_openapi_schema"] == SCHEMA
    page = f"{api_url.removesuffix('/api')}/deployments/deployment/{stored['id']}/run"

    dom = browse(chromium, tmp_path, "--dump-dom", page)
    form = RunForm(dom)
    assert 'Property is type "None"' not in dom
    assert [found.name for found in form.fields] == list(SCHEMA["properties"]), dom[-3000:]
    assert len(form.fields) <= MAX_FIELDS
    for group, model in GROUPS.items():  # a section each, holding the group's fields
        titles = [prop["title"] for prop in SCHEMA["definitions"][model]["properties"].values()]
        assert [found.name for found in form.field(group).fields] == titles
    for group, names in CHOICES.items():  # a select each, offering exactly the choices
        for name in names:
            choice = SCHEMA["definitions"][GROUPS[group]]["properties"][name]
            select = form.field(group).field(choice["title"]).select
            assert select and select.options == choice["enum"], (name, select)
            # Nothing picked unless the deployment picks it: product-shots' quality is high.
            assert select.selected == stored["parameters"].get(group, {}).get(name), name

    update = os.environ.get("UPDATE_SCREENSHOTS") == "1" and deployment == "product-shots"
    screenshot = SCREENSHOT if update else tmp_path / f"{deployment}.png"
    screenshot.parent.mkdir(exist_ok=True)
    with Browser(chromium, tmp_path / "shot") as browser:  # once the form has loaded
        assert browser.run(page, WAIT_FOR_FORM, screenshot=screenshot) == [True]
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    assert screenshot.stat().st_size > 50_000  # a drawn form, not a blank page


class Browser:
    """Headless Chromium driven over the DevTools protocol: a page a test can click in."""

    def __init__(self, chromium: str, profile: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self._port = probe.getsockname()[1]
        flags = [flag for flag in CHROMIUM_FLAGS if not flag.startswith("--virtual-time")]
        self._process = subprocess.Popen(
            [
                chromium,
                *flags,
                "--window-size=1400,3000",
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={self._port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._calls = 0

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_: object) -> None:
        stop_process(self._process, timeout=10)

    def run(self, page: str, *steps: str, screenshot: Path | None = None) -> list[Any]:
        """Open `page`, then evaluate each JavaScript step (awaited; each may wait for the
        page), and return their values; `screenshot` saves the page as it ends."""
        return asyncio.run(self._run(page, steps, screenshot))

    async def _run(self, page: str, steps: tuple[str, ...], screenshot: Path | None) -> list[Any]:
        deadline = time.monotonic() + 30
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{self._port}/json").json()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        target = next(t for t in targets if t["type"] == "page")
        async with websockets.connect(target["webSocketDebuggerUrl"], max_size=2**26) as ws:

            async def call(method: str, **params: Any) -> dict[str, Any]:
                self._calls += 1
                await ws.send(json.dumps({"id": self._calls, "method": method, "params": params}))
                while True:
                    message = json.loads(await ws.recv())
                    if message.get("id") == self._calls:
                        return cast(dict[str, Any], message.get("result", {}))

            await call("Page.navigate", url=page)
            values = []
            for step in steps:
                answer = await call(
                    "Runtime.evaluate", expression=step, awaitPromise=True, returnByValue=True
                )
                values.append(answer.get("result", {}).get("value"))
            if screenshot is not None:
                shot = await call(
                    "Page.captureScreenshot", format="png", captureBeyondViewport=True
                )
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            return values


WAIT_FOR_FORM = """new Promise((done, fail) => {
  const start = Date.now();
  const look = () => {
    const buttons = [...document.querySelectorAll('button')];
    const submit = buttons.find(b => b.innerText.trim() == 'Submit');
    if (submit && document.querySelectorAll('.schema-form-property').length > 12) {
      // The page fades in: the form is there before it is shown (at most 2 s more).
      const shown = document.getAnimations().map(a => a.finished.catch(() => null));
      Promise.race([Promise.all(shown), new Promise(wait => setTimeout(wait, 2000))])
        .then(() => done(true));
    }
    else if (Date.now() - start > 60000) fail('the form did not load');
    else setTimeout(look, 250);
  };
  look();
})"""
SUBMIT = """new Promise((done) => {
  const form = location.href, name = document.querySelector('input').value;  // Run Name
  [...document.querySelectorAll('button')].find(b => b.innerText.trim() == 'Submit').click();
  const start = Date.now();
  const look = () => {  // the UI opens the new run's page once the server has taken it
    if (location.href != form || Date.now() - start > 60000)
      done({name: name, page: document.body.innerText});
    else setTimeout(look, 250);
  };
  look();
})"""


@pytest.mark.scenario
@pytest.mark.parametrize("deployment", [entry["name"] for entry in DEPLOYED["deployments"]])
def test_the_form_as_it_opens_starts_a_run_the_flow_accepts(
    deployment: str,
    deployed: tuple[str, dict[str, str]],
    chromium: str,
    tmp_path: Path,
) -> None:
    """A person who opens the form and presses Submit starts a run: the form refuses none of
    the values it shows, the server takes them, and they are the flow's own parameters."""
    api_url, _ = deployed
    stored = httpx.get(f"{api_url}/deployments/name/generate-images/{deployment}").json()
    page = f"{api_url.removesuffix('/api')}/deployments/deployment/{stored['id']}/run"

    with Browser(chromium, tmp_path / "chrome") as browser:
        opened, submitted = browser.run(page, WAIT_FOR_FORM, SUBMIT)
    assert opened is True
    after = submitted["page"]
    assert "not valid" not in after and "is not of type" not in after, after

    runs = httpx.post(
        f"{api_url}/flow_runs/filter",
        json={"flow_runs": {"name": {"any_": [submitted["name"]]}}},
    ).json()
    (run,) = runs
    assert run["deployment_id"] == stored["id"]
    assert run["parameters"]["prompts"] == stored["parameters"]["prompts"]
    validated = generate_images.validate_parameters(run["parameters"])
    assert isinstance(validated["image"], ImageOptions)
    assert validated["batch"].enabled == ("batch" in stored["parameters"])


def test_the_placements_field_names_every_preset_a_marketer_can_type() -> None:
    from prefect_gpt_image.placement_table import PRESETS

    description = " ".join(SCHEMA["properties"]["placements"]["description"].split())
    assert [name for name in PRESETS if name not in description] == []
