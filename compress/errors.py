"""Exceptions raised by compress.

    CompressError                 base class; ``exit_code`` is what the CLI returns
    ├── InputError                the user's input is wrong (exit 2, HTTP 422)
    │   ├── RecipeError           recipe YAML or a field in it; ``errors`` lists (path, message)
    │   ├── ModelLoadError        a model file or folder cannot be read or does not fit
    │   │   ├── UnsupportedModelError   the architecture or task is not supported by a pass
    │   │   └── NonFiniteError    weights, or the model's outputs on the data, hold NaN or Inf
    │   └── DataError             calibration or evaluation data cannot be read or does not fit
    ├── PassError                 a pass failed on valid input (exit 1); keeps ``__cause__``
    ├── ExportError               ONNX export or ONNX Runtime verification failed (exit 1)
    ├── CancelledError            the job was cancelled through its progress callback (exit 1)
    └── QualityGateError          the compressed model missed the recipe's gate (exit 3)

Programming errors (TypeError, AttributeError, ...) are not wrapped: they are bugs, not input.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3


class CompressError(Exception):
    exit_code = EXIT_FAILURE

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "message": str(self)}


class InputError(CompressError):
    exit_code = EXIT_BAD_INPUT


class RecipeError(InputError):
    """A recipe does not validate.

    ``errors`` is a list of ``(field_path, message)``; ``field_path`` is dotted with list indices,
    e.g. ``passes.0.weights.bits``, so an API can return it as a 422 ``loc``.
    """

    def __init__(self, message: str, errors: list[tuple[str, str]] | None = None, source: str = ""):
        self.errors = errors or []
        self.source = source
        lines = [message] + [f"  - {path or '<root>'}: {msg}" for path, msg in self.errors]
        super().__init__("\n".join(lines))

    def to_dict(self) -> dict:
        return {
            "type": type(self).__name__,
            "message": str(self),
            "errors": [{"loc": path, "msg": msg} for path, msg in self.errors],
        }


class ModelLoadError(InputError):
    pass


class UnsupportedModelError(ModelLoadError):
    pass


class NonFiniteError(ModelLoadError):
    """NaN or Inf in a checkpoint's tensors or in the original model's outputs: bad input."""


class DataError(InputError):
    pass


class PassError(CompressError):
    def __init__(self, index: int, pass_type: str, message: str):
        self.index = index
        self.pass_type = pass_type
        super().__init__(f"pass {index} ({pass_type}) failed: {message}")


class ExportError(CompressError):
    pass


class CancelledError(CompressError):
    pass


class QualityGateError(CompressError):
    exit_code = EXIT_GATE_FAILED

    def __init__(self, failures: list[str], report_path: str | None = None):
        self.failures = failures
        self.report_path = report_path
        where = f" (report: {report_path})" if report_path else ""
        listed = "\n".join(f"  - {f}" for f in failures)
        super().__init__("quality gate failed" + where + ":\n" + listed)
