"""The dashboard end to end in headless Chromium (Debian's, driven by Playwright): pick a
bundled recipe, see inline validation, upload the digits ViT with its calibration images as a
zip, watch the job and open its report with plots."""

import json
import os
from pathlib import Path

import pytest

from service.client import zip_folder
from tests.service.conftest import live_server, make_settings

CHROMIUM = os.environ.get("COMPRESS_TEST_CHROMIUM", "/usr/bin/chromium")
# As the machine notes say: without the background-networking flags Chromium keeps trying to
# reach Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium at {CHROMIUM}; `make test` installs it")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.mark.slow
def test_upload_a_real_model_and_read_its_report(tmp_path, browser, digits_reference):
    calib_zip = zip_folder(digits_reference / "calib_images", tmp_path / "calib_images.zip")
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", workers=1)
    with live_server(settings) as url:
        page = browser.new_page()
        page.goto(f"{url}/#token=token-a")
        page.wait_for_selector("#recipe-select option[value=digits_vit_w8a8]", state="attached")
        assert "token" not in page.url  # the token moved to local storage
        page.select_option("#recipe-select", "digits_vit_w8a8")
        status = page.locator("#recipe-status")
        status.filter(has_text="valid: timm model, passes: quantize").wait_for()

        # an invalid edit is reported inline with its field path
        yaml_text = page.input_value("#recipe-yaml")
        assert "activations: {bits: 8, observer: minmax}" in yaml_text
        page.fill("#recipe-yaml", yaml_text.replace("{bits: 8, observer", "{bits: 9, observer"))
        page.locator("#recipe-errors li", has_text="passes.0.activations.bits").wait_for()
        assert "invalid" in page.get_attribute("#recipe-yaml", "class")

        # fixed, and made quicker for the test: no latency measurement
        page.fill("#recipe-yaml", yaml_text.replace("repeats: 50", "enabled: false"))
        status.filter(has_text="valid:").wait_for()
        page.set_input_files("#model-file", str(digits_reference / "model.safetensors"))
        page.set_input_files("#calib-file", str(calib_zip))
        page.set_input_files("#eval-file", str(digits_reference / "eval.npz"))
        page.click("#submit")

        row = page.locator("#jobs tbody tr", has_text="digits-vit-w8a8")
        row.wait_for()
        page.locator("#detail-state").filter(has_text="running").wait_for(timeout=30_000)
        page.locator("#report").wait_for(state="visible", timeout=180_000)
        assert page.locator("#detail-state").inner_text() == "succeeded"
        assert "finished: succeeded" in page.inner_text("#job-log")
        assert row.locator(".badge").inner_text() == "succeeded"

        report = page.frame_locator("#report-frame")
        report.locator("h1", has_text="Compression report").wait_for()
        assert report.locator("text=Quality gate").count() >= 1
        assert report.locator("img[src^='data:image/png;base64']").count() >= 1  # the plots
        artifacts = page.locator("#artifact-list li").all_inner_texts()
        assert any(a.startswith("model.onnx") for a in artifacts)
        with page.expect_download() as dl:
            page.locator("#artifact-list a", has_text="report.json").click()
        report_json = json.loads(Path(dl.value.path()).read_text())
        assert report_json["data"]["calibration"]["format"] == "imagefolder"
        assert report_json["metrics"]["compressed"]["top1"] > 0.95  # W8A8 keeps the digits ViT
        assert report_json["gate"]["passed"]
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
