"""Measurements against named anchors (`mmfm bench ...`); each prints one JSON object."""
