"""The viewer in a real browser: Debian's Chromium (headless, through Playwright) against a real service process.

The service serves a threshold U-Net (``tests.viewer.helpers.threshold_unet``: the mask of an image is known) and
an untrained ResNet-18 lesion classifier. The tests upload phantoms the way a user does (the file input), then
read what the page drew: the canvas pixels, the legend, the probability bars, the messages. Screenshots go to
the test's temporary directory (their paths are printed).
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from app.outputs import OVERLAY_COLOURS
from tests.app.helpers import decode_png, encode_image
from tests.deploy.helpers import Service
from tests.models.test_dicom import make_dicom
from tests.viewer.helpers import (
    ADMIN_KEY,
    FLAG_ALL,
    FLAG_NONE,
    KEY,
    THRESHOLD_CLASSES,
    chromium,
    expected_labels,
    running_service,
    save_lesion_classifier,
    save_threshold_unet,
)
from training.classification.lesions import render_lesion
from training.segmentation.synthetic import dental_phantom

pytestmark = pytest.mark.slow

DESKTOP = {"width": 1280, "height": 800}
NARROW = {"width": 420, "height": 800}
ANSWER_TIMEOUT_MS = 120_000  # a loaded machine; never reached when the page works


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("viewer-models")
    save_threshold_unet(folder / "teeth.pt")
    save_lesion_classifier(folder / "lesion.pt")
    # With out-of-distribution statistics whose verdict is known: every image flagged, or none.
    save_lesion_classifier(folder / "lesion-ood.pt", ood_threshold=FLAG_ALL)
    save_threshold_unet(folder / "teeth-ood.pt", ood_threshold=FLAG_ALL)
    save_threshold_unet(folder / "teeth-ok.pt", ood_threshold=FLAG_NONE)
    return folder


@pytest.fixture(scope="module")
def service(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(model_dir, tmp_path_factory.mktemp("viewer-service")) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    opened.set_default_timeout(ANSWER_TIMEOUT_MS)
    try:
        yield opened
        # Failed requests the page made on purpose (401, 400) are logged by Chromium as console errors;
        # script errors are not expected at all.
        scripts = [e for e in errors if "Failed to load resource" not in e]
        assert not scripts, scripts
    finally:
        context.close()


# -- helpers --------------------------------------------------------------------------------------------------


def dental_png(seed: int = 3, size: int = 128) -> tuple[np.ndarray, bytes]:
    image, _ = dental_phantom(np.random.default_rng(seed), size)
    return image, encode_image(image)


def open_viewer(page: Any, service: Service, *, wait_models: bool = True) -> None:
    page.goto(service.url + "/")
    if wait_models:
        page.locator("#model:enabled").wait_for()


def upload(page: Any, name: str, mime: str, data: bytes) -> None:
    page.get_by_label("Image file").set_input_files(files=[{"name": name, "mimeType": mime, "buffer": data}])


def canvas_pixels(page: Any, element_id: str) -> np.ndarray:
    """The RGBA pixels (H, W, 4) of a canvas of the page, as PNG (lossless) from the canvas itself."""
    url = page.evaluate(f"() => document.getElementById('{element_id}').toDataURL('image/png')")
    data = base64.b64decode(url.split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGBA"))


def api_mask(service: Service, model: str, name: str, mime: str, data: bytes) -> np.ndarray:
    response = httpx.post(
        f"{service.url}/segment",
        params={"model": model, "format": "png"},
        files={"file": (name, data, mime)},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return decode_png(response.content)


def assert_overlay_drawn(overlay: np.ndarray, labels: np.ndarray, visible: set[int]) -> None:
    """Each visible class in its overlay colour, opaque, exactly on its pixels; transparent everywhere else."""
    assert overlay.shape[:2] == labels.shape
    for index in range(1, len(THRESHOLD_CLASSES)):
        where = labels == index
        assert where.any(), f"class {index} is absent from the test image: the check would be empty"
        if index in visible:
            colour = [*OVERLAY_COLOURS[index - 1].astype(int).tolist(), 255]
            assert (overlay[where] == colour).all(), f"class {index} is not drawn in its colour"
        else:
            assert (overlay[where][:, 3] == 0).all(), f"class {index} is drawn although hidden"
    assert (overlay[labels == 0][:, 3] == 0).all(), "the background is painted"


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"viewer-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def assert_fits_the_window(page: Any) -> None:
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than the window"


# -- segmentation ---------------------------------------------------------------------------------------------


def test_segmentation_draws_the_mask_over_the_image_with_legend_opacity_toggles_and_download(
    page: Any, service: Service, tmp_path: Path
) -> None:
    image, png = dental_png()
    open_viewer(page, service)
    model = page.get_by_label("Model", exact=True)
    model.select_option("teeth")
    assert "segmentation" in page.locator("#model-info").inner_text()
    upload(page, "dental.png", "image/png", png)
    page.locator("#segmentation").wait_for()

    labels = api_mask(service, "teeth", "dental.png", "image/png", png)
    assert (labels == expected_labels(image)).all()
    # The image as uploaded, and the mask over it in the service's colours.
    base = canvas_pixels(page, "image-canvas")
    assert (base[:, :, 0] == image).all() and (base[:, :, 3] == 255).all()
    assert_overlay_drawn(canvas_pixels(page, "mask-canvas"), labels, visible={1, 2})

    # The legend: every class with its area as format=json gives it; a toggle for each foreground class.
    summary = httpx.post(
        f"{service.url}/segment",
        params={"model": "teeth", "format": "json"},
        files={"file": ("dental.png", png, "image/png")},
        timeout=60,
    ).json()
    entries = page.locator("#legend-list li")
    assert entries.count() == len(THRESHOLD_CLASSES)
    for entry, expected in zip(entries.all(), summary["classes"], strict=True):
        assert entry.get_attribute("data-class") == expected["name"]
        assert entry.get_attribute("data-pixels") == str(expected["pixels"])
        assert f"{expected['fraction'] * 100:.1f} %" in entry.inner_text()
    assert page.get_by_label("bone").is_checked() and page.get_by_label("tooth").is_checked()
    assert page.locator("#legend-list input[type=checkbox]").count() == len(THRESHOLD_CLASSES) - 1

    screenshot(page, tmp_path, "segmentation")
    assert_fits_the_window(page)

    # Keyboard: the opacity slider moves with the arrow keys; a class toggle with the space bar.
    opacity = page.get_by_label("Mask opacity")
    opacity.focus()
    page.keyboard.press("ArrowLeft")
    assert opacity.input_value() == "55"
    assert page.evaluate("() => document.getElementById('mask-canvas').style.opacity") == "0.55"
    page.get_by_label("bone").focus()
    page.keyboard.press("Space")
    assert not page.get_by_label("bone").is_checked()
    assert_overlay_drawn(canvas_pixels(page, "mask-canvas"), labels, visible={2})

    # The mask download is the service's PNG; no DICOM SEG for a PNG upload.
    assert not page.locator("#download-seg").is_visible()
    with page.expect_download() as download:
        page.get_by_role("link", name="Download mask PNG").click()
    saved = Path(download.value.path())
    assert download.value.suggested_filename == "dental-mask.png"
    assert (decode_png(saved.read_bytes()) == labels).all()

    page.set_viewport_size(NARROW)
    screenshot(page, tmp_path, "segmentation-narrow")
    assert_fits_the_window(page)


@pytest.mark.parametrize("kind", ["tiff", "dicom"])
def test_files_the_browser_cannot_show_are_drawn_from_the_service_answer(
    page: Any, service: Service, tmp_path: Path, kind: str
) -> None:
    image, _ = dental_png(seed=5, size=96)
    if kind == "tiff":
        name, mime, data = "dental.tif", "image/tiff", encode_image(image, "TIFF")
    else:
        name, mime, data = "dental.dcm", "application/dicom", make_dicom(image, bits_stored=8)
    open_viewer(page, service)
    page.get_by_label("Model", exact=True).select_option("teeth")
    upload(page, name, mime, data)
    page.locator("#segmentation").wait_for()
    labels = api_mask(service, "teeth", name, mime, data)
    assert (labels == expected_labels(image)).all()
    assert_overlay_drawn(canvas_pixels(page, "mask-canvas"), labels, visible={1, 2})
    # The grey image recovered from the service's overlay: within rounding of the pixels it read.
    base = canvas_pixels(page, "image-canvas").astype(int)
    assert base.shape[:2] == image.shape
    assert np.abs(base[:, :, 0] - image.astype(int)).max() <= 1
    seg_button = page.get_by_role("button", name="Download DICOM SEG")
    if kind == "tiff":
        assert not seg_button.is_visible()
        return
    with page.expect_download() as download:
        seg_button.click()
    assert download.value.suggested_filename == "dental-seg.dcm"
    seg = pydicom.dcmread(download.value.path())
    assert seg.Modality == "SEG"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(THRESHOLD_CLASSES[1:])
    screenshot(page, tmp_path, "segmentation-dicom")


# -- classification -------------------------------------------------------------------------------------------


def test_classification_shows_the_probabilities_as_bars_that_sum_to_100_percent(
    page: Any, service: Service, tmp_path: Path
) -> None:
    lesion = render_lesion(np.random.default_rng(11), 64, malignant=True)
    png = encode_image(lesion)
    open_viewer(page, service)
    page.get_by_label("Model", exact=True).select_option("lesion")
    upload(page, "lesion.png", "image/png", png)
    page.locator("#classification").wait_for()
    answer = httpx.post(
        f"{service.url}/classify", params={"model": "lesion"}, files={"file": ("lesion.png", png)}, timeout=60
    ).json()["predictions"][0]

    bars = page.locator("#bars li")
    assert bars.count() == 2
    shown = {}
    for bar in bars.all():
        text = bar.locator(".bar-value").inner_text()
        assert text.endswith(" %")
        shown[bar.get_attribute("data-class")] = float(text.removesuffix(" %"))
    assert set(shown) == {"benign", "malignant"}
    assert sum(shown.values()) == pytest.approx(100.0, abs=0.5)
    for name, value in shown.items():
        assert value == pytest.approx(answer["probabilities"][name] * 100, abs=0.051)
    assert f"Most probable: {answer['label']}" in page.locator("#predicted").inner_text()
    # The bars are drawn at their widths; the image is shown.
    widths = page.evaluate(
        "() => [...document.querySelectorAll('#bars .bar-fill')].map(e => e.getBoundingClientRect().width /"
        " e.parentElement.getBoundingClientRect().width)"
    )
    assert sorted(widths, reverse=True) == pytest.approx(
        sorted((v / 100 for v in shown.values()), reverse=True), abs=0.01
    )
    assert (canvas_pixels(page, "image-canvas")[:, :, 0] == lesion).all()
    # Nothing to warn about with this checkpoint (it has no out-of-distribution statistics).
    assert not page.locator("#ood-warning").is_visible()
    screenshot(page, tmp_path, "classification")
    assert_fits_the_window(page)
    page.set_viewport_size(NARROW)
    screenshot(page, tmp_path, "classification-narrow")
    assert_fits_the_window(page)


def explanation_of(service: Service, png: bytes, target: str | None = None) -> dict[str, str]:
    params = {"model": "lesion", "explain": "gradcam", **({"target": target} if target else {})}
    response = httpx.post(
        f"{service.url}/classify", params=params, files={"file": ("lesion.png", png)}, timeout=120
    )
    assert response.status_code == 200, response.text
    explanation: dict[str, str] = response.json()["predictions"][0]["explanation"]
    return explanation


def shown_explanation(page: Any) -> np.ndarray:
    src = page.locator("#explanation-image").get_attribute("src") or ""
    assert src.startswith("data:image/png;base64,")
    return decode_png(base64.b64decode(src.split(",", 1)[1])).astype(int)


def test_classification_shows_the_explanation_map_over_the_image_with_a_toggle(
    page: Any, service: Service, tmp_path: Path
) -> None:
    lesion = render_lesion(np.random.default_rng(11), 64, malignant=True)
    png = encode_image(lesion)
    open_viewer(page, service)
    page.get_by_label("Model", exact=True).select_option("lesion")
    assert "Grad-CAM" in page.locator("#model-info").inner_text()
    upload(page, "lesion.png", "image/png", png)
    page.locator("#explanation-controls").wait_for()
    label = page.locator("#predicted").inner_text().removeprefix("Most probable: ").split(" (")[0]

    # The service's overlay of the map, at the image's size, exactly over the image.
    expected = explanation_of(service, png)
    assert expected["target"] == label
    shown = shown_explanation(page)
    assert shown.shape == (*lesion.shape, 3)
    assert np.abs(shown - decode_png(base64.b64decode(expected["overlay_png"])).astype(int)).max() <= 1
    image_box = page.locator("#image-canvas").bounding_box()
    map_box = page.locator("#explanation-image").bounding_box()
    assert image_box is not None and map_box is not None
    assert map_box == pytest.approx(image_box, abs=1)
    toggle = page.get_by_label("Show the Grad-CAM map")
    assert toggle.is_checked() and f"“{label}”" in page.locator("#explanation-label").inner_text()
    screenshot(page, tmp_path, "explanation")

    # The toggle hides and shows it (keyboard).
    toggle.focus()
    page.keyboard.press("Space")
    assert not page.locator("#explanation-image").is_visible()
    page.keyboard.press("Space")
    assert page.locator("#explanation-image").is_visible()

    # Another class explained on request (target=).
    other = "benign" if label == "malignant" else "malignant"
    page.get_by_label("Explain the class").select_option(other)
    page.locator("#explanation-label", has_text=f"“{other}”").wait_for()
    wanted = explanation_of(service, png, target=other)
    assert wanted["target"] == other
    assert np.abs(shown_explanation(page) - decode_png(base64.b64decode(wanted["overlay_png"]))).max() <= 1


def test_a_dicom_classification_is_shown_through_its_explanation_map(page: Any, service: Service) -> None:
    lesion = render_lesion(np.random.default_rng(13), 64, malignant=False)
    open_viewer(page, service)
    page.get_by_label("Model", exact=True).select_option("lesion")
    upload(page, "lesion.dcm", "application/dicom", make_dicom(lesion, bits_stored=8))
    page.locator("#classification").wait_for()
    assert page.locator("#bars li").count() == 2
    # The browser cannot decode DICOM: the explanation overlay (the image as the service read it, with the
    # map) is the only picture; hiding the map leaves the note that says why there is no image.
    assert not page.locator("#image-canvas").is_visible()
    assert page.locator("#explanation-image").is_visible()
    page.get_by_label("Show the Grad-CAM map").uncheck()
    assert page.locator("#no-preview").is_visible()
    assert not page.locator("#explanation-image").is_visible()


def test_dropping_a_file_on_the_page_analyses_it(page: Any, service: Service) -> None:
    png = encode_image(render_lesion(np.random.default_rng(12), 64, malignant=False))
    open_viewer(page, service)
    page.get_by_label("Model", exact=True).select_option("lesion")
    transfer = page.evaluate_handle(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            return transfer;
        }""",
        base64.b64encode(png).decode(),
    )
    page.dispatch_event("#result", "dragover", {"dataTransfer": transfer})
    assert "dragging" in (page.locator("#dropzone").get_attribute("class") or "")
    page.dispatch_event("#result", "drop", {"dataTransfer": transfer})
    page.locator("#classification").wait_for()
    assert page.locator("#bars li").count() == 2
    assert "dragging" not in (page.locator("#dropzone").get_attribute("class") or "")


