"""Ray reads its settings (token authentication, ...) once per process, when it is first
imported: ``sim`` sets them, so it is imported before any test module can import Ray."""

import sim  # noqa: F401
