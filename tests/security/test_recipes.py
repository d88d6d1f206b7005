"""Hostile recipes, through job submission and through /v1/recipes/validate: YAML tags never
construct objects, aliases and nesting cannot exhaust the server, no field names a server file
(paths, reference: escapes, constructor kwargs), --set edits get the same checks, and every size
has a bound. Each answers 422 (413 for oversized bodies) naming the field."""

import struct
import time

import pytest
import yaml

from tests.security.conftest import error_of, onnx_recipe

MARKER_NAME = "recipe-code-ran"


def onnx_doc() -> dict:
    return yaml.safe_load(onnx_recipe())


def timm_doc(**model) -> dict:
    return {"version": 1, "name": "t", "model": {"source": "timm", "name": "test_vit", **model},
            "evaluation": {"num_samples": 8, "batch_size": 8, "latency": {"enabled": False}}}


def tiny_safetensors() -> bytes:
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    return struct.pack("<Q", len(header)) + header + b"\0\0\0\0"


def send(api, route: str, recipe, *, sets=(), uploads=("model",)):
    """Submit ``recipe`` (dict or text) as a job with a matching model upload, or validate it."""
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    if route == "validate":
        return "POST", "/v1/recipes/validate", {"json": {"yaml": text, "uploads": list(uploads),
                                                         "set": list(sets)}}
    timm = "source: timm" in text
    model = ("m.safetensors", tiny_safetensors()) if timm else ("m.onnx", b"onnx")
    files = {"model": model} if "model" in uploads else {}
    return "POST", "/v1/jobs", {"data": {"recipe": text, "set": list(sets)}, "files": files}


def refuse(api, route, recipe, *needles, loc=None, sets=(), uploads=("model",), status=422):
    method, path, kw = send(api, route, recipe, sets=sets, uploads=uploads)
    return api.refused(method, path, status, *needles, loc=loc, **kw)


ROUTES = ["jobs", "validate"]


# ------------------------------------------------------------------------------- YAML

def tag_recipes(marker: str) -> dict[str, str]:
    touch = f"['touch {marker}']"
    return {
        "python/object/apply": f"!!python/object/apply:os.system {touch}\n",
        "python/object/new": f"!!python/object/new:subprocess.check_call [{touch}]\n",
        "python/name": "version: 1\nname: !!python/name:os.system\n",
        "python/module": "version: 1\nname: !!python/module:os\n",
        "tag in a value": f"version: 1\nmodel: !!python/object/apply:os.system {touch}\n",
        "local tag": "version: 1\nname: !include /etc/passwd\n",
        "tag in a nested value": (onnx_recipe().replace(
            "name: tiny-onnx", f"name: !!python/object/apply:os.system {touch}")),
    }


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(tag_recipes("x")))
def test_yaml_tags_never_construct_objects(api, route, case, tmp_path):
    marker = tmp_path / MARKER_NAME
    refuse(api, route, tag_recipes(marker)[case], ("not valid YAML", "tag", "constructor"))
    assert not marker.exists(), "a YAML tag ran code"


def billion_laughs(levels: int = 9) -> str:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("where", ["unknown keys", "name", "passes", "batch sizes", "kwargs"])
def test_billion_laughs_aliases_answer_fast(api, route, where):
    """9**9 strings by reference: refused as a wrong type without walking the expansion."""
    body = {"unknown keys": "version: 1\nmodel: {source: onnx, path: m.onnx}\n",
            "name": "version: 1\nname: *l9\nmodel: {source: onnx, path: m.onnx}\n",
            "passes": "version: 1\npasses: *l9\nmodel: {source: onnx, path: m.onnx}\n",
            "batch sizes": "version: 1\nmodel: {source: onnx, path: m.onnx}\n"
                           "evaluation: {latency: {batch_sizes: *l9}}\n",
            "kwargs": "version: 1\nmodel: {source: timm, name: test_vit, kwargs: "
                      "{img_size: *l9}}\n"}[where]
    started = time.monotonic()
    err = refuse(api, route, billion_laughs() + body, "invalid recipe")
    assert time.monotonic() - started < 10
    assert len(err["message"]) < 20_000  # the expansion is never written out


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape", ["lists", "mappings", "flow mappings"])
def test_deeply_nested_yaml_is_bad_input(api, route, shape):
    """A RecursionError in the parser or validator is the recipe's fault: 422 (defect 5)."""
    depth = 5000
    text = {"lists": "version: 1\nname: " + "[" * depth + "]" * depth + "\n",
            "mappings": "version: 1\nname:\n" + "".join(
                " " * i + f"k{i}:\n" for i in range(1, 400)) + " " * 400 + "v\n",
            "flow mappings": "version: 1\nname: " + "{a: " * depth + "1" + "}" * depth}[shape]
    refuse(api, route, text, ("nest", "deep", "depth", "invalid recipe", "valid string"))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("doc", ["", "null", "[1, 2]", "just text", "42", "\x00\x01binary"],
                         ids=["empty", "null", "list", "text", "number", "control chars"])
