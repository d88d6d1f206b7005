"""Schemathesis against a live service's OpenAPI document, with a valid token: every operation,
data that fits the schema and data that does not, bounded in examples and time. Fails on any 5xx
and on any answer the document does not describe (status code, content type, body schema)."""

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.security.conftest import AUTH_A, database, submit_sentinels  # noqa: E402
from tests.service.conftest import live_server, make_settings  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
MAX_EXAMPLES = 25        # per operation and mode
BUDGET_S = 45            # per database; the run stops generating when it is spent


def test_openapi_fuzzing_finds_no_5xx_and_no_undocumented_answer(tmp_path, db_kind,
                                                                  onnx_job_files):
    with database(db_kind, tmp_path) as db_url:
        _fuzz(make_settings(tmp_path, db_url, workers=0, max_upload_mb=2), onnx_job_files)


def _fuzz(settings, onnx_job_files):
    # workers=0: a job that the fuzzer manages to submit only queues, nothing heavy runs
    with live_server(settings) as url:
        import httpx

        with httpx.Client(base_url=url) as client:
            submit_sentinels(client, onnx_job_files)  # real ids for the job routes to meet
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 14, [op.label for op in operations]
        failures: dict[str, str] = {}
        calls = {"n": 0}
        deadline = time.monotonic() + BUDGET_S

        def fuzzer(operation, mode):
            @given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                                 phases=[Phase.explicit, Phase.generate],
                                 suppress_health_check=list(HealthCheck))
            def fuzz(case):
                if time.monotonic() > deadline:
                    return
                calls["n"] += 1
                try:
                    case.call_and_validate(base_url=url, headers=AUTH_A, checks=CHECKS,
                                           timeout=30)
                except (Exception, FailureGroup) as e:  # noqa: BLE001 - collect them all
                    key = f"{operation.label} [{mode.value}]"
                    failures.setdefault(key, f"{type(e).__name__}: {str(e)[:1500]}")

            return fuzz

        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    fuzzer(operation, mode)()
                except Unsatisfiable:  # no invalid input exists (an operation without inputs)
                    assert mode == GenerationMode.NEGATIVE, operation.label

        print(f"schemathesis: {calls['n']} calls, {len(operations)} operations, "
              f"{time.monotonic() - deadline + BUDGET_S:.0f} s")
        assert calls["n"] >= 100, calls  # the budget let it actually fuzz
        assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())
        # the service is still healthy after the run
        import httpx

        assert httpx.get(f"{url}/readyz").status_code == 200
