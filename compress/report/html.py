"""Render report.json as a self-contained HTML page (plots embedded as base64 PNG)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from jinja2 import Environment, PackageLoader
from markupsafe import Markup

from .verdict import speed_words, verdict


def _fmt(value, digits: int = 4):
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if abs(value) >= 1000 or value == int(value) and abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    if value is None:
        return "-"
    return value


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _speed(ratio) -> str:
    return "-" if ratio is None else speed_words(ratio)


def write_html(report: dict, out_dir: Path, path: Path) -> Path:
    # Everything in the report can come from a tenant (recipe name, description, layer names,
    # warnings), so every value is escaped; select_autoescape(["html"]) would not match the
    # template's .j2 name. Only the base64 plot data, made here, is marked safe.
    env = Environment(loader=PackageLoader("compress.report", "templates"), autoescape=True)
    env.filters["fmt"] = _fmt
    env.filters["mb"] = _mb
    env.filters["speed"] = _speed
    images = []
    for plot in report.get("plots", []):
        f = out_dir / plot["file"]
        if f.is_file():
            images.append({"title": plot["title"],
                           "data": Markup(base64.b64encode(f.read_bytes()).decode("ascii"))})
    html = env.get_template("report.html.j2").render(
        r=report, images=images, verdict=report.get("verdict") or verdict(report),
        recipe_json=json.dumps(report.get("recipe", {}), indent=2))
    path.write_text(html, encoding="utf-8")
    return path