def test_recipe_that_is_not_a_mapping(api, route, doc):
    refuse(api, route, doc, ("mapping", "not valid YAML", "control", "special characters",
                             "field required", "send a recipe"))


def test_recipe_text_field_over_1_mib_is_413(api):
    text = onnx_recipe() + "#" * (1 << 20)
    api.refused("POST", "/v1/jobs", 413, "recipe", data={"recipe": text},
                files={"model": ("m.onnx", b"onnx")})


def test_recipe_file_over_1_mib_is_413(api):
    text = onnx_recipe() + "#" * (1 << 20)
    api.refused("POST", "/v1/jobs", 413, "recipe",
                files={"recipe": ("r.yaml", text.encode()), "model": ("m.onnx", b"onnx")})


def test_recipe_over_1_mib_to_validate_is_refused(api):
    text = onnx_recipe() + "#" * (1 << 20)
    method, path, kw = send(api, "validate", text)
    r = api.client.request(method, path, headers=api.headers(), **kw)
    error_of(r, r.status_code, ("larger than 1", "too large"))
    assert r.status_code in (413, 422)


@pytest.mark.parametrize("route", ROUTES)
def test_many_unknown_fields_are_answered_quickly_and_briefly(api, route):
    """5,000 misspelt keys (a 50 KB recipe; 1 MiB holds 100,000) must not cost seconds of CPU
    per request or an answer of megabytes: the error list is bounded (new defect: quadratic
    de-duplication in compress.recipe._format_errors and no cap on the errors reported)."""
    doc = onnx_doc()
    doc.update({f"k{i}": 1 for i in range(5_000)})
    method, path, kw = send(api, route, doc)
    started = time.monotonic()
    r = api.client.request(method, path, headers=api.headers(), **kw)
    elapsed = time.monotonic() - started
    error_of(r, 422, "unknown field")
    assert len(r.content) < 100_000, len(r.content)
    assert elapsed < 20, elapsed


# ------------------------------------------------------------------------ server paths

SERVER_PATHS = ["/etc/passwd", "../../../etc/passwd", "~/.ssh/id_rsa", "file:///etc/passwd",
                "http://169.254.169.254/latest/meta-data", "jobs.db",
                "reference:digits-vit/../../../etc/passwd", "reference:digits-vit//etc/passwd",
                "reference:../etc/passwd", "reference:digits-vit/..\\..\\secret",
                "reference:no-such-model/calib.npz"]
PATH_NEEDLES = ("server paths", "reference", "no '..'", "outside")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("value", SERVER_PATHS)
@pytest.mark.parametrize("field", ["model.path", "evaluation.path", "calibration.path"])
def test_recipe_paths_never_name_server_files(api, route, field, value):
    doc = onnx_recipe([{"type": "ort_quantize"}])
    doc = yaml.safe_load(doc)
    section, key = field.split(".")
    doc[section][key] = value
    uploads = [u for u in ("model", "calib", "eval")
               if {"model": "model.path", "calib": "calibration.path",
                   "eval": "evaluation.path"}[u] != field]
    refuse(api, route, doc, PATH_NEEDLES, loc=field, uploads=uploads)


@pytest.mark.parametrize("route", ROUTES)
def test_timm_weights_never_name_server_files(api, route):
    refuse(api, route, timm_doc(weights="/etc/passwd"), PATH_NEEDLES, loc="model.weights",
           uploads=())


