"""The verdict line and the wording of speed ratios: a ratio below 1 is a slowdown."""

import math

import pytest

from compress.report import write_html
from compress.report.verdict import (
    paired_difference_ci,
    speed_words,
    verdict,
    wilson_interval,
)
from tests.report.test_html import _report


@pytest.mark.parametrize("ratio, words", [(0.362, "2.76× slower"), (0.5, "2.00× slower"),
                                          (1.0, "1.00× faster"), (1.85, "1.85× faster")])
def test_speed_words(ratio, words):
    assert speed_words(ratio) == words


def test_wilson_interval_matches_the_textbook_value():
    lo, hi = wilson_interval(0.5, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert wilson_interval(1.0, 50)[1] == 1.0 and wilson_interval(1.0, 50)[0] < 1


def test_paired_difference_ci_uses_the_discordant_samples():
    # 500 samples: the compressed model lost 10 that the original got right and gained 4.
    change, half = paired_difference_ci(lost=10, gained=4, n=500)
    assert change == pytest.approx(-1.2)
    assert half == pytest.approx(1.959964 * math.sqrt(14 - 36 / 500) / 500 * 100)  # 1.46 points
    # no sample changed: the rule of three bounds the change at 3/n
    assert paired_difference_ci(0, 0, 300) == (0.0, 1.0)


def _full_report(speedup, drop=None, passed=True, sizes=(2_000_000, 500_000)):
    r = _report()
    r["size"] = {"original_bytes": sizes[0], "compressed_bytes": sizes[1],
                 "ratio": round(sizes[0] / sizes[1], 3)}
    r["latency"] = {"original": dict.fromkeys(speedup, 1.0),
                    "compressed": {b: 1 / s for b, s in speedup.items()}, "speedup": speedup,
                    "threads": 2, "repeats": 5}
    r["data"]["evaluation"]["samples"] = 500
    r["metrics"] = {"original": {"top1": 0.9, "top1_agreement": 1.0},
                    "compressed": {"top1": 0.888, "top1_agreement": 0.97},
                    "drop": drop or {"top1_points": 1.2, "lost": 10, "gained": 4,
                                     "samples": 500}}
    r["gate"] = {"passed": passed, "checks": [{"metric": "speedup_batch_1", "limit": 1.0,
                                               "value": speedup.get("1", 1), "passed": passed}]}
    return r


def test_verdict_line():
    v = verdict(_full_report({"1": 0.362, "8": 1.5}, passed=False))
    assert v["line"] == ("smaller by 4.00× (2.00 MB → 0.50 MB), slower by 2.76× at batch 1, "
                         "faster by 1.50× at batch 8, accuracy change -1.20 ± 1.46 points "
                         "(top-1, 95% CI, n=500), gate failed")
    assert [p["bad"] for p in v["parts"]] == [False, True, False, True, True]


def test_verdict_without_labels_gives_agreement_with_a_wilson_interval():
    r = _full_report({"1": 2.0}, sizes=(1_000_000, 1_250_000))
    del r["metrics"]["original"]["top1"], r["metrics"]["compressed"]["top1"]
    r["gate"] = {"passed": True, "checks": []}
    v = verdict(r)
    assert v["line"] == ("larger by 1.25× (1.00 MB → 1.25 MB), faster by 2.00× at batch 1, "
                         "top-1 agreement with the original 97.00% (95% CI 95.1-98.2%, n=500; "
                         "no labels), no gate configured")


def test_report_html_words_a_slowdown_as_slower_in_red_with_the_verdict_on_top(tmp_path):
    r = _full_report({"1": 0.362, "8": 1.5}, passed=False)
    r["plots"] = []
    html = write_html(r, tmp_path, tmp_path / "report.html").read_text()
    top = html.index('id="verdict"')
    assert top < html.index("<h2>Quality gate</h2>")
    assert '<span class="bad">slower by 2.76× at batch 1</span>' in html
    assert '<td class="num bad">2.76× slower</td>' in html
    assert '<td class="num">1.50× faster</td>' in html
    assert "0.362" not in html and "0.36× faster" not in html
