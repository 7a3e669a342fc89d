"""What a user meets in ComfyUI's web frontend: a real ComfyUI server (CPU) with this pack
in custom_nodes and the comfyui-frontend-package, driven through headless Chromium.

- the template browser lists every example workflow with its picture and title;
- each one opens from there with every node known, no error dialog or toast, the missing
  models listed with their download links, the whole graph in view and no title cut off;
- the pack's nodes, as added from the node search, show their whole title.

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/comfy/test_frontend.py -q

Needs, besides COMFYUI_PATH: ComfyUI's requirements with the installed torch held (they
bring comfyui-frontend-package), `pip install playwright`, and a Chromium
(`apt-get install chromium`; CHROMIUM=/path/to/chrome for another); docs/nodes.md has the
commands. Skipped where one is missing. SAGEATTN2_SCREENSHOTS=DIR saves the template browser and the opened Flux workflow
as PNGs there (the pictures in docs/).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from comfy_env import ENV, comfyui_path  # noqa: E402

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytest.importorskip("comfyui_frontend_package", reason="comfyui-frontend-package is not installed")
if not comfyui_path():
    pytest.skip(f"{ENV} is not set (the path of a ComfyUI source tree)", allow_module_level=True)
CHROMIUM = os.environ.get("CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
if not CHROMIUM:
    pytest.skip("no Chromium (apt-get install chromium, or CHROMIUM=/path/to/chrome)", allow_module_level=True)

PACK_DIR = "ComfyUI-SageAttention2"  # the folder name the template browser shows as the category
WORKFLOWS = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "example_workflows").glob("*.json"))}
OURS = ("SageAttn2Patch", "SageAttn2Schedule", "SageAttn2Calibrate", "SageAttn2CalibrationSchedule")
WINDOW = {"width": 1400, "height": 800}
START_S = 420  # ComfyUI imports every core node pack first: minutes on 2 busy cores
MISSING_MODELS = '[aria-labelledby="global-missing-models-warning"]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_DIR).symlink_to(REPO, target_is_directory=True)
    port = free_port()
    log = base / "server.log"
    cmd = [sys.executable, str(HERE / "serve_comfyui.py"), comfyui_path(), "--cpu", "--base-directory", str(base),
           "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--database-url", "sqlite:///:memory:"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                text = log.read_text()
                missing = re.search(r"ModuleNotFoundError: No module named '([^']+)'", text)
                if missing:
                    pytest.skip(f"ComfyUI's server needs {missing.group(1)!r}, not installed here")
                raise AssertionError(f"ComfyUI exited with {proc.returncode}:\n{text[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/api/workflow_templates", timeout=5) as r:
                    templates = json.load(r)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"ComfyUI did not answer in {START_S} s:\n{log.read_text()[-4000:]}")
                time.sleep(2)
        assert "IMPORT FAILED" not in "".join(l for l in log.read_text().splitlines() if PACK_DIR in l)
        assert sorted(templates.get(PACK_DIR, [])) == sorted(WORKFLOWS), templates
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport=WINDOW)
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        pg.goto(server, wait_until="networkidle", timeout=120_000)
        pg.wait_for_function("window.app && app.graph && window.LiteGraph", timeout=120_000)
        yield pg
        browser.close()


def screenshot(page, name):
    """Into $SAGEATTN2_SCREENSHOTS, as a 128-colour PNG (small enough for docs/)."""
    folder = os.environ.get("SAGEATTN2_SCREENSHOTS")
    if folder:
        from PIL import Image

        path = Path(folder) / name
        page.screenshot(path=str(path))
        with Image.open(path) as img:
            img = img.convert("RGB").quantize(128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        img.save(path, optimize=True)


def close_dialogs(page):
    """Whatever an earlier (failed) test left open."""
    for _ in range(5):
        if not page.locator(f".p-dialog:not(:has([data-testid='template-workflows-content']))").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def open_our_templates(page):
    close_dialogs(page)
    if not page.locator('[data-testid^="template-workflow-"]').count():
        page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(PACK_DIR, exact=True).first.click()
    page.locator(f'[data-testid="template-workflow-{next(iter(WORKFLOWS))}"]').wait_for(timeout=30_000)


def error_surfaces(page) -> list[str]:
    """Text of every dialog other than the template browser and the missing-models list, of
    error toasts, and uncaught page errors."""
    dialogs = page.locator(f'.p-dialog:not({MISSING_MODELS}):not(:has([data-testid="template-workflows-content"]))')
    toasts = page.locator(".p-toast-message-error")
    return ([dialogs.nth(i).inner_text()[:300] for i in range(dialogs.count())]
            + [toasts.nth(i).inner_text()[:300] for i in range(toasts.count())] + page.errors)


def test_template_browser_shows_every_workflow_with_its_picture_and_title(page):
    pictures = {}
    page.on("response", lambda r: pictures.__setitem__(r.url, r.status) if r.url.endswith(".jpg") else None)
    open_our_templates(page)
    first = page.locator('[data-testid^="template-workflow-"] img').first
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=first.element_handle(), timeout=30_000)
    page.wait_for_timeout(1000)
    screenshot(page, "template_browser.png")
    for name in WORKFLOWS:
        card = page.locator(f'[data-testid="template-workflow-{name}"]')
        card.scroll_into_view_if_needed()
        assert card.locator("h3").inner_text() == name
        img = card.locator("img")
        img.wait_for(timeout=30_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle(),
                               timeout=30_000)
        assert img.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [600, 600], name
    for name in WORKFLOWS:
        url = next(u for u in pictures if urllib.request.unquote(u).endswith(f"/{PACK_DIR}/{name}.jpg"))
        assert pictures[url] == 200, url
    assert not error_surfaces(page)
    page.keyboard.press("Escape")


STATE_JS = """() => {
  const ctx = document.createElement('canvas').getContext('2d');
  ctx.font = app.canvas.title_text_font;
  const ds = app.canvas.ds, th = LiteGraph.NODE_TITLE_HEIGHT;
  const nodes = app.graph.nodes.map(n => ({
    type: n.type, known: !!LiteGraph.registered_node_types[n.type], errors: !!n.has_errors,
    title: n.title, width: n.size[0], titleWidth: ctx.measureText(n.title).width,
    left: (n.pos[0] + ds.offset[0]) * ds.scale, top: (n.pos[1] - th + ds.offset[1]) * ds.scale,
    right: (n.pos[0] + n.size[0] + ds.offset[0]) * ds.scale,
    bottom: (n.pos[1] + n.size[1] + ds.offset[1]) * ds.scale,
  }));
  const sidebar = document.querySelector('.side-tool-bar-container');
  return {nodes, sidebarRight: sidebar ? sidebar.getBoundingClientRect().right : 0,
          canvas: [app.canvas.canvas.clientWidth, app.canvas.canvas.clientHeight]};
}"""


def missing_models(page) -> dict[str, str]:
    """'directory / name' -> download URL, as the missing-models dialog lists them."""
    items = page.locator(f"{MISSING_MODELS} .comfy-missing-models li")
    return {items.nth(i).locator("span[title]").first.inner_text().strip():
            items.nth(i).get_by_role("button", name=re.compile("^Download")).get_attribute("title")
            for i in range(items.count())}


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_workflow_opens_from_the_browser_complete_and_in_view(page, name):
    wf = WORKFLOWS[name]
    open_our_templates(page)
    page.locator(f'[data-testid="template-workflow-{name}"]').click()
    try:
        page.locator(MISSING_MODELS).wait_for(timeout=30_000)
    except sync_api.TimeoutError:
        raise AssertionError("no missing-models dialog: the models' downloads are not offered") from None
    page.wait_for_function(f"app.graph.nodes.length === {len(wf['nodes'])}", timeout=30_000)
    page.wait_for_timeout(500)

    listed = missing_models(page)
    files = {v for n in wf["nodes"] for v in n["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")}
    assert {entry.split(" / ")[1] for entry in listed} == files
    for entry, url in listed.items():
        assert url and url.startswith("https://") and url.endswith("/" + entry.split(" / ")[1]), (entry, url)
    assert not error_surfaces(page)

    state = page.evaluate(STATE_JS)
    assert sorted(n["type"] for n in state["nodes"]) == sorted(n["type"] for n in wf["nodes"])
    for n in state["nodes"]:
        assert n["known"] and not n["errors"], n
        assert n["titleWidth"] + 40 <= n["width"], f"title cut off: {n['title']!r}"
    assert state["sidebarRight"] > 0
    assert min(n["left"] for n in state["nodes"]) >= state["sidebarRight"] + 10, "under the sidebar"
    assert max(n["right"] for n in state["nodes"]) <= state["canvas"][0]
    assert max(n["bottom"] for n in state["nodes"]) <= state["canvas"][1]
    assert min(n["top"] for n in state["nodes"]) >= 0

    page.locator(MISSING_MODELS).get_by_role("button", name="Close").click()
    page.locator(MISSING_MODELS).wait_for(state="detached", timeout=10_000)
    if name == "Flux with Sage Attention":
        page.wait_for_timeout(500)
        screenshot(page, "workflow_flux.png")


def test_pack_nodes_from_the_search_show_their_whole_title(page):
    """Default width (as the node search adds them) against the width of the title."""
    sizes = page.evaluate("""types => {
      const ctx = document.createElement('canvas').getContext('2d');
      ctx.font = app.canvas.title_text_font;
      return types.map(t => { const n = LiteGraph.createNode(t); const s = n.computeSize();
                              return [n.title, Math.max(n.size[0], s[0]), ctx.measureText(n.title).width]; });
    }""", list(OURS))
    assert len(sizes) == len(OURS)
    for title, width, title_width in sizes:
        assert title_width + 40 <= width, (title, width, title_width)