KWARGS = {"checkpoint_path": "/etc/passwd", "pretrained_file": "/etc/passwd",
          "pretrained": True, "cache_dir": "/tmp",
          "pretrained_cfg_overlay": {"file": "/etc/passwd"},
          "pretrained_cfg": {"url": "http://example.com/w.pth"}, "__class__": "x"}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("key", list(KWARGS))
def test_model_kwargs_never_reach_files_or_network(api, route, key):
    """model.kwargs is an allow-list of architecture arguments (defect 1)."""
    refuse(api, route, timm_doc(kwargs={key: KWARGS[key]}), "model.kwargs",
           loc="model.kwargs")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("assignment", ["model.kwargs.checkpoint_path=/etc/passwd",
                                        "model.kwargs={checkpoint_path: /etc/passwd}",
                                        "model.kwargs.pretrained=true"])
def test_set_cannot_smuggle_kwargs(api, route, assignment):
    refuse(api, route, timm_doc(), "model.kwargs", loc="model.kwargs", sets=[assignment])


# ------------------------------------------------------------------------------- --set

SET_CASES = {  # assignment -> (needle, loc of the error or None: the message names --set)
    "python tag": ("model.path=!!python/object/apply:os.system ['touch {marker}']",
                   ("tag", "not valid YAML", "constructor"), None),
    "python name tag": ("name=!!python/name:os.system", ("tag", "constructor"), None),
    "invalid YAML": ("evaluation.batch_size=[1", ("not valid YAML", "not plain YAML"), None),
    "deep YAML": ("name=" + "[" * 5000, ("nest", "deep"), None),
    "no equals sign": ("evaluation.batch_size", "KEY=VALUE", None),
    "empty key": ("=5", "KEY=VALUE", None),
    "index past the end": ("passes.99.type=quantize", "not an index", None),
    "into a value": ("model.path.x=1", "not a section", None),
    "server path": ("evaluation.path=/etc/passwd", "server paths", "evaluation.path"),
    "reference escape": ("evaluation.path=reference:digits-vit/../../x", "no '..'",
                         "evaluation.path"),
    "unknown field": ("__class__.__init__=1", "unknown field", "__class__"),
    "huge batch": ("evaluation.batch_size=1000000000", "less than", "evaluation.batch_size"),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(SET_CASES))
def test_set_edits_get_the_same_checks(api, route, case, tmp_path):
    marker = tmp_path / MARKER_NAME
    assignment, needle, loc = SET_CASES[case]
    err = refuse(api, route, onnx_doc(), needle, loc=loc,
                 sets=[assignment.replace("{marker}", str(marker))])
    if loc is None:
        assert err["message"].startswith("--set"), err
    assert not marker.exists()


# ------------------------------------------------------------------------------ bounds

BOUNDS = {  # field -> (value, needle); every size has an upper bound a real model needs
    "export.verify_batch_sizes": ([10**9], "less than"),
    "evaluation.latency.batch_sizes": ([10**9], "less than"),
    "evaluation.latency.repeats": (10**9, "less than"),
    "evaluation.batch_size": (-1, "greater than"),
    "evaluation.num_samples": (10**12, "less than"),
    "evaluation.latency.batch_sizes ": ([-8], ("greater than", "positive")),
    "model.preprocess.input_size": ([1, 100000, 100000], "less than"),
    "model.preprocess.input_size ": ([3, -224, 224], "greater than"),
    "model.kwargs.img_size": (1_000_000, "less than"),
    "model.kwargs.depth": (10**6, "less than"),
    "calibration.num_samples": (-5, "greater than"),
    "evaluation.gate.max_kl": (float("nan"), ("finite", "nan")),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field", list(BOUNDS))
def test_every_size_is_bounded(api, route, field):
    """Defect 6: 1e9 batch sizes, 100000-pixel sides and negative sizes are refused."""
    value, needle = BOUNDS[field]
    path = field.strip()
    doc = timm_doc() if path.startswith("model.") else onnx_doc()
    if path.startswith("calibration."):
        doc = yaml.safe_load(onnx_recipe([{"type": "ort_quantize"}]))
    node = doc
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    uploads = ("model", "calib") if path.startswith("calibration.") else ("model",)
    refuse(api, route, doc, needle, loc=path, uploads=uploads)