# -- the out-of-distribution warning --------------------------------------------------------------------------


def test_a_flagged_answer_shows_the_out_of_distribution_warning(
    page: Any, service: Service, tmp_path: Path
) -> None:
    png = encode_image(render_lesion(np.random.default_rng(14), 64, malignant=True))
    answer = httpx.post(
        f"{service.url}/classify", params={"model": "lesion-ood"}, files={"file": ("l.png", png)}, timeout=60
    ).json()["predictions"][0]
    assert answer["ood"]["flagged"] is True
    open_viewer(page, service)
    page.get_by_label("Model", exact=True).select_option("lesion-ood")
    upload(page, "lesion.png", "image/png", png)
    warning = page.locator("#ood-warning")
    warning.wait_for()
    assert warning.get_attribute("role") == "alert"
    text = warning.inner_text()
    assert "Out of distribution" in text and "do not rely on it" in text
    shown = re.search(r"score (\S+), threshold (\S+)\)", text)
    assert shown, text
    assert float(shown.group(1)) == pytest.approx(answer["ood"]["score"], rel=0.005)
    assert float(shown.group(2)) == pytest.approx(answer["ood"]["threshold"], rel=0.005)
    assert page.locator("#bars li").count() == 2  # the answer is still shown, under the warning
    screenshot(page, tmp_path, "ood-warning")
    assert_fits_the_window(page)

    # Segmentation of the same file: flagged (the format=json answer says so), then by a model that does not
    # flag it, and by one without statistics: the warning goes.
    for model, flagged in (("teeth-ood", True), ("teeth-ok", False), ("teeth", False)):
        page.get_by_label("Model", exact=True).select_option(model)
        page.locator("#status", has_text=f"Answered by {model} (").wait_for()
        assert page.locator("#segmentation").is_visible()
        assert warning.is_visible() is flagged, model


