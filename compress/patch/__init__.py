"""Thin code that patches third-party model classes; algorithms live elsewhere."""
