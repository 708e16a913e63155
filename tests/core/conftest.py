"""Settings of the core's tests."""

from hypothesis import settings

# The machine may be busy (a Go build, other suites): judge properties, not speed.
settings.register_profile("gpushare", deadline=None)
settings.load_profile("gpushare")
