"""The pure core: parsing, rules and decisions. No I/O, no framework, no clock, no globals.

Everything here works on small frozen dataclasses built at the edge; the layers above (persistence,
use cases, the HTTP/CLI/operator shells) pass in what the core needs and act on what it answers.
``make lint`` (import-linter) keeps every import of this package pointing down.
"""
