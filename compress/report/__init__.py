"""report.json (versioned) and report.html."""

from .builder import REPORT_SCHEMA_VERSION, environment_info
from .html import write_html

__all__ = ["REPORT_SCHEMA_VERSION", "environment_info", "write_html"]
