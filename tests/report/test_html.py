"""report.html escapes everything a tenant can put in a report."""

import base64

from compress.report import write_html

SCRIPT = "<script>alert('x')</script>"


def _report(**recipe) -> dict:
    return {
        "recipe": {"name": "r", "description": "", **recipe},
        "model": {"source": "timm", "name": "test_vit", "task": "image-classification",
                  "params": 1000},
        "created_at": "2026-01-01T00:00:00+00:00",
        "environment": {"versions": {"compress": "0", "onnxruntime": "1"}, "cpu": "cpu"},
        "gate": {"passed": True, "checks": []},
        "data": {"evaluation": {"samples": 4, "path": "eval.npz"}},
        "metrics": {"original": {"kl": 0.0}},
        "size": {"original_bytes": 10, "compressed_bytes": 5, "ratio": 2.0},
        "latency": {},
        "passes": [{"index": 0, "type": "quantize", "seconds": 1.0, "summary": {"note": SCRIPT}}],
        "layers": [{"name": f"blocks.0.{SCRIPT}", "kind": "Linear", "params": 10}],
        "export": {"artifacts": [], "parity": [], "op_histogram": {}},
        "warnings": [f"warning {SCRIPT}"],
        "stages": {"load": 0.1},
        "plots": [{"title": "Latency", "file": "plots/latency.png"}],
    }


def test_script_in_name_description_and_report_values_is_escaped(tmp_path):
    png = b"\x89PNG\r\n\x1a\n fake png bytes"
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "latency.png").write_bytes(png)
    path = write_html(_report(name=SCRIPT, description=f"about {SCRIPT} & more"), tmp_path,
                      tmp_path / "report.html")
    html = path.read_text()
    assert "<script" not in html.lower()
    assert "<title>compress report: &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;</title>" in html
    assert "<p>about &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more</p>" in html
    assert "warning &lt;script&gt;" in html and "blocks.0.&lt;script&gt;" in html
    # The plot is the one pre-rendered part and is embedded as it is.
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}\"" in html
