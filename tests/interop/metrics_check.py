#!/usr/bin/env python3
"""Interop check: parse a broker's Prometheus endpoint with the Prometheus project's own
OpenMetrics parser (prometheus-client on PyPI).

Usage: python3 metrics_check.py URL

Prints one line per sample, `name{label="value",...} value`, and exits 0; a body the parser
rejects prints `FAIL: <why>` on stderr and exits 1.
"""
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main():
    url = sys.argv[1]
    with urllib.request.urlopen(url, timeout=10) as response:
        content_type = response.headers.get("Content-Type", "")
        body = response.read().decode("utf-8")
    if not content_type.startswith("application/openmetrics-text"):
        print(f"FAIL: content type {content_type!r}", file=sys.stderr)
        return 1
    try:
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                print(f"{sample.name}{{{labels}}} {sample.value}")
    except Exception as e:  # the parser's verdict on our format
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
