"""report.json (versioned) and report.html."""

from .builder import REPORT_SCHEMA_VERSION, environment_info, strict_json
from .html import write_html

__all__ = ["REPORT_SCHEMA_VERSION", "environment_info", "strict_json", "write_html"]
