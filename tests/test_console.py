"""The web console in a real browser: Debian's Chromium driven by Playwright, against a real
`oneword serve` (API keys on) on the session's Ray head, a registry and a bulk job in the real
S3 server, and a real tiny bulk job running on the cluster while the jobs page watches it.

Screenshots of each page go to $ONEWORD_SCREENSHOTS, or a temp dir. The docs' screenshots are
taken on the bundled ShapesWorld model, whose images show shapes (slower than the tiny model):

    ONEWORD_CONSOLE_MODEL=shapesworld ONEWORD_SCREENSHOTS=docs/images .venv/bin/python -m pytest tests/test_console.py
"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright

from pipeline.engine.formats import LearnedConcept
from pipeline.engine.model import load_base_model
from pipeline.store.registry import Registry

from .test_serving import running_service

CHROMIUM = "/usr/bin/chromium"
# a headless Chromium that opens no connection of its own (this machine's network is closed)
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
API_KEY = "console-key-0123456789"
JOB = "console-job"
STEPS = 150  # long enough for the jobs page to see the concepts running
MARKUP_DIR = "<b>not-markup</b>"  # a missing image folder whose name looks like HTML: shown as text
EXTRA_CONCEPTS = 51  # more than one page (50) of the concepts list


@pytest.fixture(scope="module")
def console_model(tiny_model_dir) -> Path:
    from pipeline.engine.model import resolve_model_source

    bundled = os.environ.get("ONEWORD_CONSOLE_MODEL")
    return Path(resolve_model_source(bundled)) if bundled else tiny_model_dir


@pytest.fixture(scope="module")
def console(ray_head, s3_settings, console_model, star_dir, tmp_path_factory):
    """A bulk job submitted to the cluster (it runs on while the tests look), and the service with
    that job's checkpoint storage as its job_storage and the job's registry."""
    bucket = f"console-{os.getpid()}"
    s3_settings.client().make_bucket(bucket_name=bucket)
    registry_location = f"s3://{bucket}/registry"
    work = tmp_path_factory.mktemp("console")
    concepts = [{"name": "star-a", "images": str(star_dir), "init_word": "shape"},
                {"name": "star-b", "images": str(star_dir), "init_word": "shape"},
                {"name": "broken", "images": str(work / MARKUP_DIR), "init_word": "shape"}]  # fmt: skip
    spec = {"job": JOB, "base_model": str(console_model), "registry": registry_location,
            "checkpoint_storage": f"s3://{bucket}/checkpoints", "pack_size": 2, "max_concurrent": 1,
            "defaults": {"steps": STEPS, "batch_size": 2, "log_interval": 5, "learning_rate": 5e-3, "seed": 3},
            "checkpoint_interval": 50, "resources": {"cpu": 0.5}, "concepts": concepts}  # fmt: skip
    manifest = work / "job.yaml"
    manifest.write_text(yaml.safe_dump(spec, sort_keys=False))

    # more versions than one page holds, published directly (no previews: imported concepts have none)
    os.environ.update({k: v for k, v in ray_head.env.items() if k.startswith("ONEWORD_S3_")})
    registry = Registry.open(registry_location)
    model = load_base_model(console_model, "cpu")
    for i in range(EXTRA_CONCEPTS):
        vectors = torch.randn(1, model.embedding_dim, generator=torch.Generator().manual_seed(i))
        registry.publish(LearnedConcept(f"bulk-{i:03d}", vectors, base_model=model.identity))

    keys = work / "keys"
    keys.write_text(f"{API_KEY}\n")
    settings = {"api_keys_file": str(keys), "job_storage": f"s3://{bucket}/checkpoints", "default_steps": 2,
                "min_size": 16, "max_size": 64, "max_steps": 10, "max_images": 4, "num_cpus": 0.5,
                "concept_ttl_s": 1}  # fmt: skip
    with running_service(ray_head, console_model, registry_location, settings, work, replicas=1) as base:
        # submitted once the service is up, so that the jobs page sees it start and run
        submitted = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", str(manifest), "--address",
                                    ray_head.jobs_api], env=ray_head.env, capture_output=True, text=True,
                                   timeout=300)  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        yield base, registry


@pytest.fixture
def finished(console):
    """The console once its job has ended (its concepts published, with their previews)."""
    base, _ = console
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        answer = httpx.get(f"{base}/v1/jobs/{JOB}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        if answer.status_code == 200 and answer.json()["state"] in ("succeeded", "failed"):
            return console
        time.sleep(1)
    raise AssertionError(f"job {JOB} did not end")


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser context per test: its own session storage, so no key carries over."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    # the only errors a page may log are the failed requests it shows as messages (401 before the key, 404s)
    unexpected = [e for e in errors if not re.search(r"status of (401|404|422)", e)]
    assert not unexpected, unexpected


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("ONEWORD_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"console-{name}.png"), full_page=True)


def open_console(page: Page, base: str, where: str) -> None:
    """Opens a page of the console; it asks for the key (a wrong one is refused), then works."""
    page.goto(f"{base}/ui/#{where}")
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key-input", "wrong-key")
    page.click("#key-submit")
    expect(page.locator("#key-error")).to_have_text("The service refused that key.")
    page.fill("#key-input", API_KEY)
    page.click("#key-submit")
    expect(page.locator("#key-dialog")).to_be_hidden()


def test_the_console_is_static_files_under_a_strict_policy_and_adds_no_open_route(console):
    base, _ = console
    index = httpx.get(f"{base}/ui/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    policy = index.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert '<script src="console.js"' in index.text and "<script>" not in index.text  # no inline code
    assert httpx.get(f"{base}/ui/console.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{base}/ui", follow_redirects=True).url.path == "/ui/"
    assert httpx.get(f"{base}/ui/..%2Fapp.py").status_code == 404
    assert httpx.get(f"{base}/ui/settings.py").status_code == 404
    # the data the console shows comes only through the API, with a key
    for path in ("/v1/jobs", f"/v1/jobs/{JOB}", "/v1/concepts/star-a/preview"):
        assert httpx.get(f"{base}{path}").status_code == 401


def test_the_jobs_page_shows_each_concepts_live_progress_and_failures(console, page, tmp_path):
    base, _ = console
    open_console(page, base, "jobs")
    link = page.locator("#job-list a", has_text=JOB)
    expect(link).to_be_visible(timeout=60_000)
    link.click()
    expect(page.locator("#job-title")).to_contain_text(f"Job {JOB}")
    # live: a concept's step moves on while the page is open (it refreshes itself)
    running = page.locator("#job-table tr.state-running td.step").first
    expect(running).to_have_text(re.compile(r"^\d+/150$"), timeout=240_000)
    first = int(running.inner_text().split("/")[0])
    expect(page.locator("#job-table tr.state-running td.eta").first).to_have_text(re.compile(r"\d+ (s|min)"))
    screenshot(page, "jobs", tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        steps = [int(t.split("/")[0]) for t in page.locator("#job-table td.step").all_inner_texts() if t]
        if any(step > first for step in steps):
            break
        page.wait_for_timeout(500)
    else:
        raise AssertionError(f"no step past {first} shown")
    # to its end: both stars published (version shown), the broken one failed with its reason as text
    expect(page.locator("#job-title")).to_have_text(f"Job {JOB}: failed", timeout=400_000)
    for name in ("star-a", "star-b"):
        row = page.locator(f'#job-table tr[data-concept="{name}"]')
        expect(row.locator("td.state")).to_have_text("published")
        expect(row.locator("td.step")).to_have_text(f"{STEPS}/{STEPS}")
        expect(row.locator("td").last).to_have_text(re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}$"))
    broken = page.locator('#job-table tr[data-concept="broken"]')
    expect(broken.locator("td.state")).to_have_text("failed")
    expect(broken.locator("td.error")).to_contain_text(MARKUP_DIR)  # the folder's name, literally
    assert page.locator("#job-table b").count() == 0  # and not as markup
    screenshot(page, "job-done", tmp_path)


def test_the_concepts_page_lists_versions_with_previews_filters_and_pages(finished, page, tmp_path):
    base, registry = finished
    open_console(page, base, "concepts")
    rows = page.locator("#concept-table tbody tr")
    expect(rows).to_have_count(50)  # one page of 53 versions
    expect(page.locator("#next-page")).to_be_enabled()
    page.click("#next-page")
    expect(rows).to_have_count(3)
    expect(page.locator("#page-info")).to_have_text("page 2")
    page.fill("#prefix", "star")
    expect(rows).to_have_count(2)
    for name in ("star-a", "star-b"):
        manifest = registry.manifest(name)
        row = page.locator(f'#concept-table tr[data-name="{name}"]')
        expect(row.locator("td.name")).to_have_text(f"<{name}>")
        expect(row.locator("td.version")).to_have_text(manifest.version)
        cells = row.locator("td").all_inner_texts()
        assert cells[4:8] == ["1", str(STEPS), f"{manifest.metrics['final_loss']:.4f}", JOB]
        assert cells[3] == f"SD · {manifest.base_model}"
        image = row.locator("td.preview img")
        expect(image).to_be_visible()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        # the image shown is the registry's preview, pixel for pixel
        shown = page.evaluate(
            "img => { const c = document.createElement('canvas'); c.width = img.naturalWidth;"
            " c.height = img.naturalHeight; const g = c.getContext('2d'); g.drawImage(img, 0, 0);"
            " return [c.width, c.height, Array.from(g.getImageData(0, 0, c.width, c.height).data)]; }",
            image.element_handle(),
        )
        stored = Image.open(io.BytesIO(registry.preview(name)[1])).convert("RGBA")
        assert (shown[0], shown[1]) == stored.size
        assert bytes(shown[2]) == stored.tobytes()
    screenshot(page, "concepts", tmp_path)


def test_the_playground_completes_names_and_generates_an_image_of_the_requested_size(finished, page, tmp_path):
    base, registry = finished
    open_console(page, base, "playground")
    prompt = page.locator("#prompt")
    prompt.click()
    prompt.press_sequentially("a photo of <star-")
    options = page.locator("#completions li")
    expect(options).to_have_text(["<star-a>", "<star-b>"])
    prompt.press("ArrowDown")
    prompt.press("Enter")
    expect(prompt).to_have_value("a photo of <star-b>")
    # <name@ completes that concept's versions
    prompt.press_sequentially(" and <star-a@")
    version = registry.manifest("star-a").version
    expect(options.first).to_have_text(f"<star-a@{version}>")
    prompt.press("Tab")
    expect(prompt).to_have_value(f"a photo of <star-b> and <star-a@{version}>")
    page.fill("#width", "64")
    page.fill("#height", "48")
    page.fill("#steps", "10")
    page.fill("#seed", "7")
    page.fill("#n", "2")
    page.click("#generate")
    images = page.locator("#images img")
    expect(images).to_have_count(2, timeout=120_000)
    for i in range(2):
        src = images.nth(i).get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert decoded.size == (64, 48)
    expect(page.locator("#generate-info")).to_contain_text(f"seed 7, <star-b@{registry.manifest('star-b').version}>")
    screenshot(page, "playground", tmp_path)


def test_the_playground_shows_the_apis_own_error_messages(console, page):
    base, _ = console
    open_console(page, base, "playground")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for prompt, n, status in (("a photo of <star-c>", 1, 404), ("a photo of <star-a>", 9, 422)):
        answer = httpx.post(f"{base}/v1/generate", json={"prompt": prompt, "n": n}, headers=headers, timeout=60)
        assert answer.status_code == status
        body = answer.json()
        page.fill("#prompt", prompt)
        page.fill("#n", str(n))
        page.click("#generate")
        error = page.locator("#generate-error")
        expect(error).to_contain_text(f"{body['message']} ({status} {body['code']})")
        if body.get("close_matches"):
            expect(error).to_contain_text(f"Did you mean: {', '.join(body['close_matches'])}?")
        expect(page.locator("#images img")).to_have_count(0)
