"""The HTTP side: admin JSON API, web view, Prometheus metrics and health checks.

One twisted.web Site on the bridge's reactor (so a change made here is serialised with HL7
changes, which run on the same thread). See docs/http-api.md.
"""