# -- errors and the API key -----------------------------------------------------------------------------------


def test_a_broken_file_shows_the_problem_detail_not_json(page: Any, service: Service, tmp_path: Path) -> None:
    broken = b"\x89PNG\r\n\x1a\n this is not really a PNG"
    problem = httpx.post(
        f"{service.url}/segment",
        params={"model": "teeth", "format": "json"},
        files={"file": ("broken.png", broken, "image/png")},
        timeout=60,
    ).json()
    open_viewer(page, service)
    page.get_by_label("Model", exact=True).select_option("teeth")
    upload(page, "broken.png", "image/png", broken)
    alert = page.locator("#error")
    alert.wait_for()
    assert alert.get_attribute("role") == "alert"
    assert page.locator("#error-detail").inner_text() == problem["detail"]
    assert page.locator("#error-title").inner_text() == problem["title"]
    assert "{" not in alert.inner_text() and "/problems/" not in alert.inner_text()
    assert not page.locator("#view").is_visible() and not page.locator("#segmentation").is_visible()
    screenshot(page, tmp_path, "error")


def test_keyboard_reaches_every_control_in_order(page: Any, service: Service) -> None:
    open_viewer(page, service)
    order = []
    for _ in range(8):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.id || document.activeElement.tagName"))
    assert order.index("model") < order.index("file"), order
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, button, a[href]')]
            .filter(e => e.offsetParent !== null)
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                         && !e.textContent.trim())
            .map(e => e.id || e.outerHTML)"""
    )
    assert not unlabelled, unlabelled


@pytest.fixture(scope="module")
def keyed_service(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("viewer-keyed")
    keys = f"{KEY},{ADMIN_KEY}:admin"  # the second may only replace models: no inference
    with running_service(model_dir, workdir, env={"MEDSERVE_API_KEYS": keys}) as running:
        yield running


def test_with_api_keys_the_page_asks_for_the_key_and_then_shows_the_result(
    page: Any, keyed_service: Service, tmp_path: Path
) -> None:
    assert httpx.get(keyed_service.url + "/models").status_code == 401
    open_viewer(page, keyed_service, wait_models=False)
    key_field = page.get_by_label("API key")
    key_field.wait_for()
    assert page.evaluate("() => document.activeElement.id") == "api-key"
    assert "needs an API key" in page.locator("#key-reason").inner_text()
    screenshot(page, tmp_path, "api-key")
    # A wrong key is refused and asked for again; the right one opens the models.
    key_field.fill("not-the-right-key-000000")
    page.keyboard.press("Enter")
    page.locator("#key-reason", has_text="not accepted").wait_for()
    key_field.fill(KEY)
    page.get_by_role("button", name="Use key").click()
    page.locator("#model:enabled").wait_for()
    assert not key_field.is_visible()
    assert page.evaluate("() => sessionStorage.getItem('medserve.apiKey')") == KEY
    _, png = dental_png(seed=7, size=64)
    page.get_by_label("Model", exact=True).select_option("teeth")
    upload(page, "dental.png", "image/png", png)
    page.locator("#segmentation").wait_for()
    assert page.locator("#legend-list li").count() == len(THRESHOLD_CLASSES)
    # Forgetting the key: the next request asks for it again. A valid key without the scope the endpoint needs
    # (403) shows the problem's detail; with the right key the request runs.
    refused = httpx.post(
        f"{keyed_service.url}/segment",
        params={"model": "teeth"},
        files={"file": ("dental.png", png, "image/png")},
        headers={"X-API-Key": ADMIN_KEY},
        timeout=60,
    )
    assert refused.status_code == 403
    page.get_by_role("button", name="Forget API key").click()
    page.get_by_role("button", name="Analyse again").click()
    key_field.wait_for()
    key_field.fill(ADMIN_KEY)
    page.keyboard.press("Enter")
    page.locator("#error").wait_for()
    assert page.locator("#error-detail").inner_text() == refused.json()["detail"]
    assert not page.locator("#segmentation").is_visible()
    page.get_by_role("button", name="Forget API key").click()
    page.get_by_role("button", name="Analyse again").click()
    key_field.wait_for()
    key_field.fill(KEY)
    page.keyboard.press("Enter")
    page.locator("#segmentation").wait_for()
    assert not page.locator("#error").is_visible()
